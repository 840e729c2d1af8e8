"""The Triton backend: a fused gather → per-expert GEMM → scatter kernel and a weight-gradient
kernel, both driven by the plan's expert offsets.

Programs along the first grid axis are row tiles. Tile ``p`` is mapped to an expert and a row
range inside the kernel from the offsets (a cumulative sum of per-expert tile counts), so there
is no host synchronisation, experts with no rows get no tiles, and a new token count changes only
the grid, never the compiled kernel. The grid is sized for the worst case,
``cdiv(T*k, BLOCK_M) + min(E, T*k)`` tiles; tiles past the real count exit at once.

Accumulation is fp32. Under ``TRITON_INTERPRET=1`` (CPU tensors) bf16/fp16 tiles are upcast to
fp32 before ``tl.dot``, because the interpreter's bf16 dot is wrong (FACTS.md).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .plan import RowLayout, token_sum

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# MOE_BLOCKS_AUTOTUNE=0: each kernel runs the first configuration below, untimed (quick
# correctness runs, where timing every candidate for every new shape costs minutes).
AUTOTUNE = os.environ.get("MOE_BLOCKS_AUTOTUNE", "1") != "0"

# Block configurations the autotuner chooses from on GPU where tl.dot runs on the matrix units
# (bf16, fp16, fp32 with TF32): (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
GEMM_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 8, 4),
    (64, 64, 64, 4, 4),
    (32, 64, 64, 4, 4),
    (16, 64, 128, 4, 4),
]
# (BLOCK_M rows per program, BLOCK_N, BLOCK_K, INNER_M rows per step, warps, stages)
WEIGHT_GRAD_CONFIGS = [
    (512, 128, 128, 64, 8, 3),
    (1024, 128, 64, 64, 4, 4),
    (256, 64, 128, 64, 4, 4),
    (128, 64, 64, 32, 4, 4),
]
# fp32 operands (TF32 or IEEE): twice as wide as bf16's, and in IEEE precision multiplied on the
# FMA units with both operand tiles in registers: the tiles above spill registers there on
# sm_80 and sm_90 (kernels/aot.py), these do not.
FP32_GEMM_CONFIGS = [
    (64, 64, 32, 4, 3),
    (128, 64, 32, 8, 2),
    (64, 128, 32, 8, 2),
    (128, 32, 32, 4, 2),
    (32, 64, 32, 4, 2),
    (32, 32, 32, 4, 2),
]
FP32_WEIGHT_GRAD_CONFIGS = [
    (512, 64, 32, 32, 4, 3),
    (1024, 128, 32, 32, 8, 3),
    (256, 64, 64, 32, 4, 3),
    (128, 32, 32, 32, 4, 2),
]
# The interpreter runs one small configuration: every program instance costs host time there.
INTERPRET_GEMM_CONFIG = (32, 64, 64, 4, 1)
INTERPRET_WEIGHT_GRAD_CONFIG = (64, 64, 64, 32, 4, 1)


def _candidates(rows: list[tuple]) -> list[tuple]:
    """The configurations the autotuner times: all of ``rows``, or the first alone when
    MOE_BLOCKS_AUTOTUNE=0."""
    return rows if AUTOTUNE else rows[:1]


def _gemm_configs(rows: list[tuple]) -> list[triton.Config]:
    rows = [INTERPRET_GEMM_CONFIG] if INTERPRET else _candidates(rows)
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in rows
    ]


def _weight_grad_configs(rows: list[tuple]) -> list[triton.Config]:
    rows = [INTERPRET_WEIGHT_GRAD_CONFIG] if INTERPRET else _candidates(rows)
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "INNER_M": i}, num_warps=w, num_stages=s
        )
        for m, n, k, i, w, s in rows
    ]


@triton.jit
def _tile_rows(pid_m, offsets_ptr, num_experts, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Expert and grouped-row range [row_start, row_end) of row tile ``pid_m``.

    Returns expert == num_experts for a tile past the last real one."""
    experts = tl.arange(0, E_POW2)
    real = experts < num_experts
    starts = tl.load(offsets_ptr + experts, mask=real, other=0)
    ends = tl.load(offsets_ptr + experts + 1, mask=real, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    expert = tl.sum(((tiles_end <= pid_m) & real).to(tl.int32), 0)
    mine = experts == expert
    first_tile = tl.sum(tl.where(mine, tiles_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(mine, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, ends, 0), 0)
    return expert, row_start, row_end


@triton.jit
def _rows_of(grouped_rows, assignment, fan_out, LAYOUT: tl.constexpr):
    """Row index (int64) of a LAYOUT tensor for the given grouped rows (see RowLayout)."""
    if LAYOUT == 0:
        return grouped_rows.to(tl.int64)
    elif LAYOUT == 1:
        return assignment
    else:
        return assignment // fan_out


@triton.jit(do_not_specialize=["rows_bucket"])
def gather_gemm_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, y_ptr, sorted_idx_ptr, offsets_ptr,
    N, K, num_experts, fan_out, rows_bucket,
    stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_be, stride_bn,
    stride_ym, stride_yn,
    X_LAYOUT: tl.constexpr, Y_LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GATES: tl.constexpr,
    E_POW2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[row_Y(i)] = (x[row_X(i)] @ w[e(i)].T (+ b[e(i)])) (* g[a(i)]) for the grouped rows i
    of one tile (a(i): the assignment of row i)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, row_start, row_end = _tile_rows(pid_m, offsets_ptr, num_experts, E_POW2, BLOCK_M)
    if expert >= num_experts:
        return
    expert = expert.to(tl.int64)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    assignment = tl.load(sorted_idx_ptr + rows, mask=row_mask, other=0)
    x_rows = _rows_of(rows, assignment, fan_out, X_LAYOUT)
    y_rows = _rows_of(rows, assignment, fan_out, Y_LAYOUT)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    x_base = x_ptr + x_rows[:, None] * stride_xm
    w_base = w_ptr + expert * stride_we + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x_tile = tl.load(
            x_base + ks[None, :] * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        w_tile = tl.load(
            w_base + ks[:, None] * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0
        )
        if UPCAST:
            x_tile = x_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_ptr + expert * stride_be + cols * stride_bn, mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if HAS_GATES:
        gate = tl.load(g_ptr + assignment, mask=row_mask, other=0.0)
        acc *= gate.to(tl.float32)[:, None]
    y_ptrs = y_ptr + y_rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit(do_not_specialize=["rows_bucket"])
def weight_grad_kernel(
    x_ptr, dy_ptr, g_ptr, dw_ptr, sorted_idx_ptr, offsets_ptr,
    N, K, num_experts, fan_out, rows_bucket,
    stride_xm, stride_xk,
    stride_dym, stride_dyn,
    stride_dwe, stride_dwn, stride_dwk,
    X_LAYOUT: tl.constexpr, Y_LAYOUT: tl.constexpr, HAS_GATES: tl.constexpr,
    E_POW2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INNER_M: tl.constexpr,
):  # fmt: skip
    """dw[e(i)] += (g[a(i)] ·) dy[row_Y(i)]ᵀ x[row_X(i)] summed over the (up to BLOCK_M) rows
    of one tile.

    An expert's rows are split across tiles of BLOCK_M rows, so one expert holding most tokens
    still spreads over many programs; the partial sums meet in the fp32 ``dw`` by atomic add."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    expert, row_start, row_end = _tile_rows(pid_m, offsets_ptr, num_experts, E_POW2, BLOCK_M)
    if expert >= num_experts:
        return
    expert = expert.to(tl.int64)
    row_end = tl.minimum(row_end, row_start + BLOCK_M)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = cols_n < N
    k_mask = cols_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_start, row_end, INNER_M):
        rows = m0 + tl.arange(0, INNER_M)
        row_mask = rows < row_end
        assignment = tl.load(sorted_idx_ptr + rows, mask=row_mask, other=0)
        x_rows = _rows_of(rows, assignment, fan_out, X_LAYOUT)
        y_rows = _rows_of(rows, assignment, fan_out, Y_LAYOUT)
        dy_t = tl.load(
            dy_ptr + y_rows[None, :] * stride_dym + cols_n[:, None] * stride_dyn,
            mask=n_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        if HAS_GATES:  # scaled in fp32, rounded once to the dtype tl.dot takes
            gate = tl.load(g_ptr + assignment, mask=row_mask, other=0.0).to(tl.float32)
            dy_t = (dy_t.to(tl.float32) * gate[None, :]).to(dy_ptr.dtype.element_ty)
        x_tile = tl.load(
            x_ptr + x_rows[:, None] * stride_xm + cols_k[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            dy_t = dy_t.to(tl.float32)
            x_tile = x_tile.to(tl.float32)
        acc = tl.dot(dy_t, x_tile, acc, input_precision=PRECISION)
    dw_ptrs = (
        dw_ptr + expert * stride_dwe + cols_n[:, None] * stride_dwn + cols_k[None, :] * stride_dwk
    )
    tl.atomic_add(dw_ptrs, acc, mask=n_mask[:, None] & k_mask[None, :])


# Autotuning is keyed on the feature sizes, the expert count, a coarse bucket of rows per expert
# and the precision (plus the dtypes, which triton adds itself): a new token count reuses the
# tuned config. One autotuner per kernel for 16-bit operands, one for fp32.
_AUTOTUNE_KEY = ["N", "K", "num_experts", "rows_bucket", "PRECISION"]
TUNED = {
    "gather_gemm": triton.autotune(_gemm_configs(GEMM_CONFIGS), _AUTOTUNE_KEY)(gather_gemm_kernel),
    "gather_gemm_fp32": triton.autotune(_gemm_configs(FP32_GEMM_CONFIGS), _AUTOTUNE_KEY)(
        gather_gemm_kernel
    ),
    "weight_grad": triton.autotune(
        _weight_grad_configs(WEIGHT_GRAD_CONFIGS), _AUTOTUNE_KEY, reset_to_zero=["dw_ptr"]
    )(weight_grad_kernel),
    "weight_grad_fp32": triton.autotune(
        _weight_grad_configs(FP32_WEIGHT_GRAD_CONFIGS), _AUTOTUNE_KEY, reset_to_zero=["dw_ptr"]
    )(weight_grad_kernel),
}


def _tuned(kernel: str, dtype: torch.dtype):
    """The autotuner of ``kernel`` for ``dtype`` operands."""
    return TUNED[kernel + "_fp32" if dtype == torch.float32 else kernel]


def _narrow_columns(t: Tensor, name: str) -> Tensor:
    """``t``, or a contiguous copy of it where an element offset along the dimensions after the
    first passes 2**31: the kernels address rows and experts in int64 but columns in int32
    (cheaper, and enough for any operand whose rows, or experts, are below 2**31 elements); a
    transposed ``x`` of 2**31 elements or a permuted ``[out, E, in]`` weight are rare enough to
    be copied. An expert of more than 2**31 elements (8 GiB in bf16) is a ValueError naming
    ``name``."""
    if _column_extent(t) < 2**31:
        return t
    if t[0].numel() > 2**31:  # (decided before copying: the copy would not narrow it)
        raise ValueError(
            f"{name}: rows of {t[0].numel():,} elements, beyond the Triton kernels' int32 "
            "column offsets (2**31 - 1 at most); use backend='torch'"
        )
    return t.contiguous()


def _column_extent(t: Tensor) -> int:
    """The largest element offset within one row (one expert) of ``t``: ``t[0].numel() - 1``
    when contiguous."""
    return sum(
        (size - 1) * stride
        for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True)
        if size
    )


def _rows_bucket(num_rows: int, num_experts: int) -> int:
    """Rows per expert rounded up to a power of two, capped: the autotuning bucket."""
    return min(triton.next_power_of_2(max(1, num_rows // num_experts)), 4096)


def _row_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    return triton.cdiv(num_rows, block_m) + min(num_experts, num_rows)


def _precision(dtype: torch.dtype) -> str:
    """``"tf32"`` for fp32 where torch allows TF32 in CUDA matmuls, else ``"ieee"``. Read from
    ``fp32_precision`` (torch >= 2.9), which also reflects the legacy ``allow_tf32`` and
    ``set_float32_matmul_precision``; reading ``allow_tf32`` after the new API set TF32 raises."""
    if dtype != torch.float32:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", None)
    allow_tf32 = matmul.allow_tf32 if setting is None else setting == "tf32"
    return "tf32" if allow_tf32 else "ieee"


def _common_constexprs(dtype: torch.dtype, num_experts: int) -> dict:
    return {
        "E_POW2": triton.next_power_of_2(num_experts),
        "UPCAST": INTERPRET and dtype != torch.float32,
        "PRECISION": "ieee" if INTERPRET else _precision(dtype),
    }


def gather_gemm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gates: Tensor | None,
    sorted_indices: Tensor,
    sorted_experts: Tensor,
    expert_offsets: Tensor,
    fan_out: int,
    x_layout: int,
    y_layout: int,
) -> Tensor:
    """Same contract as :func:`torch_backend.gather_gemm`; ``sorted_experts`` is unused here.
    TOKEN output: the kernel writes each assignment's gated row in fp32, then a token's k rows
    are summed and rounded once to x's dtype."""
    del sorted_experts
    x, weight = _narrow_columns(x, "x"), _narrow_columns(weight, "weight")
    num_rows = sorted_indices.shape[0]
    num_experts, num_out, num_in = weight.shape
    token_output = y_layout == RowLayout.TOKEN
    y = x.new_empty(num_rows, num_out, dtype=torch.float32 if token_output else x.dtype)
    if num_rows and num_out:
        bias_arg = bias if bias is not None else weight  # never read when HAS_BIAS is False
        gates_arg = gates if gates is not None else weight  # never read when HAS_GATES is False
        grid = lambda meta: (
            _row_tiles(num_rows, num_experts, meta["BLOCK_M"]),
            triton.cdiv(num_out, meta["BLOCK_N"]),
        )
        _tuned("gather_gemm", x.dtype)[grid](
            x, weight, bias_arg, gates_arg, y, sorted_indices, expert_offsets,
            num_out, num_in, num_experts, fan_out, _rows_bucket(num_rows, num_experts),
            x.stride(0), x.stride(1),
            weight.stride(0), weight.stride(1), weight.stride(2),
            bias_arg.stride(0), bias_arg.stride(1),
            y.stride(0), y.stride(1),
            X_LAYOUT=int(x_layout),
            Y_LAYOUT=int(RowLayout.ASSIGNMENT if token_output else y_layout),
            HAS_BIAS=bias is not None, HAS_GATES=gates is not None,
            **_common_constexprs(x.dtype, num_experts),
        )  # fmt: skip
    if token_output:
        return token_sum(y, fan_out).to(x.dtype)
    return y


def weight_grad(
    x: Tensor,
    dy: Tensor,
    gates: Tensor | None,
    sorted_indices: Tensor,
    expert_offsets: Tensor,
    num_experts: int,
    fan_out: int,
    x_layout: int,
    y_layout: int,
) -> Tensor:
    """Same contract as :func:`torch_backend.weight_grad`."""
    x, dy = _narrow_columns(x, "x"), _narrow_columns(dy, "grad_output")
    num_rows = sorted_indices.shape[0]
    num_out, num_in = dy.shape[1], x.shape[1]
    dw = torch.zeros(num_experts, num_out, num_in, device=x.device, dtype=torch.float32)
    if num_rows == 0 or num_out == 0 or num_in == 0:
        return dw.to(x.dtype)
    gates_arg = gates if gates is not None else dw  # never read when HAS_GATES is False
    grid = lambda meta: (
        _row_tiles(num_rows, num_experts, meta["BLOCK_M"]),
        triton.cdiv(num_out, meta["BLOCK_N"]),
        triton.cdiv(num_in, meta["BLOCK_K"]),
    )
    _tuned("weight_grad", x.dtype)[grid](
        x, dy, gates_arg, dw, sorted_indices, expert_offsets,
        num_out, num_in, num_experts, fan_out, _rows_bucket(num_rows, num_experts),
        x.stride(0), x.stride(1),
        dy.stride(0), dy.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        X_LAYOUT=int(x_layout), Y_LAYOUT=int(y_layout), HAS_GATES=gates is not None,
        **_common_constexprs(x.dtype, num_experts),
    )  # fmt: skip
    return dw.to(x.dtype)


__all__ = ["gather_gemm", "weight_grad", "RowLayout", "INTERPRET"]
