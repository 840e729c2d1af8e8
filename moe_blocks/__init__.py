"""moe-blocks: Mixture-of-Experts building blocks for PyTorch on one sparse-dispatch kernel."""

from .kernels import DispatchPlan, expert_linear, plan_dispatch, use_backend

__version__ = "0.1.0"

__all__ = ["DispatchPlan", "expert_linear", "plan_dispatch", "use_backend", "__version__"]
