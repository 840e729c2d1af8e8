"""expert_linear forward and forward+backward beside a per-expert loop of torch.mm, a
torch._grouped_mm pipeline and a dense matmul of equal FLOPs (the roofline: the same arithmetic
with no routing), at decode-sized to training-sized token counts. Cases and implementations come
from moe_blocks.models.bench (also behind `moe-blocks bench --suite expert_linear`).

    python -m pytest benches/test_bench_expert_linear.py --benchmark-warmup=on

Each case computes ``out[t] = Σ_j gates[t,j] · (x[t] @ W[e_tj].T)`` for T tokens, k of E experts,
``x[T, d_model]``, ``W[E, d_ffn, d_model]`` (bench.RoutedLinear).
"""

import pytest
import torch

from moe_blocks.models import bench

from .conftest import DEVICE, TINY
from .test_bench_blocks import case_id, case_params, suite_cases, time_case

TOKENS = [8, 256] if TINY else [8, 512, 16384] if DEVICE == "cuda" else [8, 256, 2048]
CASES = suite_cases([bench.KERNEL_SUITE], TOKENS)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_the_timed_implementations_compute_the_same_function(case):
    """Not timed: moe_blocks and the grouped_mm pipeline (where it runs) agree with the
    per-expert loop on the benchmark's own inputs, in the output and the gradients of x, the
    weight and the gates (the dense roofline only does the same FLOPs: tests/test_bench.py)."""
    results = {}
    for impl in bench.ROUTED_LINEARS:
        if bench.applies(case, impl):
            module, x = bench.build(case, impl)
            x = x.detach().requires_grad_()
            out = module(x)
            out.float().square().sum().backward()
            results[impl] = (out, x.grad, module.weight.grad, module.gates.grad)
    expected = results.pop("per_expert_loop")
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[case.torch_dtype]  # loop rounds rows
    for impl, actual in results.items():
        names = ("output", "grad x", "grad weight", "grad gates")
        for ours, theirs, name in zip(actual, expected, names, strict=True):
            torch.testing.assert_close(
                ours.float(), theirs.float(), atol=tolerance * theirs.abs().max().item(),
                rtol=tolerance, msg=lambda message, name=f"{impl} {name}": f"{name}: {message}",
            )  # fmt: skip


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case,impl", case_params(CASES))
def test_expert_linear(benchmark, case, impl, backward):
    out, x = time_case(benchmark, case, impl, backward)
    assert out.shape == (*x.shape[:-1], case.dims[1])
