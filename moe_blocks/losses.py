"""Router losses, and the mechanism that lets a block's auxiliary loss reach the gradient
without the caller's help.

All losses take router ``logits[N, E]`` (fp32 from the router; float64 stays float64) and
``expert_idx[N, k]`` where counts matter, and return a scalar tensor of the logits' dtype (at
least fp32), differentiable in the logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels.checks import (
    INTEGER_DTYPES,
    check_index_range,
    check_non_negative,
    check_positive_int,
)

BALANCE_LOSSES = ("switch", "mutual_information", "load_concentration", "none")


def _loss_dtype(logits: Tensor) -> torch.dtype:
    """The dtype a loss is computed and returned in: fp32, or float64 for float64 logits."""
    return torch.promote_types(logits.dtype, torch.float32)


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {_describe(logits)}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, num_experts], got shape {tuple(logits.shape)}")


def _describe(value) -> str:
    return f"{value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__


def _token_weights(logits: Tensor, token_mask: Tensor | None) -> Tensor | None:
    """``token_mask[N]`` (True: a real token) as weights of the loss's dtype, or None."""
    if token_mask is None:
        return None
    if not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool:
        raise TypeError(f"token_mask must be a bool tensor, got {_describe(token_mask)}")
    if token_mask.shape != logits.shape[:1]:
        raise ValueError(
            f"token_mask must be [N={logits.shape[0]}] like logits' rows, "
            f"got shape {tuple(token_mask.shape)}"
        )
    return token_mask.to(device=logits.device, dtype=_loss_dtype(logits))


def _token_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """The mean over tokens (dim 0) of ``values``, over the real tokens when ``weights`` are
    given (0 when there is none)."""
    if weights is None:
        return values.mean(0)
    shape = (-1,) + (1,) * (values.dim() - 1)
    return (values * weights.view(shape)).sum(0) / weights.sum().clamp_min(1.0)


def _zero_loss(logits: Tensor) -> Tensor:
    """0.0 for an empty batch, still attached to ``logits``' graph."""
    return logits.to(_loss_dtype(logits)).sum() * 0.0


def load_balancing_loss(
    logits: Tensor,
    expert_idx: Tensor,
    num_experts: int,
    *,
    tokens_per_expert: Tensor | None = None,
    prior: Tensor | None = None,
    token_mask: Tensor | None = None,
) -> Tensor:
    """Switch Transformer / GShard balance loss ``E · Σ_e f_e · P_e``.

    ``f_e`` is the fraction of the N·k assignments routed to expert e (not differentiable),
    ``P_e`` the mean softmax probability of e over the N tokens. It is exactly 1.0 when both are
    uniform and grows as routing concentrates. An empty batch gives 0. Computed in float64 and
    rounded once to the result's dtype, so that perfect balance gives exactly 1.0 for any E.

    ``tokens_per_expert``: optional ``[E]`` assignment counts to take ``f_e`` from instead of
    counting ``expert_idx`` (e.g. summed over the ranks of an expert-parallel group).

    ``token_mask``: optional ``[N]`` bool, True for real tokens: padding counts in neither
    ``f_e`` nor ``P_e`` (the mean over real tokens; 0 without any).

    ``prior``: optional ``[E]`` fp32 expert prior weights ``π_e >= 0`` (see
    :class:`~moe_blocks.TopKRouter`): then ``P_e`` averages ``π_e·exp(l_e) / Σ_j π_j·exp(l_j)``,
    computed in π (not in ``log π``), so that an expert with ``π_e = 0`` (never chosen) still
    gets the finite gradient ``∂loss/∂π_e < 0`` that opens it.
    """
    _check_logits(logits)
    check_positive_int("num_experts", num_experts)
    if logits.shape[1] != num_experts:
        raise ValueError(
            f"logits must have num_experts={num_experts} columns, got shape {tuple(logits.shape)}"
        )
    if not isinstance(expert_idx, Tensor) or expert_idx.dtype not in INTEGER_DTYPES:
        raise TypeError(f"expert_idx must be an integer tensor, got {_describe(expert_idx)}")
    if expert_idx.dim() != 2 or expert_idx.shape[0] != logits.shape[0]:
        raise ValueError(
            f"expert_idx must be [N={logits.shape[0]}, k] like logits' rows, "
            f"got shape {tuple(expert_idx.shape)}"
        )
    if tokens_per_expert is None:
        check_index_range(expert_idx, num_experts, "expert_idx", "num_experts")
    for name, given in (("tokens_per_expert", tokens_per_expert), ("prior", prior)):
        if given is not None and not isinstance(given, Tensor):
            raise TypeError(f"{name} must be a tensor [num_experts] or None, got "
                            f"{type(given).__name__}")  # fmt: skip
        if given is not None and given.shape != (num_experts,):
            raise ValueError(
                f"{name} must be [num_experts={num_experts}], got shape {tuple(given.shape)}"
            )
    real = _token_weights(logits, token_mask)
    if logits.shape[0] == 0:
        return _zero_loss(logits)
    wide = logits.double()
    if prior is None:
        probs = torch.softmax(wide, dim=-1)
    else:
        weights = prior.double().clamp_min(0.0) * torch.exp(wide - wide.detach().amax(-1, True))
        probs = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(wide.dtype).tiny)
    if tokens_per_expert is None:
        flat = expert_idx.reshape(-1).long()
        ones = torch.ones(expert_idx.shape, device=logits.device, dtype=wide.dtype)
        if real is not None:
            ones = ones * real.to(wide.dtype)[:, None]
        counts = torch.zeros(num_experts, device=logits.device, dtype=wide.dtype)
        counts.scatter_add_(0, flat, ones.reshape(-1))
    else:
        counts = tokens_per_expert.to(wide.dtype)
    fraction = counts / counts.sum().clamp_min(1.0)
    mean_probs = _token_mean(probs, None if real is None else real.to(wide.dtype))
    return (num_experts * (fraction * mean_probs).sum()).to(_loss_dtype(logits))


