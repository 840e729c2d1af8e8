"""expert_linear on both backends against the float64 reference: outputs and every gradient.

- Property tests, one per combination of the flags (x's memory layout, the rows x holds, the
  output, bias): 54 combinations per backend, listed explicitly so each runs every time, with
  Hypothesis drawing the routing, sizes, dtypes, gates and weight layout within each.
- The torch backend's one-``_grouped_mm`` path (CUDA's) forced on CPU.
- Experts whose rows span several row tiles of the Triton kernels.
- fp32 on the Triton kernels under PyTorch's TF32 switch, within TF32's error.
- The fp32-accumulation contract: a gate-weighted sum is rounded to the dtype once.
"""

import itertools
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_blocks.kernels import expert_linear, plan_dispatch, torch_backend, triton_backend
from moe_blocks.testing import (
    Routing,
    feature_dims,
    reference_expert_linear,
    routings,
    unit_roundoff,
)

from .conftest import DEVICE
from .helpers import LAYOUTS, assert_matches, make_tensor, padded_run

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROWS_IN = ("token", "assignment", "grouped")  # x is [T, in] (read k times), [T*k, in], grouped
OUTPUTS = ("assignment", "grouped", "gated")  # [T*k, out] in either order, or [T, out] summed
BACKENDS = ("torch", "triton")


def _combination(x_layout, rows_in, output, with_bias):
    return {"x_layout": x_layout, "rows_in": rows_in, "output": output, "with_bias": with_bias}


COMBINATIONS = [
    pytest.param(_combination(*flags), id="-".join(map(str, flags)))
    for flags in itertools.product(LAYOUTS, ROWS_IN, OUTPUTS, (False, True))
]


def per_combination(examples_at_default_profile: int) -> settings:
    """A Hypothesis budget per flag combination that follows the active profile's
    ``max_examples`` (40 by default; see tests/conftest.py). The first example Hypothesis tries
    is the smallest (no tokens), so a budget is at least 2."""
    scaled = settings.default.max_examples * examples_at_default_profile // 40
    return settings(max_examples=max(2, scaled))


