"""On CPUs without native bf16/fp16 matrix products the torch backend multiplies each expert's
rows in fp32 and rounds once (kernels/torch_backend.py, cpu_has_native_matmul), or, up to
EMULATED_MM_ROWS rows of a row-major weight (not the input gradient's weight.mT; on an AVX2 CPU
EMULATED_WEIGHT_FIRST_MM_ROWS), with torch's own 16-bit product. The predicates are forced
here, so the paths run whatever this machine has; the float64 oracle judges them."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_blocks.kernels import expert_linear, plan_dispatch, torch_backend
from moe_blocks.testing import reference_expert_linear, routings

from .helpers import assert_matches


def test_native_matmul_predicate_reads_torch_once_per_dtype():
    native = torch_backend.cpu_has_native_matmul
    assert native(torch.float32) and native(torch.float64)
    assert native(torch.bfloat16) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert native(torch.float16) == torch.ops.mkldnn._is_mkldnn_fp16_supported()
    assert native.cache_info().currsize >= 4


def _no_native_products(consulted: list):
    """A stand-in for ``cpu_has_native_matmul`` on a CPU that emulates bf16 and fp16, noting
    each dtype asked about."""

    def native(asked: torch.dtype) -> bool:
        consulted.append(asked)
        return asked not in (torch.bfloat16, torch.float16)

    return native


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mm_rows", [0, 2**62], ids=["in_fp32", "16_bit_mm"])
@pytest.mark.parametrize("avx2", [False, True], ids=["other_cpu", "avx2_cpu"])
@settings(max_examples=15)
@given(
    routing=routings(max_tokens=20, max_experts=6),
    num_in=st.integers(1, 40),
    num_out=st.integers(1, 40),
    gated=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_emulated_dtypes_multiply_in_fp32_and_match_the_oracle(
    dtype, mm_rows, avx2, routing, num_in, num_out, gated, seed
):
    """Every product in fp32 (a 16-bit limit of 0: on an AVX2 CPU weight-first from 2 rows) or
    every rows-first product of a row-major weight torch's own 16-bit one (the limit beyond any
    count; the input gradient's stay in fp32): both sum in fp32 and round once."""
    consulted = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_backend, "cpu_has_native_matmul", _no_native_products(consulted))
        patch.setattr(torch_backend, "_avx2_cpu", lambda: avx2)
        patch.setattr(torch_backend, "EMULATED_MM_ROWS", mm_rows)
        patch.setattr(torch_backend, "EMULATED_WEIGHT_FIRST_MM_ROWS", mm_rows)
        generator = torch.Generator().manual_seed(seed)
        num_experts = routing.num_experts
        x = torch.randn(routing.num_tokens, num_in, generator=generator).to(dtype)
        weight = torch.randn(num_experts, num_out, num_in, generator=generator)
        weight = (weight * num_in**-0.5).to(dtype)
        bias = torch.randn(num_experts, num_out, generator=generator).to(dtype)
        gates = torch.rand(routing.expert_idx.shape, generator=generator) if gated else None
        leaves = [t.requires_grad_() for t in (x, weight, bias, gates) if t is not None]
        plan = plan_dispatch(routing.expert_idx, num_experts)
        out = expert_linear(x, weight, plan, bias=bias, gates=gates, backend="torch")
        # The upstream gradient as the kernel receives it: in the output's dtype.
        probe = torch.randn(out.shape, generator=generator).to(dtype)
        grads = torch.autograd.grad((out * probe).sum(), leaves, allow_unused=True)

    if routing.num_tokens:
        assert dtype in consulted  # the fp32 path ran
    exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
    exact_x, exact_weight, exact_bias = exact_leaves[:3]
    exact_gates = exact_leaves[3] if gated else None
    expected = reference_expert_linear(
        exact_x, exact_weight, routing.expert_idx, bias=exact_bias, gates=exact_gates
    )
    top_k = routing.top_k if gated else 1
    assert_matches(
        out, expected.detach(), dtype, "output", reduction_length=num_in + 1, top_k=top_k
    )
    if not expected.requires_grad:  # an empty routing depends on nothing
        return
    expected_grads = torch.autograd.grad(
        (expected * probe.double()).sum(), exact_leaves, allow_unused=True, materialize_grads=True
    )
    # Error model per gradient (as in test_expert_linear): the products and rows it sums, three
    # roundings. A gate's gradient is a dot product of the upstream gradient with the expert's
    # ungated row, which may cancel: its error scales with the magnitude of the terms it sums,
    # bounded by |probe| . (|weight| |x| + |bias|) for the assignment's expert.
    models = {
        "x": {"reduction_length": num_out, "top_k": routing.top_k},
        "weight": {"reduction_length": routing.num_tokens},
        "bias": {"reduction_length": routing.num_tokens},
    }
    if gated:
        magnitudes = reference_expert_linear(
            exact_x.detach().abs(), exact_weight.detach().abs(), routing.expert_idx,
            bias=exact_bias.detach().abs(),
        )  # fmt: skip
        magnitudes = magnitudes.view(routing.num_tokens, routing.top_k, num_out)
        term_scale = (probe.double().abs().unsqueeze(1) * magnitudes).sum(-1)
        models["gates"] = {"reduction_length": num_in + num_out + 1, "scale": term_scale}
    names = ("x", "weight", "bias", "gates")[: len(leaves)]
    for name, grad, exact in zip(names, grads, expected_grads, strict=True):
        grad = torch.zeros_like(exact) if grad is None else grad
        assert_matches(grad, exact, dtype, name, roundings=3, **models[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 9, 30])
