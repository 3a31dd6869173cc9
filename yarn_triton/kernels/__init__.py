"""The Triton kernel of yarn-triton and its host side.

One concern per module, each importing only those before it::

    rope_kernel   the @triton.jit kernel and its helpers, INTERPRETED        (no sibling)
    configs       launch shapes: LaunchConfig, the heuristic, the candidates
                  and their timing (the tuner), the grid, heads per step     (rope_kernel)
    launcher      launch_rope (arguments, switches, the shape a call gets,
                  the tuner's picks), PreparedLaunch, the compiled-kernel
                  fast path                                                  (rope_kernel, configs)

Nothing is re-exported here: import each name from its module. Module state lives in the
module that reads it (``launcher.AUTOTUNE``, ``launcher._TUNED``, ``launcher.FAST_LAUNCH``,
``launcher._sincos``, ...); a name imported into another module is a copy of the binding,
so patch the owner. The kernel object is read by name in ``configs`` (the tuner's timing
runs) and in ``launcher``: a stand-in for it replaces both.
"""