@st.composite
def problems(
    draw, combination, max_tokens, max_experts, max_dim, max_assignments=None, min_tokens=0
):
    routing = draw(
        routings(
            min_tokens=min_tokens, max_tokens=max_tokens, max_experts=max_experts,
            max_assignments=max_assignments,
        )
    )  # fmt: skip
    return combination | {
        "routing": routing,
        "in_features": draw(feature_dims(max_dim)),
        "out_features": draw(feature_dims(max_dim)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "gates_layout": draw(st.sampled_from(LAYOUTS)),
        "gates_dtype": draw(st.sampled_from((torch.float32, torch.bfloat16))),
        "w_layout": draw(st.sampled_from(LAYOUTS)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def results_and_references(problem, backend):
    """Run ``expert_linear`` on ``problem`` (with a random upstream gradient) and the float64
    reference: for the output and each gradient, ``(name, result, reference, dtype, model)``
    where ``model`` holds the error model's arguments of :func:`assert_matches`. Also checks
    that every input got a gradient of its dtype and that no input was modified."""
    routing, dtype = problem["routing"], problem["dtype"]
    num_tokens, top_k, num_experts = routing.num_tokens, routing.top_k, routing.num_experts
    d_in, d_out = problem["in_features"], problem["out_features"]
    grouped_in, grouped_out = problem["rows_in"] == "grouped", problem["output"] == "grouped"
    gated = problem["output"] == "gated"
    gen = torch.Generator().manual_seed(problem["seed"])
    plan = plan_dispatch(routing.expert_idx.to(DEVICE), num_experts)

    x_rows = num_tokens if problem["rows_in"] == "token" else num_tokens * top_k
    x = make_tensor((x_rows, d_in), dtype, problem["x_layout"], gen).to(DEVICE).requires_grad_()
    weight = (
        make_tensor((num_experts, d_out, d_in), dtype, problem["w_layout"], gen, scale=d_in**-0.5)
        .to(DEVICE)
        .requires_grad_()
    )
    bias = make_tensor((num_experts, d_out), dtype, generator=gen) if problem["with_bias"] else None
    gates = None
    if gated:
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
        x, weight, plan, bias=bias, gates=gates, grouped_in=grouped_in, grouped_out=grouped_out,
        backend=backend,
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
        grouped_in=grouped_in, grouped_out=grouped_out,
    )  # fmt: skip
    if expected.requires_grad:  # an empty routing (T=0) depends on nothing
        (expected * upstream.cpu().double()).sum().backward()

    # The error model of each result (moe_blocks.testing.tolerances): the products it sums and
    # the rows it sums after that, in fp32. Roundings to the dtype: the output at most two (the
    # torch backend rounds the rows of x @ weight.T before the bias and the gates; Triton's one
    # truncating store counts as two); a gradient three (it also rounds an intermediate, such
    # as dy @ weight before the gates or dy · gates before dy.T @ x).
    has_bias = int(bias is not None)
    reductions = {
        "output": (d_in + has_bias, top_k if gated else 1),
        "x": (d_out, top_k if problem["rows_in"] == "token" else 1),
        "weight": (num_tokens, 1),  # an expert's rows: at most one per token
        "bias": (num_tokens, 1),
        "gates": (d_in + d_out + has_bias, 1),
    }
    assert out.dtype == dtype
    for name, before in snapshots.items():
        assert torch.equal(inputs[name].detach(), before), f"{name} was modified"
    reduction_length, rows = reductions["output"]
    # The output's intermediates are the rows before the gates (each rounded to the dtype):
    # their gate-weighted sum of magnitudes, not the output's largest value, bounds what their
    # roundings can move (with many gated rows that nearly cancel, it is far larger). Likewise
    # each gradient sums terms that can be far larger than the result: dgates[a] =
    # <dy_row(a), x_row(a) @ weight[e].T + bias[e]>, dx[t] = Σ_j gates[t, j] · dy @ weight[e_j]
    # (k rows of dy @ weight, each rounded to the dtype before the gates), dweight and dbias
    # sums over an expert's rows; their magnitudes bound what the roundings of the
    # intermediates can move it by: the gradient of the same reference on |x|, |weight|,
    # |bias|, |gates| with the upstream |dy|.
    absolute = {name: leaf.detach().abs().requires_grad_() for name, leaf in leaves.items()}
    magnitudes = reference_expert_linear(
        absolute["x"], absolute["weight"], routing.expert_idx, bias=absolute.get("bias"),
        gates=absolute.get("gates"), sorted_indices=plan.sorted_indices.cpu(),
        grouped_in=grouped_in, grouped_out=grouped_out,
    )  # fmt: skip
    if magnitudes.requires_grad:  # a non-empty routing
        (magnitudes * upstream.cpu().double().abs()).sum().backward()
    magnitudes = magnitudes.detach()
    largest = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    compared = [("output", out.detach().cpu(), expected.detach(), dtype,
                 {"reduction_length": reduction_length, "top_k": rows,
                  "scale": magnitudes.clamp_min(largest)})]  # fmt: skip
    for name, leaf in leaves.items():
        grad = inputs[name].grad
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == inputs[name].dtype, f"grad {name} has dtype {grad.dtype}"
        grad_dtype = problem["gates_dtype"] if name == "gates" else dtype
        expected_grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        reduction_length, rows = reductions[name]
        model = {"reduction_length": reduction_length, "top_k": rows, "roundings": 3}
        if absolute[name].grad is not None:
            largest_grad = max(1.0, expected_grad.abs().max().item()) if grad.numel() else 1.0
            model["scale"] = absolute[name].grad.clamp_min(largest_grad)
        compared.append((f"grad {name}", grad.cpu(), expected_grad,
                         max(grad_dtype, dtype, key=_eps), model))  # fmt: skip
    return compared


def check_against_reference(problem, backend):
    for name, result, reference, dtype, model in results_and_references(problem, backend):
        assert_matches(result, reference, dtype, name, **model)


def _eps(dtype):
    return torch.finfo(dtype).eps


TORCH_PROBLEMS = dict(max_tokens=40, max_experts=64, max_dim=160, max_assignments=512)
TRITON_PROBLEMS = dict(max_tokens=24, max_experts=64, max_dim=100, max_assignments=96)


@pytest.mark.usefixtures("poisoned_memory")
@pytest.mark.parametrize("combination", COMBINATIONS)
@per_combination(3)
@given(data=st.data())
def test_torch_backend_matches_reference(combination, data):
    check_against_reference(data.draw(problems(combination, **TORCH_PROBLEMS)), "torch")


@pytest.mark.usefixtures("poisoned_memory")
@pytest.mark.parametrize("combination", COMBINATIONS)
@per_combination(2)
@given(data=st.data())
def test_triton_backend_matches_reference(combination, data):
    check_against_reference(data.draw(problems(combination, **TRITON_PROBLEMS)), "triton")


def _one_run(offsets, dtype, rows, row_bytes, **options):
    return [(None, 0, rows)] if rows else []


@pytest.mark.usefixtures("poisoned_memory")
@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize("runs", [_one_run, padded_run], ids=["one_grouped_mm", "padded_bmm"])
@per_combination(2)
@given(data=st.data())
def test_torch_backend_forced_runs_match_reference(runs, combination, data):
    """Two paths that ``_runs`` takes only on some machines, forced here by making it return
    their run for every problem: one ``torch._grouped_mm`` call over all experts' rows (CUDA's,
    bf16 on sm_90+, with no host read; CPU's ``_grouped_mm`` runs the same call), and native
    bf16 CPU products of many experts with a few rows each as one ``bmm`` over a zero-padded
    ``[E, rows, width]`` layout (forward, input and weight gradients; any routing whose padding
    is bounded), in every dtype, layout and output."""
    problem = data.draw(problems(combination, **TORCH_PROBLEMS))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_backend, "_runs", runs)
        check_against_reference(problem, "torch")


@pytest.mark.usefixtures("poisoned_memory")
@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize("native", [False, True], ids=["own_products", "native_16_bit"])
@per_combination(2)
@given(data=st.data())
def test_torch_backend_one_token_path_matches_reference(native, combination, data):
    """One token's k assignments on CPU (a decode step with a batch of one) skip the plan's
    gathers, permutations and runs (``one_token_gather_gemm``): the output and every gradient
    match the oracle, with this CPU's products and with native 16-bit ones (weight-first,
    forced), and the path is taken (every forward and input-gradient call)."""
    problem = data.draw(problems(combination, **TORCH_PROBLEMS | dict(min_tokens=1, max_tokens=1)))
    with pytest.MonkeyPatch.context() as patch:
        if native:
            patch.setattr(torch_backend, "cpu_has_native_matmul", lambda dtype: True)
        taken = mock.Mock(wraps=torch_backend.one_token_gather_gemm)
        patch.setattr(torch_backend, "one_token_gather_gemm", taken)
        check_against_reference(problem, "torch")
    assert taken.call_count >= 1 or DEVICE != "cpu"


@pytest.mark.usefixtures("poisoned_memory")
@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize("weight_first_rows", [0, 2**62], ids=["rows_first", "weight_first"])
@pytest.mark.parametrize("gather_once_bytes", [0, 2**62], ids=["gather_per_run", "gather_once"])
@pytest.mark.parametrize("token_sums", ["per_token", "placed", "gathered", "added"])
@per_combination(2)
@given(data=st.data())
def test_torch_backend_matmul_orientations_gathers_and_sums_match_reference(
    weight_first_rows, gather_once_bytes, token_sums, combination, data
):
    """Each expert's product is ``weight[e] @ rows.T`` up to WEIGHT_FIRST_ROWS rows (16-bit on
    CPU), else ``rows @ weight[e].T``; rows are gathered in one call up to GATHER_ONCE_BYTES,
    else per expert; a gated token sum takes SUM_BLOCK_BYTES of terms at a time (a token at a
    time, or all at once), or, above ADDED_SUMS_BYTES on CPU, adds each expert's gated rows
    into the sums (``added``); grouped rows go to assignment order (all at once, and ASSIGNMENT
    outputs) placed by one ``index_copy_`` up to PLACED_BYTES, else gathered by the inverse
    permutation: every choice, forced here for every run, matches the oracle."""
    sum_block_bytes = 0 if token_sums == "per_token" else 2**62
    added_sums_bytes = 0 if token_sums == "added" else 2**62
    placed_bytes = 0 if token_sums == "gathered" else 2**62
    problem = data.draw(problems(combination, **TORCH_PROBLEMS))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_backend, "WEIGHT_FIRST_ROWS", weight_first_rows)
        forced = weight_first_rows > 0  # in every dtype (else 16-bit on CPU only), mv included
        patch.setattr(torch_backend, "_weight_first_helps", lambda *args: forced)
        patch.setattr(torch_backend, "_avx2_cpu", lambda: False)  # (else fp32 weight-first)
        patch.setattr(torch_backend, "GATHER_ONCE_BYTES", gather_once_bytes)
        patch.setattr(torch_backend, "SUM_BLOCK_BYTES", sum_block_bytes)
        patch.setattr(torch_backend, "ADDED_SUMS_BYTES", added_sums_bytes)
        patch.setattr(torch_backend, "PLACED_BYTES", placed_bytes)
        check_against_reference(problem, "torch")