@pytest.mark.parametrize("avx2", [False, True], ids=["other_cpu", "avx2_cpu"])
def test_few_emulated_rows_take_the_16_bit_product_more_take_fp32(dtype, rows, avx2, monkeypatch):
    """On a CPU that emulates 16-bit products (forced), an expert's product of up to
    EMULATED_MM_ROWS rows (EMULATED_WEIGHT_FIRST_MM_ROWS on an AVX2 CPU, forced or not) is
    torch's own 16-bit ``mm`` (faster there: it streams the 16-bit weight, its column-major
    right operand), of more rows an fp32 ``mm`` of the converted operands, on an AVX2 CPU
    weight-first; the input gradient's, through the row-major weight, is in fp32 whatever the
    rows (torch's 16-bit product took 10-50x the time so), rows-first. Each is the float64
    product rounded once, within fp32's summation error."""
    monkeypatch.setattr(torch_backend, "cpu_has_native_matmul", _no_native_products([]))
    monkeypatch.setattr(torch_backend, "_avx2_cpu", lambda: avx2)
    weight = (torch.randn(2, 24, 40) / 40**0.5).to(dtype)
    x = torch.randn(rows, 40).to(dtype).requires_grad_()
    operands = []
    real_mm = torch.mm

    def recorded_mm(a, b, out=None):
        operands.append((a.dtype, b.dtype, tuple(a.shape)))
        return real_mm(a, b, out=out)

    monkeypatch.setattr(torch, "mm", recorded_mm)
    expert_idx = torch.ones(rows, 1, dtype=torch.long)  # every row to expert 1
    y = expert_linear(x, weight, plan_dispatch(expert_idx, 2), backend="torch")
    limit = torch_backend.EMULATED_WEIGHT_FIRST_MM_ROWS if avx2 else torch_backend.EMULATED_MM_ROWS
    if rows <= limit:
        assert operands == [(dtype, dtype, (rows, 40))]
    else:
        assert operands == [(torch.float32, torch.float32, (24, 40) if avx2 else (rows, 40))]
    probe = torch.randn(rows, 24).to(dtype)
    (dx,) = torch.autograd.grad(y, x, probe)
    assert operands[1:] == [(torch.float32, torch.float32, (rows, 24))]
    w = weight[1].double()
    for result, a, b in ((y, x.detach().double(), w.T), (dx, probe.double(), w)):
        exact = a @ b
        ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
        fp32_sum = b.shape[0] * torch.finfo(torch.float32).eps * (a.abs() @ b.abs())
        assert ((result.double() - exact).abs() <= ulp + fp32_sum).all()


