"""Expert parallelism for :class:`~moe_blocks.MoEMLP` on torch.distributed.

``parallelize_module(mlp, ep_mesh, ExpertParallel())`` (the convention of torchtitan's
``ExpertParallel``) shards the experts over a 1-D device mesh of ``ep`` ranks: rank ``r`` keeps
experts ``[r·E/ep, (r+1)·E/ep)`` as the local shard of ``Shard(0)`` DTensors, the router and
the output bias stay replicated (plain tensors, equal on every rank). Each rank then runs the
block on its own tokens:

1. route locally (every rank holds the whole router);
2. exchange the per-expert assignment counts (``all_to_all_single``), which gives the split
   sizes of the token exchange;
3. send each assignment's row to the rank owning its expert (``all_to_all_single_autograd``:
   rows leave in the plan's grouped order, so the rows for each destination are contiguous);
4. run the local experts on what arrived through ``MoEMLP.experts``, i.e. ``expert_linear``
   with a plan over the local expert ids of the received rows (the plan does the grouping: the
   received rows are not copied into expert order);
5. send the results back (the reverse exchange) and take each token's gate-weighted sum.

Backward runs through the same two exchanges in reverse. The output has the input's shape, and
outputs and gradients equal those of the single-process block run on the concatenation of all
ranks' tokens (router and bias gradients then need a sum over the ranks, as data parallelism
does). Per layer and step the ranks together send ``T·k·d_model`` elements to the experts and
as many back in the forward pass (``T`` the global token count, rows a rank keeps for its own
experts included), the same again in backward, plus ``E`` counts per rank: nothing is padded
to a capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed._functional_collectives import (
    all_reduce,
    all_to_all_single,
    all_to_all_single_autograd,
    wait_tensor,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from .experts import ParallelExperts
from .kernels import plan_dispatch
from .moe_mlp import MoEMLP
from .router import RouterOutput

BALANCE_SCOPES = ("global", "local")


class ExpertParallel(ParallelStyle):
    """Shard an :class:`~moe_blocks.MoEMLP`'s experts over a 1-D device mesh and exchange
    tokens with all-to-all. Apply with
    ``torch.distributed.tensor.parallel.parallelize_module(mlp, ep_mesh, ExpertParallel())``
    (or a plan such as ``{"model.layers.*.mlp": ExpertParallel()}``).

    Args:
        balance: which tokens the router's load-balancing statistics count.
            ``"global"`` (default): the per-expert assignment counts are summed over the EP
            group (an all-reduce of ``E`` integers per forward), as Megatron-LM's global
            balancing does, so the Switch loss's ``f_e``, ``router.last_tokens_per_expert`` and
            the auxiliary-loss-free bias load describe the whole EP batch, as a single process
            running that batch would see them (``P_e``, the mean router probability, stays the
            rank's own, as do the z-loss and the mutual-information loss).
            ``"local"``: each rank counts only its own tokens (no extra collective).

    Requirements (``ValueError``/``TypeError`` otherwise): the module is an ``MoEMLP`` not yet
    expert-parallel, the mesh is 1-D, and ``num_experts`` is divisible by the mesh size.
    """

    def __init__(self, *, balance: str = "global") -> None:
        super().__init__()
        if balance not in BALANCE_SCOPES:
            raise ValueError(f"balance must be one of {BALANCE_SCOPES}, got {balance!r}")
        self.balance = balance

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, MoEMLP):
            raise TypeError(
                f"ExpertParallel applies to an MoEMLP, got {type(module).__name__} (MoA and other "
                "blocks stay data-parallel)"
            )
        if not isinstance(device_mesh, DeviceMesh) or device_mesh.ndim != 1:
            shape = tuple(device_mesh.shape) if isinstance(device_mesh, DeviceMesh) else None
            raise ValueError(
                "ExpertParallel needs a 1-D DeviceMesh of the expert-parallel ranks (e.g. "
                f'mesh["ep"] of a 2-D mesh), got {type(device_mesh).__name__} of shape {shape}'
            )
        num_experts, ep_size = module.router.num_experts, device_mesh.size()
        if num_experts % ep_size:
            raise ValueError(
                f"num_experts ({num_experts}) must be divisible by the expert-parallel size "
                f"({ep_size})"
            )
        if module.token_dispatcher is not None:
            raise ValueError("this MoEMLP already has a token dispatcher (ExpertParallel twice?)")
        for experts in (module.input_linear, module.output_linear):
            distribute_module(experts, device_mesh, self._shard_experts)
        group = device_mesh.get_group()
        module.token_dispatcher = AllToAllDispatcher(group, ep_size, num_experts // ep_size)
        if self.balance == "global":
            module.router.reduce_tokens_per_expert = GroupSum(group)
        return module

    def _shard_experts(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        if isinstance(module, ParallelExperts):
            weight = distribute_tensor(
                module.weight, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank
            )
            module.register_parameter("weight", nn.Parameter(weight))


@dataclass(frozen=True)
class GroupSum:
    """``counts -> Σ over the group of counts`` (a new tensor; the input is left alone)."""

    group: ProcessGroup

    def __call__(self, counts: Tensor) -> Tensor:
        return wait_tensor(all_reduce(counts, "sum", self.group))


@dataclass(frozen=True)
class AllToAllDispatcher:
    """``MoEMLP.token_dispatcher`` under expert parallelism: ``(mlp, tokens[T, d], route) ->
    [T, d]``, the gate-weighted sum of each token's experts, computed on the ranks that own
    them. ``num_local_experts`` experts per rank, ``ep_size`` ranks in ``group``."""

    group: ProcessGroup
    ep_size: int
    num_local_experts: int

    def __call__(self, mlp: MoEMLP, tokens: Tensor, route: RouterOutput) -> Tensor:
        plan = route.plan
        with torch.no_grad():
            # counts[s*E_local + e]: assignments rank s sends to this rank's local expert e.
            counts = wait_tensor(all_to_all_single(plan.tokens_per_expert, None, None, self.group))
            send_splits = plan.tokens_per_expert.view(self.ep_size, -1).sum(1).tolist()
            receive_splits = counts.view(self.ep_size, -1).sum(1).tolist()
            local_experts = torch.arange(self.num_local_experts, device=counts.device)
            local_idx = local_experts.repeat(self.ep_size).repeat_interleave(counts)
        # Rows leave in grouped order: sorted by expert, hence by destination rank.
        sent = tokens[plan.sorted_indices // plan.top_k]
        received = all_to_all_single_autograd(sent, receive_splits, send_splits, self.group)
        results = mlp.experts(received, plan_dispatch(local_idx[:, None], self.num_local_experts))
        returned = all_to_all_single_autograd(results, send_splits, receive_splits, self.group)
        # returned[i] is assignment plan.sorted_indices[i]'s result: back to assignment order,
        # then each token's gate-weighted sum over its k slots, accumulated in fp32.
        per_assignment = torch.empty_like(returned).index_copy(0, plan.sorted_indices, returned)
        per_slot = per_assignment.view(plan.num_tokens, plan.top_k, mlp.d_model).float()
        return (per_slot * route.gates[..., None]).sum(1).to(returned.dtype)


__all__ = ["BALANCE_SCOPES", "AllToAllDispatcher", "ExpertParallel", "GroupSum"]
