"""The PyTorch backend: gather, one grouped matmul (``torch._grouped_mm``), scatter.

This is the CPU path. Nothing here reads a tensor value on the host, except the per-expert
loop used where ``_grouped_mm`` cannot run the dtype (float64, or a torch build without it),
which reads the E+1 expert offsets once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .plan import RowLayout

_ALIGN_BYTES = 16  # _grouped_mm wants every non-unit stride to be a multiple of 16 bytes
# This backend copies rows into grouped order before each matmul, so the backward pass groups
# the output gradient once and hands both products (dx and dW) the grouped copy.
COPIES_ROWS_TO_GROUPED = True


def source_rows(layout: int, sorted_indices: Tensor, fan_out: int) -> Tensor | None:
    """Row of a ``layout`` tensor that holds grouped row ``i`` (None: row ``i`` itself)."""
    if layout == RowLayout.GROUPED:
        return None
    if layout == RowLayout.ASSIGNMENT:
        return sorted_indices
    return torch.div(sorted_indices, fan_out, rounding_mode="floor")


def to_grouped(t: Tensor, layout: int, sorted_indices: Tensor, fan_out: int) -> Tensor:
    rows = source_rows(layout, sorted_indices, fan_out)
    return t if rows is None else t.index_select(0, rows)


def from_grouped(t: Tensor, layout: int, sorted_indices: Tensor) -> Tensor:
    """Put grouped rows into ``layout`` (GROUPED or ASSIGNMENT)."""
    if layout == RowLayout.GROUPED:
        return t
    return torch.empty_like(t).index_copy_(0, sorted_indices, t)


def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs ``dtype`` on ``device`` in this torch build."""
    device = torch.device(device)
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return False


def _layout_accepted(matrix: Tensor) -> bool:
    """Whether ``_grouped_mm`` takes ``matrix`` as it is: row- or column-major in its last two
    dims with the leading stride a multiple of 16 bytes, and 16-byte aligned data."""
    multiple = _ALIGN_BYTES // matrix.element_size()
    (rows, cols), (row_stride, col_stride) = matrix.shape[-2:], matrix.stride()[-2:]
    if col_stride == 1 and row_stride >= max(1, cols):
        leading = row_stride
    elif row_stride == 1 and col_stride >= max(1, rows):
        leading = col_stride
    else:
        return False
    return leading % multiple == 0 and matrix.data_ptr() % _ALIGN_BYTES == 0


def _mm_operand(t: Tensor, transposed: bool = False) -> Tensor:
    """``t``, or a copy of it, such that ``_grouped_mm`` accepts it (``t.mT`` if
    ``transposed``). A last dimension whose size is not a multiple of 16 bytes is zero-padded,
    so both operands sharing that (reduction) dimension must go through here."""
    pad = -t.shape[-1] % (_ALIGN_BYTES // t.element_size())
    if pad:
        return F.pad(t, (0, pad))
    if _layout_accepted(t.mT if transposed else t):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)  # canonical strides


def _offsets_int32(expert_offsets: Tensor) -> Tensor:
    return expert_offsets[1:].to(torch.int32)


def _host_bounds(expert_offsets: Tensor) -> list[int]:
    return expert_offsets.tolist()


def grouped_matmul(x_grouped: Tensor, weight: Tensor, expert_offsets: Tensor) -> Tensor:
    """``out[i] = x_grouped[i] @ weight[e(i)].T`` for grouped rows; ``[R, out]``, x's dtype."""
    rows, num_out = x_grouped.shape[0], weight.shape[1]
    if rows == 0 or num_out == 0 or x_grouped.shape[1] == 0:
        return x_grouped.new_zeros(rows, num_out)
    if grouped_mm_runs(x_grouped.device, x_grouped.dtype):
        out = torch._grouped_mm(
            _mm_operand(x_grouped),
            _mm_operand(weight, transposed=True).mT,
            offs=_offsets_int32(expert_offsets),
        )
        return out.contiguous()
    out = x_grouped.new_empty(rows, num_out)
    bounds = _host_bounds(expert_offsets)
    for expert, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        torch.mm(x_grouped[start:end], weight[expert].t(), out=out[start:end])
    return out


def grouped_weight_grad(
    x_grouped: Tensor, dy_grouped: Tensor, expert_offsets: Tensor, num_experts: int
) -> Tensor:
    """``dW[e] = Σ_{rows i of e} dy_grouped[i]ᵀ x_grouped[i]``: ``[E, out, in]``, x's dtype."""
    num_out, num_in = dy_grouped.shape[1], x_grouped.shape[1]
    if x_grouped.shape[0] == 0 or num_out == 0 or num_in == 0:
        return x_grouped.new_zeros(num_experts, num_out, num_in)
    if grouped_mm_runs(x_grouped.device, x_grouped.dtype):
        dw = torch._grouped_mm(
            _mm_operand(dy_grouped, transposed=True).t(),
            _mm_operand(x_grouped),
            offs=_offsets_int32(expert_offsets),
        )
        return dw[:, :num_out, :num_in].contiguous()
    dw = x_grouped.new_zeros(num_experts, num_out, num_in)
    bounds = _host_bounds(expert_offsets)
    for expert, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        torch.mm(dy_grouped[start:end].t(), x_grouped[start:end], out=dw[expert])
    return dw


def gather_gemm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    sorted_indices: Tensor,
    sorted_experts: Tensor,
    expert_offsets: Tensor,
    fan_out: int,
    x_layout: int,
    y_layout: int,
) -> Tensor:
    """``y[row(i)] = x[row(i)] @ weight[e(i)].T (+ bias[e(i)])`` with rows placed per layout."""
    x_grouped = to_grouped(x, x_layout, sorted_indices, fan_out)
    y_grouped = grouped_matmul(x_grouped, weight, expert_offsets)
    if bias is not None:
        y_grouped = y_grouped + bias.index_select(0, sorted_experts)
    return from_grouped(y_grouped, y_layout, sorted_indices)


def weight_grad(
    x: Tensor,
    dy: Tensor,
    sorted_indices: Tensor,
    expert_offsets: Tensor,
    num_experts: int,
    fan_out: int,
    x_layout: int,
    y_layout: int,
) -> Tensor:
    """``dW[e] = Σ_i dy[row(i)]ᵀ x[row(i)]`` over grouped rows of expert e: ``[E, out, in]``."""
    return grouped_weight_grad(
        to_grouped(x, x_layout, sorted_indices, fan_out),
        to_grouped(dy, y_layout, sorted_indices, fan_out),
        expert_offsets,
        num_experts,
    )
