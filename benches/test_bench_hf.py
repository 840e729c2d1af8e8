"""transformers' MoE code with each experts implementation ("eager", "grouped_mm", "batched_mm",
and ours, "moe_blocks"): Qwen3-MoE's sparse MoE block at the Mixtral-like and fine-grained
expert shapes, and a whole two-layer Qwen3-MoE model. Cases and implementations come from
moe_blocks.models.bench (also behind `moe-blocks bench --suite hf`).

    python -m pytest benches/test_bench_hf.py --benchmark-warmup=on --benchmark-min-rounds=5
"""

import pytest

from moe_blocks.models import bench

from .conftest import DEVICE, TINY

pytest.importorskip("transformers")

SHAPES = ["mixtral", "fine-grained", bench.HF_MODEL]
TOKENS = [8, 4096] if DEVICE == "cuda" else [8, 512]
DTYPES = ["bf16"] if DEVICE == "cuda" else ["bf16", "fp32"]


def _cases():
    table = bench.hf_shapes(DEVICE, TINY)
    for shape in SHAPES:
        for tokens in TOKENS[:1] if TINY else TOKENS:
            for dtype in DTYPES:
                case = bench.Case("hf", shape, tokens, dtype, DEVICE, table[shape])
                for impl in bench.HF_IMPLEMENTATIONS:
                    if bench.applies(case, impl):
                        yield pytest.param(case, impl, id=f"{shape}-{tokens}-{dtype}-{impl}")


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case,impl", list(_cases()))
def test_hf_experts(benchmark, case, impl, backward):
    module, x = bench.build(case, impl)
    passes = "fwd+bwd" if backward else "fwd"
    benchmark.group = f"hf {case.shape} {case.tokens} tokens {case.dtype} {passes}"
    out = benchmark(bench.step_function(module, x, backward))
    width = bench.HF_MODEL_VOCAB if case.shape == bench.HF_MODEL else case.dims[0]
    assert out.shape == (*x.shape[:-1], width)
