"""The GPU check: one command for a machine with one H100/H200, under 8 minutes.

    python benches/gpu_check.py --out OUT

Every step runs in its own process, each within its own limit and the time left before
``--deadline-s``; ``OUT/gpu_check.json`` is rewritten after every step, so a run cut short keeps
what it measured. In order:

1. Makes the source tree importable as moe_blocks where it is not installed (no pip: links
   ``moe_blocks/kernels`` and ``moe_blocks/models`` to ``kernels/`` and ``models/``, as the
   install maps them), and records the versions it runs with.
2. The quick tests on CUDA (Triton compiled for the card, not interpreted): the kernel contract
   (the 2**31-row-offset and NaN cases among them), MoEMLP's ``torch.compile`` test, the MoEMLP
   and MoA tests. Tests run with ``MOE_BLOCKS_AUTOTUNE=0`` (one block configuration per kernel,
   untimed); their output goes to ``OUT/pytest.log`` as they run.
3. The GPU suite: MoEMLP forward+backward at the JetMoE-8B and fine-grained shapes, bf16, 16k
   tokens, and a decode-sized (8 tokens) forward, beside transformers' JetMoe MoE, the
   torch._grouped_mm pipeline and the dense cuBLAS roofline; one JSON line per result.
4. One JetMoE-8B (random weights, bf16) forward+backward at a training batch, ours beside
   transformers' JetMoeForCausalLM on the same GPU, each in its own process.
5. The rest of the tests: the expert_linear properties (hypothesis draws many shapes).
6. A tuning sweep: the MoEMLP work once more with a wider set of candidate block
   configurations (:data:`SWEEP`), each timed and recorded, for tuning offline afterwards. It
   never fails the check.

Steps 3, 4 and 6 autotune, and every autotuning of the two Triton kernels is recorded with the
timing of every candidate and the step it came from (``OUT/autotune.jsonl``). A short table is
printed last (``OUT/gpu_check.log`` keeps everything printed). Exits with 1, naming the failed
steps, when any step but the sweep failed.

``--tiny`` runs the same steps with tiny shapes on whatever device is there (CI runs it on CPU
to keep the script working; its numbers mean nothing). Without it, a machine with no CUDA
device fails the check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 450  # the whole check; each step gets at most what is left, less RESERVE_S
RESERVE_S = 10
MIN_STEP_S = 5  # a step with less time than this left is skipped
COMPILE_TEST = "tests/test_dynamic_shapes.py::test_moe_mlp_compiles_once_for_new_shapes"
# JetMoE's logits against transformers (ours on the GPU, theirs on the CPU), fp32 and bf16.
JETMOE_TESTS = [
    "tests/test_jetmoe.py::test_transformers_checkpoint_loads_with_the_same_logits",
    "tests/test_jetmoe.py::test_bf16_logits_as_close_to_fp32_as_transformers_bf16",
]
QUICK_TESTS = ["tests/test_expert_linear_contract.py", COMPILE_TEST, "tests/test_moe_mlp.py",
               "tests/test_moa.py", *JETMOE_TESTS, "tests/test_plan.py"]  # fmt: skip
REST_TESTS = ["tests/test_expert_linear.py"]
# CPU checks that mean nothing more on a GPU (CI runs them): the compile test of the torch
# backend on CPU tensors, and the ahead-of-time compilation for sm_90 without a device.
CPU_ONLY_TESTS = [
    "tests/test_expert_linear_contract.py::test_compiles_without_graph_breaks",
    "tests/test_expert_linear_contract.py::test_compiled_kernels_address_rows_and_experts_in_64_bit",
]
TEST_ENV = {"HYPOTHESIS_PROFILE": "gpu_check", "MOE_BLOCKS_AUTOTUNE": "0"}
# Upper limits of the steps, seconds (the deadline may cut them shorter)
LIMITS_S = {"versions": 60, "quick tests": 150, "suite": 150, "model": 100,
            "rest of the tests": 200, "sweep": 150}  # fmt: skip
SKIPPED = "skipped: no time left before the deadline"


def log(message: str, sink) -> None:
    print(message, flush=True)
    sink.write(message + "\n")
    sink.flush()


def ensure_importable(env: dict, sink) -> None:
    """moe_blocks importable in the child processes (started in ROOT): the installed package,
    or else this source tree, once ``moe_blocks/kernels`` and ``moe_blocks/models`` link to
    ``kernels/`` and ``models/`` as the install maps them (git-ignored links, made only where
    nothing is installed: the GPU machine's copy of the tree)."""
    probe = [sys.executable, "-c", "import moe_blocks.kernels, moe_blocks.models"]
    if subprocess.run(probe, cwd=ROOT, env=env, capture_output=True).returncode == 0:
        return
    for name in ("kernels", "models"):
        link = ROOT / "moe_blocks" / name
        if not os.path.lexists(link):
            link.symlink_to(Path("..") / name)
    log("moe_blocks is not installed: linked moe_blocks/kernels -> ../kernels and "
        "moe_blocks/models -> ../models to import the source tree", sink)  # fmt: skip
    result = subprocess.run(probe, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        log(f"moe_blocks is still not importable; stopping:\n{result.stderr[-3000:]}", sink)
        raise SystemExit(1)


def run_tests(name: str, tests: list[str], env: dict, timeout: int, out: Path, sink) -> dict:
    """Run pytest on ``tests``, its output appended to ``OUT/pytest.log`` as it runs (so it
    survives a kill): the exit status, the summary line and the seconds taken."""
    if timeout < MIN_STEP_S:
        return {"returncode": None, "summary": SKIPPED}
    command = [sys.executable, "-m", "pytest", "-q", "--maxfail=10", "-rfE", "--durations=15",
               *(f"--deselect={test}" for test in CPU_ONLY_TESTS), *tests]  # fmt: skip
    started = time.perf_counter()
    path = out / "pytest.log"
    with open(path, "ab") as output:
        output.write(f"== {name}: {' '.join(tests)}\n".encode())
        output.flush()
        start = output.tell()
        try:
            returncode = subprocess.run(
                command, cwd=ROOT, env=env | TEST_ENV, stdout=output, stderr=subprocess.STDOUT,
                timeout=timeout,
            ).returncode  # fmt: skip
            summary = None
        except subprocess.TimeoutExpired:
            returncode, summary = 124, f"timed out after {timeout} s"
    text = path.read_bytes()[start:].decode(errors="replace")
    summary = summary or (text.strip().splitlines() or ["(no output)"])[-1]
    log(text[-6000:], sink)
    log(f"{name}: {summary}", sink)
    return {"returncode": returncode, "summary": summary,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def run_child(command: list[str], env: dict, timeout: int, sink) -> dict:
    """Run ``command`` (:func:`child_command`) in a fresh Python in ROOT, for at most
    ``timeout`` s. The child prints its results as JSON lines, each flushed as soon as it is
    known, so a child that dies
    or times out keeps what it printed before: returns ``{"rows": [every JSON line]}``, with
    ``"error"`` when it failed, timed out or printed no JSON line."""
    if timeout < MIN_STEP_S:
        return {"rows": [], "error": SKIPPED}
    try:
        result = subprocess.run(
            [sys.executable, *command], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip
        stdout, stderr = result.stdout, result.stderr
        error = f"exit status {result.returncode}: {stderr[-3000:]}" if result.returncode else None
    except subprocess.TimeoutExpired as expired:  # its output comes as bytes, even with text=True
        stdout, stderr = _text(expired.stdout), _text(expired.stderr)
        error = f"timed out after {timeout} s"
    if stderr:
        log(stderr[-8000:], sink)
    rows = _json_objects(stdout)
    if error is None and not rows:
        error = f"printed no JSON line; its output ended: {stdout[-3000:]}"
    return {"rows": rows} | ({"error": error} if error else {})


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _json_objects(text: str) -> list[dict]:
    """The lines of ``text`` that are JSON objects, parsed (a child's other output is skipped)."""
    objects = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            objects.append(value)
    return objects


def single(child: dict) -> dict:
    """The one JSON line a child printed, or its error."""
    return {"error": child["error"]} if "error" in child else child["rows"][-1]


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


def record_autotuning(path: Path, step: str, tuners: dict, configs: dict | None = None) -> None:
    """Append each new autotuning of the named Triton autotuners to ``path`` as a JSON line:
    the step of the check, the kernel, the autotuning key, the variant (the constexpr
    arguments), the best candidate and every candidate's timing (triton's ``configs_timings``:
    median, 20th and 80th percentile ms). With ``configs`` (name -> triton.Config list), tune
    over those instead (autotuners not named there keep theirs)."""

    def recording(name, tuner, run):
        def run_and_record(*args, **kwargs):
            known = set(tuner.cache)
            result = run(*args, **kwargs)
            timings = getattr(tuner, "configs_timings", None) or {}
            for key in set(tuner.cache) - known:
                row = {
                    "step": step,
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
        if configs is not None and name in configs:
            tuner.configs = configs[name]
        tuner.run = recording(name, tuner, tuner.run)


# --------------------------------------------------------------------------------------------
# The steps that run in a child process (``gpu_check.py --child NAME RECORD STEP ARGS...``): each
# prints its results as JSON lines, flushed as soon as each is known.


def start_recording(path: str, step: str) -> None:
    """Record moe_blocks' autotunings (``triton_backend.TUNED``) into ``path``, tagged ``step``;
    in the sweep, the 16-bit ones over the sweep's candidates (:data:`SWEEP`)."""
    import triton

    from moe_blocks.kernels import triton_backend

    configs = None
    if step == "sweep":
        configs = {
            "gather_gemm": [
                triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
                for m, n, k, w, s in SWEEP["gather_gemm"]
            ],
            "weight_grad": [
                triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, INNER_M=i), num_warps=w,
                              num_stages=s)
                for m, n, k, i, w, s in SWEEP["weight_grad"]
            ],
        }  # fmt: skip
    record_autotuning(Path(path), step, triton_backend.TUNED, configs)


def versions() -> None:
    """The versions this check runs with, and the device."""
    import torch
    import transformers
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"torch": torch.__version__, "triton": triton.__version__,
                      "transformers": transformers.__version__, "device": device,
                      "python": sys.version.split()[0]}))  # fmt: skip


