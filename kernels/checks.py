"""Input checks shared by the kernels, the blocks and the models: each raises a clear error
naming the argument (never a crash inside a kernel, never a silently wrong answer)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


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


def check_positive(name: str, value) -> None:
    """:func:`check_non_negative`, and a ValueError naming ``name`` for 0."""
    check_non_negative(name, value)
    if value == 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


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


def check_top_k(top_k: object, num_experts: object) -> None:
    """ValueError naming the argument unless ``num_experts`` and ``top_k`` are positive ints
    with ``top_k <= num_experts``."""
    check_positive_int("num_experts", num_experts)
    check_positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) must not exceed num_experts ({num_experts})")
