"""Upcycling: a dense GLU MLP becomes the experts and router of an MoE block.

Three methods, each a function of the dense weights ``gate [F, d]``, ``up [F, d]`` and ``down
[d, F]`` (the three ``nn.Linear`` weights of a SwiGLU/GeGLU MLP):

- ``"copy"``, sparse upcycling (Komatsuzaki et al., 2022, "Sparse Upcycling: Training
  Mixture-of-Experts from Dense Checkpoints"): every expert is the dense MLP. With gates that
  sum to 1 per token the block computes the dense MLP for every input, whatever the router
  picks. Options: the router's initial weights (``router_std``: normal with that std, or zeros
  with 0) and ``noise_std``, Gaussian noise added to each expert's copy, relative to each
  dense matrix's std, so that the experts differ from the first step (the output then differs
  from the dense MLP by that noise).
- ``"drop"``, Drop-Upcycling (Nakamura et al., ICLR 2025): each expert starts as a copy, then a
  different random fraction ``drop_ratio`` of its intermediate neurons (rows of gate and up,
  the same columns of down) is drawn anew from a normal distribution with the mean and std of
  that dense matrix. The kept neurons are the dense ones; the output is not the dense MLP's
  unless ``drop_ratio`` is 0.
- ``"granular"``, fine-grained upcycling (Megatron-Core's granular upcycling, OLMo-core's
  virtual groups): the intermediate dimension is cut into ``granularity`` G slices of F/G
  neurons; expert ``c·G + g`` is slice g of copy c (E = G × copies), its output weights scaled
  by G. The router's rows are equal within a copy (so a copy's G experts have one logit) and
  ``top_k`` is a multiple of G, so the top-k picks whole copies: with gates summing to 1 the
  chosen copies' gates sum to 1/G each slice, the G slices of a copy sum to the dense
  intermediate sum, and the block computes the dense MLP (exact up to rounding, for every
  input whose copies' logits do not tie at the top-k boundary: a random router, or top_k = E).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

from .kernels.checks import check_positive_int, check_top_k
from .moe_mlp import MoEMLP

UPCYCLE_METHODS = ("copy", "drop", "granular")


@dataclass(frozen=True)
class UpcycledWeights:
    """An MoE block's weights from a dense MLP: ``router [E, d]``, ``w_in [E, 2·F', d]`` (each
    expert's gate rows, then its up rows), ``w_out [E, d, F']``; F' = F, or F/G for
    ``"granular"``."""

    router: Tensor
    w_in: Tensor
    w_out: Tensor


@dataclass(frozen=True)
class UpcycleOptions:
    """How a dense MLP is upcycled (see the module docstring for the methods).

    Attributes:
        method: ``"copy"``, ``"drop"`` or ``"granular"``.
        router_std: the router's initial weights are normal with this std (0: zeros). For
            ``"granular"`` with top_k < E it must be > 0 (zeros tie every copy).
        noise_std: ``"copy"`` and ``"granular"``: add ``noise_std · std(W) · N(0, 1)`` to each
            expert's copy of each dense matrix W (0: exact copies).
        drop_ratio: ``"drop"`` only: the fraction of each expert's intermediate neurons drawn
            anew, in [0, 1], rounded to whole neurons (default 0.5, the paper's best).
        granularity: ``"granular"`` only: G, the slices of the intermediate dimension (F % G
            == 0; E and top_k multiples of G); default top_k, so that each token's experts
            are the G slices of one copy (E / top_k copies).
    """

    method: str = "copy"
    router_std: float = 0.02
    noise_std: float = 0.0
    drop_ratio: float | None = None
    granularity: int | None = None

    def checked(self, d_ffn: int, num_experts: int, top_k: int) -> UpcycleOptions:
        """These options with the defaults that apply filled in, once checked for a dense MLP
        of intermediate size ``d_ffn`` upcycled to ``num_experts`` experts, ``top_k`` per
        token (before any weight is read or written); ValueError naming the option
        otherwise."""
        check_positive_int("d_ffn", d_ffn)
        check_top_k(top_k, num_experts)
        method, drop_ratio, granularity = self.method, self.drop_ratio, self.granularity
        if method not in UPCYCLE_METHODS:
            raise ValueError(f"method must be one of {UPCYCLE_METHODS}, got {method!r}")
        for name in ("router_std", "noise_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if drop_ratio is not None and method != "drop":
            raise ValueError(f"drop_ratio applies to method='drop', not {method!r}")
        if granularity is not None and method != "granular":
            raise ValueError(f"granularity applies to method='granular', not {method!r}")
        if method == "drop":
            drop_ratio = 0.5 if drop_ratio is None else drop_ratio
            if (
                isinstance(drop_ratio, bool)
                or not isinstance(drop_ratio, (int, float))
                or not (0 <= drop_ratio <= 1)
            ):
                raise ValueError(f"drop_ratio must be in [0, 1], got {drop_ratio!r}")
            if self.noise_std:
                raise ValueError("noise_std applies to methods 'copy' and 'granular', not 'drop'")
        if method == "granular":
            granularity = top_k if granularity is None else granularity
            check_positive_int("granularity", granularity)
            for name, value in (("d_ffn (the dense intermediate size)", d_ffn),
                                ("num_experts", num_experts), ("top_k", top_k)):  # fmt: skip
                if value % granularity:
                    raise ValueError(f"{name} ({value}) must be a multiple of granularity "
                                     f"({granularity}) for method='granular'")  # fmt: skip
            if top_k < num_experts and self.router_std == 0:
                raise ValueError(
                    "method='granular' with top_k < num_experts needs router_std > 0: a zero "
                    "router ties every copy, and the top-k would not pick whole copies"
                )
        return replace(self, drop_ratio=drop_ratio, granularity=granularity)


def upcycle_weights(
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    *,
    num_experts: int,
    top_k: int,
    seed: int | None = None,
    **options,
) -> UpcycledWeights:
    """The experts and router of an upcycled MoE block (see the module docstring for the
    methods). ``gate``, ``up``: ``[F, d]``; ``down``: ``[d, F]``; the results have their dtype
    and device, and share no storage with them (nothing passed in is modified).

    Args:
        num_experts: E. top_k: k in [1, E].
        seed: seeds every random draw (router, noise, dropped neurons); None: a fresh random
            seed.
        **options: the fields of :class:`UpcycleOptions` (``method``, ``router_std``,
            ``noise_std``, ``drop_ratio``, ``granularity``).
    """
    _check_dense(gate, up, down)
    check_seed(seed)
    hidden, d_model = gate.shape
    chosen = UpcycleOptions(**options).checked(hidden, num_experts, top_k)
    method, drop_ratio, granularity = chosen.method, chosen.drop_ratio, chosen.granularity
    router_std, noise_std = chosen.router_std, chosen.noise_std
    copies = num_experts // (granularity or 1)
    generator = torch.Generator(gate.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    def normal(shape, mean, std) -> Tensor:
        draw = torch.randn(shape, generator=generator, device=gate.device, dtype=torch.float32)
        return (draw * std + mean).to(gate.dtype)

    router = (
        normal((copies, d_model), 0.0, router_std)
        if router_std
        else gate.new_zeros(copies, d_model)
    )
    w_in = torch.cat([gate, up]).expand(copies, 2 * hidden, d_model).clone()
    w_out = down.expand(copies, d_model, hidden).clone()
    if noise_std:
        for copied, dense in ((w_in[:, :hidden], gate), (w_in[:, hidden:], up), (w_out, down)):
            copied += normal(copied.shape, 0.0, noise_std * _statistics(dense)[1])
    if method == "drop":
        dropped = round(drop_ratio * hidden)
        for expert in range(num_experts):
            neurons = torch.randperm(hidden, generator=generator, device=gate.device)[:dropped]
            for dense, rows in ((gate, neurons), (up, neurons + hidden)):
                w_in[expert, rows] = normal((dropped, d_model), *_statistics(dense))
            w_out[expert][:, neurons] = normal((d_model, dropped), *_statistics(down))
    if method == "granular":
        width = hidden // granularity
        w_in = w_in.view(copies, 2, granularity, width, d_model).transpose(1, 2)
        w_in = w_in.reshape(num_experts, 2 * width, d_model)
        w_out = w_out.view(copies, d_model, granularity, width).permute(0, 2, 1, 3)
        w_out = (w_out * granularity).reshape(num_experts, d_model, width)
        router = router.repeat_interleave(granularity, dim=0)
    return UpcycledWeights(
        router=router.contiguous(), w_in=w_in.contiguous(), w_out=w_out.contiguous()
    )


def check_seed(seed: object) -> None:
    """TypeError naming ``seed`` unless it is an int or None."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")


