"""Routing plans: which assignment goes to which expert, in grouped (expert-sorted) order.

Routing of T tokens to k of E experts is an index tensor ``expert_idx[T, k]``; assignment
``a = t*k + j`` goes to expert ``expert_idx[t, j]``. "Grouped order" lists the T*k assignments
sorted by expert (stable, so ascending assignment id within an expert).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from .checks import INTEGER_DTYPES, check_index_range, check_positive_int


class RowLayout(IntEnum):
    """How the rows of an activation tensor relate to grouped row ``i``.

    GROUPED: row ``i`` itself. ASSIGNMENT: row ``sorted_indices[i]`` (one row per assignment,
    assignment order). TOKEN: row ``sorted_indices[i] // k`` (one row per token, read k times).
    """

    GROUPED = 0
    ASSIGNMENT = 1
    TOKEN = 2


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype TOKEN outputs are summed in: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def token_sum(
    rows: Tensor, fan_out: int, gates: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """ASSIGNMENT rows to TOKEN rows: ``Σ_j gates[t, j] · rows[t*k + j]`` for every token t
    (``rows [T*k, out]``, ``gates [T, k]`` or ``[T*k]``, 1 if None; k = ``fan_out``), summed in
    :func:`accumulation_dtype`, which the result ``[T, out]`` keeps (the caller rounds once);
    written into ``out`` if given."""
    wide = accumulation_dtype(rows.dtype)
    terms = rows.view(rows.shape[0] // fan_out, fan_out, rows.shape[1])
    if gates is None:
        terms = terms.to(wide)
    else:  # each term float(row) * gate
        gates = gates.reshape(terms.shape[0], fan_out, 1).to(wide)
        # 16-bit rows widened first, then gated in place: the same products; gated_token_sum
        # 1.22-1.34x faster than with one mixed-dtype product (bf16, k = 8, 64-2048 tokens,
        # the AVX2 EPYC; k = 2 within noise)
        terms = terms * gates if terms.dtype == wide else terms.to(wide).mul_(gates)
    return terms.sum(1) if out is None else torch.sum(terms, 1, out=out)


@dataclass(frozen=True)
class DispatchPlan:
    """The grouping of ``T*k`` assignments by expert, built by :func:`plan_dispatch`.

    Attributes:
        expert_idx: ``[T, k]`` int64, the routing it was built from.
        num_experts: E.

    Properties (the grouping, computed on ``expert_idx``'s device the first time one of them
    is read, then kept; a one-token decode step on CPU reads none: its products take the
    order from :meth:`one_token_order`, and the grouping's four small ops each cost 30-60 us
    there, the caches cold from the weights streaming through):
        sorted_indices: ``[T*k]`` int64, assignment ids in grouped order (experts
            non-decreasing).
        sorted_experts: ``[T*k]`` int64, the expert of each grouped row.
        expert_offsets: ``[E+1]`` int64, grouped rows of expert ``e`` are
            ``expert_offsets[e]:expert_offsets[e+1]``.
        tokens_per_expert: ``[E]`` int64, assignments per expert.
    """

    expert_idx: Tensor
    num_experts: int

    @property
    def sorted_indices(self) -> Tensor:
        return self._grouping()[0]

    @property
    def sorted_experts(self) -> Tensor:
        return self._grouping()[1]

    @property
    def expert_offsets(self) -> Tensor:
        return self._grouping()[2]

    @property
    def tokens_per_expert(self) -> Tensor:
        return self._grouping()[3]

    def _grouping(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        grouping = self.__dict__.get("_grouped")
        if grouping is None:
            flat = self.expert_idx.reshape(-1)
            sorted_experts, sorted_indices = torch.sort(flat, stable=True)
            boundaries = torch.arange(self.num_experts + 1, device=flat.device, dtype=flat.dtype)
            expert_offsets = torch.searchsorted(sorted_experts, boundaries)
            grouping = (sorted_indices, sorted_experts, expert_offsets, expert_offsets.diff())
            # kept on the (frozen) plan itself: torch.compile traces this, where Python 3.11's
            # functools.cached_property takes a lock it cannot
            object.__setattr__(self, "_grouped", grouping)
        return grouping

    def one_token_order(self) -> tuple[list[int], list[int]]:
        """For a plan of one token: its slots in grouped order and their experts, as host
        lists (``sorted_indices`` and ``sorted_experts``, read from ``expert_idx`` without
        computing the grouping)."""
        if self.num_tokens != 1:
            raise ValueError(f"one_token_order needs a plan of one token, got {self.num_tokens}")
        ids = self.expert_idx[0].tolist()
        slots = sorted(range(len(ids)), key=ids.__getitem__)  # stable, as the grouping
        return slots, [ids[slot] for slot in slots]

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
    """The plan that sorts the assignments of ``expert_idx[T, k]`` by expert and counts them
    per expert (when first read: :class:`DispatchPlan`).

    Everything is computed on ``expert_idx``'s device without reading values on the host. The
    range check ``0 <= expert_idx < num_experts`` raises ``ValueError`` on CPU; on other devices
    (and under ``torch.compile``) it is a device-side assertion, so it costs no synchronisation.

    Args:
        expert_idx: integer tensor ``[T, k]``: int8, uint8, int16, int32 or int64 (torch's
            uint16, uint32 and uint64, which most of its ops do not take, are refused).
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
    return plan_valid_routing(expert_idx, num_experts)


def plan_valid_routing(expert_idx: Tensor, num_experts: int) -> DispatchPlan:
    """:func:`plan_dispatch` for a routing known to be valid (a router's own top-k: an integer
    ``[T, k]`` tensor of ids in ``[0, num_experts)``), without the checks, whose range check
    reads two values on the host (a decode step's router spends its time in such small
    steps)."""
    return DispatchPlan(expert_idx=expert_idx.to(torch.int64), num_experts=num_experts)
