"""MoEMLP: a drop-in Mixture-of-Experts MLP (JetMoE's, by default)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import ParallelExperts
from .kernels.plan import check_positive_int
from .losses import attach_aux_loss
from .router import TopKRouter

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def resolve_activation(activation: str | Callable[[Tensor], Tensor]) -> Callable:
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)} or a callable")
    return ACTIVATIONS[activation]


class MoEMLP(nn.Module):
    """``forward(x[..., d_model]) -> [..., d_model]``: each token goes through ``top_k`` of
    ``num_experts`` expert MLPs, weighted by its gates.

    ``out = Σ_j gate_j · W_out[e_j] · act(W_in[e_j] x) + bias``; with ``glu=True`` (default,
    JetMoE) ``W_in[e]`` maps to ``2·d_hidden`` features and ``act(first half) * second half``
    replaces ``act(·)``.

    Args:
        d_model, d_hidden: feature sizes; num_experts, top_k: E and k.
        activation: "silu" (default), "gelu", "gelu_tanh", "relu" or a callable.
        glu: gated linear unit experts (default True).
        bias: one shared output bias ``[d_model]`` added after the weighted sum (JetMoE).
        backend: the kernel backend ("auto", "torch", "triton").
        **router_options: passed to :class:`TopKRouter` (score, balance_loss, z_loss_weight,
            aux_loss_coef, bias_update_rate, ...).

    Submodules ``router``, ``input_linear``, ``output_linear`` and the parameter ``bias`` are
    named as in the JetMoE checkpoint. The router's aux loss (times ``aux_loss_coef``) reaches
    the gradient through the returned tensor; ``router.last_*`` hold the batch's statistics.
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **router_options,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.router = TopKRouter(d_model, num_experts, top_k, **router_options, **factory)
        check_positive_int("d_hidden", d_hidden)
        self.d_model, self.d_hidden, self.glu = d_model, d_hidden, glu
        self.activation = resolve_activation(activation)
        expanded = 2 * d_hidden if glu else d_hidden
        self.input_linear = ParallelExperts(
            num_experts, d_model, expanded, backend=backend, **factory
        )
        self.output_linear = ParallelExperts(
            num_experts, d_hidden, d_model, backend=backend, **factory
        )
        self.bias = nn.Parameter(torch.zeros(d_model, **factory)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}"
            )
        tokens = x.reshape(-1, self.d_model)
        route = self.router(tokens)
        hidden = self.input_linear(tokens, route.plan, grouped_out=True)
        if self.glu:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = self.activation(gate) * up
        else:
            hidden = self.activation(hidden)
        out = self.output_linear(hidden, route.plan, grouped_in=True, gates=route.gates)
        if self.bias is not None:
            out = out + self.bias
        out = attach_aux_loss(out, self.router.aux_loss_coef * route.aux_loss)
        return out.view(x.shape)