def _statistics(weight: Tensor) -> tuple[float, float]:
    """The mean and std of a dense matrix, which Drop-Upcycling's re-drawn neurons take."""
    values = weight.float()
    return values.mean().item(), values.std().item() if values.numel() > 1 else 0.0


def _check_dense(gate: Tensor, up: Tensor, down: Tensor) -> None:
    for name, weight in (("gate", gate), ("up", up), ("down", down)):
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            found = (
                f"{weight.dtype} {tuple(weight.shape)}"
                if isinstance(weight, Tensor)
                else (type(weight).__name__)
            )
            raise ValueError(f"{name} must be a 2-D floating-point weight, got {found}")
    if up.shape != gate.shape or down.shape != gate.shape[::-1]:
        raise ValueError(
            f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must be [F, d] and down "
            f"{tuple(down.shape)} [d, F] of one dense GLU MLP"
        )
    if (
        len({gate.dtype, up.dtype, down.dtype}) > 1
        or len({gate.device, up.device, down.device}) > 1
    ):
        raise ValueError("gate, up and down must share one dtype and device")


def dense_glu_weights(mlp: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Callable]:
    """``(gate [F, d], up [F, d], down [d, F], output bias or None, activation)`` of a dense GLU
    MLP: a module with ``gate_proj``, ``up_proj``, ``down_proj`` ``nn.Linear``s and ``act_fn``
    (transformers' Llama/Mistral/Qwen2/Qwen3/Gemma MLPs), or an :class:`MoEMLP` with one expert
    and ``glu=True`` (a dense GLU MLP in our own layout)."""
    if isinstance(mlp, MoEMLP):
        if mlp.router.num_experts != 1 or not mlp.glu or mlp.num_shared_experts:
            raise ValueError(
                "mlp: an MoEMLP is a dense MLP to upcycle only with num_experts=1, glu=True and "
                f"no shared experts; got num_experts={mlp.router.num_experts}, glu={mlp.glu}, "
                f"num_shared_experts={mlp.num_shared_experts}"
            )
        gate, up = mlp.input_linear.weight[0].chunk(2)
        return gate, up, mlp.output_linear.weight[0], mlp.bias, mlp.activation
    linears = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(linear, nn.Linear) for linear in linears) or not callable(
        getattr(mlp, "act_fn", None)
    ):
        raise TypeError(
            f"mlp must be a dense GLU MLP (gate_proj, up_proj, down_proj nn.Linear and act_fn, as "
            f"transformers' LlamaMLP) or an MoEMLP with one expert, got {type(mlp).__name__}"
        )
    gate_proj, up_proj, down_proj = linears
    if gate_proj.bias is not None or up_proj.bias is not None:
        raise ValueError(
            "mlp: gate_proj and up_proj have biases, which MoEMLP's experts do not (only an "
            "output bias); not supported"
        )
    return gate_proj.weight, up_proj.weight, down_proj.weight, down_proj.bias, mlp.act_fn


