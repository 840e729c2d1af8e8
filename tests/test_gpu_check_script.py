"""benches/gpu_check.py keeps working: its --tiny smoke mode runs every step on this machine."""

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