@pytest.mark.parametrize("avx2", [False, True], ids=["other_cpu", "avx2_cpu"])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 48, 49, 128, 129])
def test_fp32_rows_are_multiplied_weight_first_in_their_range(rows, avx2, monkeypatch):
    """In fp32 an expert's rows are computed as ``weight[e] @ rows.T`` (faster there than
    packing the streamed weight) in a range of rows, fewer or more as ``rows @ weight[e].T``:
    on an AVX2 CPU AVX2_WEIGHT_FIRST_ROWS for an expert of any size, on other CPUs
    FP32_WEIGHT_FIRST_ROWS for an expert of FP32_WEIGHT_FIRST_NUMEL weights only (the CPU
    kind forced here). Either way the float64 reference's product, rounded."""
    monkeypatch.setattr(torch_backend, "_avx2_cpu", lambda: avx2)
    monkeypatch.setattr(torch_backend, "HALVED_ROW_THREADS", 2**30)  # (one row: the next test)
    low, high = (
        torch_backend.AVX2_WEIGHT_FIRST_ROWS if avx2 else torch_backend.FP32_WEIGHT_FIRST_ROWS
    )
    large = torch_backend.FP32_WEIGHT_FIRST_NUMEL // 2048
    products = []
    real_mm = torch.mm

    def recorded_mm(a, b, out=None):
        products.append(tuple(a.shape))
        return real_mm(a, b, out=out)

    monkeypatch.setattr(torch, "mm", recorded_mm)
    for out_features, in_features in ((2048, large), (48, 32)):
        products.clear()
        weight = torch.randn(2, out_features, in_features) / in_features**0.5
        x = torch.randn(rows, in_features)
        expert_idx = torch.ones(rows, 1, dtype=torch.long)  # every row to expert 1
        y = expert_linear(x, weight, plan_dispatch(expert_idx, 2), backend="torch")
        weight_first = low <= rows <= high and (avx2 or out_features == 2048)
        assert products == [(out_features, in_features) if weight_first else (rows, in_features)]
        expected = x.double() @ weight[1].double().T
        torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
        # A column-major weight (the input gradient's weight.mT, or an [E, in, out] tensor's
        # view) stays rows-first: weight-first was 2-2.5x slower on it.
        products.clear()
        column_major = weight.mT.contiguous().mT
        y = expert_linear(x, column_major, plan_dispatch(expert_idx, 2), backend="torch")
        assert products == [(rows, in_features)]
        torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("avx2", [False, True], ids=["other_cpu", "avx2_cpu"])