def upcycle_mlp(
    mlp: nn.Module, *, num_experts: int, top_k: int, method: str = "copy", **options
) -> MoEMLP:
    """A new :class:`MoEMLP` upcycled from the dense GLU MLP ``mlp`` (see
    :func:`dense_glu_weights` for what it accepts) by ``method``, on its device and dtype, with
    its activation and output bias. The router scores top-k then softmax (gates summing to 1,
    JetMoE's), so with ``"copy"`` and ``"granular"`` (no noise) the block computes ``mlp``'s
    output for every input. ``options``: those of :func:`upcycle_weights`; the rest go to
    :class:`MoEMLP` (``aux_loss_coef``, ``backend``, ...). ``mlp`` is not modified."""
    weight_options = {
        key: options.pop(key)
        for key in {field.name for field in fields(UpcycleOptions)} - {"method"} | {"seed"}
        if key in options
    }
    gate, up, down, bias, activation = dense_glu_weights(mlp)
    with torch.no_grad():
        weights = upcycle_weights(
            gate.detach(), up.detach(), down.detach(), num_experts=num_experts, top_k=top_k,
            method=method, **weight_options,
        )  # fmt: skip
    block = MoEMLP(
        gate.shape[1], weights.w_out.shape[2], num_experts, top_k, activation=activation,
        bias=bias is not None, device=gate.device, dtype=gate.dtype, **options,
    )  # fmt: skip
    with torch.no_grad():
        block.router.layer.weight.copy_(weights.router)
        block.input_linear.weight.copy_(weights.w_in)
        block.output_linear.weight.copy_(weights.w_out)
        if bias is not None:
            block.bias.copy_(bias)
    return block
