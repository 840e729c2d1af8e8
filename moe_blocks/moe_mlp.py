"""MoEMLP: a drop-in Mixture-of-Experts MLP (JetMoE's, by default)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import InitMethod, ParallelExperts, check_init_method, local_tensor
from .kernels import DispatchPlan
from .kernels.checks import check_positive_int
from .kernels.ops import routed_mlp
from .losses import check_aux_loss_mode, route_aux_loss
from .modular import ModularBlock
from .router import RouterOutput, TopKRouter, check_input_dtype, check_keep_mask


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU's tanh approximation ``0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))``."""
    return F.gelu(x, approximate="tanh")


# By name; besides our "gelu_tanh", every name is one of transformers' (ACT2FN, a checkpoint's
# config.json) for the same function: "gelu_new", "gelu_fast", "gelu_accurate" and
# "gelu_python_tanh" write out the tanh approximation that "gelu_pytorch_tanh" computes in one
# kernel (equal up to rounding; gelu_fast rounds sqrt(2/π) to 10 decimals), "gelu_python" the
# exact GELU with erf. Not here: approximations of other functions (quick_gelu, gelu_10).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_tanh": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_python_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu_accurate": gelu_tanh,
    "relu": F.relu,
    "tanh": torch.tanh,
}


def glu(activation: Callable[[Tensor], Tensor], *, interleaved: bool = False) -> Callable:
    """Rows ``[N, 2F] -> [N, F]``: ``activation(gate) * up`` with the gate and up features as
    the two halves of each row, or interleaved (gate at even, up at odd positions)."""

    def apply(hidden: Tensor) -> Tensor:
        if interleaved:
            gate, up = hidden[:, ::2], hidden[:, 1::2]
        else:
            gate, up = hidden.chunk(2, dim=-1)
        return activation(gate) * up

    return apply


def resolve_activation(activation: str | Callable[[Tensor], Tensor]) -> Callable:
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)} or a callable")
    return ACTIVATIONS[activation]


