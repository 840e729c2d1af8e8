"""The rest of expert_linear's contract: bad input, NaN containment, backend selection,
torch.compile, autocast, and 64-bit indexing."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_blocks.kernels import (
    expert_linear,
    plan_dispatch,
    resolve_backend,
    torch_backend,
    use_backend,
)
from moe_blocks.testing import reference_expert_linear

from .conftest import DEVICE
from .helpers import assert_matches, padded_run

BACKENDS = ("torch", "triton")


def _setup(
    num_tokens=6, top_k=2, num_experts=4, d_in=8, d_out=5, dtype=torch.float32, seed=0,
    device=DEVICE,
):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    expert_idx = torch.rand(num_tokens, num_experts, generator=gen).topk(top_k).indices
    plan = plan_dispatch(expert_idx.to(device), num_experts)
    x = torch.randn(num_tokens, d_in, generator=gen).to(device, dtype)
    weight = torch.randn(num_experts, d_out, d_in, generator=gen).to(device, dtype)
    return plan, x, weight


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_naming_the_argument(backend):
    """Each bad argument is caught by its own check: the patterns are the checks' messages."""
    plan, x, weight = _setup()
    cases = [
        (TypeError, "x must have dtype in", dict(x=x.long())),
        (TypeError, "x must be a torch.Tensor", dict(x=x.cpu().numpy())),
        (TypeError, "weight dtype torch.float64 differs from x dtype",
         dict(weight=weight.double())),
        (TypeError, "plan must be a DispatchPlan", dict(plan=plan.expert_idx)),
        (ValueError, "weight in-features 8 differ from x features 7", dict(x=x[:, :7])),
        (ValueError, r"x has 5 rows; the plan \(T=6, k=2\) needs T or T\*k rows", dict(x=x[:5])),
        (ValueError, r"x must be 2-D \[rows, in\]", dict(x=x.view(2, 3, 8))),
        (ValueError, "weight has 3 experts but the plan has num_experts=4",
         dict(weight=weight[:3])),
        (ValueError, r"weight must be 3-D \[E, out, in\]", dict(weight=weight[0])),
        (ValueError, r"bias must have shape \[E, out\] = \(4, 5\), got \(4, 6\)",
         dict(bias=torch.zeros(4, 6))),
        (TypeError, "bias dtype torch.float16 differs from x dtype",
         dict(bias=torch.zeros(4, 5, dtype=torch.float16))),
        (ValueError, r"gates must have shape \[T, k\] = \(6, 2\), got \(6, 3\)",
         dict(gates=torch.rand(6, 3))),
        (TypeError, "gates must be a floating-point tensor",
         dict(gates=torch.ones(6, 2, dtype=torch.int64))),
        (ValueError, "gates cannot be combined with grouped_out=True",
         dict(gates=torch.rand(6, 2), grouped_out=True)),
        (ValueError, r"x has 6 rows; .* needs T\*k \(grouped_in=True\) rows",
         dict(x=torch.randn(6, 8), grouped_in=True)),
        (TypeError, "grouped_in must be a bool", dict(grouped_in=1)),
        (ValueError, "backend must be one of", dict(backend="cuda")),
        (ValueError, f"weight is on meta but x is on {x.device}", dict(weight=weight.to("meta"))),
        (ValueError, f"gates is on meta but x is on {x.device}",
         dict(gates=torch.rand(6, 2, device="meta"))),
        (ValueError, f"plan was built on meta but x is on {x.device}",
         dict(plan=plan_dispatch(plan.expert_idx.to("meta"), 4))),
        (ValueError, f"weight is on {x.device} but x is on meta", dict(x=x.to("meta"))),
    ]  # fmt: skip
    for error, message, overrides in cases:
        args = {"x": x, "weight": weight, "plan": plan, "backend": backend} | overrides
        with pytest.raises(error, match=message):
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
    default = "triton" if x.device.type == "cuda" else "torch"
    assert resolve_backend("auto", x.device) == default
    with use_backend(backend):
        assert resolve_backend("auto", x.device) == backend
        assert_matches(expert_linear(x, weight, plan).cpu(), expected.cpu(), torch.float32, "auto")
    assert resolve_backend("auto", x.device) == default
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
    """The compiled MLP (fp32) against the same code run eagerly in float64, within the fp32
    error model: the compiled graph may sum in another order than eager fp32 does."""
    torch._dynamo.reset()
    plan, x, w_in = _setup(d_out=12, device="cpu")
    w_out = torch.randn(4, 8, 6)
    gates = torch.rand(6, 2)
    params = [t.clone().requires_grad_() for t in (x, w_in, w_out, gates)]
    exact = [t.detach().double().requires_grad_() for t in params]

    def step(x, w_in, w_out, gates, expert_idx):
        plan = plan_dispatch(expert_idx, 4)
        return _mlp(x, w_in, w_out, plan, gates, "torch")

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(*params, plan.expert_idx)
    got.square().sum().backward()
    want = step(*exact, plan.expert_idx)
    want.square().sum().backward()
    assert_matches(got.detach(), want.detach(), torch.float32, "output", reduction_length=12)
    for name, p, e in zip(("x", "w_in", "w_out", "gates"), params, exact, strict=True):
        assert_matches(p.grad, e.grad, torch.float32, name, reduction_length=12, roundings=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_in_the_autocast_dtype(backend):
    plan, x, weight = _setup()
    gates = torch.rand(6, 2, device=DEVICE)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = expert_linear(x, weight, plan, gates=gates, backend=backend)
    assert y.dtype == torch.bfloat16
    expected = reference_expert_linear(
        x.bfloat16(), weight.bfloat16(), plan.expert_idx, gates=gates.bfloat16()
    )
    assert_matches(y, expected, torch.bfloat16, "autocast output")


def test_autocast_leaves_float64_alone_as_a_matmul_does():
    """``torch.autocast`` does not cast float64: float64 operands stay float64 (as with
    ``F.linear``), and a float64 ``x`` with fp32 weights fails naming the dtypes."""
    plan, x, weight = _setup(dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = expert_linear(x, weight, plan, backend="torch")
        assert y.dtype == torch.nn.functional.linear(x, weight[0]).dtype == torch.float64
        with pytest.raises(TypeError, match="weight dtype torch.bfloat16 differs from x dtype"):
            expert_linear(x, weight.float(), plan, backend="torch")
    torch.testing.assert_close(y, reference_expert_linear(x, weight, plan.expert_idx))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows_in", ["token", "assignment", "grouped"])
def test_row_offsets_past_2_31_elements(backend, rows_in):
    """x rows whose element offsets pass 2**31 (int32 index arithmetic would wrap around), in
    each row layout, through the forward and the weight gradient (which reads x again). The
    storage is 4 GiB of fp16, barely touched (on CPU never allocated beyond the rows used)."""
    tokens, top_k, d_in = 3, 2, 16
    plan = plan_dispatch(torch.tensor([[0, 1], [1, 0], [1, 0]], device=DEVICE), 2)
    rows = tokens if rows_in == "token" else tokens * top_k
    row_stride = (2**31 // (rows - 1) + 16) // 16 * 16  # the last row starts past 2**31
    storage = torch.empty((rows - 1) * row_stride + d_in, dtype=torch.float16, device=DEVICE)
    x = storage.as_strided((rows, d_in), (row_stride, 1))
    x.copy_(torch.randn(rows, d_in).half())
    weight = torch.randn(2, 8, d_in).half().to(DEVICE).requires_grad_()
    grouped_in = rows_in == "grouped"
    out = expert_linear(x, weight, plan, grouped_in=grouped_in, backend=backend)
    upstream = torch.randn(out.shape).half()
    (out * upstream.to(DEVICE)).sum().backward()
    x_ref, weight_ref = x.cpu().double(), weight.detach().cpu().double().requires_grad_()
    expected = reference_expert_linear(x_ref, weight_ref, plan, grouped_in=grouped_in)
    (expected * upstream.double()).sum().backward()
    assert_matches(out.cpu(), expected.detach(), torch.float16, "y", reduction_length=d_in)
    assert_matches(weight.grad.cpu(), weight_ref.grad, torch.float16, "dW", reduction_length=6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("operand", ["x", "weight"])
def test_column_offsets_past_2_31_elements(backend, operand):
    """Strides within a row past 2**31 elements: a transposed ``x`` (``a.t()`` of a wide
    ``a``) or a weight whose out-features are far apart (``[out, E, in]`` permuted), through
    the forward and both gradients. The 4 GiB fp16 storage is barely touched."""
    tokens, d_in, d_out = 3, 16, 8
    plan = plan_dispatch(torch.tensor([[0, 1], [1, 0], [1, 0]], device=DEVICE), 2)
    x = torch.randn(tokens, d_in).half()
    weight = torch.randn(2, d_out, d_in).half()
    far = (2**31 // 7 + 16) // 16 * 16  # the 8th column or out-feature starts past 2**31
    if operand == "x":
        storage = torch.empty(15 * far + tokens, dtype=torch.float16, device=DEVICE)
        x = storage.as_strided((tokens, d_in), (1, far)).copy_(x)
    else:
        storage = torch.empty(7 * far + 2 * d_in, dtype=torch.float16, device=DEVICE)
        weight = storage.as_strided((2, d_out, d_in), (d_in, far, 1)).copy_(weight)
    x, weight = x.to(DEVICE).requires_grad_(), weight.to(DEVICE).requires_grad_()
    out = expert_linear(x, weight, plan, backend=backend)
    upstream = torch.randn(out.shape).half()
    (out * upstream.to(DEVICE)).sum().backward()
    x_ref = x.detach().cpu().double().requires_grad_()
    weight_ref = weight.detach().cpu().double().requires_grad_()
    expected = reference_expert_linear(x_ref, weight_ref, plan)
    (expected * upstream.double()).sum().backward()
    assert_matches(out.cpu(), expected.detach(), torch.float16, "y", reduction_length=d_in)
    assert_matches(x.grad.cpu(), x_ref.grad, torch.float16, "dx", reduction_length=d_out)
    assert_matches(weight.grad.cpu(), weight_ref.grad, torch.float16, "dW", reduction_length=6)


_ROW_POINTERS = {"gather_gemm": ("x_ptr", "y_ptr"), "weight_grad": ("x_ptr", "dy_ptr")}
_EXPERT_POINTERS = {"gather_gemm": ("w_ptr",), "weight_grad": ("dw_ptr",)}


@pytest.mark.slow
def test_compiled_kernels_address_rows_and_experts_in_64_bit():
    """What the interpreter cannot show: in the Triton-IR compiled for sm_90, every row offset
    added to an activation pointer and every expert offset added to a weight pointer is 64-bit,
    in every row layout (a 32-bit offset wraps past 2**31 elements: 1 GiB of bf16 rows of
    width 2048, or DeepSeek-V3's 2048 x 7168 x 256 expert weights)."""
    code = textwrap.dedent(
        """
        import json, re, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from moe_blocks.kernels import aot, triton_backend
        wanted = {("gather_gemm", 0, 1), ("gather_gemm", 1, 0), ("gather_gemm", 2, 1),
                  ("weight_grad", 0, 2), ("weight_grad", 1, 0), ("weight_grad", 2, 1)}
        found = []
        for variant in aot.variants():
            key = (variant.kernel, variant.constexprs["X_LAYOUT"], variant.constexprs["Y_LAYOUT"])
            if variant.dtype != "bfloat16" or key not in wanted:
                continue
            wanted.remove(key)
            kernel = getattr(triton_backend, variant.kernel + "_kernel")
            signature, constexprs, attrs = aot._signature(kernel, variant)
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
            )
            found.append([variant.kernel, variant.label, compiled.asm["ttir"]])
        print(json.dumps(found))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    builds = json.loads(result.stdout.splitlines()[-1])
    assert len(builds) == 6, [label for _, label, _ in builds]  # x and y rows of each kind
    for kernel, label, ttir in builds:
        offsets = _pointer_offset_widths(ttir)
        for pointer in _ROW_POINTERS[kernel] + _EXPERT_POINTERS[kernel]:
            assert offsets.get(pointer), f"{label}: no offset added to {pointer}"
            assert offsets[pointer] == {"i64"}, f"{label}: {pointer} offsets are {offsets[pointer]}"


def _pointer_offset_widths(ttir: str) -> dict[str, set[str]]:
    """For each pointer argument of a Triton-IR function, the integer types of the offsets added
    to it directly (``tt.addptr %arg``) or to its splat (``tt.splat %arg`` then ``tt.addptr``)."""
    origin = {f"%{name}": name for name in re.findall(r"%(\w+_ptr): !tt\.ptr", ttir)}
    for result, source in re.findall(r"(%[\w.]+) = tt\.splat (%[\w.]+) ", ttir):
        if source in origin:
            origin[result] = origin[source]
    widths: dict[str, set[str]] = {}
    addptr = r"= tt\.addptr (%[\w.]+), %[\w.]+ : [^,]+, (?:tensor<[\dx]+x)?(i\d+)"
    for base, width in re.findall(addptr, ttir):
        if base in origin:
            widths.setdefault(origin[base], set()).add(width)
    return widths


@pytest.mark.parametrize("backend", [*BACKENDS, "torch-padded"])
@pytest.mark.parametrize("d_in, d_out", [(0, 5), (8, 0), (0, 0)])
def test_zero_width_features(backend, d_in, d_out, monkeypatch):
    if backend == "torch-padded":
        monkeypatch.setattr(torch_backend, "_runs", padded_run)
        backend = "torch"
    plan, _, _ = _setup()
    x = torch.randn(6, d_in, device=DEVICE, requires_grad=True)
    weight = torch.randn(4, d_out, d_in, device=DEVICE, requires_grad=True)
    bias = torch.randn(4, d_out, device=DEVICE, requires_grad=True)
    gates = torch.rand(6, 2, device=DEVICE, requires_grad=True)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, weight, bias, gates)]
    out = expert_linear(x, weight, plan, bias=bias, gates=gates, backend=backend)
    expected = reference_expert_linear(*leaves[:2], plan, bias=leaves[2], gates=leaves[3])
    assert_matches(out.cpu(), expected.detach(), torch.float32, "output")
    upstream = torch.randn(out.shape)
    (out * upstream.to(DEVICE)).sum().backward()
    (expected * upstream.double()).sum().backward()
    # d_in = 0: the output is the gated bias, so bias and gates still get gradients; d_out = 0:
    # every gradient is zero.
    for name, tensor, leaf in zip(("x", "weight", "bias", "gates"), (x, weight, bias, gates),
                                  leaves, strict=True):  # fmt: skip
        expected_grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        assert_matches(tensor.grad.cpu(), expected_grad, torch.float32, f"grad {name}")


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
