"""Integrations with model libraries.

Each integration lives in its own submodule and imports its library only when that
submodule is imported, so ``import yarn_triton`` never pulls in transformers::

    from yarn_triton.integrations.transformers import enable_fused_rope, disable_fused_rope

The transformers model types the switch supports, and what it fuses in each, are listed in
``docs/models.md``.

``yarn_triton.integrations.torchtitan`` switches torchtitan's llama3, qwen3 and deepseek_v3
models when imported (``--experimental.custom_import yarn_triton.integrations.torchtitan``);
it is imported by name only, never through this package's attributes.
"""

__all__ = ["transformers"]


def __getattr__(name):
    if name == "transformers":
        import importlib

        return importlib.import_module(f"{__name__}.transformers")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
