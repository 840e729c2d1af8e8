"""expert_linear on both backends against the float64 reference: outputs and every gradient,
for all grouped_in/grouped_out combinations, gates, bias, dtypes and memory layouts."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_blocks.kernels import expert_linear, plan_dispatch
from moe_blocks.testing import feature_dims, reference_expert_linear, routings

from .conftest import DEVICE
from .helpers import LAYOUTS, assert_matches, make_tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@st.composite
def problems(draw, max_tokens, max_experts, max_dim, max_assignments=None):
    routing = draw(
        routings(max_tokens=max_tokens, max_experts=max_experts, max_assignments=max_assignments)
    )
    grouped_in = draw(st.booleans())
    grouped_out = draw(st.booleans())
    return {
        "routing": routing,
        "in_features": draw(feature_dims(max_dim)),
        "out_features": draw(feature_dims(max_dim)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "grouped_in": grouped_in,
        "grouped_out": grouped_out,
        "x_per_assignment": grouped_in or draw(st.booleans()),
        "with_bias": draw(st.booleans()),
        "with_gates": (not grouped_out) and draw(st.booleans()),
        "gates_layout": draw(st.sampled_from(LAYOUTS)),
        "gates_dtype": draw(st.sampled_from((torch.float32, torch.bfloat16))),
        "x_layout": draw(st.sampled_from(LAYOUTS)),
        "w_layout": draw(st.sampled_from(LAYOUTS)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def check_against_reference(problem, backend):
    routing, dtype = problem["routing"], problem["dtype"]
    num_tokens, top_k, num_experts = routing.num_tokens, routing.top_k, routing.num_experts
    d_in, d_out = problem["in_features"], problem["out_features"]
    gen = torch.Generator().manual_seed(problem["seed"])
    plan = plan_dispatch(routing.expert_idx.to(DEVICE), num_experts)

    x_rows = num_tokens * top_k if problem["x_per_assignment"] else num_tokens
    x = make_tensor((x_rows, d_in), dtype, problem["x_layout"], gen).to(DEVICE).requires_grad_()
    weight = (
        make_tensor((num_experts, d_out, d_in), dtype, problem["w_layout"], gen, scale=d_in**-0.5)
        .to(DEVICE)
        .requires_grad_()
    )
    bias = make_tensor((num_experts, d_out), dtype, generator=gen) if problem["with_bias"] else None
    gates = None
    if problem["with_gates"]:
        gates = make_tensor(
            (num_tokens, top_k), problem["gates_dtype"], problem["gates_layout"], gen
        ).abs()
    bias = bias.to(DEVICE) if bias is not None else None
    gates = gates.to(DEVICE) if gates is not None else None
    for tensor in (bias, gates):
        if tensor is not None:
            tensor.requires_grad_()
    inputs = {"x": x, "weight": weight, "bias": bias, "gates": gates}
    snapshots = {name: t.detach().clone() for name, t in inputs.items() if t is not None}

    out = expert_linear(
        x, weight, plan, bias=bias, gates=gates, grouped_in=problem["grouped_in"],
        grouped_out=problem["grouped_out"], backend=backend,
    )  # fmt: skip
    upstream = torch.randn(out.shape, generator=gen).to(DEVICE, out.dtype)
    (out * upstream).sum().backward()

    leaves = {
        name: t.detach().cpu().double().requires_grad_()
        for name, t in inputs.items()
        if t is not None
    }
    expected = reference_expert_linear(
        leaves["x"], leaves["weight"], routing.expert_idx, bias=leaves.get("bias"),
        gates=leaves.get("gates"), sorted_indices=plan.sorted_indices.cpu(),
        grouped_in=problem["grouped_in"], grouped_out=problem["grouped_out"],
    )  # fmt: skip
    if expected.requires_grad:  # an empty routing (T=0) depends on nothing
        (expected * upstream.cpu().double()).sum().backward()

    assert out.dtype == dtype
    assert_matches(out.cpu(), expected.detach(), dtype, "output")
    for name, leaf in leaves.items():
        grad = inputs[name].grad
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == inputs[name].dtype, f"grad {name} has dtype {grad.dtype}"
        grad_dtype = problem["gates_dtype"] if name == "gates" else dtype
        expected_grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        assert_matches(grad.cpu(), expected_grad, max(grad_dtype, dtype, key=_eps), f"grad {name}")
    for name, before in snapshots.items():
        assert torch.equal(inputs[name].detach(), before), f"{name} was modified"


def _eps(dtype):
    return torch.finfo(dtype).eps


@pytest.mark.usefixtures("poisoned_memory")
@given(problems(max_tokens=40, max_experts=64, max_dim=160))
def test_torch_backend_matches_reference(problem):
    check_against_reference(problem, "torch")


@pytest.mark.usefixtures("poisoned_memory")
@given(problems(max_tokens=24, max_experts=64, max_dim=100, max_assignments=96))
def test_triton_backend_matches_reference(problem):
    check_against_reference(problem, "triton")
