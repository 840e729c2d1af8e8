"""moe-blocks: Mixture-of-Experts building blocks for PyTorch on one sparse-dispatch kernel."""

from .experts import ParallelExperts
from .kernels import DispatchPlan, expert_linear, plan_dispatch, use_backend
from .losses import (
    attach_aux_loss,
    aux_loss_scale,
    collect_aux_loss,
    load_balancing_loss,
    load_concentration_loss,
    mutual_information_loss,
    router_z_loss,
)
from .moa import KVCache, MoA
from .modular import (
    FrozenExperts,
    ModularBlock,
    add_experts,
    expert_blocks,
    expert_usage,
    freeze_experts,
    prune_experts,
)
from .moe_mlp import MoEMLP
from .router import RouterOutput, TopKRouter, router_stats
from .upcycling import UPCYCLE_METHODS, UpcycleOptions, upcycle_mlp, upcycle_weights

__version__ = "0.1.0"


_PARALLEL = ("ExpertParallel", "clip_grad_norm_", "parallelize")


def __getattr__(name: str):
    # moe_blocks.parallel needs torch.distributed.tensor, ~0.7 s to import: loaded on first use.
    if name in _PARALLEL:
        from . import parallel

        return getattr(parallel, name)
    raise AttributeError(f"module 'moe_blocks' has no attribute {name!r}")


__all__ = [
    "DispatchPlan",
    "ExpertParallel",
    "FrozenExperts",
    "KVCache",
    "MoA",
    "ModularBlock",
    "MoEMLP",
    "ParallelExperts",
    "RouterOutput",
    "TopKRouter",
    "UPCYCLE_METHODS",
    "UpcycleOptions",
    "__version__",
    "add_experts",
    "attach_aux_loss",
    "aux_loss_scale",
    "clip_grad_norm_",
    "collect_aux_loss",
    "expert_blocks",
    "expert_linear",
    "expert_usage",
    "freeze_experts",
    "load_balancing_loss",
    "load_concentration_loss",
    "mutual_information_loss",
    "parallelize",
    "plan_dispatch",
    "prune_experts",
    "router_stats",
    "router_z_loss",
    "upcycle_mlp",
    "upcycle_weights",
    "use_backend",
]
