"""The PyTorch backend: each expert's rows gathered, multiplied and placed, expert by expert.

On CPU (and on CUDA where ``torch._grouped_mm`` cannot run the dtype) it loops over the experts
that have rows: gather that expert's rows of ``x`` (a small copy that stays in cache), one
``mm`` (an ``mv`` for a single row; weight-first for a few 16-bit rows, WEIGHT_FIRST_ROWS, for
some fp32 rows of a large expert, FP32_WEIGHT_FIRST_ROWS, and on an AVX2 CPU for 2-128 rows
computed in fp32, AVX2_WEIGHT_FIRST_ROWS, where one fp32 row of a large expert is a ``bmm``
over two halves of its weight, HALVED_ROW_THREADS) into
the grouped result; then, for ASSIGNMENT output, one gather into assignment order, or, for TOKEN
output, each token's k rows gathered, times the gates and summed in fp32, a block of tokens at
a time (:func:`gated_token_sum`), or, on CPU with one run per expert, when all T·k rows in
fp32 would exceed ADDED_SUMS_BYTES, no grouped result: each expert's rows, times their gates
(if any), added into its tokens' sums (:func:`added_token_sums`).
Beyond GATHER_ONCE_BYTES no full-size gathered copy of ``x`` is made: on CPU a fresh allocation
that large costs more than the copy itself (page faults), and such copies were a quarter of a
block's time. The loop reads the E+1 expert offsets on the host (free on CPU).

On a CPU with native bf16 products, many experts with a few rows each are one ``torch.bmm``
over all experts, each expert's rows zero-padded to the largest count (PADDED_ROWS). On CUDA,
where ``_grouped_mm`` runs the dtype (bf16 on sm_90+), the same steps run once over all rows
with one ``_grouped_mm``, with no host reads.

On a CPU without native bf16 (or fp16) matrix instructions torch emulates them, ~100x slower than
fp32 (:func:`cpu_has_native_matmul`); there each expert's bf16/fp16 product is computed in fp32
and rounded once, as a native product is, but for a few rows of a row-major weight
(EMULATED_MM_ROWS), where torch's own 16-bit product, which also sums in fp32, is faster than
converting the weight (never for a column-major one, such as the input gradient's ``weight.mT``).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .plan import RowLayout, accumulation_dtype, token_sum

# Up to this many rows an expert's product is computed as ``weight[e] @ rows.T`` (then viewed
# transposed), not ``rows @ weight[e].T``: the same product, summed in another order, but with
# few rows the BLAS streams the [out, in] weight as the left operand instead of packing it as
# the right one. On the 2-core AVX-512 BF16 EPYC (torch 2.13) one JetMoE-shaped bf16 expert took
# 1.3-1.6x less time so at 8-64 rows (the same at 1 row, mixed above 256); in the whole block,
# with the transposed result copied back, 64 was the best limit of 0, 16, 64 and 128.
# Row-major weights only: the input gradient's weight.mT was slower so (:func:`_weight_first`).
WEIGHT_FIRST_ROWS = 64

# In fp32, from 8 to 48 rows, the experts of at least 2M weights (8 MB: JetMoE's and Mixtral's,
# not fine-grained ones) are computed weight-first too: on the 2-core AMX Xeon (torch 2.13, MKL)
# a rows-first fp32 product of 4 or more rows packs the streamed weight and took 1.1-1.75x the
# weight-first time (a [5632, 1024] expert: 16 rows 3.06 against 1.74 ms, the transposed copy
# included); MoEMLP at 32-128 tokens ran 1.14-1.56x faster (JetMoE's and Mixtral's shapes,
# alternating rounds). Below 8 rows and for smaller experts rows-first was as fast or faster.
FP32_WEIGHT_FIRST_ROWS = (8, 48)
FP32_WEIGHT_FIRST_NUMEL = 2**21

# On a CPU where torch runs at AVX2 capability (no AVX-512; MKL's AVX2 kernels), every product
# computed in fp32 (fp32 ones, and emulated 16-bit ones converted to fp32) of this many rows is
# weight-first, whatever the expert's size: rows-first, MKL took 1.1-4.3x the time. The 2-core
# AVX2-only EPYC (torch 2.13), fp32, caches flushed, rows-first against weight-first (ms): a
# [5632, 1024] expert 3.38/1.90 at 2 rows, 7.54/1.77 at 4, 8.97/2.88 at 8, 12.86/7.72 at 32,
# 30.16/24.67 at 128, but 93.46/93.96 at 512; [1024, 2816] 1.58/0.87, 2.38/0.89, 2.56/1.36,
# 4.50/3.40, 12.53/11.41; a fine-grained [512, 1024] 0.24/0.20, 0.55/0.21, 0.55/0.30, 0.92/0.71,
# 2.40/2.28; [1024, 256] 0.22/0.14 at 2, 0.30/0.23 at 8, 1.37/1.43 at 128. At 1 row rows-first
# was 5-10% faster. (On the AMX Xeon and the AVX-512 EPYC rows-first was as fast or faster
# below 8 rows: FP32_WEIGHT_FIRST_ROWS there.)
AVX2_WEIGHT_FIRST_ROWS = (2, 128)
# There a call's products are also one per expert (not one _grouped_mm, whose products are
# rows-first) while the experts with rows have a mean row count whose product is weight-first;
# with more than MANY_RUNS such experts only up to this mean. Fine-grained shape (E64 k8),
# fp32, one product per expert against one _grouped_mm, alternating rounds: MoEMLP's forward
# 1.12x faster at a mean of 2 rows (16 tokens), 1.29x at 3, 1.44x at 4, 1.41x at 8, 1.01x at
# 12 and 16, 0.95x at 32; the decoder layer's (MoA's experts of 128 x 1024 weights too) 1.16x
# at 8, but 0.87x at 16.
AVX2_MANY_RUNS_MEAN = 8
# There one fp32 row of an expert of at least FP32_WEIGHT_FIRST_NUMEL weights is multiplied as
# the two halves of the expert's output rows in one torch.bmm (:func:`_halves_product`) when
# torch runs at least this many threads: MKL's one-row product ran on one core (the same time
# with one thread or two), the batched one on two. The AVX2 EPYC, caches flushed, ms, ``mm``
# against the halves: [5632, 1024] 1.67/1.26, [7168, 1024] 2.06/1.64, [2048, 1024] 0.66/0.55,
# [1024, 3584] 1.11/0.97, [1024, 2816] 0.79/0.67, [1536, 1024] 0.54/0.49, [1024, 1024]
# 0.41/0.40, but [512, 1024] 0.21/0.23 and, with one thread, [5632, 1024] 1.71/2.12. Two rows
# and more gain nothing so (a weight-first product of two rows 1.76 against 1.83).
HALVED_ROW_THREADS = 2

# Up to this many rows, an expert's product on a CPU that emulates its 16-bit dtype is torch's
# own 16-bit mm, not the rows and the weight converted to fp32 (:func:`_mm`): that kernel also
# sums in fp32 and rounds once (the same errors against float64 at 1-16 rows, bf16 and fp16),
# but streams the 16-bit weight where the conversion writes and reads it in fp32 as well. On the
# AVX2 EPYC (torch 2.13), bf16, caches flushed, the 16-bit mm against the converted one: 1.96
# against 4.56 ms at 1 row of a [5632, 1024] expert, 9.37 against 14.15 at 8 rows, 17.72
# against 12.77 at 16 (the [1024, 2816] one 1.33/2.83, 4.98/3.99, 8.97/4.66; fine-grained
# experts 0.9-1.6 either way up to 8 rows); fp16 alike (1.77 against 5.53 at 1 row). Only with
# the weight as the product's column-major right operand (``rows @ weight[e].T``, a row-major
# weight): with a row-major right one (the input gradient's ``dy @ weight[e]``) torch's 16-bit
# product took 10-50x the converted one's time (bf16, the same EPYC: a [5632, 1024] expert
# 53.87 against 5.42 ms at 1 row, 415.47 against 7.84 at 8; a [512, 1024] one 1.65 against
# 0.34 and 13.08 against 0.70), so those products are always converted.
EMULATED_MM_ROWS = 8
# Where the converted product is weight-first (AVX2_WEIGHT_FIRST_ROWS), torch's own 16-bit mm
# is taken up to this many rows only: bf16, the AVX2 EPYC, caches flushed, the 16-bit mm
# against the converted weight-first product (ms): [5632, 1024] 3.42/4.26 at 3 rows,
# 4.47/4.49 at 4, 6.57/4.76 at 6, 8.68/4.85 at 8; [1024, 2816] 1.63/2.14, 2.10/2.02,
# 3.14/2.40, 4.21/2.38; [512, 1024] 0.35/0.41, 0.46/0.37, 0.65/0.45, 0.85/0.47.
EMULATED_WEIGHT_FIRST_MM_ROWS = 3
# On such a CPU a forward product's runs go through one _grouped_mm (all of them torch's own
# 16-bit products) also while the experts with rows have at most this many on average, the
# second number for experts of at least FP32_WEIGHT_FIRST_NUMEL weights (whose fp32 copy
# outgrows the caches): a few larger runs cost more in 16-bit, but fewer than the loop's
# per-expert calls and conversions. bf16 on the AVX2 EPYC (torch 2.13), caches flushed, 5-9
# alternating rounds, ours before, after and grouped_mm: fine-grained (mean rows tokens/8)
# 32 tokens 50.24/44.82/44.15 ms, 40 59.30/55.65/54.58, 48 67.29/66.07/64.82, but 56
# 72.03/75.96/75.03 and 64 76.15/87.30/85.26 with the rule at 8; JetMoE (tokens/4) 24
# 84.38/79.31/79.13, 32 113.22/103.82/103.15, but 40 123.04/130.05/128.38 with it at 10;
# Mixtral 24 103.70/98.75/96.51, 32 143.08/129.37/128.92.
EMULATED_MEAN_ROWS = (6, 8)

# Gathered rows up to this size are gathered in one call (one call per expert cost 0.3 ms of a
# fine-grained block's 6.9 ms first linear at 256 tokens); larger ones one run at a time, so no
# full-size copy is allocated (see the module docstring).
GATHER_ONCE_BYTES = 8 * 2**20
MANY_RUNS = 16  # experts with rows above which small inputs go through one _grouped_mm (_runs)
# In bf16 on a CPU with native bf16 matrix instructions, when more than MANY_RUNS experts and
# at least PADDED_USED of all have rows, at most PADDED_ROWS each (not all single rows: those
# keep one product per expert, as a one-token step's), their products are one torch.bmm over all
# E experts, each expert's rows zero-padded to the largest count (:class:`Padded`), while the
# padded rows number at most PADDED_WASTE times the real ones: oneDNN's batched product streams
# the weights in one call, where each per-expert product (or _grouped_mm's) packs its expert's
# weight anew. On the AMX Xeon (torch 2.13) the fine-grained block (E64 k8 f256) ran
# 1.31-1.46x faster at 16-128 tokens, 1.05x at 256 and 1.30x (32 tokens) / 1.08x (256)
# forward+backward, the copies into and out of the padded layout included; at 4 tokens (28 of
# 64 experts with rows) reading every expert's weight took 1.4x the time, at 8 (40 of 64) it
# broke even. In fp32, and for JetMoE's 8 large experts, bmm was mostly slower (single
# products: 0.82-1.73x the time of one _grouped_mm); in fp16 (AMX-FP16) the block took
# 0.92-1.17x the time.
PADDED_ROWS = 64
PADDED_USED = 0.75
PADDED_WASTE = 4
# routed_mlp: hidden rows of all experts above this size are activated run by run, in cache
FUSE_BYTES = 2**20
# TOKEN output whose grouped products (in fp32) would exceed this size is not placed and summed
# (gated_token_sum) but added run by run into the tokens' sums (added_token_sums): a fresh
# allocation that large costs its page faults (see the module docstring). The fine-grained
# shape (E64 k8), fp32, 2048 tokens, on the AVX2 EPYC: the gated output product 185 -> 158 ms,
# the first product's input gradient (a TOKEN sum of 64 MB of rows) 306 -> 279 ms; from 16 to
# 256 tokens (0.5-8 MB) and at JetMoE's shape 0.98-1.03x (noise).
ADDED_SUMS_BYTES = 8 * 2**20
# gated_token_sum: fp32 terms of this many bytes at a time (a block of tokens' k rows)
SUM_BLOCK_BYTES = 2 * 2**20
# to_assignment_order: grouped rows of at most this many bytes are placed by one index_copy_
PLACED_BYTES = 2**18
_ALIGN_BYTES = 16  # _grouped_mm wants every non-unit stride to be a multiple of 16 bytes


def source_rows(layout: int, sorted_indices: Tensor, fan_out: int) -> Tensor | None:
    """Row of a ``layout`` tensor that holds each of the given grouped rows (None: GROUPED,
    the rows themselves)."""
    if layout == RowLayout.GROUPED:
        return None
    if layout == RowLayout.ASSIGNMENT:
        return sorted_indices
    return torch.div(sorted_indices, fan_out, rounding_mode="floor")


def to_grouped(t: Tensor, layout: int, sorted_indices: Tensor, fan_out: int) -> Tensor:
    """The ``layout`` tensor ``t`` in grouped row order (``t`` itself if GROUPED)."""
    rows = source_rows(layout, sorted_indices, fan_out)
    return t if rows is None else t.index_select(0, rows)


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


@functools.cache
def cpu_has_native_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware, as torch's oneDNN reports it
    (AVX-512 BF16 or AMX for bfloat16; AVX-512 FP16 or AMX-FP16 for float16). Without it torch
    emulates them: a bf16 ``torch.mm`` ran ~100x slower than fp32 on an AVX2-only EPYC, an fp16
    one ~80x slower on an AVX-512 BF16 EPYC. Read once per dtype."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def _emulated(t: Tensor) -> bool:
    """Whether products of ``t``'s dtype are emulated here (:func:`cpu_has_native_matmul`)."""
    return t.is_cpu and not cpu_has_native_matmul(t.dtype)


