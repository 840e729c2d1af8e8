"""The results of a benchmark: a table, JSON and a PNG."""

from __future__ import annotations

import json
import math
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

import torch

from .cases import MEMORY_MEASURES
from .ep import EPResult
from .measure import Result


def format_table(results: list[Result]) -> str:
    """One row per result; "x dense": time over the dense roofline's; "x faster": times faster
    than the suite's per-expert loop (:data:`LOOP_BASELINES`); "saved MB" (CPU) or "peak MB"
    (CUDA): :func:`memory_mb`; "x grouped" (hf suite): times faster than its grouped_mm;
    "weight GB/s" (forward): the used experts' weight bytes per second (``Result.weight_gbs``)."""
    grouped = any(r.vs_grouped_mm is not None for r in results)
    bandwidth = any(r.weight_gbs is not None for r in results)
    devices = sorted({r.device for r in results}) or ["cpu"]
    memory = "/".join(MEMORY_MEASURES[device].split("_")[0] for device in devices) + " MB"
    header = (
        f"{'suite':<14}{'shape':<16}{'tokens':>7} {'dtype':<5}{'pass':<9}{'impl':<16}"
        f"{'ms':>10}{'TFLOP/s':>9}{'x dense':>9}{'x faster':>10}{memory:>10}"
        + (f"{'x grouped':>11}" if grouped else "")
        + (f"{'weight GB/s':>12}" if bandwidth else "")
    )
    lines = [header, "-" * len(header)]
    for r in results:
        passes = "fwd+bwd" if r.backward else "fwd"
        case = f"{r.suite:<14}{r.shape:<16}{r.tokens:>7} {r.dtype:<5}{passes:<9}{r.impl:<16}"
        if r.error is not None:
            lines.append(f"{case}  error: {r.error.splitlines()[0][:120]}")
            continue
        lines.append(
            f"{case}{r.median_ms:>10.2f}{r.tflops:>9.3f}{_opt(r.vs_dense, 9, 2)}"
            f"{_opt(r.vs_transformers, 10, 2)}{_opt(r.memory_mb, 10, 1)}"
            + (_opt(r.vs_grouped_mm, 11, 2) if grouped else "")
            + (_opt(r.weight_gbs, 12, 1) if bandwidth else "")
        )
    return "\n".join(lines)


def _opt(value: float | None, width: int, digits: int) -> str:
    return " " * width if value is None else f"{value:>{width}.{digits}f}"


def plot(results: list[Result], path) -> None:
    """Throughput against tokens, one line per implementation, a panel per (suite, shape,
    dtype, pass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.suite, r.shape, r.dtype, r.backward) for r in results})
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax, (suite, shape, dtype, backward) in zip(axes.flat, panels, strict=False):
        for impl in dict.fromkeys(r.impl for r in results):
            points = sorted(
                (r.tokens, r.tflops)
                for r in results
                if r.error is None
                and (r.suite, r.shape, r.dtype, r.backward, r.impl)
                == (suite, shape, dtype, backward, impl)
            )
            if points:
                ax.plot(*zip(*points, strict=True), "o-", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{suite} {shape} {dtype} {'fwd+bwd' if backward else 'fwd'}", fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def to_json(results: list[Result] | list[EPResult]) -> list[dict]:
    """The results as dicts: their fields, and a block suite's ``memory_measure``."""
    return [
        asdict(r) | ({"memory_measure": r.memory_measure} if isinstance(r, Result) else {})
        for r in results
    ]


def format_ep_table(results: list[EPResult]) -> str:
    header = (
        f"{'shape':<14}{'tokens':>7} {'dtype':<6}{'device':<7}{'ep':>3}{'threads':>8}"
        f"{'ms':>10}{'exch %':>8}{'fwd MB':>9}{'bwd MB':>9}{'2TkdB MB':>10}{'cross MB':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        volumes = (r.forward_bytes, r.backward_bytes, r.expected_bytes, r.crossing_bytes)
        megabytes = [None if v is None else v / 2**20 for v in volumes]
        share = None if r.exchange_share is None else 100 * r.exchange_share
        lines.append(
            f"{r.shape:<14}{r.tokens:>7} {r.dtype:<6}{r.device:<7}"
            f"{'-' if r.ep == 0 else r.ep:>3}{r.threads:>8}{r.median_ms:>10.2f}{_opt(share, 8, 1)}"
            + "".join(_opt(v, w, 2) for v, w in zip(megabytes, (9, 9, 10, 10), strict=True))
        )
    return "\n".join(lines)


def write_results(results: list[Result] | list[EPResult], suite: str, out: Path) -> list[Path]:
    """Write ``results`` of ``suite`` into the folder ``out`` (created): ``bench_<suite>.json``,
    and for every suite but ``ep`` its plot ``bench_<suite>.png``. Returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"bench_{suite}.json"]
    written[0].write_text(json.dumps(to_json(results), indent=1))
    if suite != "ep":
        written.append(out / f"bench_{suite}.png")
        plot(results, written[1])
    return written


def provenance(command: str, device: str) -> dict:
    """Where a benchmark script's numbers come from, for its JSON: the ``command`` that ran,
    the machine, the ``device`` (the GPU's name on CUDA), torch's version and the checkout's
    commit (empty outside a git checkout)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()  # fmt: skip
    return {
        "command": command,
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": commit,
    }
