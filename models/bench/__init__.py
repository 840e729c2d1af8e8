"""Benchmarks of the kernel and the blocks beside their baselines, shared by ``moe-blocks
bench``, the pytest-benchmark suites in ``benches/`` and ``benches/gpu_check.py``.

Every case builds each implementation with the same random weights and input and times the
same work. The block suites (``mlp``, ``moa``, ``layer``: MoEMLP, MoA, a JetMoE decoder layer)
time :data:`IMPLEMENTATIONS`:

- ``moe_blocks``: our block, on the default backend.
- ``transformers``: transformers' JetMoe module with the same weights: the per-expert loop
  most MoE code runs today.
- ``grouped_mm``: (MLP only) a plain autograd pipeline: sort, gather, ``torch._grouped_mm``,
  SiLU-GLU, ``torch._grouped_mm``, gate-weighted ``index_add``.
- ``expert_products``: (MLP on CPU only) the floor of a block that multiplies expert by expert,
  as the torch backend does: the routed rows already grouped, each expert's two products and
  SiLU-GLU, nothing else (no router, gathers, gates or sums). Its ``x dense`` is how near the
  dense roofline one BLAS call per expert can come on this machine.
- ``dense``: the roofline: dense layers with the same matmul FLOPs and no routing (T·k rows
  through one dense expert-sized MLP; for attention, one dense projection as wide as the k
  experts' together; for a layer, both in sequence).

The ``expert_linear`` suite times the kernel alone as one expert linear layer with its routing
fixed (:class:`RoutedLinear`): ``x[T, d_model]`` in, each token's gate-weighted sum over its k
experts ``[T, d_ffn]`` out, one call that reads each token row k times, multiplies it by its
experts' weights and sums the k results by the gates. Implementations
(:data:`KERNEL_IMPLEMENTATIONS`): ``moe_blocks`` (one ``expert_linear`` call),
``per_expert_loop`` (for each expert ``torch.where``, ``torch.mm``, gate, ``index_add``: the
loop of transformers' MoE layers), ``grouped_mm`` (sort, gather, one ``torch._grouped_mm``,
gate-weighted ``index_add``) and ``dense`` (the T·k rows through one expert's weight).

The ``hf`` suite times transformers' own MoE code with each of its ``experts_implementation``
choices (``eager``, ``grouped_mm``, ``batched_mm``) and ours (``moe_blocks``, from
:mod:`moe_blocks.integrations.transformers`): Qwen3-MoE's sparse MoE block (router + experts)
at each expert shape, and a whole two-layer Qwen3-MoE model (shape ``qwen3-moe-model``).

Rooms, each importing only those before it: :mod:`.cases` (suites, shapes, cases),
:mod:`.baselines` (building each implementation), :mod:`.measure` (timing, memory,
:func:`run_suite`), :mod:`.ep` (expert parallelism, :func:`run_ep`), :mod:`.report` (table,
JSON, PNG).
"""

from .baselines import ROUTED_LINEARS, RoutedLinear, build
from .cases import (
    BLOCK_SUITES,
    CPU_SHAPES,
    HF_IMPLEMENTATIONS,
    HF_MODEL,
    HF_MODEL_VOCAB,
    HF_SUITE,
    IMPLEMENTATIONS,
    KERNEL_IMPLEMENTATIONS,
    KERNEL_SUITE,
    LOOP_BASELINES,
    MEMORY_MEASURES,
    SHAPES,
    SUITES,
    TINY_SHAPES,
    Case,
    applies,
    case_implementations,
    cases,
    hf_shapes,
    shapes_for,
)
from .ep import EPResult, measure_ep, run_ep
from .measure import (
    Result,
    cache_flush,
    last_level_cache_bytes,
    memory_mb,
    run_case,
    run_suite,
    step_function,
    time_medians_ms,
)
from .report import format_ep_table, format_table, plot, to_json, write_results

__all__ = [
    "BLOCK_SUITES",
    "CPU_SHAPES",
    "HF_IMPLEMENTATIONS",
    "HF_MODEL",
    "HF_MODEL_VOCAB",
    "HF_SUITE",
    "IMPLEMENTATIONS",
    "KERNEL_IMPLEMENTATIONS",
    "KERNEL_SUITE",
    "LOOP_BASELINES",
    "MEMORY_MEASURES",
    "ROUTED_LINEARS",
    "SHAPES",
    "SUITES",
    "TINY_SHAPES",
    "Case",
    "EPResult",
    "Result",
    "RoutedLinear",
    "applies",
    "build",
    "cache_flush",
    "case_implementations",
    "cases",
    "format_ep_table",
    "format_table",
    "hf_shapes",
    "last_level_cache_bytes",
    "measure_ep",
    "memory_mb",
    "plot",
    "run_case",
    "run_ep",
    "run_suite",
    "shapes_for",
    "step_function",
    "time_medians_ms",
    "to_json",
    "write_results",
]
