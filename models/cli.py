"""The ``moe-blocks`` command line (also ``python -m moe_blocks``).

Subcommands:
    train     train a JetMoE-style model from a preset on text (default: the Python standard
              library's sources, as bytes), with progress, validation, checkpoints, a JSON log
              and a PNG of the loss curves and expert loads.
    generate  sample from a trained checkpoint given a prompt.
    info      a preset's architecture, total and active parameters, FLOPs per token.
    bench     time MoEMLP, MoA or a JetMoE layer beside transformers' modules, a grouped_mm
              pipeline and the dense roofline; print a table, write JSON and a PNG.

It lives in the top layer (models/) because it drives the reference model; moe_blocks' own
modules never import it.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import torch

from moe_blocks import __version__


def info(args: argparse.Namespace) -> int:
    from .jetmoe import JetMoEConfig, JetMoEForCausalLM

    config = JetMoEConfig.from_preset(args.preset)
    with torch.device("meta"):
        model = JetMoEForCausalLM(config)
    total, active = model.num_parameters(), model.num_parameters(active=True)
    embedding = config.vocab_size * config.hidden_size
    attention_width = config.num_experts_per_tok * config.num_key_value_heads * config.kv_channels
    # Forward FLOPs per token: 2 per active weight used in a matmul (the embedding is a lookup;
    # the LM head is a matmul even when tied), plus QK^T and AV over a context of --context.
    matmul_weights = active - embedding + config.vocab_size * config.hidden_size
    attention = 4 * config.num_hidden_layers * args.context * attention_width
    forward = 2 * matmul_weights + attention
    rows = [
        ("preset", args.preset),
        ("layers", config.num_hidden_layers),
        ("d_model (hidden_size)", config.hidden_size),
        (
            "experts, top-k (MoA and MoE)",
            f"{config.num_local_experts}, {config.num_experts_per_tok}",
        ),
        ("KV heads x head size", f"{config.num_key_value_heads} x {config.kv_channels}"),
        ("query heads per token", config.num_experts_per_tok * config.num_key_value_heads),
        ("expert ffn size", config.intermediate_size),
        ("vocabulary", config.vocab_size),
        ("tied embeddings", config.tie_word_embeddings),
        ("parameters", f"{total:,}"),
        ("active parameters per token", f"{active:,} (with the embedding)"),
        (f"forward FLOPs per token (context {args.context})", _flops(forward)),
        ("training FLOPs per token (3x forward)", _flops(3 * forward)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _flops(value: float) -> str:
    return f"{value / 1e9:,.2f} GFLOP" if value >= 1e9 else f"{value / 1e6:,.2f} MFLOP"


def train_command(args: argparse.Namespace) -> int:
    from .parallel import is_sharded_checkpoint, launched_by_torchrun, train_sharded
    from .train import TrainSettings, train

    settings = TrainSettings(
        preset=args.preset, data=args.data, out=args.out, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, schedule=args.schedule,
        warmup_steps=args.warmup_steps, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, seed=args.seed, threads=args.threads,
    )  # fmt: skip
    options = {"resume": args.resume, "overwrite": args.overwrite, "progress": not args.quiet}
    resumes_sharded = args.resume and is_sharded_checkpoint(Path(args.out) / "checkpoint")
    sharded = args.ep != 1 or launched_by_torchrun() or resumes_sharded
    if sharded:
        result = train_sharded(settings, ep=args.ep, **options)
        if int(os.environ.get("RANK", 0)):  # rank 0 alone reports
            return 130 if result.interrupted else 0
    else:
        result = train(settings, **options)
    lm = [entry["lm_loss"] for entry in result.log if "lm_loss" in entry]
    print(
        f"validation: {result.start_bpb:.3f} -> {result.final_bpb:.3f} bits per byte"
        f" after {len(lm)} steps; last train loss {lm[-1] if lm else float('nan'):.3f} nats"
    )
    print(
        f"checkpoint: {result.out / 'checkpoint'}  log: {result.out / 'log.json'}  "
        f"plot: {result.out / 'training.png'}"
        + (f"  model (Hugging Face layout): {result.out / 'model'}" if sharded else "")
    )
    if result.interrupted:
        print("interrupted: checkpoint saved; continue with --resume", file=sys.stderr)
        return 130
    return 0


def generate_command(args: argparse.Namespace) -> int:
    from .jetmoe import JetMoEForCausalLM
    from .train import TrainingError, check_positive_int, checkpoint_folder

    if not args.temperature >= 0:
        raise TrainingError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.threads is not None:
        check_positive_int("--threads", args.threads)
        torch.set_num_threads(args.threads)
    prompt = args.prompt.encode()
    if not prompt:
        raise TrainingError("--prompt must not be empty")
    try:
        model = JetMoEForCausalLM.from_pretrained(checkpoint_folder(args.checkpoint)).eval()
    except (FileNotFoundError, ValueError) as error:
        raise TrainingError(f"--checkpoint: {error}") from None
    if model.config.vocab_size != 256:
        raise TrainingError(
            f"--checkpoint {args.checkpoint}: vocabulary {model.config.vocab_size}, "
            "not a byte-level model trained by moe-blocks"
        )
    ids = torch.tensor([list(prompt)])
    generator = torch.Generator().manual_seed(args.seed)
    try:
        out = model.generate(
            ids,
            args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature,
            top_k=args.top_k,
            generator=generator,
        )
    except ValueError as error:
        raise TrainingError(str(error)) from None
    sys.stdout.write(bytes(out[0].tolist()).decode("utf-8", errors="replace") + "\n")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from . import bench
    from .train import TrainingError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        raise TrainingError(
            f"--tokens must be comma-separated integers, got {args.tokens!r}"
        ) from None
    if any(t < 1 for t in tokens):
        raise TrainingError("--tokens must be positive")
    shapes, dtypes = args.shapes.split(","), args.dtypes.split(",")
    for dtype in dtypes:
        if dtype not in ("bf16", "fp32", "fp16"):
            raise TrainingError(f"--dtypes: {dtype!r} is not bf16, fp32 or fp16")
    try:
        import transformers  # noqa: F401  (the baselines)
    except ImportError:
        raise TrainingError("the baselines need transformers: pip install transformers") from None
    passes = {"fwd": (False,), "fwd+bwd": (True,), "both": (False, True)}[args.passes]
    timing = {"max_repeats": args.repeats, "budget_s": args.budget}
    try:
        if args.suite == "ep":  # MoEMLP fwd+bwd, expert-parallel over 1, 2 and 4 processes
            results = bench.run_ep(shapes, tokens, dtypes, device, tiny=args.tiny, **timing)
        else:
            results = bench.run_suite(
                args.suite, shapes, tokens, dtypes, device, tiny=args.tiny, passes=passes,
                **timing,
            )  # fmt: skip
    except ValueError as error:
        raise TrainingError(str(error)) from None
    print(bench.format_ep_table(results) if args.suite == "ep" else bench.format_table(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_{args.suite}.json").write_text(json.dumps(bench.to_json(results), indent=1))
    if args.suite == "ep":
        print(f"wrote {out / 'bench_ep.json'}")
        return 0
    bench.plot(results, out / f"bench_{args.suite}.png")
    print(f"wrote {out / f'bench_{args.suite}.json'} and {out / f'bench_{args.suite}.png'}")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except flags and options that are unset by
    default (their help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    from .jetmoe import JetMoEConfig
    from .train import TrainingError, TrainSettings

    presets = list(JetMoEConfig.PRESETS)
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(
        prog="moe-blocks", description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=functools.partial(argparse.ArgumentParser, formatter_class=_HelpFormatter),
    )

    train_parser = commands.add_parser("train", help="train a JetMoE-style model on text")
    train_parser.add_argument("--preset", default=defaults.preset, help=", ".join(presets))
    train_parser.add_argument("--data", help="a text file or folder (default: Python's stdlib)")
    train_parser.add_argument(
        "--out", default=defaults.out, help="output folder: checkpoint/, log.json, training.png"
    )
    train_parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
    train_parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="windows per step"
    )
    train_parser.add_argument(
        "--seq-len", type=int, default=defaults.seq_len, help="bytes per window"
    )
    train_parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    train_parser.add_argument("--schedule", default=defaults.schedule, help="wsd or cosine")
    train_parser.add_argument(
        "--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warmup steps"
    )
    train_parser.add_argument(
        "--eval-every", type=int, default=defaults.eval_every, help="validate every N steps"
    )
    train_parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=defaults.checkpoint_every,
        help="save a checkpoint every N steps (and at the end, and on Ctrl-C)",
    )
    train_parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="initialisation and data order"
    )
    train_parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    train_parser.add_argument(
        "--resume", action="store_true", help="continue the run in OUT up to --steps"
    )
    train_parser.add_argument(
        "--overwrite", action="store_true", help="replace the run in OUT, if there is one"
    )
    train_parser.add_argument(
        "--quiet", action="store_true", help="no progress bar (the summary still prints)"
    )
    train_parser.add_argument(
        "--ep",
        type=int,
        default=1,
        help="expert-parallel size: under torchrun, shard the MoE experts over groups of EP "
        "processes (the rest is data parallel); see docs/parallel.md",
    )
    train_parser.set_defaults(handler=train_command)

    generate_parser = commands.add_parser("generate", help="sample from a trained checkpoint")
    generate_parser.add_argument(
        "--checkpoint",
        default=defaults.out,
        help="a run folder (train's --out) or the checkpoint folder in it",
    )
    generate_parser.add_argument("--prompt", default="def ", help="text to continue")
    generate_parser.add_argument(
        "--max-new-tokens", type=int, default=300, help="bytes to generate"
    )
    generate_parser.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0: greedy"
    )
    generate_parser.add_argument(
        "--top-k", type=int, help="sample from the k likeliest bytes (default: all)"
    )
    generate_parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate_parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    generate_parser.set_defaults(handler=generate_command)

    info_parser = commands.add_parser("info", help="a preset's size and cost")
    info_parser.add_argument(
        "preset", nargs="?", default="jetmoe-8b", choices=presets, help="the preset"
    )
    info_parser.add_argument("--context", type=int, default=4096, help="tokens of context")
    info_parser.set_defaults(handler=info)

    bench_parser = commands.add_parser("bench", help="benchmark a block beside its baselines")
    bench_parser.add_argument("--suite", default="mlp", choices=["mlp", "moa", "layer", "ep"])
    bench_parser.add_argument(
        "--shapes",
        default="jetmoe-8b,fine-grained",
        help="comma-separated: jetmoe-8b, mixtral, fine-grained, deepseek-v3",
    )
    bench_parser.add_argument("--tokens", default="8,256,2048", help="comma-separated counts")
    bench_parser.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp32, fp16")
    bench_parser.add_argument("--passes", default="both", choices=["fwd", "fwd+bwd", "both"])
    bench_parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present")
    bench_parser.add_argument("--repeats", type=int, default=20, help="at most this many timings")
    bench_parser.add_argument("--budget", type=float, default=2.0, help="seconds per measurement")
    bench_parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    bench_parser.add_argument("--out", default="runs/bench", help="folder for JSON and PNG")
    bench_parser.set_defaults(handler=bench_command)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except TrainingError as error:
        print(f"moe-blocks {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
