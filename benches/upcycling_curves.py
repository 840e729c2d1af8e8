"""The upcycling demonstration behind docs/upcycling.md: does an upcycled MoE start where its
dense model ended, and pull ahead?

1. A small dense Llama (bytes as tokens) trains ``--dense-steps`` steps on the embedded corpus
   (the standard library's Python sources).
2. From there, for the same ``--steps`` further steps and the same batches: the dense model
   continues; its upcycled Mixtral (``moe_blocks.integrations.transformers.upcycle``, each
   method given) continues; and a Mixtral of the same shape trains from scratch. The MoE runs
   use transformers' modules with ``experts_implementation="moe_blocks"`` (our kernel), the
   router's aux loss included (``output_router_logits``).

Validation bits per byte are recorded every ``--eval-every`` steps; the JSON and a PNG go to
``--out``. Usage::

    python benches/upcycling_curves.py --out docs/upcycling
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _model(kind: str, args, **moe):
    import transformers

    shape = dict(
        vocab_size=256, hidden_size=args.d_model, intermediate_size=args.d_ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
    )  # fmt: skip
    if kind == "dense":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    config = transformers.MixtralConfig(**shape, **moe, output_router_logits=True)
    return transformers.MixtralForCausalLM(config)


def _train(model, corpus, args, first_step: int, steps: int, label: str) -> list[dict]:
    """``steps`` AdamW steps from batch ``first_step`` on; validation every ``eval_every``."""
    from moe_blocks.models.train.data import batch_at

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    warmup = torch.optim.lr_scheduler.LambdaLR(  # the same linear warmup in every phase
        optimizer, lambda step: min(1.0, (step + 1) / args.warmup)
    )
    curve, started = [], time.perf_counter()
    for step in range(steps + 1):
        if step % args.eval_every == 0 or step == steps:
            curve.append({"step": step, "val_bpb": _validate(model, corpus, args)})
            print(f"{label:>24s} step {step:5d}  val {curve[-1]['val_bpb']:.4f} bpb", flush=True)
        if step == steps:
            break
        model.train()
        batch = batch_at(corpus.train, first_step + step, args.seed, args.batch_size, args.seq_len)
        out = model(batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        warmup.step()
    curve[-1]["seconds"] = time.perf_counter() - started
    return curve


@torch.no_grad()
def _validate(model, corpus, args) -> float:
    from moe_blocks.models.train.data import batch_at

    model.eval()
    losses = []
    for index in range(args.eval_batches):
        batch = batch_at(corpus.validation, index, 12345, args.batch_size, args.seq_len)
        logits = model(batch[:, :-1]).logits  # the language-model loss alone, no aux loss
        losses.append(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item())
    return sum(losses) / len(losses) / math.log(2)  # nats per byte -> bits per byte


def main(argv: list[str] | None = None) -> dict:
    from moe_blocks.integrations.transformers import register, upcycle
    from moe_blocks.models.train.data import load_corpus

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for upcycling.json and .png")
    parser.add_argument("--dense-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=600, help="steps after the dense phase")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--d-ffn", type=int, default=352)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--methods", default="copy,drop", help="comma-separated")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50, help="linear warmup steps per phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    register()
    corpus = load_corpus(None, args.seq_len)
    torch.manual_seed(args.seed)
    dense = _model("dense", args)
    curves = {"dense (phase 1)": _train(dense, corpus, args, 0, args.dense_steps, "dense phase 1")}
    start = args.dense_steps
    moe_shape = {"num_local_experts": args.experts, "num_experts_per_tok": args.top_k}
    for method in args.methods.split(","):
        options = {"granularity": 2} if method == "granular" else {}
        moe = upcycle(dense, num_experts=args.experts, top_k=args.top_k, method=method,
                      seed=args.seed, **options)  # fmt: skip
        moe.config.output_router_logits = True
        moe.set_experts_implementation("moe_blocks")
        label = f"upcycled ({method})"
        curves[label] = _train(moe, corpus, args, start, args.steps, label)
    torch.manual_seed(args.seed + 1)
    scratch = _model("moe", args, **moe_shape)
    scratch.set_experts_implementation("moe_blocks")
    curves["MoE from scratch"] = _train(
        scratch, corpus, args, start, args.steps, "MoE from scratch"
    )
    curves["dense (continued)"] = _train(dense, corpus, args, start, args.steps, "dense continued")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    result = {
        "settings": vars(args), "commit": commit,
        "machine": _cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "curves": curves,
        "parameters": {"dense": sum(p.numel() for p in dense.parameters()),
                       "moe": sum(p.numel() for p in scratch.parameters())},
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "upcycling.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot(result, out / "upcycling.png")
    return result


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = result["settings"]["dense_steps"]
    figure, axis = plt.subplots(figsize=(8, 5))
    for label, curve in result["curves"].items():
        offset = 0 if label == "dense (phase 1)" else start
        axis.plot([p["step"] + offset for p in curve], [p["val_bpb"] for p in curve], label=label,
                  linestyle="--" if "scratch" in label else "-")  # fmt: skip
    axis.axvline(start, color="grey", linewidth=0.8)
    axis.set_xlabel("step (batches of the same corpus)")
    axis.set_ylabel("validation bits per byte")
    axis.set_ylim(top=min(4.0, axis.get_ylim()[1]))
    axis.legend()
    axis.set_title("Upcycling a dense Llama into a Mixtral (moe_blocks experts)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
