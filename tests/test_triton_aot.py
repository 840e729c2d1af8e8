"""Every Triton kernel compiles for sm_80 and sm_90 at the configurations it would run, without
register spills, within shared memory, with matrix instructions where the dtype allows them.

The compile runs in a subprocess because the test session runs triton in interpreter mode."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_kernels_compile_for_real_gpus_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "moe_blocks.kernels.aot", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    builds = json.loads(result.stdout)
    archs = {build["arch"] for build in builds}
    assert archs == {"sm_80", "sm_90"}
    kernels = {build["variant"].split()[0] for build in builds}
    assert kernels == {"gather_gemm", "weight_grad"}
    problems = [f"{b['variant']} {b['arch']}: {b['problems']}" for b in builds if b["problems"]]
    assert not problems, "\n".join(problems)
    sm90_bf16 = [b for b in builds if b["arch"] == "sm_90" and " bf16 128x" in b["variant"]]
    assert sm90_bf16 and all(b["matrix_instruction"] == "wgmma" for b in sm90_bf16)


SPILLING_BUILD = """
import json
from dataclasses import asdict
from moe_blocks.kernels import aot
# fp32 in IEEE precision at a 128x128x64 tile: both operand tiles in registers on the FMA units
variant = aot.Variant(
    "gather_gemm", "float32",
    {"E_POW2": 8, "UPCAST": False, "HAS_GATES": False, "BLOCK_M": 128, "BLOCK_N": 128,
     "BLOCK_K": 64, "PRECISION": "ieee", "X_LAYOUT": 2, "Y_LAYOUT": 1, "HAS_BIAS": False},
    8, 3,
)
build = aot.build(variant, 90)
print(json.dumps(asdict(build) | {"problems": build.problems}))
"""


@pytest.mark.slow
def test_a_spilling_configuration_is_reported():
    """The check can fail: a tile far too large for fp32 on the FMA units spills registers
    (ptxas puts them in the stack frame, which the check counts), and is reported."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", SPILLING_BUILD], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    build = json.loads(result.stdout.splitlines()[-1])
    assert build["stack_bytes"] > 0
    assert any("spills registers" in problem for problem in build["problems"])
