"""TopKRouter: a linear gate, fp32 logits, top-k selection, gates, the dispatch plan and the
router's auxiliary loss and statistics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .kernels import DispatchPlan, gather_scores
from .kernels.checks import (
    INTEGER_DTYPES,
    check_index_range,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_top_k,
)
from .kernels.ops import AUTOCAST_DTYPES, autocasting, no_autograd
from .kernels.plan import plan_valid_routing
from .losses import (
    BALANCE_LOSSES,
    load_balancing_loss,
    load_concentration_loss,
    mutual_information_loss,
    recomputing,
    router_z_loss,
)

SCORE_MODES = ("topk_softmax", "softmax_topk", "sigmoid")


@dataclass(frozen=True)
class RouterOutput:
    """What a router decided for N tokens.

    logits: ``[N, E]`` fp32, plus ``log π_e`` when the router has expert priors (``-inf`` for
    a closed expert). expert_idx: ``[N, k]`` int64, distinct per token. gates:
    ``[N, k]`` fp32 weights of the chosen experts. plan: the :class:`DispatchPlan` of
    ``expert_idx``. aux_loss: scalar, what this routing adds to the training loss:
    ``aux_loss_coef · (balance loss + z_loss_weight · z-loss)``, differentiable in the logits.
    """

    logits: Tensor
    expert_idx: Tensor
    gates: Tensor
    plan: DispatchPlan
    aux_loss: Tensor


class TopKRouter(nn.Module):
    """Route each token to ``top_k`` of ``num_experts`` experts.

    Args:
        d_model: token feature size.
        num_experts: E.
        top_k: k, in ``[1, E]``.
        score: how gates come from logits.
            ``"topk_softmax"`` (JetMoE, default): top-k of the logits, softmax over the k picked
            (gates sum to 1). ``"softmax_topk"`` (Mixtral, ModuleFormer): softmax over all E,
            keep the top k probabilities (sum ≤ 1; 1 with ``renormalize``). ``"sigmoid"``
            (DeepSeek-V3): independent sigmoid scores, top k (renormalised with ``renormalize``).
        renormalize: divide the kept scores by their sum (``softmax_topk`` and ``sigmoid``).
        balance_loss: ``"switch"`` (default), ``"mutual_information"``,
            ``"load_concentration"`` (ModuleFormer's, for fine-tuning before pruning: it
            *concentrates* routing, see :func:`~moe_blocks.load_concentration_loss`) or
            ``"none"`` (no balance term: the z-loss alone, at ``z_loss_weight``; no aux loss
            at all with ``aux_loss_coef=0``).
        z_loss_weight: weight of the router z-loss inside the aux loss (JetMoE: 0.1), >= 0.
        aux_loss_coef: the weight of ``balance + z_loss_weight · z-loss`` in the training loss
            (JetMoE: 0.01), >= 0. ``RouterOutput.aux_loss`` already includes it.
        bias_update_rate: if set, DeepSeek-V3's auxiliary-loss-free balancing: a per-expert
            bias added to the scores only to *choose* experts (gates use the unbiased scores),
            moved by ``bias_update_rate`` towards balance each time
            :meth:`update_selection_bias` is called (once per optimiser step).
        expert_prior: give the router a parameter ``expert_prior`` ``π[E]`` (fp32, ones): each
            expert's probability is proportional to ``π_e·exp(logit_e)``, i.e. ``log π_e`` is
            added to its logit in every score mode. ``π_e = 0`` closes expert e: it is never
            chosen and changes no gate, yet the Switch balance loss (computed in π) gives it a
            gradient that opens it. :func:`moe_blocks.add_experts` adds new experts closed
            this way, which is what keeps a block's output unchanged when it grows.

    After each forward, the detached statistics hold the values of that batch:
    ``last_aux_loss`` (weighted, as ``RouterOutput.aux_loss``), the unweighted
    ``last_balance_loss`` and ``last_z_loss``, and ``last_tokens_per_expert``.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        score: str = "topk_softmax",
        renormalize: bool = False,
        balance_loss: str = "switch",
        z_loss_weight: float = 0.1,
        aux_loss_coef: float = 0.01,
        bias_update_rate: float | None = None,
        expert_prior: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_top_k(top_k, num_experts)
        if score not in SCORE_MODES:
            raise ValueError(f"score must be one of {SCORE_MODES}, got {score!r}")
        if balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"balance_loss must be one of {BALANCE_LOSSES}, got {balance_loss!r}")
        for name, value in (("z_loss_weight", z_loss_weight), ("aux_loss_coef", aux_loss_coef)):
            check_non_negative(name, value)
        if bias_update_rate is not None:
            check_positive("bias_update_rate", bias_update_rate)
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.score, self.renormalize = score, renormalize
        self.balance_loss, self.z_loss_weight = balance_loss, z_loss_weight
        self.aux_loss_coef, self.bias_update_rate = aux_loss_coef, bias_update_rate
        self.layer = nn.Linear(d_model, num_experts, bias=False, device=device, dtype=dtype)
        stats = {"device": device, "dtype": torch.float32}
        self.expert_prior = nn.Parameter(torch.ones(num_experts, **stats)) if expert_prior else None
        if bias_update_rate is not None:
            self.register_buffer("selection_bias", torch.zeros(num_experts, **stats))
            self.register_buffer("load_since_update", torch.zeros(num_experts, **stats))
        else:
            self.selection_bias = None
        for name in ("last_aux_loss", "last_balance_loss", "last_z_loss"):
            self.register_buffer(name, torch.zeros((), **stats), persistent=False)
        self.register_buffer(
            "last_tokens_per_expert",
            torch.zeros(num_experts, device=device, dtype=torch.int64),
            persistent=False,
        )
        # Maps a sum over the batch's tokens to that over the balance group's (None: the
        # batch's own): the per-expert assignment counts [E] that the balance loss, the
        # statistics and the selection-bias load use, and (with autograd) the probability
        # sums of the mutual-information and load-concentration losses' marginal.
        # Sharding sets it to a sum over the group ("global" balancing).
        self.reduce_tokens_per_expert: Callable[[Tensor], Tensor] | None = None

    def reset_parameters(self) -> None:
        """Re-initialise the gate as ``nn.Linear`` does and zero the balancing state and the
        statistics (e.g. after building on the meta device and ``to_empty``); expert priors 1."""
        self.layer.reset_parameters()
        if self.expert_prior is not None:
            nn.init.ones_(self.expert_prior)
        for buffer in self.buffers(recurse=False):
            buffer.zero_()

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> RouterOutput:
        """Route ``x[N, d_model]`` (the gate's dtype, or any floating dtype under autocast).

        ``token_mask``: optional ``[N]`` bool (or 0/1 integers), True for real tokens: every
        token is routed, but the aux loss and every statistic (balance and z-loss,
        ``last_*``, the bias balancing's load) count the real tokens only (padding does not
        skew the balance), as zero weights for the padding: no host synchronisation, one
        compiled graph."""
        check_input_dtype(x, self.layer.weight.dtype)
        if x.dim() != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [N, d_model={self.d_model}], got {tuple(x.shape)}")
        if token_mask is not None:
            token_mask = check_keep_mask(token_mask, "token_mask", (x.shape[0],))
        raw_logits = gate_logits(x, self.layer.weight)
        logits = raw_logits
        if self.expert_prior is not None:
            logits = raw_logits + _log_prior(self.expert_prior)
        if self.score == "topk_softmax":
            scores = logits
        elif self.score == "softmax_topk":  # in float64 and rounded once, as the logits: a
            # vectorised and a scalar fp32 exp can differ in the last bit, and which one an
            # element gets depends on the expert count
            scores = torch.softmax(logits.double(), dim=-1).float()
        else:
            scores = torch.sigmoid(logits.double()).float()
        choice = scores if self.selection_bias is None else scores + self.selection_bias
        if self.expert_prior is not None:  # a closed expert's score 0 could win with a bias
            closed = self.expert_prior <= 0
            _check_open_experts(closed, self.top_k)
            choice = choice.masked_fill(closed, float("-inf"))
        top_values, expert_idx = top_k(choice, self.top_k)
        if self.score == "softmax_topk" and self.renormalize:
            # the picked probabilities over their sum are a softmax over the picked logits: so
            # computed, in float64 and rounded once as the scores, the gates do not depend on
            # the experts not chosen (pruning them leaves every gate's bits)
            gates = torch.softmax(gather_scores(logits, expert_idx).double(), dim=-1).float()
        else:
            if choice is scores and no_autograd(scores):  # the chosen scores themselves
                picked = top_values
            else:
                picked = gather_scores(scores, expert_idx)
            if self.score == "topk_softmax":
                gates = torch.softmax(picked, dim=-1)
            elif self.renormalize:
                tiny = torch.finfo(picked.dtype).tiny
                gates = picked / picked.sum(-1, keepdim=True).clamp_min(tiny)
            else:
                gates = picked
        plan = plan_valid_routing(expert_idx, self.num_experts)  # a top-k: in range
        counts = {"device": x.device, "dtype": torch.int64}
        if token_mask is not None:
            token_mask = token_mask.to(x.device)
            real = token_mask[:, None].expand_as(expert_idx).reshape(-1).long()
            tokens_per_expert = torch.zeros(self.num_experts, **counts).scatter_add_(
                0, expert_idx.reshape(-1), real
            )
        elif expert_idx.shape[0] == 1 and x.is_cpu:  # one token's k distinct experts, counted
            # without the plan's grouping, which a decode step on CPU never computes (elsewhere
            # its kernels group the plan anyway, and the counts come with it)
            chosen = torch.zeros(self.num_experts, **counts)
            tokens_per_expert = chosen.index_fill_(0, expert_idx.view(-1), 1)
        else:
            tokens_per_expert = plan.tokens_per_expert
        if self.reduce_tokens_per_expert is not None:  # e.g. every rank's (global balance)
            tokens_per_expert = self.reduce_tokens_per_expert(tokens_per_expert)
        self.last_tokens_per_expert.copy_(tokens_per_expert)  # integers: autograd records none
        if inference(self):  # the aux losses are training terms: only the counts are kept
            aux_loss = torch.zeros((), device=logits.device)
        else:
            aux_loss = self._aux_loss(raw_logits, logits, expert_idx, tokens_per_expert, token_mask)
        return RouterOutput(logits, expert_idx, gates, plan, aux_loss)

    def _aux_loss(
        self,
        raw_logits: Tensor,
        logits: Tensor,
        expert_idx: Tensor,
        tokens_per_expert: Tensor,
        token_mask: Tensor | None,
    ) -> Tensor:
        if self.balance_loss == "switch":
            balance = load_balancing_loss(
                raw_logits,
                expert_idx,
                self.num_experts,
                tokens_per_expert=tokens_per_expert,
                prior=self.expert_prior,
                token_mask=token_mask,
            )
        elif self.balance_loss == "mutual_information":
            balance = mutual_information_loss(
                logits, token_mask=token_mask, group_sum=self.reduce_tokens_per_expert
            )
        elif self.balance_loss == "load_concentration":
            balance = load_concentration_loss(
                logits, token_mask=token_mask, group_sum=self.reduce_tokens_per_expert
            )
        else:
            balance = logits.new_zeros(())
        z_loss = router_z_loss(logits, token_mask=token_mask)
        aux_loss = self.aux_loss_coef * (balance + self.z_loss_weight * z_loss)
        with torch.no_grad():
            self.last_aux_loss.copy_(aux_loss)
            self.last_balance_loss.copy_(balance)
            self.last_z_loss.copy_(z_loss)
            # activation checkpointing runs the forward again in backward: counted once
            if self.selection_bias is not None and self.training and not recomputing():
                self.load_since_update.add_(tokens_per_expert)
        return aux_loss

    @torch.no_grad()
    def update_selection_bias(self) -> None:
        """Auxiliary-loss-free balancing step (DeepSeek-V3): raise the selection bias of
        experts that got fewer than the mean number of tokens since the last call, lower it
        for those that got more, by ``bias_update_rate``; then reset the load count."""
        if self.selection_bias is None:
            raise RuntimeError("update_selection_bias needs TopKRouter(bias_update_rate=...)")
        load = self.load_since_update
        self.selection_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
        load.zero_()


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest ``scores [N, E]`` of each row and their expert ids, largest first,
    ties to the lower id (a stable sort): which of two tied experts a token gets does not
    depend on how many experts there are (``torch.topk``'s order of ties does), so adding or
    pruning experts leaves every token's choice as it was. Ties are common in bf16 logits and
    in sigmoid scores that round to 1."""
    values, ids = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[:, :k].contiguous(), ids[:, :k].contiguous()


def inference(module: nn.Module) -> bool:
    """Whether ``module`` runs for inference: eval mode and no autograd (``generate``,
    evaluation). Its routers then compute no aux loss (0; ``last_aux_loss``,
    ``last_balance_loss`` and ``last_z_loss`` keep the last other forward's values), a decode
    step's router costs half as much; ``last_tokens_per_expert`` still counts."""
    return not module.training and not torch.is_grad_enabled()


def gate_logits(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` as fp32 logits ``[N, E]``. In fp32 (outside autocast) each logit is the
    float64 product rounded once, so it does not depend on how many rows the gate has: adding
    or pruning experts leaves the other experts' logits, and so the routing and the block's
    output, bit for bit unchanged (a fp32 matmul blocks its sums by the output width). Other
    dtypes and autocast: the gate's own linear, as transformers computes it."""
    if x.dtype == weight.dtype == torch.float32 and not autocasting(x.device.type):
        if no_autograd(x, weight):  # without the Function's overhead
            return _float64_product(x, weight)
        return _Float64Logits.apply(x, weight)
    return nn.functional.linear(x, weight).float()


def _float64_product(x: Tensor, weight: Tensor) -> Tensor:
    """fp32 ``x @ weight.T`` computed in float64 and rounded once (``linear``: the same
    product as ``@`` with the transposed weight, its bits, without the transposing view and
    ``matmul``'s dispatch: a cold decode step's gate 100 against 150 us)."""
    return nn.functional.linear(x.double(), weight.double()).float()


class _Float64Logits(torch.autograd.Function):
    """fp32 ``x @ weight.T`` computed in float64 and rounded once; the backward is the fp32
    linear's (nothing in float64 is kept for it)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return _float64_product(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        dx = grad @ weight if ctx.needs_input_grad[0] else None
        dweight = grad.T @ x if ctx.needs_input_grad[1] else None
        return dx, dweight


def _check_open_experts(closed: Tensor, top_k: int) -> None:
    """At least ``top_k`` experts must be open (``expert_prior > 0``; training can close them
    by driving a prior to 0 or below): else a token's k choices would include closed experts
    (gate 0, counted as chosen; NaN gates when none is open). A ValueError on CPU, a device-side
    assertion elsewhere and under ``torch.compile`` (no host synchronisation)."""
    message = f"fewer than top_k={top_k} experts are open (expert_prior > 0)"
    if closed.device.type == "cpu" and not torch.compiler.is_compiling():
        open_count = closed.numel() - int(closed.sum())
        if open_count < top_k:
            raise ValueError(f"{message}: {open_count} are; raise some priors above 0")
    else:
        torch._assert_async(closed.numel() - closed.sum() >= top_k, message)


def _log_prior(prior: Tensor) -> Tensor:
    """``log π`` of expert priors ``π[E]``, ``-inf`` where ``π <= 0`` (closed experts), with a
    zero (not NaN) gradient there."""
    tiny = torch.finfo(prior.dtype).tiny
    return torch.where(prior > 0, prior.clamp_min(tiny).log(), float("-inf"))


def named_modules_of(model: nn.Module, kind: type | tuple[type, ...]) -> dict[str, nn.Module]:
    """Every module of type ``kind`` in ``model`` (itself included, under the name ``""``) in
    module order, by its name in ``model.named_modules()`` without the ``_orig_mod`` parts that
    ``torch.compile`` adds (a compiled router itself: ``""`` as in eager)."""
    return {
        ".".join(part for part in name.split(".") if part != "_orig_mod"): module
        for name, module in model.named_modules()
        if isinstance(module, kind)
    }


def named_routers(model: nn.Module) -> dict[str, TopKRouter]:
    """Every :class:`TopKRouter` in ``model``, by name (:func:`named_modules_of`)."""
    return named_modules_of(model, TopKRouter)


def router_stats(model: nn.Module) -> dict:
    """Detached statistics of every :class:`TopKRouter` in ``model`` after its last forward,
    for logging: ``aux_loss``, the sum over routers of what they added to the training loss
    (each weighted by its ``aux_loss_coef``, as ``RouterOutput.aux_loss``); the unweighted sums
    ``balance_loss`` and ``z_loss``; and ``tokens_per_expert`` by router name (names as in
    ``model.named_modules()``, without the ``_orig_mod.`` that ``torch.compile`` adds)."""
    routers = named_routers(model)
    total = {
        key: sum(float(getattr(r, f"last_{key}")) for r in routers.values())
        for key in ("aux_loss", "balance_loss", "z_loss")
    }
    total["tokens_per_expert"] = tokens_per_expert(model)
    return total


def tokens_per_expert(model: nn.Module) -> dict[str, list[int]]:
    """Each router's assignments per expert in its last forward, by :func:`named_routers`."""
    return {name: r.last_tokens_per_expert.tolist() for name, r in named_routers(model).items()}


def check_keep_mask(mask: object, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
    """``mask`` as a bool tensor (True = real token), after checking it: bool, or integers that
    are all 0 or 1 (a float mask is refused: an additive mask of zeros means "keep all", a keep
    mask of zeros "keep none"); of ``shape`` when given. TypeError/ValueError naming ``name``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool tensor, got {type(mask).__name__}")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.dtype not in INTEGER_DTYPES:
            raise TypeError(
                f"{name} must be bool or integer (1 = real token, 0 = padding), got "
                f"{mask.dtype}; for an additive float mask m use (m == 0)"
            )
        check_index_range(mask, 2, name)  # 0 and 1 only
    return mask.bool()


def check_input_dtype(x, dtype: torch.dtype, name: str = "x") -> None:
    """Raise TypeError naming ``name`` unless ``x`` is a floating-point tensor of the block's
    parameter ``dtype``; under ``torch.autocast`` fp32, bf16 and fp16 are accepted (autocast
    casts them; it leaves float64 alone)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dtype != dtype and not (autocasting(x.device.type) and x.dtype in AUTOCAST_DTYPES):
        raise TypeError(
            f"{name} has dtype {x.dtype} but the block's parameters have dtype {dtype}: convert "
            f"one of them (x.to({dtype}) or block.to({x.dtype})), or run under torch.autocast"
        )
