"""moe_blocks.kernels: the sparse-dispatch kernel (plan_dispatch, expert_linear) and backends."""

# The repository's kernels/ directory is installed as moe_blocks.kernels. Imported as the top-level
# "kernels" (a process started in the checkout root has the root on sys.path), it hands over to
# the installed package of that name (PyPI's "kernels", which transformers imports): see
# _checkout.py. Its own modules are never loaded a second time under that name (registering the
# torch.library ops twice corrupts the dispatcher).
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
elif __name__ == "kernels":
    import sys

    from ._checkout import hand_over

    del sys.modules[f"{__name__}._checkout"]
    hand_over(__name__, __file__)
