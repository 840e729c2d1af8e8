"""Ahead-of-time compilation of the Triton kernels for real GPU targets, without a GPU.

The interpreter (how CI runs the Triton backend) accepts code the GPU compiler rejects, and says
nothing about registers or spills. This module compiles every kernel at the configurations it
would run (each autotune config x dtype, plus every row-layout variant) for sm_80 and sm_90 with
``triton.compile`` and reads each cubin's resource usage with the ``cuobjdump`` shipped in the
triton wheel: registers, shared memory, spills, and whether the matrix instructions are there
(``mma`` on sm_80, ``wgmma`` on sm_90). Spills are read from the stack frame (cuobjdump's
``STACK``): ptxas puts spilled registers there, while its ``LOCAL`` stayed 0 for a kernel that
spilled kilobytes (``ptxas -v`` confirms), and a Triton kernel keeps nothing else on the stack.

Run ``python -m moe_blocks.kernels.aot`` (or ``python benches/kernel_report.py``) for a table;
``--json`` for machine-readable output. It must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHS = (80, 90)
# Largest dynamic shared memory one block may use (A100: 163 KiB, H100/H200: 227 KiB).
SHARED_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_LAYOUT_NAMES = {0: "grouped", 1: "assignment", 2: "token"}


@dataclass(frozen=True)
class Variant:
    """One compilation of one kernel: its constexprs, launch options and argument dtypes."""

    kernel: str
    dtype: str  # torch dtype name of the activations and weights
    constexprs: dict
    num_warps: int
    num_stages: int
    y_dtype: str | None = None  # the output's dtype where it is not ``dtype`` (fp32 token sums)

    @property
    def expects_matrix_instructions(self) -> bool:
        return self.dtype != "float32" or self.constexprs["PRECISION"] == "tf32"

    @property
    def label(self) -> str:
        c = self.constexprs
        tile = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"
        if "INNER_M" in c:
            tile += f"/{c['INNER_M']}"
        layouts = f"{_LAYOUT_NAMES[c['X_LAYOUT']]}->{_LAYOUT_NAMES[c['Y_LAYOUT']]}"
        extra = ("+bias" if c.get("HAS_BIAS") else "") + ("+gates" if c["HAS_GATES"] else "")
        precision = " tf32" if c["PRECISION"] == "tf32" else ""
        if self.y_dtype:
            extra += f" y:{_DTYPE_NAMES[self.y_dtype]}"
        return (
            f"{self.kernel} {_DTYPE_NAMES[self.dtype]}{precision} {tile} "
            f"w{self.num_warps}s{self.num_stages} {layouts}{extra}"
        )


@dataclass(frozen=True)
class Build:
    variant: str
    arch: str
    registers: int
    shared_bytes: int
    spill_bytes: int
    stack_bytes: int
    matrix_instruction: str | None
    expects_matrix_instructions: bool
    shared_limit_bytes: int

    @property
    def problems(self) -> list[str]:
        found = []
        if self.shared_bytes > self.shared_limit_bytes:
            found.append(f"needs {self.shared_bytes} bytes of shared memory")
        if self.spill_bytes or self.stack_bytes:  # ptxas puts spilled registers in the stack
            found.append(  # frame; a Triton kernel has nothing else to keep there
                f"spills registers: {self.stack_bytes}-byte stack frame, "
                f"{self.spill_bytes} bytes of local memory"
            )
        if self.expects_matrix_instructions and self.matrix_instruction is None:
            found.append("no matrix (mma/wgmma) instructions")
        return found


def variants() -> list[Variant]:
    """Every configuration the autotuner may pick, for each dtype and precision (bf16, fp16;
    fp32 with and without TF32 on its own configurations), in the
    common layout and with gated rows as MoEMLP runs them (per-token output written as fp32
    rows, and a gated per-token ``dy``); every layout combination at the first configuration;
    gated per-assignment ``x`` (MoA) at the first."""
    from . import triton_backend as tb

    found = []
    common = {"E_POW2": 8, "UPCAST": False, "HAS_GATES": False}
    kinds = [
        ("bfloat16", "ieee", tb.GEMM_CONFIGS, tb.WEIGHT_GRAD_CONFIGS),
        ("float16", "ieee", tb.GEMM_CONFIGS, tb.WEIGHT_GRAD_CONFIGS),
        ("float32", "tf32", tb.FP32_GEMM_CONFIGS, tb.FP32_WEIGHT_GRAD_CONFIGS),
        ("float32", "ieee", tb.FP32_GEMM_CONFIGS, tb.FP32_WEIGHT_GRAD_CONFIGS),
    ]
    for dtype, precision, gemm_configs, weight_grad_configs in kinds:
        for m, n, k, warps, stages in gemm_configs:
            tiles = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "PRECISION": precision}
            layout = {"X_LAYOUT": 2, "Y_LAYOUT": 1, "HAS_BIAS": False}
            found.append(Variant("gather_gemm", dtype, common | tiles | layout, warps, stages))
            # MoEMLP's output: grouped rows, gated, fp32 rows to sum
            gated = {"X_LAYOUT": 0, "Y_LAYOUT": 1, "HAS_BIAS": False, "HAS_GATES": True}
            found.append(
                Variant("gather_gemm", dtype, common | tiles | gated, warps, stages, "float32")
            )
        for m, n, k, inner, warps, stages in weight_grad_configs:
            tiles = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "INNER_M": inner}
            tiles["PRECISION"] = precision
            layout = {"X_LAYOUT": 2, "Y_LAYOUT": 1}
            found.append(Variant("weight_grad", dtype, common | tiles | layout, warps, stages))
            gated = {"X_LAYOUT": 0, "Y_LAYOUT": 2, "HAS_GATES": True}  # grouped x, token dy
            found.append(Variant("weight_grad", dtype, common | tiles | gated, warps, stages))
    m, n, k, warps, stages = tb.GEMM_CONFIGS[0]
    tiles = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}
    for x_layout in (0, 1, 2):
        for y_layout in (0, 1):
            for has_bias in (False, True):
                layout = {"X_LAYOUT": x_layout, "Y_LAYOUT": y_layout, "HAS_BIAS": has_bias}
                constexprs = common | tiles | layout | {"PRECISION": "ieee"}
                found.append(Variant("gather_gemm", "bfloat16", constexprs, warps, stages))
    for x_layout, has_gates in ((1, True), (0, False)):  # MoA's gated output; a token fan-in
        layout = {"X_LAYOUT": x_layout, "Y_LAYOUT": 1, "HAS_BIAS": False, "HAS_GATES": has_gates}
        constexprs = common | tiles | layout | {"PRECISION": "ieee"}
        found.append(Variant("gather_gemm", "bfloat16", constexprs, warps, stages, "float32"))
    m, n, k, inner, warps, stages = tb.WEIGHT_GRAD_CONFIGS[0]
    tiles = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "INNER_M": inner}
    for x_layout in (0, 1, 2):
        for y_layout in (0, 1):
            layout = {"X_LAYOUT": x_layout, "Y_LAYOUT": y_layout, "PRECISION": "ieee"}
            found.append(Variant("weight_grad", "bfloat16", common | tiles | layout, warps, stages))
    gated = {"X_LAYOUT": 1, "Y_LAYOUT": 2, "HAS_GATES": True, "PRECISION": "ieee"}  # MoA's
    found.append(Variant("weight_grad", "bfloat16", common | tiles | gated, warps, stages))
    return _unique(found)


def _unique(found: list[Variant]) -> list[Variant]:
    seen, unique = set(), []
    for variant in found:
        key = (variant.label, variant.dtype)
        if key not in seen:
            seen.add(key)
            unique.append(variant)
    return unique


def _signature(kernel, variant: Variant) -> tuple[dict, dict, dict]:
    """Argument types, constexprs and divisibility hints as the runtime would specialise a
    launch on contiguous tensors whose sizes are multiples of 16."""
    element = _DTYPE_NAMES[variant.dtype]
    float_pointers = {"x_ptr", "w_ptr", "b_ptr", "y_ptr", "dy_ptr"}  # g_ptr: fp32 gates
    unit_strides = {"stride_xk", "stride_wk", "stride_bn", "stride_yn", "stride_dyn", "stride_dwk"}
    signature, constexprs, attrs = {}, dict(variant.constexprs), {}
    for index, name in enumerate(kernel.arg_names):
        if kernel.params[index].is_constexpr:
            signature[name] = "constexpr"
            continue
        if name in unit_strides:
            signature[name], constexprs[name] = "constexpr", 1
            continue
        if name in ("dw_ptr", "g_ptr") or (name == "y_ptr" and variant.y_dtype == "float32"):
            signature[name] = "*fp32"
        elif name in float_pointers:
            signature[name] = f"*{element}"
        elif name.endswith("_ptr"):
            signature[name] = "*i64"
        else:
            signature[name] = "i32"
        if name.endswith("_ptr") or name.startswith("stride") or name in ("N", "K"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _cuobjdump() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found at {path} (it ships in the triton wheel)")
    return path


def build(variant: Variant, arch: int) -> Build:
    """Compile ``variant`` for ``sm_<arch>`` and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_backend as tb

    kernel = {"gather_gemm": tb.gather_gemm_kernel, "weight_grad": tb.weight_grad_kernel}[
        variant.kernel
    ]
    signature, constexprs, attrs = _signature(kernel, variant)
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [str(_cuobjdump()), "--dump-resource-usage", str(cubin)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    fields = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", usage)}
    ptx = compiled.asm["ptx"]
    instruction = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else None)
    return Build(
        variant=variant.label,
        arch=f"sm_{arch}",
        registers=fields["REG"],
        shared_bytes=compiled.metadata.shared,
        spill_bytes=fields["LOCAL"],
        stack_bytes=fields["STACK"],
        matrix_instruction=instruction,
        expects_matrix_instructions=variant.expects_matrix_instructions,
        shared_limit_bytes=SHARED_LIMIT_BYTES[arch],
    )


def build_all(archs: tuple[int, ...] = ARCHS) -> list[Build]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    return [build(variant, arch) for variant in variants() for arch in archs]


def format_table(builds: list[Build]) -> str:
    header = f"{'kernel variant':<58} {'arch':<6} {'regs':>4} {'smem':>7} {'stack':>5}  mma"
    lines = [header, "-" * len(header)]
    for b in builds:
        mark = b.matrix_instruction or ("-" if not b.expects_matrix_instructions else "MISSING")
        lines.append(
            f"{b.variant:<58} {b.arch:<6} {b.registers:>4} {b.shared_bytes:>7} "
            f"{b.stack_bytes + b.spill_bytes:>5}  {mark}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", type=int, action="append", choices=ARCHS, help="80 or 90 (default: both)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    builds = build_all(tuple(args.arch) if args.arch else ARCHS)
    if args.json:
        print(json.dumps([asdict(b) | {"problems": b.problems} for b in builds], indent=1))
    else:
        print(format_table(builds))
    problems = [f"{b.variant} {b.arch}: {p}" for b in builds for p in b.problems]
    for problem in problems:
        print("PROBLEM:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