@pytest.mark.parametrize(
    ("counts", "one_run"),
    [([4] * 64, True), ([8] * 20, True), ([9] + [4] * 63, True), ([1] * 64, True),
     ([2] * 8, True), ([2] * 7 + [9], True), ([3] * 4 + [0] * 4, True), ([6] * 63 + [9], False),
     ([7] * 63 + [9], False), ([9] * 8, False), ([1] * 7 + [12], True), ([4] * 7 + [21], False)],
)  # fmt: skip
def test_emulated_runs_share_one_grouped_mm_while_each_takes_the_16_bit_product(
    counts, one_run, monkeypatch
):
    """On a CPU that emulates bf16 (forced), a row-major weight's runs go through one
    ``_grouped_mm`` (its C++ loop of torch's own 16-bit products costs less than ours) where
    fp32's would (many experts, or all below the weight-first range) and every expert has at
    most EMULATED_MM_ROWS rows, or while the experts with rows have at most
    EMULATED_MEAN_ROWS[0] on average (at least two each: not all single rows). Others keep
    the loop, whose larger products run in fp32; so do a weight gradient's products (a whole
    expert each) and a column-major weight's (the input gradient's ``weight.mT``), whatever
    the rows. Both match the oracle. On a CPU other than AVX2 (forced; on an AVX2 CPU see
    test_avx2_cpu_runs_are_one_per_expert_while_the_mean_product_is_weight_first)."""
    monkeypatch.setattr(torch_backend, "cpu_has_native_matmul", _no_native_products([]))
    monkeypatch.setattr(torch_backend, "_avx2_cpu", lambda: False)
    experts = len(counts)
    routing = torch.arange(experts).repeat_interleave(torch.tensor(counts))[:, None]
    num_rows = routing.shape[0]
    plan = plan_dispatch(routing, experts)
    weight = (torch.randn(experts, 48, 64) / 8).bfloat16()
    runs = torch_backend._linear_runs(weight, plan.expert_offsets, num_rows)
    assert (runs == [(None, 0, num_rows)]) == one_run
    per_expert = [c for c in counts if c]
    for kept in (
        torch_backend._runs(plan.expert_offsets, torch.bfloat16, num_rows, 64 * 2, weight=None),
        torch_backend._linear_runs(weight.mT, plan.expert_offsets, num_rows),
    ):
        assert [end - start for _, start, end in kept] == per_expert
    x = torch.randn(num_rows, 64).bfloat16()
    expected = torch.einsum("ti,toi->to", x.double(), weight.double()[routing[:, 0]])
    y = expert_linear(x, weight, plan, backend="torch")
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("counts", "small_experts", "large_experts"),
    [([6] * 8, True, True), ([6] * 7 + [14], False, True), ([8] * 7 + [9], False, False),
     ([2] * 7 + [50], False, True), ([2] * 7 + [51], False, False)],
)  # fmt: skip
def test_emulated_runs_short_on_average_by_expert_size(
    counts, small_experts, large_experts, monkeypatch
):
    """The average that sends an emulated bf16 forward product's runs through one
    ``_grouped_mm``: EMULATED_MEAN_ROWS[0] rows for experts below FP32_WEIGHT_FIRST_NUMEL
    weights, EMULATED_MEAN_ROWS[1] from it (a 2048 x 1024 expert, as a broadcast view), on a
    CPU other than AVX2 (forced)."""
    monkeypatch.setattr(torch_backend, "cpu_has_native_matmul", _no_native_products([]))
    monkeypatch.setattr(torch_backend, "_avx2_cpu", lambda: False)

    experts = len(counts)
    routing = torch.arange(experts).repeat_interleave(torch.tensor(counts))[:, None]
    num_rows = routing.shape[0]
    offsets = plan_dispatch(routing, experts).expert_offsets
    small = torch.zeros(1, 64, 1024, dtype=torch.bfloat16).expand(experts, -1, -1)
    large = torch.zeros(1, 2048, 1024, dtype=torch.bfloat16).expand(experts, -1, -1)
    assert large[0].numel() == torch_backend.FP32_WEIGHT_FIRST_NUMEL
    for weight, one_run in ((small, small_experts), (large, large_experts)):
        runs = torch_backend._linear_runs(weight, offsets, num_rows)
        assert (runs == [(None, 0, num_rows)]) == one_run, (weight.shape, runs)
