"""Read a model config (transformers ``PretrainedConfig``, dict, or config.json) into
:class:`~yarn_triton.rope.RopeParams`.

The parsing itself lives in :mod:`yarn_triton.config_parsing` (which
:meth:`RopeParams.from_config <yarn_triton.rope.RopeParams.from_config>` uses); this module
sits on top of :mod:`yarn_triton.rope` in the import graph and offers the function form,
:func:`rope_params_from_config`, plus the parsing helpers under their established names.
"""

from __future__ import annotations

from typing import Any, Optional

from .config_parsing import SUPPORTED_ROPE_TYPES, load_config_dict, rope_dim_from_config, rope_spec_from_config
from .rope import RopeParams

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "load_config_dict",
    "rope_dim_from_config",
    "rope_params_from_config",
    "rope_spec_from_config",
]


def rope_params_from_config(config: Any, *, layer_type: Optional[str] = None) -> RopeParams:
    """:class:`RopeParams` for a model config, as the installed transformers computes them.

    The same as :meth:`RopeParams.from_config`; the rules (where ``rope_theta``, the rotary
    dimension, the original length and the YaRN / LongRoPE / llama3 keys are read from, and
    which contradictions raise) are those of
    :func:`yarn_triton.config_parsing.rope_spec_from_config`. Dynamic and longrope results
    depend on the sequence length: use :meth:`RopeParams.for_seq_len` or
    :class:`~yarn_triton.rope.RopeTracker`.

    Args:
        config: ``PretrainedConfig``, dict, or path to config.json (or its folder).
        layer_type: for configs with a rope dict per layer type, which one to read.

    Raises:
        ValueError: unknown rope type (the message lists the supported ones), a required
            key missing, a value out of range (named), or two places of the config giving
            different values (both named).
        TypeError: ``config`` of an unsupported kind, or a non-numeric value.
    """
    return RopeParams.from_config(config, layer_type=layer_type)