@functools.cache
def _avx2_cpu() -> bool:
    """Whether torch runs this CPU's kernels at AVX2 capability, without AVX-512
    (``torch.backends.cpu.get_cpu_capability()``), where AVX2_WEIGHT_FIRST_ROWS apply. Read
    once."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def _takes_16_bit_mm(num_rows: int, weight: Tensor) -> bool:
    """Whether, where 16-bit products are emulated, an expert's product of ``num_rows`` rows
    through ``weight [E, out, in]`` is torch's own 16-bit ``mm`` (else fp32, :func:`_mm`): up
    to EMULATED_MM_ROWS rows (EMULATED_WEIGHT_FIRST_MM_ROWS on an AVX2 CPU, where the converted
    product of more rows is weight-first) of a row-major weight, the product's column-major
    right operand (never the input gradient's ``weight.mT``)."""
    limit = EMULATED_WEIGHT_FIRST_MM_ROWS if _avx2_cpu() else EMULATED_MM_ROWS
    return num_rows <= limit and weight.stride(-1) == 1


def _mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a @ b`` (2-D, one dtype), written into ``out`` if given. On a CPU without native
    ``a.dtype`` products (:func:`_emulated`) computed in fp32, rounded once."""
    if _emulated(a):
        product = torch.mm(a.float(), b.float())
        return product.to(a.dtype) if out is None else out.copy_(product)
    return torch.mm(a, b, out=out)


class Padded(NamedTuple):
    """The expert of a run of all grouped rows computed as one ``torch.bmm``, each expert's
    rows at ``e * rows`` of a zero-padded ``[E * rows, width]`` layout (:func:`_padded_slots`)."""

    rows: int


def _runs(
    expert_offsets: Tensor,
    dtype: torch.dtype,
    num_rows: int,
    row_bytes: int,
    *,
    weight: Tensor | None,
) -> list:
    """Runs of grouped rows, ``(expert, start, end)``: one run of all rows (expert None, one
    ``_grouped_mm``) on CUDA where ``_grouped_mm`` runs ``dtype``, with no host read; else one
    run per expert that has rows, from the offsets read on the host (a decode step's few
    assignments cost a few runs, not one per expert). In native bf16 on CPU one run of all
    rows as a padded ``bmm`` (expert :class:`Padded`) by the rule of PADDED_ROWS. On CPU also
    one run of all rows when there are many experts with several rows each and all of them
    (``row_bytes`` each, the wider of input and output) fit GATHER_ONCE_BYTES: ``_grouped_mm``'s
    own loop then costs less than ours (the fine-grained block at 64-256 tokens: 0.80-0.91 of
    the plain pipeline's speed per expert, 0.91-0.99 in one run; JetMoE's 8 experts stay
    faster per expert). ``weight``: the ``[E, out, in]`` weight of the runs' products, None
    for a weight gradient's (whose output is a whole expert). Where 16-bit products are
    emulated, one run also while a row-major ``weight``'s runs are short on average
    (EMULATED_MEAN_ROWS). On an AVX2 CPU one run per expert while the mean run's product is
    weight-first (AVX2_MANY_RUNS_MEAN)."""
    device = expert_offsets.device
    if device.type == "cuda" and grouped_mm_runs(device, dtype):
        return [(None, 0, num_rows)] if num_rows else []
    offsets = expert_offsets.tolist()
    runs = [(e, start, end) for e, (start, end) in enumerate(itertools.pairwise(offsets))
            if end > start]  # fmt: skip
    weight_first = _weight_first_helps(device, dtype)
    most = max((end - start for _, start, end in runs), default=0)
    if (
        weight_first
        and dtype == torch.bfloat16
        and most > 1  # all single rows: one product per expert, as below
        and len(runs) > MANY_RUNS
        and len(runs) >= PADDED_USED * (len(offsets) - 1)
        and most <= PADDED_ROWS
        and (len(offsets) - 1) * most <= PADDED_WASTE * num_rows
    ):
        return [(Padded(most), 0, num_rows)]
    mean = num_rows // max(1, len(runs))
    if (
        weight is not None
        and _avx2_cpu()
        and _weight_first(mean, weight)
        and (len(runs) <= MANY_RUNS or mean <= AVX2_MANY_RUNS_MEAN)
    ):
        return runs  # our weight-first products beat _grouped_mm's: AVX2_MANY_RUNS_MEAN
    # where no product can be weight-first (fp32 runs below FP32_WEIGHT_FIRST_ROWS), the C++
    # loop of one _grouped_mm costs less than ours: with the caches cold, as in a decode step,
    # each Python-level mm cost ~50 us more (JetMoE fp32, 8 tokens: the first products of 8
    # experts 9.1 against 8.5 ms). Not when every run is a single row: one product per expert,
    # as one_token_gather_gemm computes a one-token step's. In an emulated 16-bit dtype only
    # for a row-major weight and while every run takes torch's own 16-bit product
    # (EMULATED_MM_ROWS), as _grouped_mm's products do, or the runs are short on average
    # (EMULATED_MEAN_ROWS); larger runs are faster in fp32, expert by expert, and so are the
    # weight gradient's products, whose output is a whole expert (bf16 on the AVX2 EPYC, 8
    # tokens, forward+backward with the weight gradient in one _grouped_mm as well: 0.89-0.91x
    # the speed of the loop's, JetMoE's and the fine-grained shape).
    few_rows = not weight_first and 1 < len(runs) < num_rows
    few_rows = few_rows and most < FP32_WEIGHT_FIRST_ROWS[0]
    native = cpu_has_native_matmul(dtype)
    emulated = not native and weight is not None  # (None: the weight gradient's, in fp32)
    short_on_average = (
        emulated
        and weight.stride(-1) == 1
        and 1 < len(runs) < num_rows
        and num_rows <= EMULATED_MEAN_ROWS[weight[0].numel() >= FP32_WEIGHT_FIRST_NUMEL] * len(runs)
    )
    if (
        (few_rows or len(runs) > MANY_RUNS or short_on_average)
        # in 16-bit, runs of mostly single rows stay ours: each a matrix-vector product
        and (num_rows >= 2 * len(runs) or not weight_first)
        and num_rows * row_bytes <= GATHER_ONCE_BYTES
        and device.type == "cpu"
        and (native or short_on_average or (emulated and _takes_16_bit_mm(most, weight)))
        and grouped_mm_runs(device, dtype)
    ):
        return [(None, 0, num_rows)]
    return runs


def _linear_runs(weight: Tensor, expert_offsets: Tensor, num_rows: int) -> list:
    """The :func:`_runs` of a :func:`gather_gemm` call through ``weight [E, out, in]`` (its
    input rows ``in`` wide, its output rows ``out``: the wider counts), in the weight's dtype."""
    row_bytes = max(weight.shape[1], weight.shape[2]) * weight.element_size()
    return _runs(expert_offsets, weight.dtype, num_rows, row_bytes, weight=weight)


def _run_rows(t: Tensor, layout: int, sorted_indices: Tensor, fan_out: int, runs: list):
    """For each run in turn, its rows of the ``layout`` tensor ``t``: views for GROUPED,
    otherwise gathered one run at a time, so only one run's copy exists at once."""
    rows = source_rows(layout, sorted_indices, fan_out)
    if rows is not None and rows.numel() * t.shape[1] * t.element_size() <= GATHER_ONCE_BYTES:
        t, rows = t.index_select(0, rows), None  # small: one gather, not one per run
    for _, start, end in runs:
        yield t[start:end] if rows is None else t.index_select(0, rows[start:end])


def _weight_first_helps(device: torch.device, dtype: torch.dtype) -> bool:
    """Where weight-first products (WEIGHT_FIRST_ROWS, and ``mv`` for one row) apply: 16-bit
    products on a CPU that runs them natively. In fp32 (and emulated 16-bit, computed in fp32)
    weight-first was slower at 1-8 rows on the AVX-512 EPYC (1.3x the time of the whole block
    at 8 tokens, Mixtral-like and fine-grained) and below 4 rows on the AMX Xeon; fp32 has its
    own range (FP32_WEIGHT_FIRST_ROWS)."""
    return device.type == "cpu" and dtype.itemsize == 2 and cpu_has_native_matmul(dtype)


def _weight_first(num_rows: int, weight: Tensor) -> bool:
    """Whether one expert's product of ``num_rows`` rows is computed as ``weight[e] @ rows.T``,
    for a row-major weight only: up to WEIGHT_FIRST_ROWS 16-bit rows where
    :func:`_weight_first_helps`; on an AVX2 CPU (:func:`_avx2_cpu`) AVX2_WEIGHT_FIRST_ROWS of a
    product computed in fp32 (fp32, or an emulated 16-bit dtype converted: :func:`_mm`, not
    torch's own 16-bit product, :func:`_takes_16_bit_mm`); in
    fp32 on other CPUs, FP32_WEIGHT_FIRST_ROWS of an expert of at least
    FP32_WEIGHT_FIRST_NUMEL weights (tuned on the AMX Xeon). The input gradient's
    ``weight.mT`` (column-major) was slower weight-first at every row count on the AMX Xeon:
    1.1-1.9x the time in bf16 (1-64 rows, the four expert shapes of the bench), 2-2.5x in
    fp32."""
    if weight.stride(-1) != 1:
        return False
    if _weight_first_helps(weight.device, weight.dtype):
        return num_rows <= WEIGHT_FIRST_ROWS
    if _avx2_cpu() and weight.is_cpu and (weight.dtype == torch.float32 or _emulated(weight)):
        low, high = AVX2_WEIGHT_FIRST_ROWS
        in_fp32 = not (_emulated(weight) and _takes_16_bit_mm(num_rows, weight))
        return in_fp32 and low <= num_rows <= high
    low, high = FP32_WEIGHT_FIRST_ROWS
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and low <= num_rows <= high
        and weight[0].numel() >= FP32_WEIGHT_FIRST_NUMEL
    )


