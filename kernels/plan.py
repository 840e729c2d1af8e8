"""Routing plans: which assignment goes to which expert, in grouped (expert-sorted) order.

Routing of T tokens to k of E experts is an index tensor ``expert_idx[T, k]``; assignment
``a = t*k + j`` goes to expert ``expert_idx[t, j]``. "Grouped order" lists the T*k assignments
sorted by expert (stable, so ascending assignment id within an expert).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


class RowLayout(IntEnum):
    """How the rows of an activation tensor relate to grouped row ``i``.

    GROUPED: row ``i`` itself. ASSIGNMENT: row ``sorted_indices[i]`` (one row per assignment,
    assignment order). TOKEN: row ``sorted_indices[i] // k`` (one row per token, read k times).
    """

    GROUPED = 0
    ASSIGNMENT = 1
    TOKEN = 2


@dataclass(frozen=True)
class DispatchPlan:
    """The grouping of ``T*k`` assignments by expert, built by :func:`plan_dispatch`.

    Attributes:
        expert_idx: ``[T, k]`` int64, the routing it was built from.
        sorted_indices: ``[T*k]`` int64, assignment ids in grouped order (experts non-decreasing).
        sorted_experts: ``[T*k]`` int64, the expert of each grouped row.
        expert_offsets: ``[E+1]`` int64, grouped rows of expert ``e`` are
            ``expert_offsets[e]:expert_offsets[e+1]``.
        tokens_per_expert: ``[E]`` int64, assignments per expert.
        num_experts: E.
    """

    expert_idx: Tensor
    sorted_indices: Tensor
    sorted_experts: Tensor
    expert_offsets: Tensor
    tokens_per_expert: Tensor
    num_experts: int

    @property
    def num_tokens(self) -> int:
        return self.expert_idx.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_idx.shape[1]

    @property
    def num_assignments(self) -> int:
        return self.expert_idx.shape[0] * self.expert_idx.shape[1]

    @property
    def device(self) -> torch.device:
        return self.expert_idx.device


def plan_dispatch(expert_idx: Tensor, num_experts: int) -> DispatchPlan:
    """Sort the assignments of ``expert_idx[T, k]`` by expert and count them per expert.

    Everything is computed on ``expert_idx``'s device without reading values on the host. The
    range check ``0 <= expert_idx < num_experts`` raises ``ValueError`` on CPU; on other devices
    (and under ``torch.compile``) it is a device-side assertion, so it costs no synchronisation.

    Args:
        expert_idx: integer tensor ``[T, k]`` (any integer dtype).
        num_experts: E, a positive int.
    """
    if not isinstance(expert_idx, Tensor):
        raise TypeError(f"expert_idx must be a torch.Tensor, got {type(expert_idx).__name__}")
    if expert_idx.dtype not in INTEGER_DTYPES:
        raise TypeError(f"expert_idx must have a dtype in {INTEGER_DTYPES}, got {expert_idx.dtype}")
    if expert_idx.dim() != 2:
        raise ValueError(f"expert_idx must be 2-D [T, k], got shape {tuple(expert_idx.shape)}")
    check_positive_int("num_experts", num_experts)
    if expert_idx.shape[1] < 1:
        raise ValueError("expert_idx must have at least one column (k >= 1)")
    check_index_range(expert_idx, num_experts, "expert_idx", "num_experts")

    expert_idx = expert_idx.to(torch.int64)
    flat = expert_idx.reshape(-1)
    sorted_experts, sorted_indices = torch.sort(flat, stable=True)
    boundaries = torch.arange(num_experts + 1, device=flat.device, dtype=torch.int64)
    expert_offsets = torch.searchsorted(sorted_experts, boundaries)
    return DispatchPlan(
        expert_idx=expert_idx,
        sorted_indices=sorted_indices,
        sorted_experts=sorted_experts,
        expert_offsets=expert_offsets,
        tokens_per_expert=expert_offsets.diff(),
        num_experts=num_experts,
    )


def check_positive_int(name: str, value) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_non_negative(name: str, value) -> None:
    """Raise TypeError (not a real number) or ValueError (negative, NaN, infinite) naming
    ``name`` unless ``value`` is a finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def check_index_range(values: Tensor, upper: int, name: str, bound: str | None = None) -> None:
    """Require ``0 <= values < upper`` without a host synchronisation where one would cost:
    ``ValueError`` naming ``name`` (and ``bound``, the name of ``upper``) on CPU; a device-side
    assertion on other devices and under ``torch.compile``."""
    if values.numel() == 0:
        return
    limit = str(upper) if bound is None else f"{bound}={upper}"
    if values.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(values))  # Python ints: no dtype wrap-around
        if low < 0 or high >= upper:
            raise ValueError(
                f"{name} values must lie in [0, {limit}), got values in [{low}, {high}]"
            )
    else:
        wide = values.to(torch.int64)
        in_range = (wide >= 0).all() & (wide < upper).all()
        torch._assert_async(in_range, f"{name} values must lie in [0, {limit})")
