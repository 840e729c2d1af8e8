"""benches/gpu_check.py keeps working: its --tiny smoke mode runs every step on this machine,
and a failed step fails the check."""

import copy
import json
import subprocess
import sys

import pytest

from .helpers import ROOT, script_module

pytest.importorskip("transformers")


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_every_step(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failures"] == []
    assert [tests["returncode"] for tests in report["tests"].values()] == [0]
    implementations = {(row["suite"], row["impl"]) for row in report["suite"]["rows"]}
    assert implementations == {
        ("mlp", "moe_blocks"), ("mlp", "transformers"), ("mlp", "grouped_mm"), ("mlp", "dense"),
        ("mlp", "expert_products"),  # the smoke mode runs on CPU, where the floor applies
        ("hf", "eager"), ("hf", "grouped_mm"), ("hf", "batched_mm"), ("hf", "moe_blocks"),
    }  # fmt: skip
    assert [row["impl"] for row in report["model"]] == ["moe_blocks", "transformers"]
    assert "JetMoE fwd+bwd" in result.stdout.splitlines()[-1]


def test_any_failed_step_fails_the_check():
    """The exit status comes from ``failures``: every step that failed is named, the JetMoE-8B
    forward+backward of either implementation included (an out-of-memory there used to pass)."""
    failures = script_module("benches/gpu_check.py").failures
    passing = {
        "versions": {"device": "NVIDIA H200"},
        "tests": {"quick tests": {"returncode": 0, "summary": "60 passed in 100 s"}},
        "suite": {"rows": [{"impl": "moe_blocks", "median_ms": 1.0, "error": None}]},
        "model": [{"impl": "moe_blocks", "median_ms": 900.0},
                  {"impl": "transformers", "median_ms": 2000.0}],
    }  # fmt: skip
    assert failures(passing) == []
    for index, impl in enumerate(("moe_blocks", "transformers")):
        report = copy.deepcopy(passing)
        report["model"][index] = {"impl": impl, "error": "CUDA out of memory"}
        assert failures(report) == [f"the JetMoE forward+backward step of {impl}"]
    broken = passing | {
        "versions": {"error": "exit status 1: no module named triton"},
        "tests": {"quick tests": {"returncode": 1, "summary": "1 failed, 59 passed"},
                  "rest of the tests": {"returncode": None, "summary": "skipped: no time"}},
        "suite": {"rows": [{"impl": "transformers", "shape": "jetmoe-8b", "tokens": 16384,
                            "error": "OutOfMemoryError: CUDA out of memory"}],
                  "error": "timed out after 150 s"},
    }  # fmt: skip
    assert failures(broken) == [
        "the versions step: exit status 1: no module named triton",
        "quick tests on the device: 1 failed, 59 passed",
        "rest of the tests on the device: skipped: no time",
        "the MoEMLP suite: timed out after 150 s",
        "the MoEMLP suite's transformers at jetmoe-8b 16384",
    ]
    assert failures({key: value for key, value in passing.items() if key != "tests"}) == []
    assert failures({"versions": {"device": "cpu"}, "stopped": "no CUDA device"}) == [
        "no CUDA device"
    ]


def test_every_autotuning_candidate_is_recorded(tmp_path, monkeypatch):
    """The recorder reads what triton's own Autotuner keeps (``cache``, ``configs_timings``):
    each new autotuning key gives one line with every candidate's timing and the winner. The
    interpreter cannot time candidates, so ``_bench`` is replaced by a stand-in clock."""
    import torch
    import triton
    import triton.language as tl
    from triton.runtime.autotuner import Autotuner

    @triton.jit
    def double(x_ptr, n, BLOCK: tl.constexpr, SCALE: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * SCALE, mask=mask)

    candidates = [triton.Config({"BLOCK": block}, num_warps=4, num_stages=2) for block in (8, 16)]
    tuner = triton.autotune(configs=candidates, key=["n"])(double)
    clock = {8: [2.0, 1.9, 2.1], 16: [1.0, 0.9, 1.1], 32: [3.0, 2.9, 3.1]}
    monkeypatch.setattr(
        Autotuner, "_bench", lambda self, *a, config, **k: clock[config.kwargs["BLOCK"]]
    )
    path = tmp_path / "autotune.jsonl"
    wider = [triton.Config({"BLOCK": block}, num_warps=4, num_stages=2) for block in (8, 16, 32)]
    record_autotuning = script_module("benches/gpu_check.py").record_autotuning
    record_autotuning(path, "sweep", {"double": tuner}, {"double": wider})
    for n in (20, 20, 40):  # the second call reuses the first key's choice
        x = torch.ones(n)
        tuner[lambda meta, n=n: (triton.cdiv(n, meta["BLOCK"]),)](x, n, SCALE=2)
        assert torch.equal(x, torch.full((n,), 2.0))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["key"][0] for row in rows] == ["20", "40"]
    for row in rows:
        assert row["step"] == "sweep" and row["kernel"] == "double"
        assert row["variant"]["SCALE"] == 2
        assert row["best"] == {"BLOCK": 16, "num_warps": 4, "num_stages": 2}
        timed = {entry[0]["BLOCK"]: entry[1] for entry in row["timings_ms"]}
        assert timed == clock


def test_a_child_that_times_out_keeps_the_json_lines_it_printed(tmp_path):
    gpu_check = script_module("benches/gpu_check.py")
    limit = gpu_check.MIN_STEP_S
    code = "import json, time; print(json.dumps({'case': 1}), flush=True); time.sleep(60)"
    with open(tmp_path / "gpu_check.log", "w") as sink:
        child = gpu_check.run_child(["-c", code], {}, limit, sink)
        assert child == {"rows": [{"case": 1}], "error": f"timed out after {limit} s"}
        finished = gpu_check.run_child(["-c", "print('done')"], {}, limit, sink)
        assert finished["rows"] == [] and finished["error"].startswith("printed no JSON line")