def _padded_slots(expert_offsets: Tensor, padded: Padded) -> Tensor:
    """The row of each grouped row in the padded layout of ``padded``: ``e * padded.rows + j``
    for the j-th row of expert e."""
    num_rows = int(expert_offsets[-1])
    rows = torch.arange(num_rows, device=expert_offsets.device)
    experts = torch.searchsorted(expert_offsets, rows, right=True) - 1
    return rows + experts * padded.rows - expert_offsets[experts]


def _to_padded(t: Tensor, slots: Tensor, num_experts: int, padded: Padded) -> Tensor:
    """Grouped rows ``t`` in the zero-padded layout ``[E, padded.rows, width]``."""
    flat = t.new_zeros(num_experts * padded.rows, t.shape[1]).index_copy_(0, slots, t)
    return flat.view(num_experts, padded.rows, t.shape[1])


def _matmul(
    rows: Tensor,
    weight: Tensor,
    expert: int | Padded | None,
    expert_offsets: Tensor,
    out: Tensor | None,
) -> Tensor:
    """``rows[i] @ weight[e(i)].T`` for the (non-empty) rows of one run, written into ``out``
    if given."""
    if isinstance(expert, Padded):
        slots = _padded_slots(expert_offsets, expert)
        padded = torch.bmm(_to_padded(rows, slots, weight.shape[0], expert), weight.mT)
        return torch.index_select(padded.flatten(0, 1), 0, slots, out=out)
    if expert is not None:
        return _expert_product(rows, weight)(rows, expert, out)
    num_out = weight.shape[1]
    if num_out == 0 or rows.shape[1] == 0:  # _grouped_mm rejects zero-width operands
        result = rows.new_zeros(rows.shape[0], num_out)
    else:
        result = torch._grouped_mm(
            _mm_operand(rows),
            _mm_operand(weight, transposed=True).mT,
            offs=expert_offsets[1:].to(torch.int32),
        )
    return result.contiguous() if out is None else out.copy_(result)