def test_one_fp32_row_of_a_large_expert_is_multiplied_as_two_halves_on_an_avx2_cpu(
    avx2, threads, monkeypatch
):
    """On an AVX2 CPU with torch on HALVED_ROW_THREADS threads or more, one fp32 row of a
    row-major expert of FP32_WEIGHT_FIRST_NUMEL weights or more, with an even number of output
    rows, is one ``torch.bmm`` over the two halves of those rows: a one-token step's k
    products, and an expert's single row among other experts' rows; every other product is
    not (the CPU kind and the thread count forced here). Each is the float64 reference's
    product, rounded."""
    monkeypatch.setattr(torch_backend, "_avx2_cpu", lambda: avx2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    bmm_calls = []
    real_bmm = torch.bmm

    def recorded_bmm(*args, **kwargs):
        bmm_calls.append(args[0].shape)
        return real_bmm(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", recorded_bmm)
    large = torch_backend.FP32_WEIGHT_FIRST_NUMEL // 1024
    cases = [  # (out, in), dtype, column-major: whether one row is halved
        ((large, 1024), torch.float32, False, avx2 and threads >= 2),
        ((large + 1, 1024), torch.float32, False, False),  # odd
        ((large // 2, 1024), torch.float32, False, False),  # small
        ((large, 1024), torch.float32, True, False),  # the input gradient's weight.mT
        ((large, 1024), torch.bfloat16, False, False),
    ]
    one_token = torch.tensor([[1, 0]])  # one token's two 1-row products
    among_others = torch.tensor([[1], [1], [1], [0]])  # expert 0's single row, expert 1's three
    for (out_features, in_features), dtype, column_major, halved in cases:
        padded = torch.randn(2, out_features, in_features + 8, dtype=dtype)
        weight = padded[..., :in_features] / in_features**0.5  # rows strided past their width
        if column_major:
            weight = weight.mT.contiguous().mT
        x = torch.randn(in_features, 4, dtype=dtype).t()  # rows strided too (column-major)
        for tokens, expert_idx, single_rows in ((x[:1], one_token, 2), (x, among_others, 1)):
            bmm_calls.clear()
            y = expert_linear(tokens, weight, plan_dispatch(expert_idx, 2), backend="torch")
            if expert_idx is one_token or avx2:  # (elsewhere the 4 rows are one _grouped_mm)
                halves = [(2, out_features // 2, in_features)] * single_rows
                assert bmm_calls == (halves if halved else []), (out_features, dtype)
            k = expert_idx.shape[1]
            expected = torch.stack([  # assignment a: token a // k through its expert
                tokens[a // k].double() @ weight[e].double().T
                for a, e in enumerate(expert_idx.flatten().tolist())
            ])  # fmt: skip
            tolerance = 1e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(y.double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("rows", [1, 2, 64, 65])
def test_16_bit_rows_are_multiplied_weight_first_only_with_a_row_major_weight(rows, monkeypatch):
    """In native 16-bit (forced here) up to WEIGHT_FIRST_ROWS rows of an expert are computed
    as ``weight[e] @ rows.T`` (one row: ``mv``) when the weight is row-major; a column-major
    weight (the input gradient's ``weight.mT``) is always rows-first (weight-first took 1.1-1.9x
    the time). Every orientation gives the float64 product, rounded once."""
    monkeypatch.setattr(torch_backend, "cpu_has_native_matmul", lambda dtype: True)
    weight = torch.randn(2, 48, 32, dtype=torch.bfloat16)
    x = torch.randn(rows, 32, dtype=torch.bfloat16)
    expert_idx = torch.ones(rows, 1, dtype=torch.long)
    products = []
    real_mm, real_mv = torch.mm, torch.mv

    def recorded_mm(a, b, out=None):
        products.append(("mm", tuple(a.shape)))
        return real_mm(a, b, out=out)

    def recorded_mv(matrix, vector):
        products.append(("mv", tuple(matrix.shape)))
        return real_mv(matrix, vector)

    monkeypatch.setattr(torch, "mm", recorded_mm)
    monkeypatch.setattr(torch, "mv", recorded_mv)
    expected = (x.double() @ weight[1].double().T).to(torch.bfloat16).double()
    weight_first = [("mv", (48, 32))] if rows == 1 else [("mm", (48, 32))]
    for layout, w in (("row-major", weight), ("column-major", weight.mT.contiguous().mT)):
        products.clear()
        y = expert_linear(x, w, plan_dispatch(expert_idx, 2), backend="torch")
        if layout == "row-major" and rows <= torch_backend.WEIGHT_FIRST_ROWS:
            assert products == weight_first, layout
        else:
            assert products == [("mm", (rows, 32))], layout
        torch.testing.assert_close(y.double(), expected, atol=1e-2, rtol=1e-2)


def _spanning_routing(seed: int) -> Routing:
    """101 tokens, top-2 of 4 experts, with 1, 33, 67 and 101 rows: experts of one, two, three
    and four 32-row tiles (Triton's gemm under the interpreter) and one or two 64-row tiles
    (its weight gradient), most with a partial last tile. Tokens and slots are shuffled."""
    gen = torch.Generator().manual_seed(seed)
    tokens = 101
    second = torch.tensor([0] + [1] * 33 + [2] * 67)
    expert_idx = torch.stack((torch.full((tokens,), 3), second), dim=1)
    swap = torch.rand(tokens, generator=gen) < 0.5
    expert_idx = torch.where(swap[:, None], expert_idx.flip(1), expert_idx)
    return Routing(expert_idx[torch.randperm(tokens, generator=gen)], 4, "spanning")


@pytest.mark.usefixtures("poisoned_memory")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows_in", ROWS_IN)
@pytest.mark.parametrize("output", OUTPUTS)
def test_experts_spanning_several_row_tiles(backend, rows_in, output):
    """On a GPU every expert spans many row tiles; the property tests' few tokens fit one."""
    routing = _spanning_routing(seed=len(rows_in) * 7 + len(output))
    assert sorted(torch.bincount(routing.expert_idx.flatten()).tolist()) == [1, 33, 67, 101]
    problem = _combination("contiguous", rows_in, output, with_bias=True) | {
        "routing": routing, "in_features": 5, "out_features": 6, "dtype": torch.float32,
        "gates_layout": "contiguous", "gates_dtype": torch.float32, "w_layout": "transposed",
        "seed": 11,
    }  # fmt: skip
    check_against_reference(problem, backend)


@pytest.fixture
def set_matmul_switch():
    """``set_matmul_switch(name, value)`` sets ``torch.backends.cuda.matmul.<name>`` for one test;
    each switch gets back the value it had, through the same switch. (pytest >= 9.2's
    ``monkeypatch`` restores such attributes by deleting them, since that object serves them
    through ``__getattr__``, not its ``__dict__``: AttributeError on undo.)"""
    matmul = torch.backends.cuda.matmul
    saved = {}

    def set_switch(name, value):
        saved.setdefault(name, getattr(matmul, name))
        setattr(matmul, name, value)

    yield set_switch
    for name, value in reversed(saved.items()):
        setattr(matmul, name, value)


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
@pytest.mark.parametrize("output", OUTPUTS)
def test_fp32_on_triton_follows_torchs_tf32_switch(allow_tf32, output, set_matmul_switch):
    """The Triton kernels multiply fp32 in TF32 exactly when PyTorch allows it for fp32
    matmuls (``torch.backends.cuda.matmul.allow_tf32``), and then stay within TF32's error:
    each input keeps 10 mantissa bits, fp16's, so the error model is fp16's unit roundoff for
    the two rounded factors of every product (the model's roundings), with fp32 sums. Experts
    span several row tiles. The interpreter (CI) always multiplies in IEEE fp32; on a GPU this
    checks the TF32 path."""
    set_matmul_switch("allow_tf32", allow_tf32)
    assert triton_backend._precision(torch.float32) == ("tf32" if allow_tf32 else "ieee")
    assert triton_backend._precision(torch.bfloat16) == "ieee"
    problem = _combination("contiguous", "token", output, with_bias=True) | {
        "routing": _spanning_routing(seed=5), "in_features": 40, "out_features": 24,
        "dtype": torch.float32, "gates_layout": "contiguous", "gates_dtype": torch.float32,
        "w_layout": "contiguous", "seed": 12,
    }  # fmt: skip
    model_dtype = torch.float16 if allow_tf32 else torch.float32
    for name, result, reference, _, model in results_and_references(problem, "triton"):
        assert_matches(result, reference, model_dtype, name, **model)


@pytest.mark.parametrize(
    "switch, value, precision",
    [("allow_tf32", True, "tf32"), ("allow_tf32", False, "ieee"),
     ("fp32_precision", "tf32", "tf32"), ("fp32_precision", "ieee", "ieee")],
)  # fmt: skip
def test_tf32_is_read_from_the_legacy_and_the_new_torch_switch(
    switch, value, precision, set_matmul_switch
):
    """TF32 asked for through torch's newer ``fp32_precision`` (torch >= 2.9, where reading the
    legacy ``allow_tf32`` then raises) is honoured as the legacy switch is."""
    if not hasattr(torch.backends.cuda.matmul, switch):
        pytest.skip(f"this torch has no torch.backends.cuda.matmul.{switch}")
    set_matmul_switch(switch, value)
    assert triton_backend._precision(torch.float32) == precision
    assert triton_backend._precision(torch.bfloat16) == "ieee"


@pytest.mark.parametrize(
    ("backend", "added_sums_bytes"),
    [(backend, 2**62) for backend in BACKENDS] + [("torch", 0)],
    ids=[*BACKENDS, "torch-added"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows_in", ROWS_IN)
def test_a_gated_sum_is_rounded_to_the_dtype_once(
    backend, added_sums_bytes, dtype, rows_in, monkeypatch
):
    """The fp32-accumulation contract: ``out[t] = Σ_j gates[t, j] · y[t*k+j]`` is summed in
    fp32 and rounded to the dtype once. Small integers in x, weight and bias make every row
    ``y`` exact in the dtype, so the only error allowed is that last rounding: one unit in the
    last place of the dtype (round to nearest gives half of it; the Triton interpreter's
    stores truncate) plus the fp32 sum's own error. Rounding the gated rows, or summing them
    in the dtype, costs several units in the last place. ``torch-added``: the torch backend's
    sums added expert by expert (above ADDED_SUMS_BYTES, forced here)."""
    monkeypatch.setattr(torch_backend, "ADDED_SUMS_BYTES", added_sums_bytes)
    tokens, top_k, experts, d_in, d_out = 48, 4, 6, 8, 16
    gen = torch.Generator().manual_seed(3)
    expert_idx = torch.rand(tokens, experts, generator=gen).topk(top_k).indices
    plan = plan_dispatch(expert_idx.to(DEVICE), experts)
    x_rows = tokens if rows_in == "token" else tokens * top_k
    x = torch.randint(-3, 4, (x_rows, d_in), generator=gen).to(dtype)
    weight = torch.randint(-3, 4, (experts, d_out, d_in), generator=gen).to(dtype)
    bias = torch.randint(-3, 4, (experts, d_out), generator=gen).to(dtype)
    gates = torch.rand(tokens, top_k, generator=gen)  # fp32, like the router's
    out = expert_linear(
        x.to(DEVICE), weight.to(DEVICE), plan, bias=bias.to(DEVICE), gates=gates.to(DEVICE),
        grouped_in=rows_in == "grouped", backend=backend,
    ).cpu()  # fmt: skip
    exact = reference_expert_linear(
        x, weight, plan, bias=bias, gates=gates, grouped_in=rows_in == "grouped"
    )
    magnitude = reference_expert_linear(
        x.abs(), weight.abs(), plan, bias=bias.abs(), gates=gates, grouped_in=rows_in == "grouped"
    )
    largest = torch.maximum(exact.abs(), out.double().abs())
    ulp = 2 * unit_roundoff(dtype) * torch.exp2(torch.floor(torch.log2(largest.clamp_min(1e-30))))
    fp32_sum_error = (d_in + 1 + top_k) * unit_roundoff(torch.float32) * magnitude
    excess = (out.double() - exact).abs() - (ulp + fp32_sum_error)
    assert excess.max().item() <= 0, (
        f"error beyond one rounding of the fp32 sum at {int((excess > 0).sum())} of "
        f"{excess.numel()} elements; worst {(out.double() - exact).abs().max().item():.3g}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("experts", "rows_each", "one_run"),
    [(64, 4, "padded"), (64, 1, "fp32"), (8, 7, "fp32"), (8, 8, False), (8, 64, False),
     (64, 1100, False)],
    ids=["many-small", "single-rows", "few-below-weight-first", "few-at-weight-first",
         "few-experts", "too-large"],
)  # fmt: skip
def test_cpu_runs_go_through_one_grouped_mm_only_for_many_small_experts(
    experts, rows_each, one_run, dtype, monkeypatch
):
    """On CPU the per-expert loop gives way to one call for many experts of a few rows each
    that fit GATHER_ONCE_BYTES: a padded ``bmm`` in native bf16, else one ``_grouped_mm``;
    and in fp32 to one ``_grouped_mm`` for experts that all have fewer rows than any
    weight-first product (FP32_WEIGHT_FIRST_ROWS); in native 16-bit, single rows
    (matrix-vector products) and a few experts keep the loop (weight-first products), and so
    do large inputs (beyond GATHER_ONCE_BYTES in every dtype). On a CPU that emulates bf16
    products, bf16 runs as fp32 does while every expert has at most EMULATED_MM_ROWS rows, or
    the experts have at most EMULATED_MEAN_ROWS on average (each product then torch's own bf16
    one, in ``_grouped_mm`` as in the loop); larger ones keep the loop, whose products run in
    fp32. So on a CPU other than AVX2 (forced; see test_avx2_cpu_runs_are_one_per_expert...).
    Either way expert_linear matches the float64 oracle."""
    monkeypatch.setattr(torch_backend, "_avx2_cpu", lambda: False)
    native = dtype == torch.float32 or torch_backend.cpu_has_native_matmul(dtype)

    if one_run == "padded":
        one_run = ("padded" if dtype != torch.float32 else True) if native else True
    elif one_run == "fp32":
        one_run = dtype == torch.float32 or not native
    routing = torch.arange(experts).repeat_interleave(rows_each)[:, None]
    plan = plan_dispatch(routing, experts)
    x = torch.randn(routing.shape[0], 64, dtype=dtype)
    weight = torch.randn(experts, 48, 64, dtype=dtype)
    num_rows = routing.shape[0]
    runs = torch_backend._linear_runs(weight, plan.expert_offsets, num_rows)
    if one_run == "padded":
        assert runs == [(torch_backend.Padded(rows_each), 0, num_rows)]
    else:
        assert (runs == [(None, 0, num_rows)]) == one_run
    if not one_run:
        assert [end - start for _, start, end in runs] == [rows_each] * experts
    expected = torch.einsum("ti,toi->to", x.double(), weight.double()[routing[:, 0]])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        expert_linear(x, weight, plan).double(), expected, rtol=tolerance, atol=tolerance * 10
    )


@pytest.mark.parametrize(
    ("dtype", "experts", "rows_each", "per_expert"),
    [(torch.float32, 8, 2, True), (torch.float32, 64, 4, True), (torch.float32, 64, 8, True),
     (torch.float32, 64, 9, False), (torch.float32, 64, 1, False), (torch.bfloat16, 8, 3, False),
     (torch.bfloat16, 8, 4, True), (torch.bfloat16, 64, 4, True), (torch.bfloat16, 64, 2, False)],
)  # fmt: skip
def test_avx2_cpu_runs_are_one_per_expert_while_the_mean_product_is_weight_first(
    dtype, experts, rows_each, per_expert, monkeypatch
):
    """On an AVX2 CPU (forced), where a product computed in fp32 of AVX2_WEIGHT_FIRST_ROWS rows
    is weight-first, a row-major weight's runs are one per expert (each product weight-first),
    not one ``_grouped_mm`` (whose products are rows-first), while the experts' mean row count
    is in that range (in emulated bf16, forced, above EMULATED_WEIGHT_FIRST_MM_ROWS, where
    torch's own 16-bit product is taken), for more than MANY_RUNS experts only up to a mean of
    AVX2_MANY_RUNS_MEAN; otherwise the other CPUs' rules decide, as they always do for a weight
    gradient's runs and a column-major weight's. The products match the float64 oracle."""
    monkeypatch.setattr(
        torch_backend, "cpu_has_native_matmul", lambda d: d not in (torch.bfloat16, torch.float16)
    )
    routing = torch.arange(experts).repeat_interleave(rows_each)[:, None]
    routing = routing[torch.randperm(routing.shape[0])]
    plan = plan_dispatch(routing, experts)
    num_rows = routing.shape[0]
    weight = (torch.randn(experts, 48, 64) / 8).to(dtype)

    def runs_of(avx2: bool) -> tuple:
        monkeypatch.setattr(torch_backend, "_avx2_cpu", lambda: avx2)
        return tuple(
            torch_backend._runs(plan.expert_offsets, dtype, num_rows, 64 * 4, weight=w)
            for w in (weight, None, weight.mT)
        )

    elsewhere, (runs, *others) = runs_of(False), runs_of(True)
    one_each = [(e, e * rows_each, (e + 1) * rows_each) for e in range(experts)]
    assert runs == (one_each if per_expert else elsewhere[0])
    assert others == list(elsewhere[1:])
    x = torch.randn(num_rows, 64).to(dtype)
    expected = torch.einsum("ti,toi->to", x.double(), weight.double()[routing[:, 0]])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        expert_linear(x, weight, plan, backend="torch").double(), expected, rtol=tolerance,
        atol=tolerance * 10,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("counts", "padded"),
    [([4] * 64, True), ([64] * 64, True), ([65] + [64] * 63, False),
     ([4] * 48 + [0] * 16, True), ([4] * 47 + [0] * 17, False), ([2] * 17 + [0] * 5, True),
     ([2] * 16, False), ([5] + [1] * 63, False), ([4] + [1] * 63, True), ([1] * 64, False)],
    ids=["small", "at-most-rows", "above-most-rows", "three-quarters-used", "fewer-used",
         "17-experts", "16-experts", "too-much-padding", "padding-at-bound", "single-rows"],
)  # fmt: skip
def test_native_bf16_cpu_products_of_many_small_experts_are_one_padded_bmm(
    counts, padded, monkeypatch
):
    """The rule of ``_runs`` for the padded ``bmm``: more than MANY_RUNS experts with rows,
    at least PADDED_USED of all of them, at most PADDED_ROWS rows each, and padded rows at
    most PADDED_WASTE times the real ones (64 x 4 = 256 <= 4 x 67; 64 x 5 = 320 > 4 x 68),
    not every expert a single row (a one-token step keeps the per-expert calls' bits); in
    bf16 on a CPU with native products only (forced native here; fp16 and fp32 never). The
    padded product matches the float64 oracle, each expert's rows with its own weight."""
    monkeypatch.setattr(torch_backend, "cpu_has_native_matmul", lambda dtype: True)
    experts = len(counts)
    routing = torch.repeat_interleave(torch.arange(experts), torch.tensor(counts))[:, None]
    routing = routing[torch.randperm(routing.shape[0])]
    plan = plan_dispatch(routing, experts)
    num_rows, most = routing.shape[0], max(counts)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        runs = torch_backend._runs(plan.expert_offsets, dtype, num_rows, 64 * 2, weight=None)
        expected_runs = [(torch_backend.Padded(most), 0, num_rows)]
        assert (runs == expected_runs) == (padded and dtype == torch.bfloat16), (dtype, runs)
    x = torch.randn(num_rows, 32, dtype=torch.bfloat16)
    weight = torch.randn(experts, 24, 32, dtype=torch.bfloat16)
    expected = torch.einsum("ti,toi->to", x.double(), weight.double()[routing[:, 0]])
    torch.testing.assert_close(
        expert_linear(x, weight, plan).double(), expected, rtol=2e-2, atol=0.2
    )


@pytest.mark.parametrize("tokens", [64, 1024])
def test_large_gated_outputs_on_cpu_are_added_expert_by_expert(tokens):
    """On CPU, a TOKEN output whose T·k fp32 products exceed ADDED_SUMS_BYTES (here 1024 tokens,
    k = 4, 1024 features: 16 MB) is summed by adding each expert's gated rows into the tokens'
    sums, never placing all T·k rows; a smaller one (64 tokens: 1 MB) is placed and summed in
    slot order. Both are the float64 sum, rounded, forward and backward."""
    top_k, experts, d_in, d_out = 4, 6, 16, 1024
    x = torch.randn(tokens, d_in).requires_grad_()
    weight = (torch.randn(experts, d_out, d_in) / d_in**0.5).requires_grad_()
    gates = torch.rand(tokens, top_k).requires_grad_()
    plan = plan_dispatch(torch.rand(tokens, experts).topk(top_k).indices, experts)
    large = tokens * top_k * d_out * 4 > torch_backend.ADDED_SUMS_BYTES
    with (
        mock.patch.object(torch_backend, "added_token_sums", wraps=torch_backend.added_token_sums)
        as added,
        mock.patch.object(torch_backend, "gated_token_sum", wraps=torch_backend.gated_token_sum)
        as placed,
        mock.patch.object(torch_backend, "_products", wraps=torch_backend._products) as grouped,
    ):  # fmt: skip
        out = expert_linear(x, weight, plan, gates=gates, backend="torch")
    assert (added.call_count, placed.call_count) == ((1, 0) if large else (0, 1))
    assert grouped.call_count == (0 if large else 1)  # no T·k-row result when large
    grad = torch.randn_like(out)
    out.backward(grad)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, gates)]
    expected = reference_expert_linear(leaves[0], leaves[1], plan, gates=leaves[2])
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for tensor, leaf in zip((x, weight, gates), leaves, strict=True):
        torch.testing.assert_close(tensor.grad.double(), leaf.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@given(
    top_k=st.integers(1, 2),
    rows_in=st.sampled_from(ROWS_IN),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_added_sums_equal_the_slot_order_sums_to_the_bit_for_k_up_to_2(
    dtype, top_k, rows_in, with_bias, seed
):
    """With k <= 2 a token's sum of its gated rows has the same bits in expert order (the torch
    backend's sums added expert by expert, forced with an ADDED_SUMS_BYTES of 0) as in slot
    order (placed and summed, an ADDED_SUMS_BYTES beyond any size): forward and every
    gradient, so JetMoE-like routings (k = 2) do not depend on the batch size."""
    gen = torch.Generator().manual_seed(seed)
    tokens, experts, d_in, d_out = 1 + seed % 40, 5, 12, 20
    plan = plan_dispatch(torch.rand(tokens, experts, generator=gen).topk(top_k).indices, experts)
    x_rows = tokens if rows_in == "token" else tokens * top_k
    leaves = {
        "x": torch.randn(x_rows, d_in, generator=gen),
        "weight": torch.randn(experts, d_out, d_in, generator=gen) / d_in**0.5,
        "bias": torch.randn(experts, d_out, generator=gen) if with_bias else None,
        "gates": torch.rand(tokens, top_k, generator=gen),
    }
    grad = torch.randn(tokens, d_out, generator=gen).to(dtype)
    results = []
    for added_sums_bytes in (0, 2**62):
        inputs = {name: None if t is None else t.to(dtype).requires_grad_()
                  for name, t in leaves.items()}  # fmt: skip
        with mock.patch.object(torch_backend, "ADDED_SUMS_BYTES", added_sums_bytes):
            out = expert_linear(
                inputs["x"], inputs["weight"], plan, bias=inputs["bias"], gates=inputs["gates"],
                grouped_in=rows_in == "grouped", backend="torch",
            )  # fmt: skip
            out.backward(grad)
        results.append([out] + [t.grad for t in inputs.values() if t is not None])
    for added, placed in zip(*results, strict=True):
        assert torch.equal(added, placed)


def test_triton_operands_past_int32_column_offsets_are_copied_or_refused():
    """The Triton kernels address columns in int32: an operand whose offsets within a row pass
    2**31 only through its strides is made contiguous; an expert of more than 2**31 elements,
    which no copy narrows, is a ValueError naming the operand (the offsets would wrap around).
    Shapes only: meta tensors, nothing allocated."""
    wide = torch.empty(65536, 32769, device="meta").t()  # x [32769, 65536], transposed
    assert not wide.is_contiguous()
    assert triton_backend._narrow_columns(wide, "x").is_contiguous()
    fits = torch.empty(2, 65536, 32768, device="meta", dtype=torch.bfloat16)
    assert triton_backend._narrow_columns(fits, "weight") is fits  # offsets up to 2**31 - 1
    huge = torch.empty(2, 65537, 32768, device="meta", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"weight: rows of 2,147,516,416 elements"):
        triton_backend._narrow_columns(huge, "weight")