def router_z_loss(logits: Tensor, *, token_mask: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss ``mean_n(logsumexp(logits_n)²)``: keeps router logits small.
    ``token_mask``: optional ``[N]`` bool, the mean over the real tokens only."""
    _check_logits(logits)
    weights = _token_weights(logits, token_mask)
    if logits.shape[0] == 0:
        return _zero_loss(logits)
    squares = torch.logsumexp(logits.to(_loss_dtype(logits)), dim=-1).square()
    return _token_mean(squares, weights)


def _log_softmax(logits: Tensor) -> Tensor:
    """``log_softmax`` (fp32, or float64) with ``-inf`` (a closed expert's logit) clamped to the
    most negative float, so that ``p·log p`` is ``0``, not NaN, and its gradient finite."""
    dtype = _loss_dtype(logits)
    return torch.log_softmax(logits.to(dtype), dim=-1).clamp_min(torch.finfo(dtype).min)


def _marginal_entropy(
    probs: Tensor, weights: Tensor | None, group_sum: Callable[[Tensor], Tensor] | None
) -> Tensor:
    """``H(mean_n p_n)``: the entropy of the batch's mean routing distribution (over the real
    tokens with ``weights``); with ``group_sum``, over the tokens of every process whose sums
    it adds (the probabilities' sum and the token count, with autograd)."""
    if group_sum is None:
        marginal = _token_mean(probs, weights)
    else:
        count = probs.new_tensor(probs.shape[0]) if weights is None else weights.sum()
        total = probs.sum(0) if weights is None else (probs * weights[:, None]).sum(0)
        summed = group_sum(torch.cat([total, count[None].to(total.dtype)]))
        marginal = summed[:-1] / summed[-1].clamp_min(1.0)
    return -(marginal * torch.log(marginal.clamp_min(torch.finfo(marginal.dtype).tiny))).sum()


def mutual_information_loss(
    logits: Tensor,
    *,
    token_mask: Tensor | None = None,
    group_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """ModuleFormer's loss: the negative mutual information between tokens and experts,
    ``-(H(mean_n p_n) - mean_n H(p_n))`` with ``p_n = softmax(logits_n)``.

    Minimising it makes each token's choice confident (low conditional entropy) while the
    experts stay used evenly over the batch (high marginal entropy). It lies in
    ``[-log E, 0]``; ``-log E`` is reached by confident, perfectly balanced routing.
    ``token_mask``: optional ``[N]`` bool, the means over the real tokens only. ``group_sum``:
    for a batch split over processes (data parallelism), a differentiable sum over them
    (``TopKRouter.reduce_tokens_per_expert``): the marginal is then the whole batch's, so the
    loss and, once data parallelism averages the gradients, its gradient are one process's.
    """
    _check_logits(logits)
    weights = _token_weights(logits, token_mask)
    if logits.shape[0] == 0 and group_sum is None:
        return _zero_loss(logits)
    log_probs = _log_softmax(logits)
    probs = log_probs.exp()
    if logits.shape[0] == 0:  # no tokens here: the group's sums still need this process's
        conditional_entropy = _zero_loss(logits)
    else:
        conditional_entropy = _token_mean(-(probs * log_probs).sum(-1), weights)
    return conditional_entropy - _marginal_entropy(probs, weights, group_sum)


def load_concentration_loss(
    logits: Tensor,
    *,
    token_mask: Tensor | None = None,
    group_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """ModuleFormer's load-concentration loss, for fine-tuning on one task before pruning:
    ``H(mean_n p_n) = -Σ_e P_e · log P_e`` with ``P_e = mean_n softmax(logits_n)_e``, the
    entropy of the batch's mean routing distribution.

    Minimising it concentrates the batch's routing on few experts (the opposite of balancing),
    so that the experts the task does not need receive no tokens and can be pruned. It lies in
    ``[0, log E]``: 0 when every token puts all its probability on the same expert, ``log E``
    when the experts are used evenly. ``token_mask``: optional ``[N]`` bool, the mean over the
    real tokens only. ``group_sum``: as for :func:`mutual_information_loss`.
    """
    _check_logits(logits)
    weights = _token_weights(logits, token_mask)
    if logits.shape[0] == 0 and group_sum is None:  # (with one: the group's sums need ours)
        return _zero_loss(logits)
    probs = torch.softmax(logits.to(_loss_dtype(logits)), dim=-1)
    return _marginal_entropy(probs, weights, group_sum)


# The innermost aux_loss_scale context's factor; None outside every context (factor 1).
_aux_loss_scale: float | Tensor | None = None


@contextlib.contextmanager
def aux_loss_scale(scale: float | Tensor) -> Iterator[None]:
    """Blocks whose forward runs inside this context send ``scale · aux_loss`` into the gradient
    of each backward pass through their output, instead of ``1 · aux_loss``.

    Set it to the factor by which your training loop scales the loss it backpropagates, so that
    the aux gradient stays exactly that of adding the aux loss to the unscaled loss:

    - gradient accumulation over n micro-batches (``(loss / n).backward()``): ``1 / n``;
    - a loss scaler (``scaler.scale(loss).backward()``): ``scaler.get_scale()`` (a float, or the
      scaler's 0-dim scale tensor to avoid reading it on the host);
    - both: their product. ``0`` leaves the aux loss out of the gradient.

    The scale is read when the block runs forward (so the context must enclose the forward; it
    may also enclose the backward). Contexts nest; the innermost wins.

    Args:
        scale: a finite float >= 0, or a 0-dim floating-point tensor.
    """
    global _aux_loss_scale
    if isinstance(scale, Tensor):
        if scale.dim() != 0 or not scale.is_floating_point():
            raise ValueError(
                f"scale must be a float or a 0-dim floating-point tensor, got {scale.dtype} "
                f"tensor of shape {tuple(scale.shape)}"
            )
    else:
        check_non_negative("scale", scale)
    previous = _aux_loss_scale
    _aux_loss_scale = scale
    try:
        yield
    finally:
        _aux_loss_scale = previous


class _AddAuxLossGradient(torch.autograd.Function):
    """Identity on ``output``; in backward, also sends gradient 1 into ``aux_loss``."""

    @staticmethod
    def forward(ctx, output: Tensor, aux_loss: Tensor, unscaled_fp16: bool) -> Tensor:
        ctx.aux_shape = aux_loss.shape
        ctx.aux_dtype = aux_loss.dtype
        ctx.unscaled_fp16 = unscaled_fp16
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.unscaled_fp16:
            raise RuntimeError(
                "an MoE block attached its aux loss at scale 1 in a forward under fp16 autocast: "
                "a GradScaler multiplies the loss, not the attached aux loss, which then does "
                "nothing. Build the blocks with aux_loss='collect' and add "
                "moe_blocks.collect_aux_loss(model) to the loss, or run the forward inside "
                "moe_blocks.aux_loss_scale(scaler.get_scale()) (aux_loss_scale(1.0) without a "
                "scaler)"
            )
        aux_grad = torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_output.device)
        return grad_output, aux_grad, None


def attach_aux_loss(output: Tensor, aux_loss: Tensor) -> Tensor:
    """Return ``output`` unchanged, such that each backward pass through it also backpropagates
    ``aux_loss``: exactly as if the caller had added ``aux_loss`` to the loss it backpropagates
    (the way Megatron-LM attaches MoE losses). Nothing is attached when gradients are off or
    ``aux_loss`` needs none.

    If the training loop scales its loss (gradient accumulation, fp16 loss scaling), run the
    forward inside :func:`aux_loss_scale` with the same factor; the default factor is 1.
    Backpropagating twice through one output (``retain_graph``) adds the aux loss twice, as
    adding it to both losses would: sum the losses and backpropagate once instead.

    The returned tensor is a view made inside an autograd function, which autograd forbids
    modifying in place; so attach the loss to a tensor inside the block that every backward
    pass through its output reaches (MoEMLP and MoA attach it to their gates), not to the
    output callers receive and may modify (``y += x``)."""
    return _attach(output, aux_loss, _aux_loss_scale)


def _attach(output: Tensor, aux_loss: Tensor, scale: float | Tensor | None) -> Tensor:
    """:func:`attach_aux_loss` at ``scale`` (None: no :func:`aux_loss_scale` context, 1)."""
    if not (torch.is_grad_enabled() and aux_loss.requires_grad):
        return output
    device = output.device.type
    unscaled_fp16 = (
        scale is None
        and torch.amp.is_autocast_available(device)
        and torch.is_autocast_enabled(device)
        and torch.get_autocast_dtype(device) == torch.float16
    )
    factor = 1.0 if scale is None else scale
    return _AddAuxLossGradient.apply(output, aux_loss * factor, unscaled_fp16)


# --------------------------------------------------------------------------------------------
# The two aux-loss modes of a block: "attach" (the default) or "collect"

AUX_LOSS_MODES = ("attach", "collect")


def check_aux_loss_mode(aux_loss: object) -> None:
    if aux_loss not in AUX_LOSS_MODES:
        raise ValueError(f"aux_loss must be one of {AUX_LOSS_MODES}, got {aux_loss!r}")


def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing recomputing
    a block (what the first forward already counted must not be counted again). Under
    ``torch.compile`` the graph is traced once for both cases: False."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


@dataclass
class _AuxLossRecord:
    """A collect-mode block's aux loss of its last forward, and whether it was collected."""

    loss: Tensor
    collected: bool = False


class _RequireCollected(torch.autograd.Function):
    """Identity on ``gates``; its backward raises if the block's aux loss of that forward was
    never collected (a loop that forgot ``collect_aux_loss``: no balance at all, silently)."""

    @staticmethod
    def forward(ctx, gates: Tensor, record: _AuxLossRecord, block: str) -> Tensor:
        ctx.record, ctx.block = record, block
        return gates.view_as(gates)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.record.collected:
            raise RuntimeError(
                f"{ctx.block} was built with aux_loss='collect', but the aux loss of its forward "
                "was never collected: add moe_blocks.collect_aux_loss(model) to the loss before "
                "backward (or build the block with aux_loss='attach')"
            )
        return grad, None, None


def route_aux_loss(block, gates: Tensor, aux_loss: Tensor) -> Tensor:
    """What a block does with its router's ``aux_loss`` in forward, by ``block.aux_loss_mode``:
    ``"attach"``: :func:`attach_aux_loss` to the gates, at the :func:`aux_loss_scale` of the
    block's forward. Reentrant activation checkpointing runs that forward again in backward,
    where the context has usually closed: the recomputed forward, whose graph the backward
    then takes, attaches at the scale of the block's last training-mode forward (eager only:
    a compiled block reads the context when it runs); ``"collect"``: keep it for
    :func:`collect_aux_loss` (and return gates whose backward checks that it was collected)."""
    if block.aux_loss_mode == "attach":
        scale = _aux_loss_scale
        if recomputing():
            scale = getattr(block, "_aux_loss_scale_seen", scale)
        elif block.training and not torch.compiler.is_compiling():
            block._aux_loss_scale_seen = scale  # (an evaluation between keeps it)
        return _attach(gates, aux_loss, scale)
    if recomputing():  # the first forward's loss is the one that was collected
        return gates
    record = _AuxLossRecord(aux_loss)
    block._aux_loss_record = record
    # The check lives in eager autograd; a compiled graph traces its backward once, ahead of
    # any collecting, so there it is left out.
    if torch.is_grad_enabled() and gates.requires_grad and not torch.compiler.is_compiling():
        return _RequireCollected.apply(gates, record, type(block).__name__)
    return gates


def collect_aux_loss(module: torch.nn.Module) -> Tensor:
    """The sum of the aux losses (each ``aux_loss_coef · (balance + z_loss_weight · z-loss)``)
    of the last forward of every block in ``module`` (a block or a whole model) built with
    ``aux_loss="collect"``: a differentiable 0-dim fp32 tensor to add to the loss before
    scaling it (gradient accumulation, GradScaler, transformers' Trainer all scale it then).

    Raises ValueError when ``module``'s blocks attach their aux loss themselves (the default,
    ``aux_loss="attach"``: adding it again would count it twice), TypeError when it holds no
    block, RuntimeError when none of its collect-mode blocks has run forward, when this forward's
    aux loss was already collected (twice would count it twice), or when a training block's
    forward ran without autograd though its router trains (reentrant activation checkpointing:
    the loss would add no gradient)."""
    blocks = [m for m in module.modules() if getattr(m, "aux_loss_mode", None) is not None]
    if not blocks:
        raise TypeError(f"module holds no MoEMLP or MoA block ({type(module).__name__})")
    collecting = [block for block in blocks if block.aux_loss_mode == "collect"]
    if not collecting:
        raise ValueError(
            "module's blocks attach their aux loss to the gradient themselves "
            "(aux_loss='attach', the default): adding collect_aux_loss to the loss would count "
            "it twice. Build them with aux_loss='collect' to add it yourself"
        )
    records = [(block, block._aux_loss_record) for block in collecting]
    records = [(block, record) for block, record in records if record is not None]
    if not records:
        raise RuntimeError("no block built with aux_loss='collect' has run forward yet")
    if any(record.collected for _, record in records):
        raise RuntimeError(
            "collect_aux_loss: the aux loss of this forward was already collected; adding it "
            "again would count it twice (read router_stats(model) to log it)"
        )
    untracked = [block for block, record in records if block.training
                 and not record.loss.requires_grad
                 and any(p.requires_grad for p in block.router.parameters())]  # fmt: skip
    if untracked and torch.is_grad_enabled():
        raise RuntimeError(
            f"collect_aux_loss: the aux loss of {type(untracked[0]).__name__}'s last forward "
            "was computed without autograd (reentrant activation checkpointing runs the "
            "forward under no_grad), so it would add nothing to the router's gradient: "
            "checkpoint with use_reentrant=False, or build the block with aux_loss='attach'"
        )
    records = [record for _, record in records]
    for record in records:
        record.collected = True
    return torch.stack([record.loss.float() for record in records]).sum()
