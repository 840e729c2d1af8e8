"""Testing helpers, public so that anyone can test an expert kernel the way we test ours.

- :func:`reference_expert_linear`: the float64 oracle, a plain loop over assignments.
- Hypothesis strategies: :func:`routings` (random, skewed, empty experts, T=0, k=E) and
  :func:`feature_dims` (sizes that are not multiples of any block size).
- :func:`tolerances`: comparison tolerances from an error model (dtype, reduction length, k).

Example::

    from hypothesis import given
    from moe_blocks.testing import routings, reference_expert_linear

    @given(routings())
    def test_my_kernel(routing):
        ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor

from .kernels import DispatchPlan

__all__ = [
    "Routing",
    "feature_dims",
    "reference_expert_linear",
    "routings",
    "tolerances",
    "unit_roundoff",
]


def reference_expert_linear(
    x: Tensor,
    weight: Tensor,
    expert_idx: Tensor | DispatchPlan,
    *,
    bias: Tensor | None = None,
    gates: Tensor | None = None,
    sorted_indices: Tensor | None = None,
    grouped_in: bool = False,
    grouped_out: bool = False,
) -> Tensor:
    """What ``expert_linear`` computes, in float64, one assignment at a time.

    ``expert_idx`` is the routing ``[T, k]`` or a :class:`DispatchPlan` (whose
    ``sorted_indices`` then serve as the grouped order unless given). ``sorted_indices`` (the
    grouped order) is needed with ``grouped_in`` or ``grouped_out``. Differentiable: call it on
    float64 leaves to get reference gradients.
    """
    if isinstance(expert_idx, DispatchPlan):
        if sorted_indices is None:
            sorted_indices = expert_idx.sorted_indices
        expert_idx = expert_idx.expert_idx
    if (grouped_in or grouped_out) and sorted_indices is None:
        raise ValueError("grouped_in/grouped_out need sorted_indices (or pass the plan)")
    expert_idx, sorted_indices = (
        expert_idx.cpu(),
        (sorted_indices.cpu() if sorted_indices is not None else None),
    )
    num_tokens, top_k = expert_idx.shape
    x, weight = x.double(), weight.double()
    bias = bias.double() if bias is not None else None
    order = sorted_indices.tolist() if sorted_indices is not None else None
    position = {assignment: row for row, assignment in enumerate(order or [])}

    rows = []
    for assignment in range(num_tokens * top_k):
        token, slot = divmod(assignment, top_k)
        expert = int(expert_idx[token, slot])
        if grouped_in:
            x_row = x[position[assignment]]
        elif x.shape[0] == num_tokens * top_k:
            x_row = x[assignment]
        else:
            x_row = x[token]
        y_row = weight[expert] @ x_row
        if bias is not None:
            y_row = y_row + bias[expert]
        rows.append(y_row)
    y = torch.stack(rows) if rows else x.new_zeros(0, weight.shape[1])

    if gates is not None:
        gates = gates.double()
        out = [
            sum(gates[token, slot] * y[token * top_k + slot] for slot in range(top_k))
            for token in range(num_tokens)
        ]
        return torch.stack(out) if out else x.new_zeros(0, weight.shape[1])
    if grouped_out:
        return y[order] if order else y
    return y


@dataclass(frozen=True)
class Routing:
    """A routing of ``T`` tokens to ``k`` distinct experts each out of ``num_experts``."""

    expert_idx: Tensor  # [T, k] int64
    num_experts: int
    kind: str

    @property
    def num_tokens(self) -> int:
        return self.expert_idx.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_idx.shape[1]


ROUTING_KINDS = ("uniform", "one_expert_hot", "few_experts")


@st.composite
def routings(
    draw,
    *,
    min_tokens: int = 0,
    max_tokens: int = 48,
    max_experts: int = 64,
    max_assignments: int | None = None,
    kinds: tuple[str, ...] = ROUTING_KINDS,
) -> Routing:
    """Routings with T in [min_tokens, max_tokens] (0 included by default), E in
    [1, max_experts], k in [1, E], each token's k experts distinct, and at most
    ``max_assignments`` assignments T*k if given (T shrinks to fit, never below min_tokens).

    Kinds: ``uniform`` (random scores), ``one_expert_hot`` (every token picks one expert),
    ``few_experts`` (all tokens use only k or k+1 experts; the rest get nothing).
    """
    num_experts = draw(st.integers(1, max_experts))
    top_k = draw(st.one_of(st.integers(1, min(num_experts, 4)), st.integers(1, num_experts)))
    if max_assignments is not None:
        max_tokens = max(min_tokens, min(max_tokens, max_assignments // top_k))
    num_tokens = draw(st.integers(min_tokens, max_tokens))
    kind = draw(st.sampled_from(kinds))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    if kind == "one_expert_hot":
        scores[:, draw(st.integers(0, num_experts - 1))] += 2.0
    elif kind == "few_experts":
        used = min(num_experts, top_k + draw(st.integers(0, 1)))
        chosen = torch.randperm(num_experts, generator=generator)[:used]
        scores[:, chosen] += 2.0
    expert_idx = scores.topk(top_k, dim=1).indices
    return Routing(expert_idx=expert_idx, num_experts=num_experts, kind=kind)


def feature_dims(max_value: int = 160) -> st.SearchStrategy[int]:
    """Feature sizes, favouring ones that are not multiples of any block size."""
    odd = [size for size in (1, 7, 16, 100, 129) if size <= max_value]
    return st.one_of(st.sampled_from(odd), st.integers(1, max_value))


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2``: the largest relative error of rounding a real number to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def tolerances(
    dtype: torch.dtype, *, reduction_length: int = 256, top_k: int = 1, roundings: int = 2
) -> dict[str, float]:
    """``atol``/``rtol`` for comparing a ``dtype`` result of ``expert_linear`` (or any product
    accumulated in fp32) with the float64 reference, from a first-order error model.

    The model: the inputs are exact in ``dtype``; a result sums ``reduction_length`` products,
    then ``top_k`` rows, in the accumulation dtype (fp32; fp64 for fp64), which costs at most
    ``(reduction_length + top_k) · u(accumulation)`` relative to the magnitude of the terms;
    and it passes through ``roundings`` roundings to ``dtype``, each of which moves a value
    ``v`` by at most ``u(dtype) · |v|`` (``u``: :func:`unit_roundoff`; a truncating store, as in
    the Triton interpreter, moves it by up to ``2u · |v|``: count it twice). The coefficient

        c = roundings · u(dtype) + (reduction_length + top_k) · u(accumulation)

    is returned as both ``atol`` and ``rtol``, for ``|actual - expected| <= atol · scale +
    rtol · |expected|`` with ``scale`` the reference's largest magnitude (at least 1): the
    intermediates are taken to be no larger than ``scale``. The default ``roundings=2`` allows
    a rounded intermediate (such as the rows of ``x @ weight.T`` before the bias or the gates)
    besides the final rounding. bf16 with the defaults: c = 7.8e-3 + 1.5e-5.
    """
    if reduction_length < 0 or top_k < 1 or roundings < 0:
        raise ValueError(
            "tolerances needs reduction_length >= 0, top_k >= 1 and roundings >= 0; got "
            f"reduction_length={reduction_length}, top_k={top_k}, roundings={roundings}"
        )
    accumulation = torch.promote_types(dtype, torch.float32)
    coefficient = roundings * unit_roundoff(dtype) + (reduction_length + top_k) * unit_roundoff(
        accumulation
    )
    return {"atol": coefficient, "rtol": coefficient}
