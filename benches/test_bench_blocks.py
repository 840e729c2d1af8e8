"""MoEMLP, MoA and one JetMoE layer, forward and forward+backward, beside transformers' JetMoe
modules with the same weights, a torch._grouped_mm pipeline (MLP) and the dense roofline.
Cases and implementations come from moe_blocks.models.bench (also behind `moe-blocks bench`).

    python -m pytest benches/test_bench_blocks.py --benchmark-warmup=on --benchmark-min-rounds=5
"""

import pytest

from moe_blocks.models import bench

from .conftest import DEVICE, TINY

SHAPES = (
    ["jetmoe-8b", "mixtral", "fine-grained", "deepseek-v3"]
    if DEVICE == "cuda"
    else ["jetmoe-8b", "fine-grained"]
)
TOKENS = [8, 4096] if DEVICE == "cuda" else [8, 512]
DTYPES = ["bf16"] if DEVICE == "cuda" else ["bf16", "fp32"]


def _cases():
    table = bench.shapes_for(DEVICE, TINY)
    for suite in bench.SUITES:
        for shape in SHAPES:
            for tokens in TOKENS[:1] if TINY else TOKENS:
                for dtype in DTYPES:
                    case = bench.Case(suite, shape, tokens, dtype, DEVICE, table[shape])
                    for impl in bench.IMPLEMENTATIONS:
                        if bench.applies(case, impl):
                            yield pytest.param(
                                case, impl, id=f"{suite}-{shape}-{tokens}-{dtype}-{impl}"
                            )


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case,impl", list(_cases()))
def test_block(benchmark, case, impl, backward):
    module, x = bench.build(case, impl)
    passes = "fwd+bwd" if backward else "fwd"
    benchmark.group = f"{case.suite} {case.shape} {case.tokens} tokens {case.dtype} {passes}"
    out = benchmark(bench.step_function(module, x, backward))
    assert out.shape == x.shape
