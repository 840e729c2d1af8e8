"""The benchmark cases compare like with like, and `moe-blocks bench` writes its table, JSON
and plot."""

import json

import pytest
import torch

from moe_blocks.models import bench
from moe_blocks.models.cli import main

pytest.importorskip("transformers")


@pytest.mark.parametrize("suite", bench.SUITES)
def test_implementations_of_a_case_compute_the_same_function(suite):
    case = bench.Case(suite, "fine-grained", 12, "fp32", "cpu", bench.TINY_SHAPES["fine-grained"])
    reference, x = bench.build(case, "transformers")
    with torch.no_grad():
        expected = reference(x)
        for impl in ("moe_blocks", "grouped_mm"):
            if bench.applies(case, impl):
                module, same_x = bench.build(case, impl)
                assert torch.equal(same_x, x)
                torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)


def test_dense_roofline_has_the_routed_matmul_shapes():
    case = bench.Case("mlp", "jetmoe-8b", 10, "fp32", "cpu", (16, 8, 4, 2))
    dense, _ = bench.build(case, "dense")
    top_k = case.dims[3]
    macs = sum(p.numel() for p in dense.parameters()) * case.tokens * top_k  # T*k rows
    assert case.matmul_flops(backward=False) == 2 * macs


def test_bench_command_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--tiny", "--suite", "mlp", "--shapes", "jetmoe-8b", "--tokens", "4,16",
            "--dtypes", "fp32", "--repeats", "2", "--budget", "0.05",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "moe_blocks" in table and "transformers" in table and "dense" in table
    rows = json.loads((out / "bench_mlp.json").read_text())
    assert {r["impl"] for r in rows} == {"moe_blocks", "transformers", "grouped_mm", "dense"}
    assert {r["tokens"] for r in rows} == {4, 16}
    dense = {(r["tokens"], r["backward"]): r["median_ms"] for r in rows if r["impl"] == "dense"}
    for row in rows:  # each ratio is to the dense roofline of the same tokens and pass
        expected = row["median_ms"] / dense[row["tokens"], row["backward"]]
        assert row["vs_dense"] == pytest.approx(expected)
        assert (row["memory_mb"] is not None) == row["backward"]
    assert (out / "bench_mlp.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, message",
    [(["--shapes", "gpt-5"], "unknown shape"), (["--tokens", "a,b"], "--tokens"),
     (["--dtypes", "fp8"], "--dtypes")],
)  # fmt: skip
def test_bench_command_rejects_bad_input(args, message, capsys):
    assert main(["bench", "--tiny", *args]) == 2
    assert message in capsys.readouterr().err


def test_timing_runs_every_implementation_in_the_same_rounds():
    order: list[str] = []
    steps = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    medians = bench.time_medians_ms(steps, "cpu", min_repeats=4, max_repeats=4, budget_s=0.0)
    assert set(medians) == {"a", "b", "c"}
    # one warm-up call each, then four rounds in which each runs once, in turn
    assert order == ["a", "b", "c"] * 5


def test_an_implementation_that_raises_is_reported_and_the_others_still_timed(monkeypatch):
    case = bench.Case("mlp", "fine-grained", 8, "fp32", "cpu", bench.TINY_SHAPES["fine-grained"])
    build = bench.build

    def build_or_run_out_of_memory(case, impl):
        if impl == "transformers":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return build(case, impl)

    monkeypatch.setattr(bench, "build", build_or_run_out_of_memory)
    results = bench.run_case(case, True, max_repeats=2, budget_s=0.0)
    by_impl = {r.impl: r for r in results}
    assert set(by_impl) == {"moe_blocks", "transformers", "grouped_mm", "dense"}
    assert by_impl["transformers"].error == "OutOfMemoryError: CUDA out of memory"
    assert by_impl["transformers"].median_ms is None
    assert by_impl["moe_blocks"].error is None and by_impl["moe_blocks"].vs_dense is not None
    assert "error: OutOfMemoryError" in bench.format_table(results)