class MoEMLP(ModularBlock, nn.Module):
    """``forward(x[..., d_model]) -> [..., d_model]``: each token goes through ``top_k`` of
    ``num_experts`` expert MLPs, weighted by its gates.

    ``out = Σ_j gate_j · W_out[e_j] · act(W_in[e_j] x) + bias``; with ``glu=True`` (default,
    JetMoE) ``W_in[e]`` maps to ``2·d_hidden`` features and ``act(first half) * second half``
    replaces ``act(·)``.

    Args:
        d_model, d_hidden: feature sizes; num_experts, top_k: E and k.
        activation: "silu" (default), "gelu", "gelu_tanh", "relu", "tanh", transformers'
            other names for these (``ACTIVATIONS``) or a callable.
        glu: gated linear unit experts (default True).
        bias: one shared output bias ``[d_model]`` added after the weighted sum (JetMoE).
        backend: the kernel backend ("auto", "torch", "triton").
        num_shared_experts: s always-on experts (DeepSeek-V2/V3, Qwen2-MoE) whose output every
            token adds to its routed output; default 0. s experts of width h compute exactly
            what one dense MLP of width s·h does (the same activation and GLU as the routed
            experts), which is how they are stored and run: ``shared_input_linear``
            ``[2·s·h or s·h, d_model]`` and ``shared_output_linear`` ``[d_model, s·h]``, two
            dense matmuls (faster than the routed kernel with every token on one expert; see
            docs/modularity.md).
        shared_d_hidden: h, the width of each shared expert (default ``d_hidden``).
        shared_gate: scale the shared output by ``sigmoid(shared_gate(x))``, a per-token scalar
            from a ``Linear(d_model, 1)`` (Qwen2-MoE's ``shared_expert_gate``).
        aux_loss: what happens to the router's aux loss (times ``aux_loss_coef``).
            ``"attach"`` (default): it reaches the gradient through the returned tensor, at
            weight 1 per backward (times :func:`moe_blocks.aux_loss_scale` when the loop scales
            its loss). ``"collect"``: the block attaches nothing; add
            :func:`moe_blocks.collect_aux_loss` of the block or model to your loss (then any
            scaling of the loss applies to it too); a backward through a forward whose aux
            loss was never collected raises.
        init_method: how the routed experts' input weights are initialised: a std (float),
            a callable filling the ``[E, out, in]`` tensor, or None (as ``nn.Linear``); see
            :class:`~moe_blocks.ParallelExperts`. output_init_method: the same for the output
            weights (default: ``init_method``).
        **router_options: passed to :class:`TopKRouter` (score, balance_loss, z_loss_weight,
            aux_loss_coef, bias_update_rate, ...).

    Submodules ``router``, ``input_linear``, ``output_linear`` and the parameter ``bias`` are
    named as in the JetMoE checkpoint; ``router.last_*`` hold the batch's statistics. Under
    autocast the output has the autocast dtype, as ``nn.Linear``'s.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        top_k: int,
        *,
        activation: str | Callable[[Tensor], Tensor] = "silu",
        glu: bool = True,
        bias: bool = True,
        backend: str = "auto",
        num_shared_experts: int = 0,
        shared_d_hidden: int | None = None,
        shared_gate: bool = False,
        aux_loss: str = "attach",
        init_method: InitMethod | None = None,
        output_init_method: InitMethod | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **router_options,
    ) -> None:
        super().__init__()
        check_aux_loss_mode(aux_loss)
        self.aux_loss_mode, self._aux_loss_record = aux_loss, None
        factory = {"device": device, "dtype": dtype}
        self.router = TopKRouter(d_model, num_experts, top_k, **router_options, **factory)
        check_positive_int("d_hidden", d_hidden)
        if isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int):
            raise ValueError(f"num_shared_experts must be an int >= 0, got {num_shared_experts!r}")
        if num_shared_experts:
            check_positive_int("num_shared_experts", num_shared_experts)
            shared_d_hidden = d_hidden if shared_d_hidden is None else shared_d_hidden
            check_positive_int("shared_d_hidden", shared_d_hidden)
        elif shared_d_hidden is not None or shared_gate:
            raise ValueError("shared_d_hidden and shared_gate need num_shared_experts >= 1")
        self.d_model, self.d_hidden, self.glu = d_model, d_hidden, glu
        self.activation = resolve_activation(activation)
        expanded = 2 * d_hidden if glu else d_hidden
        self.input_linear = ParallelExperts(
            num_experts, d_model, expanded, backend=backend, init_method=init_method, **factory
        )
        output_init_method = init_method if output_init_method is None else output_init_method
        check_init_method(output_init_method, "output_init_method")
        self.output_linear = ParallelExperts(
            num_experts, d_hidden, d_model, backend=backend, init_method=output_init_method,
            **factory,
        )  # fmt: skip
        self.num_shared_experts = num_shared_experts
        self.shared_input_linear = self.shared_output_linear = self.shared_gate = None
        if num_shared_experts:
            shared = num_shared_experts * shared_d_hidden
            self.shared_input_linear = nn.Linear(
                d_model, 2 * shared if glu else shared, bias=False, **factory
            )
            self.shared_output_linear = nn.Linear(shared, d_model, bias=False, **factory)
            if shared_gate:
                self.shared_gate = nn.Linear(d_model, 1, bias=False, **factory)
        self.bias = nn.Parameter(torch.zeros(d_model, **factory)) if bias else None
        # How routed tokens reach the experts: None runs them all here (self.experts); expert
        # parallelism (moe_blocks.parallel.ExpertParallel) installs a callable
        # (mlp, tokens[T, d_model], route) -> [T, d_model] that exchanges them between ranks.
        self.token_dispatcher: Callable[[MoEMLP, Tensor, RouterOutput], Tensor] | None = None

    def reset_parameters(self) -> None:
        """Re-initialise the whole block: router, experts and shared experts (as ``nn.Linear``),
        an ``activation`` module through its ``reset_parameters`` (``nn.PReLU``; ``nn.GELU``
        has nothing to reset), bias 0 (e.g. after building on the meta device and
        ``to_empty``). An activation module with parameters but no ``reset_parameters`` is a
        TypeError naming it (its parameters would stay what ``to_empty`` left)."""
        for name, module in self.named_children():
            reset = getattr(module, "reset_parameters", None)
            if reset is not None:
                reset()
            elif any(True for _ in module.parameters()):
                raise TypeError(
                    f"{name} ({type(module).__name__}) has parameters but no reset_parameters: "
                    "give it one, or re-initialise its parameters yourself"
                )
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, *, token_mask: Tensor | None = None) -> Tensor:
        """``x[..., d_model]`` of the block's dtype (any floating dtype under autocast).

        ``token_mask``: optional, ``x``'s shape without its last dimension, bool (or 0/1
        integers), True for real tokens, False for padding: padding counts in no statistic of
        the router (aux loss, balance, z-loss, tokens per expert, bias balancing's load)."""
        check_input_dtype(x, self.input_linear.weight.dtype)
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}"
            )
        tokens = x.reshape(-1, self.d_model)
        if token_mask is not None:
            token_mask = check_keep_mask(token_mask, "token_mask", tuple(x.shape[:-1]))
            token_mask = token_mask.reshape(-1)
        route = self.router(tokens, token_mask)
        # The aux loss rides on the gates, which every backward pass through the output reaches,
        # so the returned tensor is an ordinary one that callers may modify in place.
        gates = route_aux_loss(self, route.gates, route.aux_loss)
        if gates is not route.gates:  # (inference attaches nothing)
            route = replace(route, gates=gates)
        if self.token_dispatcher is None:
            out = self.experts(tokens, route.plan, gates=route.gates)
        else:
            out = self.token_dispatcher(self, tokens, route)
        if self.shared_input_linear is not None:
            out = out + self.shared_experts(tokens)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)  # the autocast dtype stays, as nn.Linear's
        return out.view(x.shape)

    def shared_experts(self, tokens: Tensor) -> Tensor:
        """The shared experts' output for ``tokens[T, d_model]``: ``[T, d_model]``, times
        ``sigmoid(shared_gate(tokens))`` when the block has a shared gate."""
        out = self.shared_output_linear(self._activate(self.shared_input_linear(tokens)))
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(tokens)) * out
        return out

    def _activate(self, hidden: Tensor) -> Tensor:
        """The activation: ``act(first half) * second half`` with GLU, else ``act(hidden)``."""
        return glu(self.activation)(hidden) if self.glu else self.activation(hidden)

    def experts(self, rows: Tensor, plan: DispatchPlan, gates: Tensor | None = None) -> Tensor:
        """The routed experts ``W_out[e] · act(W_in[e] · row)`` for each assignment of ``plan``.

        ``rows`` are read as :func:`~moe_blocks.expert_linear` reads ``x`` (``[T, d_model]`` or
        ``[T*k, d_model]``). Returns each token's gate-weighted sum ``[T, d_model]`` with
        ``gates[T, k]``, else one row per assignment in assignment order ``[T*k, d_model]``."""
        linears = (self.input_linear, self.output_linear)
        if gates is not None and not any(map(_hooked_or_sharded, linears)):
            out = routed_mlp(  # inference on CPU: one pass over the experts, else None
                rows, *(linear.weight for linear in linears), plan, gates, self._activate,
                self.input_linear.backend,
            )  # fmt: skip
            if out is not None:
                return out
        hidden = self._activate(self.input_linear(rows, plan, grouped_out=True))
        return self.output_linear(hidden, plan, grouped_in=True, gates=gates)


def _hooked_or_sharded(experts: nn.Module) -> bool:
    """Whether ``experts`` must run through its own forward: it is not a plain
    :class:`ParallelExperts` (a wrapper such as PEFT's LoRA ``ParamWrapper``), it has forward
    hooks (FSDP2's unsharding, a user's) or its weight is a DTensor (expert parallelism's local
    experts)."""
    if type(experts) is not ParallelExperts:
        return True
    hooked = experts._forward_hooks or experts._forward_pre_hooks
    return bool(hooked) or local_tensor(experts.weight) is not experts.weight
