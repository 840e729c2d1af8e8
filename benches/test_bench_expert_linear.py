"""expert_linear forward and forward+backward beside a per-expert loop and a dense matmul of
equal FLOPs (the roofline: the same arithmetic with no routing).

    python -m pytest benches/test_bench_expert_linear.py --benchmark-group-by=param:case

Each case computes ``out[t] = Σ_j gates[t,j] · (x[t] @ W[e_tj].T)`` for T tokens, k of E experts.
"""

import pytest
import torch

from moe_blocks.kernels import expert_linear, plan_dispatch

from .conftest import DEVICE, TINY

# (tokens, d_in, d_out, experts, top_k): a JetMoE-like MLP input projection scaled to 2 cores,
# and a fine-grained (many small experts) one.
SHAPES = {
    "jetmoe-like": (1024, 1024, 1408, 8, 2),
    "fine-grained": (1024, 1024, 256, 64, 8),
}
if TINY:
    SHAPES = {name: (16, 32, 48, experts, k) for name, (_, _, _, experts, k) in SHAPES.items()}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def routed_inputs(shape, dtype):
    tokens, d_in, d_out, experts, top_k = shape
    gen = torch.Generator().manual_seed(0)
    expert_idx = torch.rand(tokens, experts, generator=gen).topk(top_k).indices.to(DEVICE)
    gates = torch.rand(tokens, top_k, generator=gen).softmax(-1).to(DEVICE)
    x = torch.randn(tokens, d_in, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(experts, d_out, d_in, generator=gen) * d_in**-0.5).to(DEVICE, dtype)
    return x, weight, expert_idx, gates


def moe_blocks_impl(x, weight, expert_idx, gates):
    plan = plan_dispatch(expert_idx, weight.shape[0])
    return expert_linear(x, weight, plan, gates=gates)


def per_expert_loop(x, weight, expert_idx, gates):
    """What most MoE code does: for each expert, find its tokens, matmul, scatter-add."""
    out = x.new_zeros(x.shape[0], weight.shape[1])
    for expert in range(weight.shape[0]):
        token, slot = torch.where(expert_idx == expert)
        if token.numel():
            y = x[token] @ weight[expert].T
            out.index_add_(0, token, y * gates[token, slot, None].to(y.dtype))
    return out


def dense_same_flops(x, weight, expert_idx, gates):
    """One matmul with T*k rows and the same in/out sizes: the FLOPs of the routed work."""
    rows = x.repeat_interleave(expert_idx.shape[1], dim=0)
    return rows @ weight[0].T


IMPLEMENTATIONS = {
    "moe_blocks": moe_blocks_impl,
    "per_expert_loop": per_expert_loop,
    "dense_roofline": dense_same_flops,
}


def _params():
    for shape_name in SHAPES:
        for dtype_name in DTYPES:
            yield pytest.param(shape_name, dtype_name, id=f"{shape_name}-{dtype_name}")


@pytest.mark.parametrize("shape_name,dtype_name", list(_params()))
def test_the_timed_implementations_compute_the_same_function(shape_name, dtype_name):
    """Not timed: the per-expert loop and moe_blocks agree on the benchmark's own inputs, in
    the output and both gradients (the dense roofline only has the same shapes)."""
    dtype = DTYPES[dtype_name]
    x, weight, expert_idx, gates = routed_inputs(SHAPES[shape_name], dtype)
    results = []
    for impl in (moe_blocks_impl, per_expert_loop):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
        out = impl(*leaves, expert_idx, gates)
        out.float().square().sum().backward()
        results.append([out] + [leaf.grad for leaf in leaves])
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]  # the loop rounds per row
    for ours, theirs, name in zip(*results, ("output", "grad x", "grad weight"), strict=True):
        torch.testing.assert_close(
            ours.float(), theirs.float(), atol=tolerance * theirs.abs().max().item(),
            rtol=tolerance, msg=lambda message, name=name: f"{name}: {message}",
        )  # fmt: skip


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("shape_name,dtype_name", list(_params()))
def test_forward(benchmark, impl, shape_name, dtype_name):
    benchmark.group = f"expert_linear forward {shape_name} {dtype_name}"
    x, weight, expert_idx, gates = routed_inputs(SHAPES[shape_name], DTYPES[dtype_name])
    fn = IMPLEMENTATIONS[impl]
    with torch.no_grad():
        out = benchmark(fn, x, weight, expert_idx, gates)
    assert out.shape[0] == x.shape[0] * (expert_idx.shape[1] if impl == "dense_roofline" else 1)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("shape_name,dtype_name", list(_params()))
def test_forward_backward(benchmark, impl, shape_name, dtype_name):
    benchmark.group = f"expert_linear forward+backward {shape_name} {dtype_name}"
    x, weight, expert_idx, gates = routed_inputs(SHAPES[shape_name], DTYPES[dtype_name])
    x.requires_grad_()
    weight.requires_grad_()
    fn = IMPLEMENTATIONS[impl]

    def step():
        x.grad = weight.grad = None
        out = fn(x, weight, expert_idx, gates)
        out.backward(torch.ones_like(out))
        return out

    benchmark(step)
    assert x.grad is not None and weight.grad is not None
