"""The GPU check: one command for a machine with one H100/H200, under 8 minutes.

    python benches/gpu_check.py --out OUT

1. Makes moe_blocks importable without touching the machine's packages (an offline
   ``pip install --no-deps --no-index --target``), and prints the versions it runs with.
2. Runs the kernel and block tests on CUDA (Triton compiled for the card, not interpreted),
   the kernel contract's 2**31-row-offset test among them.
3. The GPU suite: MoEMLP forward+backward at the JetMoE-8B and fine-grained shapes, bf16, 16k
   tokens, and a decode-sized (8 tokens) forward, beside transformers' JetMoe MoE, the
   torch._grouped_mm pipeline and the dense cuBLAS roofline. Every autotuning of the two
   Triton kernels is recorded with the timing of every candidate (``OUT/autotune.jsonl``).
3b. A tuning sweep: the same MoEMLP work once more with a wider set of candidate block
   configurations (:data:`SWEEP`), each timed and recorded, for tuning offline afterwards. It
   runs last among the benchmarks, under its own time limit, and never fails the check.
4. One JetMoE-8B (random weights, bf16) forward+backward at a training batch, ours beside
   transformers' JetMoeForCausalLM on the same GPU, each in its own process.
5. Prints a short table last; writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.log``. Exits
   with 1, naming the failed steps, when the tests, the suite or either JetMoE-8B step failed.

``--tiny`` runs the same steps with tiny shapes on whatever device is there (CI runs it on CPU
to keep the script working; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS_TIMEOUT_S = 360
COMPILE_TEST = "tests/test_dynamic_shapes.py::test_moe_mlp_compiles_once_for_new_shapes"
SWEEP_TIMEOUT_S = 150  # the tuning sweep (3b) is cut off here; what it recorded stays


def log(message: str, sink) -> None:
    print(message, flush=True)
    sink.write(message + "\n")
    sink.flush()


def ensure_importable(env: dict, sink) -> dict:
    """moe_blocks importable in child processes: the installed one, or a private install."""
    probe = subprocess.run(
        [sys.executable, "-c", "import moe_blocks.kernels"], env=env, capture_output=True
    )
    if probe.returncode == 0:
        return env
    target = Path(tempfile.mkdtemp(prefix="moe_blocks_"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
               "--no-build-isolation", "--target", str(target), str(ROOT)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        log(f"could not install moe_blocks offline:\n{result.stderr[-2000:]}", sink)
        raise SystemExit(1)
    return env | {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))}


def run_tests(tests: list[str], env: dict, timeout: int, sink) -> dict:
    """Run pytest on ``tests`` (stopping at the first failure): its exit status and summary."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        result = subprocess.run(
            command, cwd=ROOT, env=env | {"HYPOTHESIS_PROFILE": "gpu_check"},
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or b""
        log(output.decode(errors="replace")[-6000:], sink)
        summary = f"timed out after {timeout} s"
        log(f"tests: {summary}", sink)
        return {"returncode": 124, "summary": summary}
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    log(result.stdout[-6000:] + result.stderr[-2000:], sink)
    log(f"tests: {summary}", sink)
    return {"returncode": result.returncode, "summary": summary}


def run_child(code: str, arguments: list[str], env: dict, timeout: int, sink) -> dict | list:
    """Run ``code`` in a fresh Python with ``arguments``; it prints one JSON line last."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, *arguments], env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if result.stderr:
        log(result.stderr[-8000:], sink)
    if result.returncode != 0:
        return {"error": result.stderr[-3000:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# Candidate block configurations for the tuning sweep (step 3b), beside the default ones in
# kernels/triton_backend.py: gemm (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); weight gradient
# (BLOCK_M, BLOCK_N, BLOCK_K, INNER_M, warps, stages).
SWEEP = {
    "gather_gemm": [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 3),
        (64, 256, 64, 8, 3),
        (64, 128, 64, 4, 3),
        (64, 64, 64, 4, 3),
        (64, 128, 32, 4, 5),
        (32, 128, 64, 4, 3),
        (16, 128, 128, 4, 3),
        (16, 64, 64, 4, 4),
    ],
    "weight_grad": [
        (512, 128, 128, 64, 8, 3),
        (1024, 128, 128, 64, 8, 3),
        (512, 128, 64, 64, 4, 4),
        (2048, 128, 128, 64, 8, 3),
        (256, 128, 128, 64, 8, 3),
        (512, 64, 128, 32, 4, 4),
    ],
}


def _describe(config) -> dict:
    """A triton.Config as JSON: its block sizes, warps and stages."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def record_autotuning(path: Path, tuners: dict, configs: dict | None = None) -> None:
    """Append each new autotuning of the named Triton autotuners to ``path`` as a JSON line:
    the kernel, the autotuning key, the variant (the constexpr arguments), the best candidate
    and every candidate's timing (triton's ``configs_timings``: median, 20th and 80th
    percentile ms). With ``configs`` (name -> triton.Config list), tune over those instead."""

    def recording(name, tuner, run):
        def run_and_record(*args, **kwargs):
            known = set(tuner.cache)
            result = run(*args, **kwargs)
            timings = getattr(tuner, "configs_timings", None) or {}
            for key in set(tuner.cache) - known:
                row = {
                    "kernel": name,
                    "key": [str(part) for part in key],
                    "variant": {
                        k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))
                    },
                    "best": _describe(tuner.cache[key]),
                    "timings_ms": [[_describe(c), t] for c, t in timings.items()],
                }
                with open(path, "a") as sink:
                    sink.write(json.dumps(row) + "\n")
            return result

        return run_and_record

    for name, tuner in tuners.items():
        if configs is not None:
            tuner.configs = configs[name]
        tuner.run = recording(name, tuner, tuner.run)


