"""Modularity as ModuleFormer meant it: grow a block by new experts without changing what it
computes, train only chosen experts, count which experts a data set uses, and prune the others.

The operations act on :class:`MoEMLP` and :class:`MoA` blocks (anything that derives from
:class:`ModularBlock`: a ``router`` (:class:`TopKRouter`) and the expert weights
``input_linear.weight`` and ``output_linear.weight``, ``[E, out, in]``). Every per-expert tensor
is indexed by expert along its first dimension: the two expert weights, the router's gate rows
``router.layer.weight [E, d]``, its optional ``expert_prior [E]`` and its per-expert buffers.

Growing and pruning replace those tensors by new ``nn.Parameter`` objects (in place on the
block): an optimiser built before holds the old ones and must be built again. Every argument is
checked before anything is changed, so a failed call leaves the block as it was.
"""

from __future__ import annotations

import functools
import operator
import warnings
import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from .experts import ParallelExperts, local_tensor
from .kernels.checks import check_positive_int
from .router import TopKRouter, named_modules_of

INITS = ("copy", "random")
# Router buffers with one entry per expert, and what a new expert's entry starts at (0).
_ROUTER_BUFFERS = ("selection_bias", "load_since_update", "last_tokens_per_expert")


class ModularBlock:
    """What :class:`MoEMLP` and :class:`MoA` share for the operations of this module: they
    can grow by new experts in place."""

    router: TopKRouter
    input_linear: ParallelExperts
    output_linear: ParallelExperts

    def add_experts(
        self, n: int, *, init: str = "copy", source: int | Sequence[int] | Tensor | None = None
    ) -> None:
        """Grow this block by ``n`` experts without changing its output: see
        :func:`moe_blocks.add_experts`."""
        add_experts(self, n, init=init, source=source)


def expert_blocks(module: nn.Module) -> dict[str, ModularBlock]:
    """The :class:`MoEMLP` and :class:`MoA` blocks in ``module``, by name
    (:func:`~moe_blocks.router.named_modules_of`)."""
    return named_modules_of(module, ModularBlock)


# --------------------------------------------------------------------------------------------
# Extend


def add_experts(
    block: ModularBlock,
    n: int,
    *,
    init: str = "copy",
    source: int | Sequence[int] | Tensor | None = None,
) -> None:
    """Grow ``block`` (an :class:`MoEMLP` or :class:`MoA`) by ``n`` experts in place, numbered
    ``E .. E+n-1`` after the existing ``E``, such that its output is unchanged for every input.

    A linear gate row cannot do that alone (for k >= 2 no row's logit stays out of the top k for
    every input), so the new experts enter **closed**: the router gets expert priors ``π``
    (``TopKRouter(expert_prior=True)``; ones for the existing experts if it had none) and the new
    experts ``π = 0``. A closed expert's logit is ``logit + log 0 = -inf`` in every score mode:
    it is never chosen, adds nothing to a softmax normaliser and its sigmoid score is 0. The
    Switch balance loss sees ``π`` directly and gives ``∂loss/∂π_new < 0``, so training opens the
    new experts (π grows, tokens arrive) while the gate rows learn where to send tokens.

    Args:
        block: the block to grow.
        n: how many experts to add, >= 1.
        init: ``"copy"`` (default): each new expert is a copy of an existing one (its two
            weights and its gate row); ``"random"``: normal weights and gate rows with the
            standard deviation of the existing ones (tensor by tensor).
        source: with ``"copy"``, the expert(s) to copy: one id, or ``n`` ids (one per new
            expert). Default: the ``n`` most used in the router's last forward
            (``router.last_tokens_per_expert``; ties to the lower id, cycling when ``n > E``).
            For the usage over a whole data set use :func:`expert_usage`.

    The block's weights, gate and prior become new ``nn.Parameter`` objects: rebuild any
    optimiser that holds the old ones. Raises ValueError (naming the argument) and leaves the
    block unchanged on a bad argument. Warns when the router's balance loss is not the Switch
    loss, or its ``aux_loss_coef`` is 0: nothing then opens the new experts.
    """
    router = _check_block(block)
    check_positive_int("n", n)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    num_experts = router.num_experts
    if init == "random":
        if source is not None:
            raise ValueError('source is only used with init="copy"')
    elif source is None:
        source = most_used(router.last_tokens_per_expert, n)
    else:
        source = _expert_ids(source, num_experts, "source", unique=False)
        if len(source) == 1:
            source = source * n
        if len(source) != n:
            raise ValueError(f"source must name one expert or n = {n} experts, got {len(source)}")

    def grown(tensor: Tensor) -> Tensor:
        if init == "copy":
            new = tensor.detach()[torch.tensor(source, device=tensor.device)]
        else:
            std = tensor.detach().float().std()
            new = torch.randn((n, *tensor.shape[1:]), device=tensor.device) * std
        return torch.cat((tensor.detach(), new.to(tensor.dtype)))

    if router.balance_loss != "switch" or router.aux_loss_coef == 0:
        warnings.warn(
            f"add_experts: the new experts enter closed (prior 0) and only the Switch balance "
            f"loss's gradient opens them; this router has balance_loss={router.balance_loss!r}, "
            f"aux_loss_coef={router.aux_loss_coef}: they will stay closed. Train them with "
            f"router.balance_loss = 'switch' and aux_loss_coef > 0",
            UserWarning,
            stacklevel=2,
        )
    prior = _prior(router)
    closed = torch.zeros(n, device=prior.device, dtype=prior.dtype)
    _replace(
        block,
        {
            "weights": [grown(block.input_linear.weight), grown(block.output_linear.weight)],
            "gate": grown(router.layer.weight),
            "prior": torch.cat((prior.detach(), closed)),
            "buffers": {
                name: torch.cat((buffer, buffer.new_zeros(n)))
                for name, buffer in _router_buffers(router).items()
            },
        },
    )


