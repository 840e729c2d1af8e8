"""The benchmark cases compare like with like, and `moe-blocks bench` writes its table, JSON
and plot."""

import dataclasses
import json
import time

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moe_blocks.models import bench
from moe_blocks.models.cli import main

pytest.importorskip("transformers")


@pytest.mark.parametrize("suite", bench.BLOCK_SUITES)
def test_implementations_of_a_case_compute_the_same_function(suite):
    """(The expert_linear suite's: benches/test_bench_expert_linear.py.)"""
    case = bench.Case(suite, "fine-grained", 12, "fp32", "cpu", bench.TINY_SHAPES["fine-grained"])
    reference, x = bench.build(case, "transformers")
    with torch.no_grad():
        expected = reference(x)
        for impl in ("moe_blocks", "grouped_mm"):
            if bench.applies(case, impl):
                module, same_x = bench.build(case, impl)
                assert torch.equal(same_x, x)
                torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 12])
def test_expert_products_floor_multiplies_the_rows_our_block_routes(tokens):
    """The floor does our MLP's expert products and nothing else: its rows, put back in
    assignment order and summed by our router's gates in float64 (plus the bias), are our
    block's output; it exists for the MLP on CPU only."""
    torch.manual_seed(tokens)
    dims = bench.TINY_SHAPES["fine-grained"]
    case = bench.Case("mlp", "fine-grained", tokens, "fp32", "cpu", dims)
    ours, x = bench.build(case, "moe_blocks")
    floor, same_x = bench.build(case, "expert_products")
    assert torch.equal(same_x, x)
    with torch.no_grad():
        route = ours.router(x[0])
        rows = floor(x)
        out = ours(x)[0]
    top_k = dims[3]
    assert rows.shape == (tokens * top_k, dims[0])
    by_assignment = torch.empty_like(rows).index_copy_(0, route.plan.sorted_indices, rows)
    gated = by_assignment.double().view(tokens, top_k, -1) * route.gates.double()[..., None]
    expected = gated.sum(1) + ours.bias.double()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    step = bench.step_function(floor, x, backward=True)
    step()
    assert all(p.grad is not None for p in (floor.rows, floor.w_in[int(route.expert_idx[0, 0])]))
    for other in (dataclasses.replace(case, device="cuda"), dataclasses.replace(case, suite="moa")):
        assert not bench.applies(other, "expert_products")


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("suite", bench.SUITES)
def test_dense_roofline_does_the_matmul_flops_of_the_case(suite, backward):
    """ "x dense" divides by a roofline of the same arithmetic: the dense implementation's
    FLOPs, counted by torch as it runs, are the ones ``matmul_flops`` gives the routed work
    (attention on the math backend, which counts the causally masked half too)."""
    case = bench.Case(suite, "fine-grained", 10, "fp32", "cpu", bench.TINY_SHAPES["fine-grained"])
    dense, x = bench.build(case, "dense")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        bench.step_function(dense, x, backward)()
    masked = case.attention_flops() if suite in ("moa", "layer") else 0
    assert counter.get_total_flops() == case.matmul_flops(backward) + masked * (1 + 2 * backward)


