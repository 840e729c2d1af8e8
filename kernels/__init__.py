"""moe_blocks.kernels: the sparse-dispatch kernel (plan_dispatch, expert_linear) and backends."""

# The repository's kernels/ directory is installed as moe_blocks.kernels. A checkout on sys.path
# (``python -m pytest`` from the repository root) also makes it importable as a top-level
# "kernels", a name transformers probes for (the PyPI package of that name). Loaded that way it
# stays empty: importing its modules a second time would register the torch.library ops twice,
# which corrupts the dispatcher.
if __name__ == "moe_blocks.kernels":
    from .ops import (
        BACKENDS,
        TRITON_AVAILABLE,
        expert_linear,
        gather_scores,
        resolve_backend,
        use_backend,
    )
    from .plan import DispatchPlan, RowLayout, plan_dispatch

    __all__ = [
        "BACKENDS",
        "TRITON_AVAILABLE",
        "DispatchPlan",
        "RowLayout",
        "expert_linear",
        "gather_scores",
        "plan_dispatch",
        "resolve_backend",
        "use_backend",
    ]