# --------------------------------------------------------------------------------------------
# Prune


def prune_experts(
    block: ModularBlock, keep: int | Sequence[int] | Tensor, *, exact: bool = True
) -> None:
    """Remove every expert of ``block`` but those in ``keep``, in place: expert weights, gate
    rows, priors and the router's per-expert buffers. The kept experts keep their relative order
    (expert i afterwards is the i-th smallest id of ``keep``).

    On any input for which no removed expert was among a token's top k, the outputs are the same
    as before (the same experts, the same gates, the same bits) in the score modes whose gates
    do not depend on the experts not chosen: ``"topk_softmax"``, ``"sigmoid"`` and
    ``"softmax_topk"`` with ``renormalize`` and no selection bias. With ``"softmax_topk"``
    without ``renormalize`` every gate is a share of a softmax over all experts, which loses the
    removed experts' share (and with a selection bias that share changes the choice): such a
    block is refused unless ``exact=False``. In bf16, fp16 and under autocast the router's
    matrix product with fewer rows may round its logits differently in the last bit (see
    docs/modularity.md).

    Args:
        block: an :class:`MoEMLP` or :class:`MoA`.
        keep: the expert ids to keep: distinct, in ``[0, E)``, at least ``top_k`` of them (and
            at least ``top_k`` open ones if the router has expert priors).
        exact: refuse (ValueError) a score mode in which pruning changes the kept gates.

    The tensors become new ``nn.Parameter`` objects: rebuild any optimiser that holds the old
    ones. Raises ValueError (naming the argument) and leaves the block unchanged on a bad one.
    """
    router = _check_block(block)
    ids = _expert_ids(keep, router.num_experts, "keep", unique=True)
    if len(ids) < router.top_k:
        raise ValueError(
            f"keep names {len(ids)} experts, fewer than the router's top_k ({router.top_k})"
        )
    prior = router.expert_prior
    if prior is not None:
        open_kept = int((prior.detach()[ids] > 0).sum())
        if open_kept < router.top_k:
            raise ValueError(
                f"keep names only {open_kept} open experts (expert_prior > 0), fewer than the "
                f"router's top_k ({router.top_k})"
            )
    if exact and router.score == "softmax_topk":
        if not router.renormalize:
            raise ValueError(
                'prune_experts: score="softmax_topk" without renormalize: every kept gate is a '
                "share of a softmax over all experts, which loses the pruned experts' share; "
                "outputs would change even where no token chose them (exact=False prunes anyway)"
            )
        if router.selection_bias is not None:
            raise ValueError(
                'prune_experts: score="softmax_topk" with a selection bias: the pruned experts\' '
                "share of the softmax changes which experts are chosen (exact=False prunes anyway)"
            )
    index = torch.tensor(sorted(ids))

    def kept(tensor: Tensor) -> Tensor:
        return tensor.detach()[index.to(tensor.device)]

    _replace(
        block,
        {
            "weights": [kept(block.input_linear.weight), kept(block.output_linear.weight)],
            "gate": kept(router.layer.weight),
            "prior": None if prior is None else kept(prior),
            "buffers": {name: kept(b) for name, b in _router_buffers(router).items()},
        },
    )


