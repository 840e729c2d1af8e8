"""moe_blocks.kernels: the sparse-dispatch kernel (plan_dispatch, expert_linear) and backends."""

from .ops import BACKENDS, TRITON_AVAILABLE, expert_linear, resolve_backend, use_backend
from .plan import DispatchPlan, RowLayout, plan_dispatch

__all__ = [
    "BACKENDS",
    "TRITON_AVAILABLE",
    "DispatchPlan",
    "RowLayout",
    "expert_linear",
    "plan_dispatch",
    "resolve_backend",
    "use_backend",
]