def _expert_product(rows: Tensor, weight: Tensor) -> Callable[[Tensor, int, Tensor | None], Tensor]:
    """How one expert's product ``rows @ weight[e].T`` is computed for rows of this count,
    dtype and device: a callable ``(rows, e, out)`` (``out``: where to write it, or None). A
    one-token call chooses once for its k products: in a decode step each Python call costs
    microseconds more with the caches cold, and choosing per product cost a one-token MoEMLP
    step 1.0-1.7% of its time (JetMoE's and the fine-grained shape, fp32 and bf16, caches
    flushed before each call, alternating in one process)."""
    if not _weight_first(rows.shape[0], weight):
        if _emulated(rows) and not _takes_16_bit_mm(rows.shape[0], weight):
            return lambda rows, e, out: _mm(rows, weight[e].t(), out)
        if _halved_row_product(rows.shape[0], weight):
            return lambda rows, e, out: _halves_product(rows, weight[e], out)
        return lambda rows, e, out: torch.mm(rows, weight[e].t(), out=out)

    if rows.shape[0] == 1:
        # One 16-bit row (a decode step's expert): a matrix-vector product, which streams the
        # weight once; as a 1-row mm it took 1.65x the time (bf16, JetMoE's up projection,
        # caches cold as between two layers). In fp32 the mm was faster.
        return lambda rows, e, out: _placed(torch.mv(weight[e], rows[0])[None], out)
    return lambda rows, e, out: _placed(_mm(weight[e], rows.t()).t(), out)


