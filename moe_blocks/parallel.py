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

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed._functional_collectives import (
    all_reduce,
    all_to_all_single,
    all_to_all_single_autograd,
    wait_tensor,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from .experts import ParallelExperts
from .kernels import plan_dispatch
from .kernels.plan import token_sum
from .modular import refresh_frozen_experts
from .moe_mlp import MoEMLP
from .router import RouterOutput, TopKRouter

BALANCE_SCOPES = ("global", "local")
MESH_DIMS = ("dp", "ep")


def check_balance(balance: object) -> None:
    if balance not in BALANCE_SCOPES:
        raise ValueError(f"balance must be one of {BALANCE_SCOPES}, got {balance!r}")


class ExpertParallel(ParallelStyle):
    """Shard an :class:`~moe_blocks.MoEMLP`'s experts over a 1-D device mesh and exchange
    tokens with all-to-all. Apply with
    ``torch.distributed.tensor.parallel.parallelize_module(mlp, ep_mesh, ExpertParallel())``
    (or a plan such as ``{"model.layers.*.mlp": ExpertParallel()}``).

    Args:
        balance: which tokens the router's load-balancing statistics count.
            ``"global"`` (default): the per-expert assignment counts are summed over
            ``balance_group`` (an all-reduce of ``E`` integers per forward): global-batch
            balancing, so the Switch loss's ``f_e``, ``router.last_tokens_per_expert`` and the
            auxiliary-loss-free bias load describe the whole global batch, as a single process
            running that batch would see them (``P_e``, the mean router probability, stays the
            rank's own, as do the z-loss and the mutual-information loss; the mean of the
            ranks' losses is then the one-process loss). ``"local"``: each rank counts only
            its own micro-batch (no extra collective).
        balance_group: the ranks whose tokens ``"global"`` counts: every rank that trains on a
            share of the global batch (data parallel × expert parallel). Default: all ranks
            (the default process group).

    Requirements (``ValueError``/``TypeError`` otherwise): the module is an ``MoEMLP`` not yet
    expert-parallel, the mesh is 1-D, and ``num_experts`` is divisible by the mesh size.
    """

    def __init__(self, *, balance: str = "global", balance_group: ProcessGroup | None = None):
        super().__init__()
        check_balance(balance)
        self.balance, self.balance_group = balance, balance_group

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
        if sharded_parts(module):
            raise ValueError(
                "this MoEMLP is already sharded (fully_shard applied before ExpertParallel): "
                "apply ExpertParallel to the plain block, then fully_shard; "
                "moe_blocks.parallel.parallelize(model, mesh) does both in the right order"
            )
        for experts in (module.input_linear, module.output_linear):
            distribute_module(experts, device_mesh, self._shard_experts)
        group = device_mesh.get_group()
        module.token_dispatcher = AllToAllDispatcher(group, ep_size, num_experts // ep_size)
        if self.balance == "global":
            module.router.reduce_tokens_per_expert = GroupSum(
                self.balance_group or dist.group.WORLD
            )
        refresh_frozen_experts()  # experts frozen before: their tensors are new DTensors
        return module

    def _shard_experts(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        if isinstance(module, ParallelExperts):
            weight = distribute_tensor(
                module.weight, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank
            )
            module.register_parameter("weight", nn.Parameter(weight))


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    layers: Iterable[nn.Module] = (),
    balance: str = "global",
) -> nn.Module:
    """Shard any model that contains :class:`~moe_blocks.MoEMLP` blocks over ``mesh``, in place,
    for data-parallel (and expert-parallel) training; returns it.

    - A 1-D mesh: FSDP2 (``fully_shard``) over its ranks; every rank trains on its own share
      of the global batch.
    - A 2-D mesh named ``("dp", "ep")`` of ``dp × ep`` ranks: every ``MoEMLP`` gets
      :class:`ExpertParallel` over ``"ep"`` (rank ``(d, e)`` holds experts ``[e·E/ep,
      (e+1)·E/ep)`` and exchanges tokens within its EP group), its experts are FSDP-sharded
      further over ``"dp"``, and every other parameter (embeddings, attention, MoA, routers,
      norms) over all ``dp × ep`` ranks. ``ep`` may be the whole mesh (``dp = 1``).

    After each rank's ``loss.backward()`` (the mean over its own tokens, every rank the same
    number), every gradient is that of the mean of all ranks' losses, i.e. of one process
    running the concatenated global batch, on every mesh shape: expert gradients, which sum
    the tokens of the EP group, are averaged over all ``dp × ep`` ranks. Clip with
    :func:`clip_grad_norm_` (parameters then live on different meshes).

    Args:
        model: the plain model, the same weights on every rank (on CPU or the mesh's device;
            FSDP moves its shards to the mesh's device). Freeze experts before or after.
        mesh: see above.
        layers: submodules to shard as units of their own (the transformer blocks, e.g.
            ``model.layers``), before the whole model: FSDP then gathers one unit's
            parameters at a time instead of all at once. Default: the model as one unit.
        balance: ``"global"`` (default): every router's balance statistics (the Switch loss's
            ``f_e``, ``last_tokens_per_expert``, the bias balancing's load) count the tokens of
            all ``dp × ep`` ranks, so the losses are those of one process on the global batch;
            ``"local"``: each rank's own micro-batch.

    Parameters become DTensors; state-dict keys stay those of the plain model. Raises
    TypeError/ValueError (naming the argument) for a model already sharded (``ExpertParallel``
    or ``fully_shard`` applied: apply this to the plain model instead), a mesh of another shape,
    ``num_experts`` not divisible by ``ep``, or a ``layers`` entry that is not a submodule.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a DeviceMesh, got {type(mesh).__name__}")
    check_balance(balance)
    if mesh.ndim == 2 and mesh.mesh_dim_names == MESH_DIMS:
        shard_mesh = mesh._flatten("dp_ep")
    elif mesh.ndim != 1:
        raise ValueError(
            f"mesh must be 1-D (FSDP) or 2-D with dims named {MESH_DIMS}, got shape "
            f"{tuple(mesh.shape)} with names {mesh.mesh_dim_names}"
        )
    else:
        shard_mesh = mesh
    sharded = sharded_parts(model)
    if sharded:
        raise ValueError(
            f"model is already sharded ({sharded[0]}: ExpertParallel or fully_shard applied): "
            "call moe_blocks.parallel.parallelize once, on the plain model, instead of "
            "wrapping it by hand"
        )
    units = list(layers)
    submodules = {id(module) for module in model.modules()}
    for unit in units:
        if not isinstance(unit, nn.Module) or id(unit) not in submodules:
            raise ValueError(f"layers must hold submodules of model, got {type(unit).__name__}")
    group = shard_mesh.get_group()
    if mesh.ndim == 2:
        for block in [module for module in model.modules() if isinstance(module, MoEMLP)]:
            # src_data_rank=None: each rank keeps its slice of its own copy (every rank built
            # the same model), no scatter from rank 0.
            style = ExpertParallel(balance=balance, balance_group=group)
            parallelize_module(block, mesh["ep"], style, src_data_rank=None)
            experts = fully_shard([block.input_linear, block.output_linear], mesh=mesh["dp"])
            # Their gradients sum the EP group's tokens: average over all ranks, not over dp.
            experts[0].set_gradient_divide_factor(float(mesh.size()))
            if mesh["dp"].size() > 1:
                # Summed in the collective and divided after (gloo has no pre-multiplied sum).
                # Not on one dp rank: torch 2.13 FSDP2 then divides twice (grad / ep²).
                experts[0].set_force_sum_reduction_for_comms(True)
    if balance == "global":
        for router in model.modules():
            if isinstance(router, TopKRouter):
                router.reduce_tokens_per_expert = GroupSum(group)
    for unit in units:
        fully_shard(unit, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    refresh_frozen_experts()  # experts frozen before: their tensors are new DTensors
    return model


def sharded_parts(model: nn.Module) -> list[str]:
    """Names of what in ``model`` is sharded already: DTensor parameters, MoEMLPs with a token
    dispatcher (ExpertParallel), FSDP modules (``"model"`` for the model itself)."""
    return [
        name for name, param in model.named_parameters() if isinstance(param, DTensor)
    ] + [
        name or "model" for name, module in model.named_modules()
        if getattr(module, "token_dispatcher", None) is not None or isinstance(module, FSDPModule)
    ]  # fmt: skip


@torch.no_grad()
def clip_grad_norm_(parameters: nn.Module | Iterable[Tensor] | Tensor, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (the 2-norm) for parameters that are DTensors on
    different meshes (experts on ``("dp", "ep")``, the rest on all ranks; torch's own refuses
    the mix) or plain tensors (taken as replicated: the same gradient on every rank): the total
    norm of all gradients, which is the one-process norm of a :func:`parallelize`-d model (a
    0-dim fp32 tensor, the same on every rank), and, when it exceeds ``max_norm``, every
    gradient scaled by ``max_norm / total``. ``parameters``: a model or an iterable of tensors.
    Collective when any gradient is a DTensor: every rank calls it."""
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    elif isinstance(parameters, Tensor):
        parameters = [parameters]
    refresh_frozen_experts(zero_gradients=True)  # frozen rows a hand wrap left unhooked
    by_mesh: dict[DeviceMesh | None, list[Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            by_mesh.setdefault(getattr(param, "device_mesh", None), []).append(param)
    squares = []
    for params in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    for params in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


@dataclass(frozen=True)
class GroupSum:
    """``sums -> Σ over the group of sums`` (a new tensor; the input is left alone), with
    autograd: the gradient is summed over the group too. Every rank computes the same function
    of the group's sum and data parallelism averages the gradients over the ranks, so each
    token's gradient is the one-process one."""

    group: ProcessGroup

    def __call__(self, sums: Tensor) -> Tensor:
        return _SumOverGroup.apply(sums, self.group)


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sums: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return wait_tensor(all_reduce(sums, "sum", group))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return wait_tensor(all_reduce(grad.contiguous(), "sum", ctx.group)), None


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
        return token_sum(per_assignment, plan.top_k, route.gates).to(returned.dtype)


__all__ = [
    "BALANCE_SCOPES",
    "AllToAllDispatcher",
    "ExpertParallel",
    "GroupSum",
    "clip_grad_norm_",
    "parallelize",
]
