"""moe-blocks: Mixture-of-Experts building blocks for PyTorch on one sparse-dispatch kernel."""

from .experts import ParallelExperts
from .kernels import DispatchPlan, expert_linear, plan_dispatch, use_backend
from .losses import (
    attach_aux_loss,
    aux_loss_scale,
    load_balancing_loss,
    mutual_information_loss,
    router_z_loss,
)
from .moa import KVCache, MoA
from .moe_mlp import MoEMLP
from .router import RouterOutput, TopKRouter, router_stats

__version__ = "0.1.0"

__all__ = [
    "DispatchPlan",
    "KVCache",
    "MoA",
    "MoEMLP",
    "ParallelExperts",
    "RouterOutput",
    "TopKRouter",
    "__version__",
    "attach_aux_loss",
    "aux_loss_scale",
    "expert_linear",
    "load_balancing_loss",
    "mutual_information_loss",
    "plan_dispatch",
    "router_stats",
    "router_z_loss",
    "use_backend",
]