@pytest.mark.parametrize("suite", bench.SUITES)
def test_every_suite_is_timed_against_the_roofline_and_the_per_expert_loop(suite, tmp_path):
    """Through the Python API behind ``moe-blocks bench``: each suite's implementations, its
    dense roofline among them (the layer's too), "x dense" = time / dense time and "x faster"
    = the per-expert loop's time / time, for every token count and pass; the table, JSON and
    plot say what the memory column measured."""
    results = bench.run_suite(
        suite, ["fine-grained"], [4, 16], ["fp32"], "cpu", tiny=True, max_repeats=1, budget_s=0.0
    )
    expected = {
        "expert_linear": {"moe_blocks", "per_expert_loop", "grouped_mm", "dense"},
        "mlp": {"moe_blocks", "transformers", "grouped_mm", "expert_products", "dense"},
    }.get(suite, {"moe_blocks", "transformers", "dense"})
    loop = "per_expert_loop" if suite == bench.KERNEL_SUITE else "transformers"
    dims = bench.TINY_SHAPES["fine-grained"]
    for tokens in (4, 16):
        for backward in (False, True):
            rows = {r.impl: r for r in results if (r.tokens, r.backward) == (tokens, backward)}
            assert set(rows) == expected
            for r in rows.values():
                assert r.error is None
                assert r.vs_dense == pytest.approx(r.median_ms / rows["dense"].median_ms)
                assert r.vs_transformers == pytest.approx(rows[loop].median_ms / r.median_ms)
                flops = bench.Case(suite, "fine-grained", tokens, "fp32", "cpu", dims).matmul_flops
                assert r.tflops == pytest.approx(flops(backward) / (r.median_ms / 1e3) / 1e12)
                assert (r.memory_mb is not None) == backward
    rows = json.loads(json.dumps(bench.to_json(results)))
    assert {row["memory_measure"] for row in rows} == {"saved_for_backward"}
    header = bench.format_table(results).splitlines()[0]
    assert "saved MB" in header and "mem MB" not in header
    bench.plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_cpu_memory_is_the_bytes_autograd_saves_for_backward():
    """Not a peak: the saved input and activation, not the weights or the gradients."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 32, bias=False), nn.ReLU())
    x = torch.randn(1, 5, 8)
    saved = 5 * 8 * 4 + 5 * 32 * 4  # Linear keeps its input, ReLU its output (fp32)
    assert bench.memory_mb(module, x, "cpu") == saved / 2**20


@pytest.mark.parametrize(
    "suite, baseline", [("mlp", "transformers"), ("expert_linear", "per_expert_loop")]
)
def test_bench_command_writes_table_json_and_plot(suite, baseline, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--tiny", "--suite", suite, "--shapes", "jetmoe-8b", "--tokens", "4,16",
            "--dtypes", "fp32", "--repeats", "2", "--budget", "0.05",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "moe_blocks" in table and baseline in table and "dense" in table
    rows = json.loads((out / f"bench_{suite}.json").read_text())
    floor = {"expert_products"} if suite == "mlp" else set()  # the MLP's, on CPU
    assert {r["impl"] for r in rows} == {"moe_blocks", baseline, "grouped_mm", "dense"} | floor
    assert {r["tokens"] for r in rows} == {4, 16}
    dense = {(r["tokens"], r["backward"]): r["median_ms"] for r in rows if r["impl"] == "dense"}
    for row in rows:  # each ratio is to the dense roofline of the same tokens and pass
        expected = row["median_ms"] / dense[row["tokens"], row["backward"]]
        assert row["vs_dense"] == pytest.approx(expected)
        assert (row["memory_mb"] is not None) == row["backward"]
    assert (out / f"bench_{suite}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, message",
    [(["--shapes", "gpt-5"], "unknown shape"), (["--tokens", "a,b"], "--tokens"),
     (["--dtypes", "fp8"], "--dtypes")],
)  # fmt: skip
def test_bench_command_rejects_bad_input(args, message, capsys):
    assert main(["bench", "--tiny", *args]) == 2
    assert message in capsys.readouterr().err


def test_timing_runs_every_implementation_in_the_same_rounds_in_changing_orders():
    order: list[str] = []
    names = ("a", "b", "c", "d")
    steps = {name: (lambda name=name: order.append(name)) for name in names}
    rounds = 12
    medians = bench.time_medians_ms(
        steps, "cpu", min_repeats=rounds, max_repeats=rounds, budget_s=0.0
    )
    assert set(medians) == set(names)
    # one warm-up call each, then rounds in which each runs once
    assert order[:4] == list(names)
    timed = [order[4 * i : 4 * i + 4] for i in range(1, rounds + 1)]
    assert len(order) == 4 * (rounds + 1)
    assert all(sorted(one) == list(names) for one in timed)
    # no implementation always runs right after the same one (whose dirty caches it would
    # inherit every round): each follows at least two others over the rounds
    after = {name: {r[r.index(name) - 1] for r in timed if r.index(name)} for name in names}
    assert all(len(predecessors) >= 2 for predecessors in after.values())


def test_cold_cache_timing_flushes_before_every_timed_call_and_times_only_the_call():
    order: list[str] = []
    steps = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}

    def flush():
        order.append("flush")
        time.sleep(0.05)

    medians = bench.time_medians_ms(
        steps, "cpu", min_repeats=3, max_repeats=3, budget_s=0.0, before_each=flush
    )
    assert order[:2] == ["a", "b"]  # the warm-up calls
    timed = order[2:]
    assert len(timed) == 12 and timed[::2] == ["flush"] * 6
    assert sorted(timed[1::2]) == ["a"] * 3 + ["b"] * 3
    assert all(ms < 25 for ms in medians.values())  # the 50 ms flushes are not counted


def test_timing_needs_at_least_one_round():
    with pytest.raises(ValueError, match="max_repeats"):
        bench.time_medians_ms({"a": lambda: None}, "cpu", max_repeats=0)


def test_the_last_level_cache_is_the_largest_listed(tmp_path):
    for index, size in enumerate(["48K", "2048K", "480M", "junk"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert bench.last_level_cache_bytes("cpu", tmp_path) == 480 * 2**20
    assert bench.last_level_cache_bytes("cpu", tmp_path / "absent") == 256 * 2**20


def test_bench_command_with_cold_caches_marks_its_results(tmp_path, monkeypatch):
    flushed = []
    monkeypatch.setattr(bench.measure, "cache_flush", lambda device: lambda: flushed.append(device))
    args = ["bench", "--tiny", "--suite", "mlp", "--passes", "fwd", "--tokens", "8",
            "--dtypes", "fp32", "--shapes", "jetmoe-8b", "--repeats", "2", "--budget", "0.01",
            "--device", "cpu", "--cold-caches", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((tmp_path / "bench_mlp.json").read_text())
    assert rows and all(row["cold_caches"] for row in rows)
    assert len(flushed) == 2 * len(rows)  # two timed rounds, one flush before each call
    assert main([*args[:-3], "--out", str(tmp_path / "warm")]) == 0
    warm = json.loads((tmp_path / "warm" / "bench_mlp.json").read_text())
    assert not any(row["cold_caches"] for row in warm)
    assert main(["bench", "--tiny", "--suite", "ep", "--cold-caches"]) == 2


def test_an_implementation_that_raises_is_reported_and_the_others_still_timed(monkeypatch):
    case = bench.Case("mlp", "fine-grained", 8, "fp32", "cpu", bench.TINY_SHAPES["fine-grained"])
    build = bench.build

    def build_or_run_out_of_memory(case, impl):
        if impl == "transformers":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return build(case, impl)

    monkeypatch.setattr(bench.measure, "build", build_or_run_out_of_memory)
    results = bench.run_case(case, True, max_repeats=2, budget_s=0.0)
    by_impl = {r.impl: r for r in results}
    assert set(by_impl) == {"moe_blocks", "transformers", "grouped_mm", "expert_products", "dense"}
    assert by_impl["transformers"].error == "OutOfMemoryError: CUDA out of memory"
    assert by_impl["transformers"].median_ms is None
    assert by_impl["moe_blocks"].error is None and by_impl["moe_blocks"].vs_dense is not None
    assert "error: OutOfMemoryError" in bench.format_table(results)


@pytest.mark.parametrize("suite", ["expert_linear", "mlp"])
def test_forward_rows_report_the_used_experts_weight_bandwidth(suite):
    """ "weight GB/s": the weights of the experts the routing uses (counted here from the
    routing itself: the kernel case's expert ids, the MLP's router run on the input), one
    expert's for dense, per second of the row's time; fwd+bwd rows have none."""
    dims = bench.TINY_SHAPES["fine-grained"]  # 64 experts, top-8: 3 tokens use at most 24
    case = bench.Case(suite, "fine-grained", 3, "fp32", "cpu", dims)
    module, x = bench.build(case, "moe_blocks")
    with torch.no_grad():
        routing = module.expert_idx if suite == "expert_linear" else module.router(x[0]).expert_idx
    used = routing.unique().numel()
    d_model, d_ffn = dims[:2]
    expert_bytes = d_model * d_ffn * 4 * (1 if suite == "expert_linear" else 3)
    rows = bench.run_case(case, False, max_repeats=2, budget_s=0.0)
    for row in rows:
        experts = 1 if row.impl == "dense" else used
        expected = experts * expert_bytes / (row.median_ms / 1e3) / 1e9
        assert row.weight_gbs == pytest.approx(expected, rel=1e-9), row.impl
    assert all(r.weight_gbs is None for r in bench.run_case(case, True, max_repeats=1, budget_s=0))


def test_bench_command_starts_with_a_decode_row_by_default(tmp_path, capsys):
    """Without --tokens the table starts at one token (a decode step), forward rows carrying
    the weight bandwidth column."""
    out = tmp_path / "bench"
    args = ["bench", "--tiny", "--suite", "mlp", "--shapes", "fine-grained", "--dtypes", "fp32",
            "--passes", "fwd", "--repeats", "1", "--budget", "0.01", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "weight GB/s" in capsys.readouterr().out
    rows = json.loads((out / "bench_mlp.json").read_text())
    assert sorted({r["tokens"] for r in rows}) == [1, 8, 256, 2048]
    assert all(r["weight_gbs"] > 0 for r in rows)
