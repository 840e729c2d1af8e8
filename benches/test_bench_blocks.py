"""MoEMLP, MoA and one JetMoE layer, forward and forward+backward, beside transformers' JetMoe
modules with the same weights, a torch._grouped_mm pipeline (MLP) and the dense roofline.
Cases and implementations come from moe_blocks.models.bench (also behind `moe-blocks bench`).

    python -m pytest benches/test_bench_blocks.py --benchmark-warmup=on --benchmark-min-rounds=5
"""

import pytest

from moe_blocks.models import bench

from .conftest import DEVICE, TINY

SHAPES = ["jetmoe-8b", "mixtral", "fine-grained", "deepseek-v3"]  # scaled down on CPU
TOKENS = [8, 4096] if DEVICE == "cuda" else [8, 512]
DTYPES = ["bf16"] if DEVICE == "cuda" else ["bf16", "fp32"]


def suite_cases(suites, tokens) -> list[bench.Case]:
    """Every case of ``suites`` at :data:`SHAPES`, ``tokens`` and :data:`DTYPES` here."""
    table = bench.shapes_for(DEVICE, TINY)
    return [
        c for suite in suites for c in bench.cases(suite, SHAPES, tokens, DTYPES, DEVICE, table)
    ]


def case_id(case: bench.Case) -> str:
    return f"{case.suite}-{case.shape}-{case.tokens}-{case.dtype}"


def case_params(cases: list[bench.Case]) -> list:
    """A pytest param ``(case, impl)`` for every implementation of every case."""
    return [
        pytest.param(case, impl, id=f"{case_id(case)}-{impl}")
        for case, impl in bench.case_implementations(cases)
    ]


def time_case(benchmark, case, impl, backward):
    """Time ``impl`` on ``case`` under pytest-benchmark; the output of its last run, and x.
    Forward+backward also records the step's memory in the benchmark's ``extra_info``
    (``memory_mb``, measured as ``memory_measure`` says: bench.memory_mb)."""
    module, x = bench.build(case, impl)
    passes = "fwd+bwd" if backward else "fwd"
    benchmark.group = f"{case.suite} {case.shape} {case.tokens} tokens {case.dtype} {passes}"
    if backward:
        benchmark.extra_info["memory_mb"] = bench.memory_mb(module, x, DEVICE)
        benchmark.extra_info["memory_measure"] = bench.MEMORY_MEASURES[DEVICE]
    return benchmark(bench.step_function(module, x, backward)), x


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize(
    "case,impl", case_params(suite_cases(bench.BLOCK_SUITES, TOKENS[:1] if TINY else TOKENS))
)
def test_block(benchmark, case, impl, backward):
    out, x = time_case(benchmark, case, impl, backward)
    if impl == "expert_products":  # the floor: one row per routed assignment (their sum
        # with autograd)
        assert out.shape == (() if backward else (x.shape[1] * case.dims[3], x.shape[2]))
    else:
        assert out.shape == x.shape
