"""The rest of expert_linear's contract: bad input, NaN containment, backend selection,
torch.compile, autocast, and 64-bit indexing."""

import pytest
import torch

from moe_blocks.kernels import expert_linear, plan_dispatch, resolve_backend, use_backend
from moe_blocks.testing import reference_expert_linear

from .helpers import assert_matches

BACKENDS = ("torch", "triton")


def _setup(num_tokens=6, top_k=2, num_experts=4, d_in=8, d_out=5, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    expert_idx = torch.rand(num_tokens, num_experts, generator=gen).topk(top_k).indices
    plan = plan_dispatch(expert_idx, num_experts)
    x = torch.randn(num_tokens, d_in, generator=gen).to(dtype)
    weight = torch.randn(num_experts, d_out, d_in, generator=gen).to(dtype)
    return plan, x, weight


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_naming_the_argument(backend):
    plan, x, weight = _setup()
    cases = [
        (TypeError, "x", dict(x=x.long())),
        (TypeError, "x", dict(x=x.numpy())),
        (TypeError, "weight", dict(weight=weight.double())),
        (TypeError, "plan", dict(plan=plan.expert_idx)),
        (ValueError, "x", dict(x=x[:, :7])),
        (ValueError, "x", dict(x=x[:5])),
        (ValueError, "x", dict(x=x.view(2, 3, 8))),
        (ValueError, "weight", dict(weight=weight[:3])),
        (ValueError, "weight", dict(weight=weight[0])),
        (ValueError, "bias", dict(bias=torch.zeros(4, 6))),
        (TypeError, "bias", dict(bias=torch.zeros(4, 5, dtype=torch.float16))),
        (ValueError, "gates", dict(gates=torch.rand(6, 3))),
        (TypeError, "gates", dict(gates=torch.ones(6, 2, dtype=torch.int64))),
        (ValueError, "gates", dict(gates=torch.rand(6, 2), grouped_out=True)),
        (ValueError, "x", dict(x=torch.randn(6, 8), grouped_in=True)),
        (TypeError, "grouped_in", dict(grouped_in=1)),
        (ValueError, "backend", dict(backend="cuda")),
        (ValueError, "weight is on meta", dict(weight=weight.to("meta"))),
    ]
    for error, name, overrides in cases:
        args = {"x": x, "weight": weight, "plan": plan, "backend": backend} | overrides
        with pytest.raises(error, match=name):
            expert_linear(args.pop("x"), args.pop("weight"), args.pop("plan"), **args)


def test_triton_rejects_float64():
    plan, x, weight = _setup(dtype=torch.float64)
    with pytest.raises(TypeError, match="x must have dtype"):
        expert_linear(x, weight, plan, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_the_rows_it_touches(backend):
    plan, x, weight = _setup(num_tokens=9, num_experts=3, top_k=1)
    poisoned_token = 4
    x[poisoned_token, 3] = float("nan")
    y = expert_linear(x, weight, plan, backend=backend)
    nan_rows = torch.isnan(y).any(dim=1)
    assert nan_rows.tolist() == [t == poisoned_token for t in range(9)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_and_auto_follows_use_backend(backend):
    plan, x, weight = _setup()
    expected = reference_expert_linear(x, weight, plan.expert_idx)
    assert resolve_backend("auto", x.device) == "torch"
    with use_backend(backend):
        assert resolve_backend("auto", x.device) == backend
        assert_matches(expert_linear(x, weight, plan), expected, torch.float32, "auto")
    assert resolve_backend("auto", x.device) == "torch"
    with pytest.raises(ValueError, match="backend"):
        with use_backend("tpu"):
            pass


def _mlp(x, w_in, w_out, plan, gates, backend):
    hidden = expert_linear(x, w_in, plan, grouped_out=True, backend=backend)
    gate, up = hidden.chunk(2, dim=-1)
    return expert_linear(
        torch.nn.functional.silu(gate) * up, w_out, plan, grouped_in=True, gates=gates,
        backend=backend,
    )  # fmt: skip


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    plan, x, w_in = _setup(d_out=12)
    w_out = torch.randn(4, 8, 6)
    gates = torch.rand(6, 2)
    params = [t.clone().requires_grad_() for t in (x, w_in, w_out, gates)]

    def step(x, w_in, w_out, gates, expert_idx):
        plan = plan_dispatch(expert_idx, 4)
        return _mlp(x, w_in, w_out, plan, gates, "torch")

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(*params, plan.expert_idx)
    got.square().sum().backward()
    compiled_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    want = step(*params, plan.expert_idx)
    want.square().sum().backward()
    torch.testing.assert_close(got, want)
    for compiled_grad, p in zip(compiled_grads, params, strict=True):
        torch.testing.assert_close(compiled_grad, p.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_in_the_autocast_dtype(backend):
    plan, x, weight = _setup()
    gates = torch.rand(6, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = expert_linear(x, weight, plan, gates=gates, backend=backend)
    assert y.dtype == torch.bfloat16
    expected = reference_expert_linear(
        x.bfloat16(), weight.bfloat16(), plan.expert_idx, gates=gates.bfloat16()
    )
    assert_matches(y, expected, torch.bfloat16, "autocast output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_offsets_past_2_31_elements(backend):
    """Rows whose element offset passes 2**31 (int32 index arithmetic would wrap around)."""
    d_in, row_stride = 16, 2**30
    storage = torch.empty(2 * row_stride + d_in, dtype=torch.float16)  # 4 GiB, barely touched
    x = storage.as_strided((3, d_in), (row_stride, 1))
    x.copy_(torch.randn(3, d_in).half())
    weight = torch.randn(2, 8, d_in).half()
    plan = plan_dispatch(torch.tensor([[0], [1], [1]]), 2)
    expected = reference_expert_linear(x, weight, plan.expert_idx)
    assert_matches(expert_linear(x, weight, plan, backend=backend), expected, torch.float16, "y")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_in, d_out", [(0, 5), (8, 0), (0, 0)])
def test_zero_width_features(backend, d_in, d_out):
    plan, x, weight = _setup(d_in=max(d_in, 1), d_out=max(d_out, 1))
    x = torch.randn(6, d_in, requires_grad=True)
    weight = torch.randn(4, d_out, d_in, requires_grad=True)
    bias = torch.randn(4, d_out, requires_grad=True)
    gates = torch.rand(6, 2, requires_grad=True)
    out = expert_linear(x, weight, plan, bias=bias, gates=gates, backend=backend)
    expected = reference_expert_linear(x, weight, plan, bias=bias, gates=gates)
    assert_matches(out, expected.detach(), torch.float32, "output")
    out.sum().backward()
    assert x.grad.shape == x.shape and weight.grad.shape == weight.shape
    assert bias.grad.shape == bias.shape and gates.grad.shape == gates.shape


def test_narrow_integer_routings_are_range_checked_without_wrapping():
    idx = torch.tensor([[0, 255], [17, 3]], dtype=torch.uint8)
    plan = plan_dispatch(idx, 256)  # 256 would wrap to 0 in uint8 arithmetic
    assert plan.tokens_per_expert[255] == 1
    small = torch.tensor([[0, 100]], dtype=torch.int8)
    assert plan_dispatch(small, 300).tokens_per_expert[100] == 1  # 300 wraps to 44 in int8
    with pytest.raises(ValueError, match="expert_idx"):
        plan_dispatch(torch.tensor([[0, 120]], dtype=torch.int8), 100)


@pytest.mark.parametrize("layout", ["assignment", "grouped", "token"])
def test_double_backward_through_gates(layout):
    """Second derivatives through x and gates (a gradient penalty on the input), float64. (The
    weight-gradient op has no derivative of its own: no double backward into the weights.)"""
    torch.manual_seed(0)
    tokens, top_k, experts, d_in, d_out = 5, 2, 3, 4, 3
    plan = plan_dispatch(torch.randint(0, experts, (tokens, top_k)), experts)
    rows = tokens if layout == "token" else tokens * top_k
    x = torch.randn(rows, d_in, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(experts, d_out, d_in, dtype=torch.float64)
    gates = torch.rand(tokens, top_k, dtype=torch.float64, requires_grad=True)

    def f(x, gates):
        return expert_linear(
            x, weight, plan, gates=gates, grouped_in=layout == "grouped", backend="torch"
        )

    assert torch.autograd.gradgradcheck(f, (x, gates))
