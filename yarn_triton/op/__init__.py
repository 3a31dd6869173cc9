"""The op layer: argument checking, geometry, custom ops and autograd.

Data flows one way: the public functions check everything a caller can get wrong (before
any launch, so a bad call raises and leaves q and k untouched), then run either directly
(eager) or through the ``torch.library`` custom ops (under ``torch.compile``, and for
autograd), which end in :func:`~.launch._execute`: the kernel for CUDA tensors (and CPU
tensors under ``TRITON_INTERPRET=1``), the PyTorch reference for other CPU tensors.

One concern per module, each importing only those before it::

    overlap   memory-overlap geometry of strided views
    checks    argument checks, Norm, QueryScale            (overlap)
    launch    layout switches, token folding, _execute     (no sibling)
    plans     launch plans and their bounded cache         (overlap, checks)
    library   torch.library ops, fake and autograd         (checks, launch)
    eager     the eager autograd Function                  (checks, launch, plans, library)
    dtensor   DTensor placements, local shards, rewrapping (checks)
    api       the public functions                         (all of the above)

    cache_checks  the serving ops' checks (v, caches, slots, FP8 scales)   (checks, overlap)
    cache_api     the serving ops: custom ops, public functions       (checks, cache_checks, launch, library)

This package re-exports the public names, which is where callers (and the transformers
integration, at call time) look them up. Module state lives in its own module: rebinding
a re-export here (``CHECK_CU_SEQLENS``, ``uses_kernel``) changes nothing; patch
``checks.CHECK_CU_SEQLENS``, ``launch.uses_kernel``, ``plans._PLANS``/``_PLANS_MAX``.
"""

from ..reference import LAYOUTS
from .overlap import may_overlap, self_overlapping  # (the transformers integration uses these)
from .checks import (CHECK_CU_SEQLENS, ROTARY_AT, Norm, Offsets, QueryScale, check_cp, check_cu_seqlens_values,
                     check_norm_args, check_q_scale, check_rope_args, check_rotary_at, mrope_spec)
from .launch import layout_switches, uses_kernel
from .plans import plan_cache_size
from .library import COMPILER_SEES_KERNEL
from .api import apply_qk_norm_rope, apply_qk_norm_rope_, apply_rope, apply_rope_
from .cache_checks import CHECK_SLOTS, check_slot_values
from .cache_api import apply_mla_rope_and_cache_, apply_rope_and_cache_

__all__ = ["apply_rope_", "apply_rope", "apply_qk_norm_rope_", "apply_qk_norm_rope", "QueryScale", "LAYOUTS",
           "apply_rope_and_cache_", "apply_mla_rope_and_cache_"]