def _halved_row_product(num_rows: int, weight: Tensor) -> bool:
    """Whether one expert's product of ``num_rows`` rows through ``weight [E, out, in]`` is
    :func:`_halves_product`'s: one fp32 row of a row-major expert of at least
    FP32_WEIGHT_FIRST_NUMEL weights and an even number of output rows, on an AVX2 CPU
    (:func:`_avx2_cpu`) running torch on at least HALVED_ROW_THREADS threads."""
    return (
        num_rows == 1
        and weight.is_cpu
        and weight.dtype == torch.float32
        and weight.stride(-1) == 1
        and weight.shape[1] % 2 == 0
        and weight[0].numel() >= FP32_WEIGHT_FIRST_NUMEL
        and _avx2_cpu()
        and torch.get_num_threads() >= HALVED_ROW_THREADS
    )


def _halves_product(row: Tensor, expert_weight: Tensor, out: Tensor | None) -> Tensor:
    """``row [1, in] @ expert_weight[out, in].T`` as one ``torch.bmm`` of the weight's two
    halves of output rows (each output its own dot product, so the split changes no sum; the
    bits differ from ``mm``'s), written into ``out`` (a contiguous row) if given."""
    num_out, num_in = expert_weight.shape
    halves = expert_weight.view(2, num_out // 2, num_in)
    column = row.t().expand(2, num_in, 1)
    if out is None:
        return torch.bmm(halves, column).view(1, num_out)
    torch.bmm(halves, column, out=out.view(2, num_out // 2, 1))
    return out


def _placed(part: Tensor, out: Tensor | None) -> Tensor:
    """``part``, copied into ``out`` if given."""
    return part if out is None else out.copy_(part)


def _products(row_runs, weight: Tensor, runs: list, expert_offsets: Tensor, num_rows: int):
    """Each run's rows (``row_runs``, one tensor per run) times its expert's weight, in grouped
    order: ``[num_rows, out]``, written run by run into one buffer (a single run's result is
    taken as it is)."""
    if len(runs) == 1:
        ((expert, _, _),) = runs
        return _matmul(next(iter(row_runs)), weight, expert, expert_offsets, None).contiguous()
    out = weight.new_empty(num_rows, weight.shape[1])
    for (expert, start, end), rows in zip(runs, row_runs, strict=True):
        _matmul(rows, weight, expert, expert_offsets, out[start:end])
    return out


def _grouped_rows_of(sorted_indices: Tensor) -> Tensor:
    """The grouped row of each assignment: the inverse of the permutation ``sorted_indices``."""
    positions = torch.arange(sorted_indices.shape[0], device=sorted_indices.device)
    return torch.empty_like(sorted_indices).index_copy_(0, sorted_indices, positions)


def to_assignment_order(t: Tensor, sorted_indices: Tensor) -> Tensor:
    """The grouped-order tensor ``t`` (rows or per-row values) in assignment order. Up to
    PLACED_BYTES, one ``index_copy_`` placing each row at its assignment (two ops where the
    gather takes four; a decode step's small ops each cost 20-40 us with the caches cold: the
    gated sum of 8 tokens' rows, bf16 or fp32, JetMoE's and the fine-grained shape, took
    0.21-0.30 against 0.33-0.42 ms); above it one gather by the inverse permutation (placing
    took 1.3-1.8x its time at 1 MB of bf16 rows, 1.8x at 8 MB of fp32 rows, on CPU)."""
    if t.numel() * t.element_size() <= PLACED_BYTES:
        return t.new_empty(t.shape).index_copy_(0, sorted_indices, t)
    return t.index_select(0, _grouped_rows_of(sorted_indices))


def gated_token_sum(
    grouped: Tensor, sorted_indices: Tensor, gates: Tensor | None, fan_out: int
) -> Tensor:
    """:func:`token_sum` of rows given in grouped order: ``Σ_j gates[t, j] · grouped[g(t*k +
    j)]`` summed in :func:`accumulation_dtype` in slot order, its bits, ``[T, out]``. On CPU
    taken a block of tokens at a time (their rows gathered, gated and summed while in cache),
    so the T·k gated rows in fp32 are never all in memory (8 MB at 256 fine-grained tokens:
    1.9 against 1.3 ms once placed and summed); elsewhere all at once."""
    num_rows, width = grouped.shape
    num_tokens = num_rows // fan_out
    wide = accumulation_dtype(grouped.dtype)
    gates = None if gates is None else gates.reshape(-1)
    block = max(1, SUM_BLOCK_BYTES // max(1, fan_out * width * wide.itemsize))
    if num_tokens <= block or grouped.device.type != "cpu":  # one block (elsewhere no page
        # faults to avoid; one launch per op)
        return token_sum(to_assignment_order(grouped, sorted_indices), fan_out, gates)
    rows_of = _grouped_rows_of(sorted_indices)
    sums = grouped.new_empty(num_tokens, width, dtype=wide)
    for first in range(0, num_tokens, block):
        rows = slice(first * fan_out, min(first + block, num_tokens) * fan_out)
        terms = grouped.index_select(0, rows_of[rows])
        block_gates = None if gates is None else gates[rows]
        token_sum(terms, fan_out, block_gates, out=sums[first : first + block])
    return sums


def _per_expert(runs: list) -> bool:
    """Whether each run is one expert's rows (not a padded ``bmm`` or one ``_grouped_mm``)."""
    return all(isinstance(expert, int) for expert, _, _ in runs)


def _adds_runs(
    runs: list, num_rows: int, num_out: int, dtype: torch.dtype, device: torch.device
) -> bool:
    """Whether a TOKEN output of these runs is summed by :func:`added_token_sums`: on CPU (an
    ``index_add_`` elsewhere is not deterministic) with one run per expert, when the products
    of all ``num_rows`` in :func:`accumulation_dtype` would exceed ADDED_SUMS_BYTES."""
    size = num_rows * num_out * accumulation_dtype(dtype).itemsize
    return device.type == "cpu" and _per_expert(runs) and size > ADDED_SUMS_BYTES


def added_token_sums(
    parts,
    runs: list,
    sorted_indices: Tensor,
    gates: Tensor | None,
    fan_out: int,
    num_out: int,
    dtype: torch.dtype,
) -> Tensor:
    """:func:`gated_token_sum` of products given run by run (``parts``: each run's rows, a
    fresh tensor of the caller's dtype, gated here in place): each run's terms, ``float(row) ·
    gate`` as there, are added into their tokens' sums in :func:`accumulation_dtype`, which the
    result ``[T, out]`` keeps; the T·k rows are never all in memory. A token's terms are summed
    in expert order, not slot order: with k > 2 the last bit may differ from
    :func:`gated_token_sum`'s (with k <= 2 the sums are the same)."""
    wide = accumulation_dtype(dtype)
    token_rows = source_rows(RowLayout.TOKEN, sorted_indices, fan_out)
    sorted_gates = None if gates is None else gates.reshape(-1)[sorted_indices].to(wide)[:, None]
    sums = torch.zeros(token_rows.shape[0] // fan_out, num_out, dtype=wide,
                       device=sorted_indices.device)  # fmt: skip
    for (_, start, end), part in zip(runs, parts, strict=True):
        # in the sums' dtype and contiguous (a weight-first part is a transposed view, slow to
        # add by row; .to returns it as it is when its dtype is already the sums'): a
        # mixed-dtype product made a converted copy and a new result (bf16 at 2048 tokens: the
        # block 1.025-1.04x faster)
        part = part.to(wide, memory_format=torch.contiguous_format).contiguous()
        if sorted_gates is not None:
            part.mul_(sorted_gates[start:end])
        sums.index_add_(0, token_rows[start:end], part)
    return sums


def routed_mlp(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activate: Callable[[Tensor], Tensor],
    gates: Tensor,
    sorted_indices: Tensor,
    expert_offsets: Tensor,
    fan_out: int,
) -> Tensor:
    """The routed MLP of every token, ``Σ_j gates[t, j] · w_out[e] @ activate(w_in[e] @
    x[t])`` over its k = ``fan_out`` experts e (``x [T, in]``, ``w_in [E, hidden, in]``,
    ``w_out [E, out, hidden']``, ``gates [T, k]``, the plan's grouping): ``[T, out]`` in x's
    dtype. The products, their rounding and the gating are those of two :func:`gather_gemm`
    calls, each product in the runs its call takes (:func:`_linear_runs`). When the hidden rows
    of all experts exceed FUSE_BYTES and both products run one expert at a time, each run's
    two products, activation and gating are done together while its rows are in cache, in
    fresh small tensors, and added into its tokens' fp32 sums
    (:func:`added_token_sums`; bf16, 2048 tokens, JetMoE's shape: 1.6x faster than the two
    calls, whose 46 MB of hidden rows went through memory twice; the fine-grained shape's T·k
    gated rows, 64 MB in fp32, cost 38 ms placed and summed against 13 ms added in). The last
    bit may then differ from the calls': the activation runs per run (a vectorised and a
    scalar tail differ), and where the second call would place and sum its rows (below
    ADDED_SUMS_BYTES) a token's k terms are summed in expert order, not slot order. Otherwise
    the first products of all runs are activated in one call and the second products summed
    as the second call sums them (:func:`_token_sums`; a fine-grained block at 8 tokens has
    40-odd runs of one or two rows): the calls' bits."""
    num_rows, num_out = sorted_indices.shape[0], w_out.shape[1]
    runs_in, runs_out = (_linear_runs(w, expert_offsets, num_rows) for w in (w_in, w_out))
    x_runs = _run_rows(x, RowLayout.TOKEN, sorted_indices, fan_out, runs_in)
    fuse = _per_expert(runs_in) and _per_expert(runs_out)  # then both are one run per expert
    if num_rows * w_in.shape[1] * x.element_size() > FUSE_BYTES and fuse:
        parts = (
            _matmul(activate(_matmul(rows, w_in, expert, expert_offsets, None)), w_out, expert,
                    expert_offsets, None)
            for (expert, _, _), rows in zip(runs_in, x_runs, strict=True)
        )  # fmt: skip
        sums = added_token_sums(parts, runs_in, sorted_indices, gates, fan_out, num_out, x.dtype)
        return sums.to(x.dtype)
    hidden = activate(_products(x_runs, w_in, runs_in, expert_offsets, num_rows))
    hidden_runs = (hidden[start:end] for _, start, end in runs_out)
    plan = (sorted_indices, None, expert_offsets)  # no bias: no row needs its expert's
    return _token_sums(hidden_runs, w_out, None, gates, runs_out, plan, fan_out).to(x.dtype)


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
    """``y_a = x[row_X(a)] @ weight[e(a)].T (+ bias[e(a)])`` for every assignment ``a``, placed
    by ``y_layout``: GROUPED ``[T*k, out]``, ASSIGNMENT ``[T*k, out]``, or TOKEN ``[T, out]``
    where ``y[t] = Σ_j gates[t*k+j] · y_{t*k+j}`` (gates ``[T*k]``, 1 if None; summed in fp32).
    ``gates`` are only given with TOKEN output.
    """
    num_rows = sorted_indices.shape[0]
    if num_rows == fan_out and x.device.type == "cpu":  # one token (decode, a batch of one)
        slots, experts = sorted_indices.tolist(), sorted_experts.tolist()
        return one_token_gather_gemm(x, weight, bias, gates, slots, experts, x_layout, y_layout)
    runs = _linear_runs(weight, expert_offsets, num_rows)
    x_runs = _run_rows(x, x_layout, sorted_indices, fan_out, runs)
    plan = (sorted_indices, sorted_experts, expert_offsets)
    if y_layout == RowLayout.TOKEN:
        return _token_sums(x_runs, weight, bias, gates, runs, plan, fan_out).to(x.dtype)
    y = _biased_products(x_runs, weight, bias, runs, plan)  # grouped order
    if y_layout == RowLayout.GROUPED:
        return y
    return to_assignment_order(y, sorted_indices)


def _biased_products(row_runs, weight: Tensor, bias: Tensor | None, runs: list, plan: tuple):
    """:func:`_products` of ``row_runs`` plus each row's expert's bias, in grouped order
    (``plan``: sorted indices, sorted experts and offsets)."""
    sorted_indices, sorted_experts, expert_offsets = plan
    y = _products(row_runs, weight, runs, expert_offsets, sorted_indices.shape[0])
    if bias is not None:
        for expert, start, end in runs:
            y[start:end] += bias[expert] if isinstance(expert, int) else bias[sorted_experts]
    return y


def _token_sums(
    row_runs, weight: Tensor, bias: Tensor | None, gates: Tensor | None, runs: list, plan: tuple,
    fan_out: int,
) -> Tensor:  # fmt: skip
    """TOKEN output of the products of ``row_runs`` (plus bias): each token's gated sum in
    :func:`accumulation_dtype`, added run by run (:func:`added_token_sums`) where
    :func:`_adds_runs`, else the products placed in grouped order and summed by
    :func:`gated_token_sum`."""
    sorted_indices, _, expert_offsets = plan
    num_rows, num_out = sorted_indices.shape[0], weight.shape[1]
    if not _adds_runs(runs, num_rows, num_out, weight.dtype, weight.device):
        y = _biased_products(row_runs, weight, bias, runs, plan)
        return gated_token_sum(y, sorted_indices, gates, fan_out)
    parts = (
        _matmul(rows, weight, expert, expert_offsets, None)
        for (expert, _, _), rows in zip(runs, row_runs, strict=True)
    )
    if bias is not None:  # in place: each part is its product's own fresh result
        parts = (part.add_(bias[expert]) for part, (expert, _, _) in zip(parts, runs, strict=True))
    return added_token_sums(parts, runs, sorted_indices, gates, fan_out, num_out, weight.dtype)


def one_token_gather_gemm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gates: Tensor | None,
    slots: list[int],
    experts: list[int],
    x_layout: int,
    y_layout: int,
) -> Tensor:
    """:func:`gather_gemm` of one token's k assignments on CPU (a decode step with a batch of
    one), the slot and expert of each grouped row (``sorted_indices``, ``sorted_experts``)
    given as lists, read on the host: each product is read from the row it needs and written
    to the row it fills, without the plan's gathers, permutations and runs. The same 1-row
    products, bias adds and gated sum in slot order as the general path; a row's product may
    differ from it in the last bit where a row lies otherwise aligned in memory (a width that
    is no multiple of 16 elements), as oneDNN's sums follow the alignment. A decode step's small
    ops each cost 10-50 us as the weights streaming through evict the caches; at JetMoE's MoA
    shape (fp32, k = 2) a general-path call took 2.4-2.5x the time of its two products."""
    rows, grouped = x.new_empty(len(slots), weight.shape[1]), range(len(slots))
    sources = {RowLayout.GROUPED: grouped, RowLayout.ASSIGNMENT: slots}.get(x_layout)
    targets = grouped if y_layout == RowLayout.GROUPED else slots
    product = _expert_product(x[:1], weight)  # every product is of one row
    for source, target, expert in zip(sources or [0] * len(slots), targets, experts, strict=True):
        y = rows[target : target + 1]  # slices: a split into k views cost more
        product(x[source : source + 1], expert, y)
        if bias is not None:
            y += bias[expert]
    if y_layout != RowLayout.TOKEN:
        return rows
    return token_sum(rows, len(slots), gates).to(x.dtype)


def one_token_mlp(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activate: Callable[[Tensor], Tensor],
    gates: Tensor,
    slots: list[int],
    experts: list[int],
) -> Tensor:
    """:func:`routed_mlp` of one token (``x [1, in]``): the two :func:`gather_gemm` calls'
    one-token paths (:func:`one_token_gather_gemm`), the hidden rows in grouped order as
    theirs, so their bits, without the calls' checks and module calls around them (through
    the two calls the block's one-token step took 1.02-1.12x the time)."""
    hidden = activate(one_token_gather_gemm(
        x, w_in, None, None, slots, experts, RowLayout.TOKEN, RowLayout.GROUPED
    ))  # fmt: skip
    return one_token_gather_gemm(
        hidden, w_out, None, gates, slots, experts, RowLayout.GROUPED, RowLayout.TOKEN
    )


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
    """``dW[e] = Σ_a g_a · dy[row_Y(a)]ᵀ x[row_X(a)]`` over the assignments ``a`` of expert e
    (``g_a = gates[a]``, 1 if None; ``dy`` and ``x`` in any layout): ``[E, out, in]``, x's
    dtype."""
    num_rows, num_out, num_in = sorted_indices.shape[0], dy.shape[1], x.shape[1]
    row_bytes = max(num_in, num_out) * x.element_size()
    runs = _runs(expert_offsets, x.dtype, num_rows, row_bytes, weight=None)
    dw = x.new_empty(num_experts, num_out, num_in)
    covered = {run[0] for run in runs}
    if _per_expert(runs):  # one run per expert with rows:
        for expert in sorted(set(range(num_experts)) - covered):  # the others get none
            dw[expert].zero_()
    sorted_gates = None if gates is None else gates[sorted_indices, None].to(dy.dtype)
    for (expert, start, end), x_rows, dy_rows in zip(
        runs,
        _run_rows(x, x_layout, sorted_indices, fan_out, runs),
        _run_rows(dy, y_layout, sorted_indices, fan_out, runs),
        strict=True,
    ):
        run_gates = None if sorted_gates is None else sorted_gates[start:end]
        if run_gates is not None:  # in place on a gathered copy, never on a view of dy
            dy_rows = (
                dy_rows * run_gates if y_layout == RowLayout.GROUPED else dy_rows.mul_(run_gates)
            )
        if isinstance(expert, int):
            _mm(dy_rows.t(), x_rows, dw[expert])
        elif isinstance(expert, Padded):  # zero rows pad each expert's: they add nothing
            slots = _padded_slots(expert_offsets, expert)
            torch.bmm(
                _to_padded(dy_rows, slots, num_experts, expert).mT,
                _to_padded(x_rows, slots, num_experts, expert),
                out=dw,
            )
        elif num_out == 0 or num_in == 0:
            dw.zero_()
        else:
            dw = torch._grouped_mm(
                _mm_operand(dy_rows, transposed=True).t(),
                _mm_operand(x_rows),
                offs=expert_offsets[1:].to(torch.int32),
            )[:, :num_out, :num_in].contiguous()
    return dw