def suite(device: str, tiny: str, tokens: str) -> None:
    """MoEMLP at a training size (forward+backward) and a decode size (forward) beside its
    baselines, then transformers' own experts implementations at the training size (last, so
    the rows above are out even if time runs short there): one JSON line per result."""
    from moe_blocks.models import bench

    table = bench.shapes_for(device, tiny == "1")
    decode, training = (int(t) for t in tokens.split(","))
    results = []

    def emit(rows) -> None:
        results.extend(rows)
        for row in bench.to_json(rows):
            print(json.dumps(row), flush=True)

    for count, backward in ((training, True), (decode, False)):
        for case in bench.cases("mlp", SUITE_SHAPES, [count], ["bf16"], device, table):
            emit(bench.run_case(case, backward, max_repeats=20, budget_s=3.0))
    hf_table = bench.hf_shapes(device, tiny == "1")
    for case in bench.cases("hf", SUITE_SHAPES, [training], ["bf16"], device, hf_table):
        emit(bench.run_case(case, True, bench.HF_IMPLEMENTATIONS, max_repeats=10, budget_s=2.0))
    print(bench.format_table(results), file=sys.stderr)


def sweep(device: str, tiny: str, tokens: str) -> None:
    """One forward+backward of MoEMLP per shape, autotuned over :data:`SWEEP`."""
    from moe_blocks.models import bench

    for shape in SUITE_SHAPES:
        dims = bench.shapes_for(device, tiny == "1")[shape]
        module, x = bench.build(bench.Case("mlp", shape, int(tokens), "bf16", device, dims),
                                "moe_blocks")  # fmt: skip
        bench.step_function(module, x, backward=True)()
        print(json.dumps({"shape": shape, "tokens": int(tokens)}), flush=True)