@torch.no_grad()
def expert_usage(model: nn.Module, data: Iterable[Tensor] | Tensor) -> dict[str, Tensor]:
    """How many token assignments each expert of each MoA and MoE block in ``model`` receives
    over ``data``, with ``model`` in eval mode and no gradients.

    Args:
        model: a block, or any module holding blocks (e.g. a JetMoE model).
        data: the batches, each passed as ``model(batch)`` (a tensor is one batch).

    Returns: block name (as in :func:`expert_blocks`) -> ``int64 [E]`` counts (a token routed
    to k experts counts once for each), on the CPU.
    """
    blocks = expert_blocks(model)
    if not blocks:
        raise TypeError(f"model holds no MoEMLP or MoA block ({type(model).__name__})")
    counts = {
        name: torch.zeros(b.router.num_experts, dtype=torch.int64) for name, b in blocks.items()
    }
    was_training = model.training
    model.eval()
    try:
        for batch in [data] if isinstance(data, Tensor) else data:
            model(batch)
            for name, block in blocks.items():
                counts[name] += block.router.last_tokens_per_expert.cpu()
    finally:
        model.train(was_training)
    return counts


# --------------------------------------------------------------------------------------------
# Freeze


class FrozenExperts:
    """What :func:`freeze_experts` installed: a hook on each tensor holding frozen rows that
    zeroes those rows of its gradient once backward has accumulated it, and step hooks on every
    optimiser that keep those rows bit-identical. ``remove()`` takes all of them off.

    A zero gradient is not enough: AdamW's decoupled weight decay (``p -= lr·wd·p``) moves
    every row whatever its gradient, and momentum left from earlier steps moves rows whose
    gradient is now zero. The frozen rows share their tensors with trainable rows (one
    ``[E, ...]`` tensor feeds the fused kernel), so they cannot go in a parameter group of their
    own; instead a global optimiser step pre-hook (``torch.optim.Optimizer``'s
    ``register_optimizer_step_pre_hook``) saves the frozen rows of the tensors that optimiser
    holds and a post-hook writes them back. The trainable rows get exactly the optimiser's
    update, with any optimiser, made before or after freezing.

    Sharded models: the rows are held as (module, parameter name, expert ids), not as tensor
    objects, because ``ExpertParallel`` and FSDP2's ``fully_shard`` replace a module's
    parameters by DTensors. Whatever a module holds when an optimiser steps (or when
    :func:`moe_blocks.parallel.parallelize` or ``ExpertParallel`` finishes) gets the hooks, and
    a DTensor's frozen rows are found in this rank's shard. So freezing works before or after
    parallelising. Wrapped by hand in ``fully_shard`` after freezing, a model's first gradients
    keep their frozen rows until :func:`moe_blocks.parallel.clip_grad_norm_` or the first
    optimiser step, each of which zeroes them first."""

    def __init__(self, rows: list[tuple[nn.Module, str, list[int]]]) -> None:
        self.rows = rows
        # id(tensor) -> (tensor, local row index, hook handle) for the tensors hooked so far
        self._hooked: dict[int, tuple[Tensor, Tensor, object]] = {}
        self._saved: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
        self._handles = [
            register_optimizer_step_pre_hook(self._save),
            register_optimizer_step_post_hook(self._restore),
        ]
        _LIVE.add(self)
        self.refresh()

    def refresh(self) -> list[tuple[Tensor, Tensor]]:
        """Hook the tensors the modules hold now (those not hooked yet), and let go of the ones
        they replaced (sharding swaps whole weights: keeping them would keep their memory):
        returns each current tensor with the index of its frozen rows in this rank's part."""
        hooked, current = {}, []
        for module, name, ids in self.rows:
            param = module._parameters[name]
            if param is None or not param.requires_grad:
                continue
            entry = self._hooked.get(id(param))
            if entry is None or entry[0] is not param:
                index = _local_rows(param, ids)
                handle = param.register_post_accumulate_grad_hook(
                    functools.partial(_zero_gradient_rows, index=index)
                )
                entry = (param, index, handle)
            hooked[id(param)] = entry
            current.append(entry[:2])
        for key, (_, _, handle) in self._hooked.items():
            if hooked.get(key, (None, None, None))[2] is not handle:
                handle.remove()
        self._hooked = hooked
        return current

    @torch.no_grad()
    def _save(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        saved = []
        for param, index in self.refresh():
            if id(param) in held:
                _zero_gradient_rows(param, index)  # made before the tensor was hooked?
                saved.append((param, index, local_tensor(param)[index]))
        self._saved[id(optimizer)] = saved

    @torch.no_grad()
    def _restore(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        for param, index, values in self._saved.pop(id(optimizer), []):
            local_tensor(param).index_copy_(0, index, values)

    def remove(self) -> None:
        """Take every hook off: the experts train again."""
        for handle in self._handles:
            handle.remove()
        for _, _, handle in self._hooked.values():
            handle.remove()
        self._handles, self._hooked = [], {}
        self._saved.clear()
        _LIVE.discard(self)


# Every FrozenExperts not removed: parallelize() hooks the tensors it made.
_LIVE: weakref.WeakSet[FrozenExperts] = weakref.WeakSet()


def refresh_frozen_experts(zero_gradients: bool = False) -> None:
    """Hook the tensors that modules with frozen experts hold now (after sharding them); with
    ``zero_gradients``, also zero the frozen rows of the gradients those tensors hold already
    (made before they were hooked: a model wrapped by hand after freezing, before its first
    optimiser step)."""
    for frozen in list(_LIVE):
        for param, index in frozen.refresh():
            if zero_gradients:
                _zero_gradient_rows(param, index)


def _zero_gradient_rows(param: Tensor, index: Tensor) -> None:
    if param.grad is not None:
        local_tensor(param.grad).index_fill_(0, index, 0.0)


def _local_rows(param: Tensor, ids: list[int]) -> Tensor:
    """The positions of experts ``ids`` (global ids along dim 0) among the rows of this rank's
    part of ``param``: for a DTensor, an ``arange`` distributed as its dim 0 is (each rank
    places its own copy: no communication) says which global rows this rank holds."""
    local = local_tensor(param)
    if local is param:
        return torch.tensor(ids, dtype=torch.long, device=param.device)
    from torch.distributed.tensor import Replicate, distribute_tensor

    rows = torch.arange(param.shape[0], device=local.device)
    # Shard(0) and _StridedShard(0) (FSDP over expert parallelism) split the rows; any other
    # placement leaves each rank whole rows
    placements = [p if getattr(p, "dim", None) == 0 else Replicate() for p in param.placements]
    held = distribute_tensor(rows, param.device_mesh, placements, src_data_rank=None).to_local()
    frozen = torch.isin(held, torch.tensor(ids, device=local.device))
    return frozen.nonzero().flatten()


def freeze_experts(
    module: nn.Module,
    experts: int | Sequence[int] | Tensor | None = None,
    *,
    trainable_experts: int | Sequence[int] | Tensor | None = None,
) -> FrozenExperts:
    """Freeze some experts of every MoA and MoE block in ``module`` (a block or a model): give
    exactly one of ``experts`` (the ids to freeze) or ``trainable_experts`` (the ids to keep
    training; all others freeze).

    A frozen expert's rows of the expert weights, of the gate (``router.layer.weight``) and of
    ``router.expert_prior`` get a zero gradient, through a hook on each tensor: the weights stay
    single ``[E, ...]`` tensors and the fused kernel runs as before. Optimiser steps leave the
    frozen rows bit-identical (weight decay and momentum would move zero-gradient rows; see
    :class:`FrozenExperts`).
    Everything else in ``module`` (attention KV projections, biases, shared experts, ...) is
    left as it is: set ``requires_grad_(False)`` on what should not train.

    Raises ValueError naming the argument if an id is not an expert of some block, if both or
    neither of ``experts`` and ``trainable_experts`` are given, or if a block would have no
    trainable expert left (to freeze a whole block, use ``block.requires_grad_(False)``).
    """
    if (experts is None) == (trainable_experts is None):
        raise ValueError(
            "give exactly one of experts (to freeze) and trainable_experts (to keep training)"
        )
    blocks = expert_blocks(module)
    if not blocks:
        raise TypeError(f"module holds no MoEMLP or MoA block ({type(module).__name__})")
    rows = []
    for name, block in blocks.items():
        count = block.router.num_experts
        label = f"block {name!r}" if name else "the block"
        if experts is not None:
            frozen = _expert_ids(experts, count, "experts", unique=False)
        else:
            keep = _expert_ids(trainable_experts, count, "trainable_experts", unique=False)
            frozen = sorted(set(range(count)) - set(keep))
        if len(set(frozen)) == count:
            argument = "experts" if experts is not None else "trainable_experts"
            raise ValueError(
                f"{argument}: all {count} experts of {label} would be frozen; to freeze a whole "
                "block use requires_grad_(False)"
            )
        for module, name in _expert_parameter_owners(block):
            rows.append((module, name, sorted(set(frozen))))
    return FrozenExperts(rows)


# --------------------------------------------------------------------------------------------
# Helpers


def most_used(counts: Tensor, n: int) -> list[int]:
    """The ids of the ``n`` largest ``counts[E]`` (ties to the lower id), cycling through all
    ``E`` again when ``n > E``."""
    order = torch.argsort(-counts.cpu(), stable=True).tolist()
    return [order[i % len(order)] for i in range(n)]


def _check_block(block: object) -> TopKRouter:
    if not isinstance(block, ModularBlock):
        raise TypeError(f"block must be an MoEMLP or MoA, got {type(block).__name__}")
    for tensor in _expert_parameters(block):
        if type(tensor.data) is not torch.Tensor:  # e.g. a DTensor under expert parallelism
            raise TypeError(
                f"the block's experts are a {type(tensor.data).__name__}: grow or prune before "
                "parallelising"
            )
    return block.router


def _expert_parameter_owners(block: ModularBlock) -> list[tuple[nn.Module, str]]:
    """(module, name) of each of the block's parameters indexed by expert along dim 0."""
    router = block.router
    owners = [(block.input_linear, "weight"), (block.output_linear, "weight"),
              (router.layer, "weight")]  # fmt: skip
    return owners if router.expert_prior is None else [*owners, (router, "expert_prior")]


def _expert_parameters(block: ModularBlock) -> list[nn.Parameter]:
    """The block's parameters indexed by expert along dim 0."""
    return [module._parameters[name] for module, name in _expert_parameter_owners(block)]


def _router_buffers(router: TopKRouter) -> dict[str, Tensor]:
    buffers = {name: getattr(router, name, None) for name in _ROUTER_BUFFERS}
    return {name: buffer for name, buffer in buffers.items() if buffer is not None}


def _prior(router: TopKRouter) -> Tensor:
    """The router's expert priors, or ones (what a router without them computes)."""
    if router.expert_prior is not None:
        return router.expert_prior
    return torch.ones(router.num_experts, device=router.layer.weight.device)


def _expert_ids(ids: object, num_experts: int, name: str, *, unique: bool) -> list[int]:
    """``ids`` (an int, a sequence of ints or a 0/1-D integer tensor) as a list of ints in
    ``[0, num_experts)``; duplicates refused when ``unique``. ValueError/TypeError naming
    ``name`` otherwise."""
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() > 1:
            raise TypeError(f"{name} must be expert ids (ints), got a {ids.dtype} tensor")
        ids = ids.reshape(-1).tolist()
    elif isinstance(ids, Iterable) and not isinstance(ids, str | bytes):
        ids = list(ids)
    elif hasattr(ids, "__index__"):  # an int, a numpy integer
        ids = [ids]
    else:
        raise TypeError(f"{name} must be an expert id or a sequence of them, got {ids!r}")
    ids = [_integer(value, name) for value in ids]
    for value in ids:
        if not 0 <= value < num_experts:
            raise ValueError(
                f"{name}: expert {value} does not exist (experts 0..{num_experts - 1})"
            )
    if unique and len(set(ids)) != len(ids):
        raise ValueError(f"{name} names an expert more than once: {ids}")
    if not ids:
        raise ValueError(f"{name} names no expert")
    return ids


def _integer(value: object, name: str) -> int:
    """``value`` as an int if it is one (a Python or numpy integer, a 0-d integer tensor), not
    a bool or a float; TypeError naming ``name`` otherwise."""
    is_bool = isinstance(value, bool) or getattr(value, "dtype", None) in (torch.bool, "bool")
    try:
        if is_bool:
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must hold int expert ids, got {value!r}") from None


def _replace(block: ModularBlock, tensors: dict) -> None:
    """Install the new per-expert tensors (nothing here can fail halfway)."""
    router = block.router
    for experts, weight in zip(
        (block.input_linear, block.output_linear), tensors["weights"], strict=True
    ):
        experts.weight = nn.Parameter(weight, requires_grad=experts.weight.requires_grad)
        experts.num_experts = weight.shape[0]
    gate = tensors["gate"]
    router.layer.weight = nn.Parameter(gate, requires_grad=router.layer.weight.requires_grad)
    router.layer.out_features = router.num_experts = gate.shape[0]
    if tensors["prior"] is not None:
        requires_grad = router.expert_prior is None or router.expert_prior.requires_grad
        router.expert_prior = nn.Parameter(tensors["prior"], requires_grad=requires_grad)
    for name, buffer in tensors["buffers"].items():
        setattr(router, name, buffer)
