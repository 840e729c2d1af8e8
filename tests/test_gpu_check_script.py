"""benches/gpu_check.py keeps working: its --tiny smoke mode runs every step on this machine,
and a failed step fails the check."""

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("transformers")


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_every_step(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["tests"]["returncode"] == 0
    assert {row["impl"] for row in report["suite"]} == {
        "moe_blocks", "transformers", "grouped_mm", "dense"
    }  # fmt: skip
    assert [row["impl"] for row in report["model"]] == ["moe_blocks", "transformers"]
    assert "JetMoE fwd+bwd" in result.stdout.splitlines()[-1]


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benches" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_any_failed_step_fails_the_check():
    """The exit status comes from ``failures``: every step that failed is named, the JetMoE-8B
    forward+backward of either implementation included (an out-of-memory there used to pass)."""
    failures = _gpu_check_module().failures
    passing = {
        "tests": {"returncode": 0, "summary": "60 passed in 100 s"},
        "suite": [{"impl": "moe_blocks", "median_ms": 1.0}],
        "model": [{"impl": "moe_blocks", "median_ms": 900.0},
                  {"impl": "transformers", "median_ms": 2000.0}],
    }  # fmt: skip
    assert failures(passing) == []
    for index, impl in enumerate(("moe_blocks", "transformers")):
        report = copy.deepcopy(passing)
        report["model"][index] = {"impl": impl, "error": "CUDA out of memory"}
        assert failures(report) == [f"the JetMoE forward+backward step of {impl}"]
    broken = passing | {"tests": {"returncode": 1, "summary": "1 failed, 59 passed"},
                        "suite": {"error": "timed out after 300 s"}}  # fmt: skip
    assert failures(broken) == ["tests on the device: 1 failed, 59 passed", "the MoEMLP suite"]
    assert failures({key: value for key, value in passing.items() if key != "tests"}) == []