def model(which: str, device: str, tiny: str) -> None:
    """JetMoE-8B (random weights, bf16) forward+backward at a training batch, ours
    (``moe_blocks``) or transformers' JetMoeForCausalLM: median ms of 3 after a warm-up, peak
    memory, parameters."""
    import statistics

    import torch
    import transformers

    from moe_blocks.models.jetmoe import JetMoEConfig, JetMoEForCausalLM

    batch, length = (2, 32) if tiny == "1" else (2, 2048)
    dtype = torch.bfloat16
    config = JetMoEConfig.from_preset("tiny" if tiny == "1" else "jetmoe-8b")
    torch.manual_seed(0)
    if which == "moe_blocks":
        with torch.device("meta"):
            net = JetMoEForCausalLM(config, dtype=dtype)
        net.to_empty(device=device)
        net.init_weights()

        def loss(ids):
            return net(ids, labels=ids).loss
    else:
        skip = ("architectures", "model_type", "rope_parameters", "num_attention_heads")
        hf_config = transformers.JetMoeConfig(
            **{k: v for k, v in config.to_hf_dict().items() if k not in skip}
        )
        hf_config._attn_implementation = "sdpa"
        with torch.device(device):
            net = transformers.JetMoeForCausalLM(hf_config).to(dtype)

        def loss(ids):
            return net(input_ids=ids, labels=ids).loss

    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
    cuda = device == "cuda"
    times = []
    for _ in range(4):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        start = time.perf_counter()
        net.zero_grad(set_to_none=True)
        loss(ids).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    count = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values())
    print(json.dumps({"impl": which, "tokens": batch * length, "peak_gib": peak,
                      "parameters": count, "median_ms": statistics.median(times[1:])}))  # fmt: skip