# Child-process prelude: moe_blocks' two autotuners recorded into argv[1]; with argv[2] == "1"
# the sweep's candidates replace the defaults.
RECORDING = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import triton
from benches.gpu_check import SWEEP, record_autotuning
from moe_blocks.kernels import triton_backend
_configs = None
if sys.argv[2] == "1":
    _configs = {{
        "gather_gemm": [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w,
                                      num_stages=s) for m, n, k, w, s in SWEEP["gather_gemm"]],
        "weight_grad": [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, INNER_M=i),
                                      num_warps=w, num_stages=s)
                        for m, n, k, i, w, s in SWEEP["weight_grad"]],
    }}
record_autotuning(sys.argv[1], {{"gather_gemm": triton_backend.gather_gemm_tuned,
                                 "weight_grad": triton_backend.weight_grad_tuned}}, _configs)
sys.argv[1:] = sys.argv[3:]
"""

VERSIONS = """
import json, torch, triton, transformers
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(json.dumps({"torch": torch.__version__, "triton": triton.__version__,
                  "transformers": transformers.__version__, "device": device,
                  "python": __import__("sys").version.split()[0]}))
"""

SUITE = """
import json, sys
from moe_blocks.models import bench
device, tiny = sys.argv[1], sys.argv[2] == "1"
decode, training = (int(t) for t in sys.argv[3].split(","))
results = []
for tokens, backward in ((training, True), (decode, False)):
    results += bench.run_suite("mlp", ["jetmoe-8b", "fine-grained"], [tokens], ["bf16"], device,
                               tiny=tiny, passes=(backward,), max_repeats=20, budget_s=3.0)
print(bench.format_table(results), file=sys.stderr)
print(json.dumps(bench.to_json(results)))
"""

# The sweep (3b): one forward+backward of MoEMLP per shape, autotuned over SWEEP.
TUNE = """
import json, sys, torch
from moe_blocks.models import bench
device, tiny, tokens = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
for shape in ("jetmoe-8b", "fine-grained"):
    case = bench.Case("mlp", shape, tokens, "bf16", device, bench.shapes_for(device, tiny)[shape])
    module, x = bench.build(case, "moe_blocks")
    bench.step_function(module, x, backward=True)()
print(json.dumps({"shapes": 2}))
"""

MODEL = """
import json, statistics, sys, time, torch
which, device, tiny = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
batch, length = (2, 32) if tiny else (2, 2048)
dtype = torch.bfloat16
from moe_blocks.models.jetmoe import JetMoEConfig, JetMoEForCausalLM
config = JetMoEConfig.from_preset("tiny" if tiny else "jetmoe-8b")
torch.manual_seed(0)
if which == "moe_blocks":
    with torch.device("meta"):
        model = JetMoEForCausalLM(config, dtype=dtype)
    model.to_empty(device=device)
    model.init_weights()
    step = lambda ids: model(ids, labels=ids).loss
else:
    import transformers
    hf_config = transformers.JetMoeConfig(**{k: v for k, v in config.to_hf_dict().items()
        if k not in ("architectures", "model_type", "rope_parameters", "num_attention_heads")})
    hf_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.JetMoeForCausalLM(hf_config).to(dtype)
    step = lambda ids: model(input_ids=ids, labels=ids).loss
ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
times = []
for repeat in range(4):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(); start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    step(ids).backward()
    sync(); times.append((time.perf_counter() - start) * 1e3)
peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
count = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
print(json.dumps({"impl": which, "tokens": batch * length, "peak_gib": peak, "parameters": count,
                  "median_ms": statistics.median(times[1:])}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_check", help="folder for the JSON and log")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    report["commit"] = commit.stdout.strip() or "unknown"
    with open(out / "gpu_check.log", "w") as sink:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        env = ensure_importable(env, sink)
        report["versions"] = run_child(VERSIONS, [], env, 120, sink)
        log(f"versions: {report['versions']}  commit {report['commit']}", sink)
        device = (
            "cuda"
            if "error" not in report["versions"] and report["versions"]["device"] != "cpu"
            else "cpu"
        )
        tiny = args.tiny or device == "cpu"
        if device == "cpu":
            log("no CUDA device: running the tiny smoke test on CPU", sink)
            env["TRITON_INTERPRET"] = "1"

        if not args.skip_tests:
            started = time.perf_counter()
            tests = ["tests/test_plan.py", "tests/test_expert_linear.py",
                     "tests/test_expert_linear_contract.py", "tests/test_moe_mlp.py",
                     "tests/test_moa.py", COMPILE_TEST]  # fmt: skip
            if tiny:
                tests = ["tests/test_plan.py"]
            report["tests"] = run_tests(tests, env, TESTS_TIMEOUT_S, sink)
            report["tests"]["seconds"] = round(time.perf_counter() - started, 1)

        flag = "1" if tiny else "0"
        tokens = "4,16" if tiny else "8,16384"
        autotune = out / "autotune.jsonl"
        autotune.unlink(missing_ok=True)
        report["suite"] = run_child(
            RECORDING + SUITE, [str(autotune), "0", device, flag, tokens], env, 300, sink
        )
        report["model"] = []
        for which in ("moe_blocks", "transformers"):
            result = {"impl": which} | run_child(MODEL, [which, device, flag], env, 300, sink)
            report["model"].append(result)
            log(f"JetMoE forward+backward {which}: {result}", sink)

        if not tiny:  # the interpreter runs a single candidate: nothing to sweep
            training_tokens = tokens.split(",")[1]
            report["sweep"] = run_child(
                RECORDING + TUNE, [str(autotune), "1", device, flag, training_tokens], env,
                SWEEP_TIMEOUT_S, sink,
            )  # fmt: skip
        report["autotunings_recorded"] = (
            len(autotune.read_text().splitlines()) if autotune.exists() else 0
        )
        log(f"autotunings recorded in {autotune}: {report['autotunings_recorded']}", sink)
        report["failures"] = failures(report)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        log("\n" + summary_table(report), sink)
        if report["failures"]:
            log("FAILED: " + "; ".join(report["failures"]), sink)
    return 1 if report["failures"] else 0


def failures(report: dict) -> list[str]:
    """The steps of ``report`` that failed, in words (empty: every step passed)."""
    found = []
    tests = report.get("tests")
    if tests is not None and tests["returncode"] != 0:
        found.append(f"tests on the device: {tests['summary']}")
    if "error" in report["suite"]:
        found.append("the MoEMLP suite")
    for row in report["model"]:
        if "error" in row:
            found.append(f"the JetMoE forward+backward step of {row['impl']}")
    return found


def summary_table(report: dict) -> str:
    lines = [f"GPU check, commit {report['commit']}, {report['versions']}"]
    if "tests" in report:
        lines.append(f"tests on the device: {report['tests']['summary']}")
    if isinstance(report["suite"], list):
        header = ("MoEMLP bf16", "pass", "tokens", "impl", "ms", "TFLOP/s", "x dense")
        lines.append("{:<20}{:<8}{:>7}{:>14}{:>10}{:>9}{:>9}".format(*header))
        for row in report["suite"]:
            passes = "fwd+bwd" if row["backward"] else "fwd"
            lines.append(
                f"{row['shape']:<20}{passes:<8}{row['tokens']:>7}{row['impl']:>14}"
                f"{row['median_ms']:>10.2f}{row['tflops']:>9.1f}{row['vs_dense']:>9.2f}"
            )
    for row in report["model"]:
        if "error" in row:
            lines.append(f"JetMoE fwd+bwd {row['impl']}: error {row['error'][-300:]}")
        else:
            peak = f"{row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else "-"
            lines.append(
                f"JetMoE fwd+bwd {row['impl']:<13} {row['tokens']} tokens: "
                f"{row['median_ms']:.1f} ms ({row['tokens'] / row['median_ms'] * 1e3:,.0f} "
                f"tokens/s), peak {peak}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