CHILDREN = {"versions": versions, "suite": suite, "sweep": sweep, "model": model}
SUITE_SHAPES = ["jetmoe-8b", "fine-grained"]


def child(argv: list[str]) -> None:
    """A child process's body: ``argv`` = [step name, the autotune record's path ("-": none),
    the step's tag, its arguments...]."""
    name, record, step, *arguments = argv
    if record != "-":
        start_recording(record, step)
    CHILDREN[name](*arguments)


def child_command(name: str, arguments: list[str], record: Path | None = None,
                  step: str = "") -> list[str]:  # fmt: skip
    """The command line (after the interpreter) that runs the child ``name``."""
    return [str(Path(__file__).resolve()), "--child", name, str(record or "-"), step, *arguments]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_check", help="folder for the JSON and logs")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    parser.add_argument("--deadline-s", type=float, default=DEADLINE_S,
                        help="seconds the whole check may take (default %(default)s)")  # fmt: skip
    args = parser.parse_args()
    deadline = time.monotonic() + args.deadline_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pytest.log").unlink(missing_ok=True)
    autotune = out / "autotune.jsonl"
    autotune.unlink(missing_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    report: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": commit.stdout.strip() or "unknown",
    }

    def limit(step: str) -> int:
        """Seconds for ``step``: its own limit, or what is left before the deadline."""
        return int(min(LIMITS_S[step], deadline - time.monotonic() - RESERVE_S))

    with open(out / "gpu_check.log", "w") as sink:

        def save() -> None:
            report["autotunings_recorded"] = (
                len(autotune.read_text().splitlines()) if autotune.exists() else 0
            )
            report["failures"] = failures(report)
            (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env |= {"TRITON_DEFAULT_FP_FUSION": env.get("TRITON_DEFAULT_FP_FUSION", "1"),
                "PYTHONUNBUFFERED": "1"}  # fmt: skip
        ensure_importable(env, sink)
        report["versions"] = single(
            run_child(child_command("versions", []), env, limit("versions"), sink)
        )
        log(f"versions: {report['versions']}  commit {report['commit']}", sink)
        cuda = report["versions"].get("device", "cpu") != "cpu"
        if not cuda and not args.tiny:
            report["stopped"] = "no CUDA device (--tiny runs the smoke test without one)"
            save()
            log(f"FAILED: {'; '.join(report['failures'])}", sink)
            return 1
        device, tiny = ("cuda" if cuda else "cpu"), args.tiny
        if not cuda:
            env["TRITON_INTERPRET"] = "1"
        save()

        report["tests"] = {}
        test_steps = {"quick tests": QUICK_TESTS, "rest of the tests": REST_TESTS}
        if tiny:  # a smoke run: the plan tests alone
            test_steps = {"quick tests": ["tests/test_plan.py"]}
        if args.skip_tests:
            test_steps = {}

        def tests(step: str) -> None:
            if step in test_steps:
                report["tests"][step] = run_tests(
                    step, test_steps[step], env, limit(step), out, sink
                )
                save()

        def recorded(step: str, name: str, arguments: list[str]) -> dict:
            """Run the child ``name`` as ``step``, recording its autotunings."""
            command = child_command(name, arguments, autotune, step)
            return run_child(command, env, limit(step), sink)

        flag = "1" if tiny else "0"
        tokens = "4,16" if tiny else "8,16384"
        tests("quick tests")
        report["suite"] = recorded("suite", "suite", [device, flag, tokens])
        save()
        report["model"] = []
        for which in ("moe_blocks", "transformers"):
            result = {"impl": which} | single(recorded("model", "model", [which, device, flag]))
            report["model"].append(result)
            save()
            log(f"JetMoE forward+backward {which}: {result}", sink)
        tests("rest of the tests")
        if not tiny:  # the interpreter runs a single candidate: nothing to sweep
            report["sweep"] = recorded("sweep", "sweep", [device, flag, tokens.split(",")[1]])
            save()
        log(f"autotunings recorded in {autotune}: {report['autotunings_recorded']}", sink)
        log("\n" + summary_table(report), sink)
        if report["failures"]:
            log("FAILED: " + "; ".join(report["failures"]), sink)
    return 1 if report["failures"] else 0


def failures(report: dict) -> list[str]:
    """The steps of ``report`` that failed, in words (empty: every step passed). The sweep
    never fails the check."""
    found = []
    if "error" in report.get("versions", {}):
        found.append(f"the versions step: {report['versions']['error'][-300:]}")
    if "stopped" in report:
        found.append(report["stopped"])
    for step, tests in report.get("tests", {}).items():
        if tests["returncode"] != 0:
            found.append(f"{step} on the device: {tests['summary']}")
    suite = report.get("suite", {})
    if "error" in suite:
        found.append(f"the MoEMLP suite: {suite['error'].splitlines()[0][:200]}")
    for row in suite.get("rows", []):
        if row.get("error"):
            found.append(f"the MoEMLP suite's {row['impl']} at {row['shape']} {row['tokens']}")
    for row in report.get("model", []):
        if "error" in row:
            found.append(f"the JetMoE forward+backward step of {row['impl']}")
    return found


def summary_table(report: dict) -> str:
    lines = [f"GPU check, commit {report['commit']}, {report['versions']}"]
    for step, tests in report.get("tests", {}).items():
        lines.append(f"{step} on the device: {tests['summary']}")
    rows = report["suite"]["rows"]
    if rows:
        header = ("bf16", "experts", "pass", "tokens", "impl", "ms", "TFLOP/s", "x dense")
        lines.append("{:<6}{:<14}{:<8}{:>7}{:>16}{:>10}{:>9}{:>9}".format(*header))
    for row in rows:  # suite mlp: MoEMLP and its baselines; hf: transformers' experts
        passes = "fwd+bwd" if row["backward"] else "fwd"
        case = f"{row['suite']:<6}{row['shape']:<14}{passes:<8}{row['tokens']:>7}{row['impl']:>16}"
        if row["error"]:
            lines.append(f"{case}  error: {row['error'].splitlines()[0][:100]}")
        else:
            vs_dense = "-" if row["vs_dense"] is None else f"{row['vs_dense']:.2f}"
            lines.append(f"{case}{row['median_ms']:>10.2f}{row['tflops']:>9.1f}{vs_dense:>9}")
    if "error" in report["suite"]:
        lines.append(f"MoEMLP suite: error {report['suite']['error'][-300:]}")
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
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        sys.exit(main())
