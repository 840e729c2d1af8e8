"""The ``moe-blocks`` command line (also ``python -m moe_blocks``).

Subcommands:
    train     train a JetMoE-style model from a preset on text (default: the Python standard
              library's sources, as bytes), with progress, validation, checkpoints, a JSON log
              and a PNG of the loss curves and expert loads.
    generate  sample from a trained checkpoint given a prompt (in bytes, or with the tokenizer
              the checkpoint was trained with).
    info      a preset's architecture, total and active parameters, FLOPs per token.
    bench     time MoEMLP, MoA or a JetMoE layer beside transformers' modules, a grouped_mm
              pipeline, the dense roofline and (MLP, CPU) the floor of the experts' products
              alone; print a table, write JSON and a PNG.
    extend    add experts to every MoA and MoE of a checkpoint, closed so that its outputs are
              unchanged; train them with train --resume-from DIR --train-new-experts-only.
    prune     keep the experts a corpus uses most, write the smaller model (Hugging Face
              layout) and report its validation loss before and after.
    upcycle   turn a dense transformers checkpoint (Llama, Mistral, Qwen2, Qwen3) into its
              family's MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE) by copy, drop or granular.

It lives in the top layer (models/) because it drives the reference model; moe_blocks' own
modules never import it.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import fields
from pathlib import Path

import torch

from moe_blocks import __version__


def info(args: argparse.Namespace) -> int:
    from .jetmoe import JetMoEConfig, JetMoEForCausalLM
    from .train import TrainingError

    if args.context < 0:
        raise TrainingError(f"--context must be >= 0 tokens, got {args.context}")
    config = JetMoEConfig.from_preset(args.preset)
    with torch.device("meta"):
        model = JetMoEForCausalLM(config)
    forward = model.flops_per_token(args.context)
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
        ("parameters", f"{model.num_parameters():,}"),
        (
            "active parameters per token",
            f"{model.num_parameters(active=True):,} (with the embedding)",
        ),
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
    from .train import TrainSettings, train, validations
    from .train.run_folder import resumed_settings

    options = {f.name: getattr(args, f.name) for f in fields(TrainSettings) if f.name in args}
    if args.resume:  # the checkpoint's settings, but for the options given
        settings = resumed_settings(args.out, {name: options[name] for name in args.given})
    else:
        settings = TrainSettings(**options)
    result = train(settings, ep=args.ep, resume=args.resume, overwrite=args.overwrite,
                   progress=not args.quiet)  # fmt: skip
    if not result.main:  # the main process alone reports
        return 130 if result.interrupted else 0
    last = result.log[-1]
    print(
        f"validation: {result.start_bpb:.3f} -> {result.final_bpb:.3f} bits per byte"
        f" after {last['step']} steps; last train loss {last['lm_loss']:.3f} nats"
    )
    old = validations(result.log, "old_val_bpb")
    if old:
        print(f"validation on the old corpus: {old[0][1]:.3f} -> {old[-1][1]:.3f} bits per byte")
    print(
        f"checkpoint: {result.out / 'checkpoint'}  log: {result.out / 'log.json'}  "
        f"plot: {result.out / 'training.png'}"
        + (f"  model: {result.out / 'model'}" if (result.out / "model").is_dir() else "")
    )
    if result.interrupted:
        unfinished = last["step"] < settings.steps  # else only the last validation was cut
        hint = "; continue with --resume" if unfinished else f" at the last step ({last['step']})"
        print(f"interrupted: checkpoint saved{hint}", file=sys.stderr)
        return 130
    return 0


def generate_command(args: argparse.Namespace) -> int:
    from .train.sample import generate_text
    from .train.settings import check_positive_int

    if args.threads is not None:
        check_positive_int("--threads", args.threads)
        torch.set_num_threads(args.threads)
    text = generate_text(
        args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
    )  # fmt: skip
    sys.stdout.write(text + "\n")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from . import bench
    from .train import TrainingError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: this torch sees no CUDA device")
    if args.repeats < 1:
        raise TrainingError(f"--repeats must be >= 1, got {args.repeats}")
    if not args.budget > 0 or args.budget == float("inf"):
        raise TrainingError(f"--budget must be a positive number of seconds, got {args.budget}")
    try:
        given = args.tokens or ("8,256,2048" if args.suite == "ep" else "1,8,256,2048")
        tokens = [int(t) for t in given.split(",")]
    except ValueError:
        raise TrainingError(
            f"--tokens must be comma-separated integers, got {args.tokens!r}"
        ) from None
    if any(t < 1 for t in tokens):
        raise TrainingError("--tokens must be positive")
    shapes, dtypes = ([s.strip() for s in a.split(",")] for a in (args.shapes, args.dtypes))
    for dtype in dtypes:
        if dtype not in ("bf16", "fp32", "fp16"):
            raise TrainingError(f"--dtypes: {dtype!r} is not bf16, fp32 or fp16")
    try:
        import transformers  # noqa: F401  (the baselines)
    except ImportError:
        raise TrainingError("the baselines need transformers: pip install transformers") from None
    passes = {"fwd": (False,), "fwd+bwd": (True,), "both": (False, True)}[args.passes]
    timing = {"max_repeats": args.repeats, "budget_s": args.budget}
    if args.cold_caches and args.suite == "ep":
        raise TrainingError("--cold-caches applies to the block suites, not --suite ep")
    try:
        if args.suite == "ep":  # MoEMLP fwd+bwd, expert-parallel over 1, 2 and 4 processes
            results = bench.run_ep(shapes, tokens, dtypes, device, tiny=args.tiny, **timing)
        else:
            results = bench.run_suite(
                args.suite, shapes, tokens, dtypes, device, tiny=args.tiny, passes=passes,
                cold_caches=args.cold_caches, **timing,
            )  # fmt: skip
    except ValueError as error:
        raise TrainingError(str(error)) from None
    print(bench.format_ep_table(results) if args.suite == "ep" else bench.format_table(results))
    written = bench.write_results(results, args.suite, Path(args.out))
    print(f"wrote {' and '.join(str(path) for path in written)}")
    return 0


def extend_command(args: argparse.Namespace) -> int:
    from .train.continual import extend_checkpoint

    done = extend_checkpoint(
        args.checkpoint, args.out, add=args.add, init=args.init, data=args.data,
        seq_len=args.seq_len, seed=args.seed, overwrite=args.overwrite, tokenizer=args.tokenizer,
    )  # fmt: skip
    print(
        f"experts: {done.base_experts} -> {done.experts} in each of {done.blocks} blocks (MoA "
        f"and MoE); parameters {done.parameters_before:,} -> {done.parameters_after:,}"
    )
    print(
        f"new experts {done.base_experts}..{done.experts - 1} are closed (prior 0): "
        f"max |change in logits| on {done.checked_tokens:,} tokens = {done.max_logit_change:.2g}"
    )
    print(f"wrote {done.out}; train them with: moe-blocks train --resume-from {done.out} "
          "--train-new-experts-only --data NEW --out RUN")  # fmt: skip
    return 0


def prune_command(args: argparse.Namespace) -> int:
    from .train.continual import prune_checkpoint

    done = prune_checkpoint(
        args.checkpoint, args.out, keep_fraction=args.keep_fraction, data=args.data,
        batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len,
        overwrite=args.overwrite, tokenizer=args.tokenizer,
    )  # fmt: skip
    report, lost = done.report, done.report["share_of_assignments_lost"]
    kept = report["kept_experts"]
    print(
        f"experts: {len(next(iter(report['usage'].values())))} -> "
        f"{len(next(iter(kept.values())))} in each of {len(kept)} blocks; parameters "
        f"{report['parameters_before']:,} -> {report['parameters_after']:,}"
    )
    print(
        f"routed assignments on the usage windows that went to pruned experts: "
        f"{max(lost.values()):.1%} at most (block), {sum(lost.values()) / len(lost):.1%} mean"
    )
    print(
        f"validation: {report['val_bpb_before']:.3f} -> {report['val_bpb_after']:.3f} bits per byte"
    )
    print(f"wrote {done.out} (config.json, model.safetensors, prune.json)")
    return 0


def upcycle_command(args: argparse.Namespace) -> int:
    from .train.continual import upcycle_checkpoint

    options = {"router_std": args.router_std, "noise_std": args.noise_std, "seed": args.seed}
    options |= {name: value for name, value in (("drop_ratio", args.drop_ratio),
                ("granularity", args.granularity)) if value is not None}  # fmt: skip
    done = upcycle_checkpoint(
        args.dense, args.out, num_experts=args.experts, top_k=args.top_k, method=args.method,
        overwrite=args.overwrite, **options,
    )  # fmt: skip
    record = done.record
    print(
        f"{record['model_type']} -> {record['moe_model_type']}: {record['num_experts']} experts, "
        f"top-{record['top_k']}, method {record['method']}; max |change in logits| on "
        f"{record['checked_tokens']} random tokens = {record['max_logit_change']:.2g}"
    )
    print(f"wrote {done.out}")
    return 0


def _model_command(commands, name: str, summary: str, handler) -> argparse.ArgumentParser:
    """A subcommand that reads CHECKPOINT and writes a model into --out (extend, prune)."""
    parser = commands.add_parser(name, help=summary)
    parser.add_argument("checkpoint", help="a run folder (train's --out) or checkpoint")
    parser.add_argument("--out", required=True, help="folder for the new model")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    parser.add_argument(
        "--tokenizer",
        type=_tokenizer_option,
        metavar="DIR|bytes",
        help="how the text becomes ids, as for train (default: the checkpoint's own tokenizer "
        "when it has one, else bytes); written beside the new model",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a model in OUT")
    parser.set_defaults(handler=handler)
    return parser


class _Given(argparse.Action):
    """Stores an option's value (``const`` for a flag, ``nargs=0``) and adds its name to
    ``namespace.given``: ``train --resume`` takes the options not given from the checkpoint."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        namespace.given = namespace.given | {self.dest}


def _absolute(path: str) -> str:
    """A path option as an absolute path, so that the checkpoint's copy still names the same
    file from another working folder (``--resume``); an empty one stays empty (an error)."""
    return str(Path(path).resolve()) if path else path


def _tokenizer_option(value: str) -> str:
    """``--tokenizer``: ``bytes`` as it is, a folder as an absolute path."""
    from .train.tokens import BYTES

    return value if value == BYTES else _absolute(value)


def _absolute_sources(value: str) -> str:
    """``--decay-data`` with each PATH absolute (as :func:`_absolute`), ``stdlib`` kept;
    malformed parts are left for :meth:`TrainSettings.decay_sources` to report."""
    from .train.settings import BUILTIN_CORPUS

    parts = []
    for part in value.split(","):
        path, equals, weight = part.strip().rpartition("=")
        if equals and path and path != BUILTIN_CORPUS:
            part = f"{_absolute(path)}={weight}"
        parts.append(part)
    return ",".join(parts)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except flags and options that are unset by
    default (their help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    from .jetmoe import JetMoEConfig
    from .train import DEFAULT_WARMUP_STEPS, TrainingError, TrainSettings

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
    train_parser.set_defaults(given=frozenset())
    # The run's settings: with --resume, those not given are the checkpoint's.
    setting = functools.partial(train_parser.add_argument, action=_Given)
    setting("--preset", default=defaults.preset, help=", ".join(presets))
    setting("--data", type=_absolute, help="a text file or folder (default: Python's stdlib)")
    setting(
        "--tokenizer",
        type=_tokenizer_option,
        metavar="DIR|bytes",
        help="bytes (each byte a token), or a transformers tokenizer folder (default: "
        "--resume-from's own tokenizer when it has one, else bytes); the text is tokenized once "
        "into token files beside it, reused while neither changes",
    )
    train_parser.add_argument(
        "--out", default=defaults.out, help="output folder: checkpoint/, log.json, training.png"
    )
    setting("--steps", type=int, default=defaults.steps, help="training steps")
    setting("--batch-size", type=int, default=defaults.batch_size, help="windows per step")
    setting("--seq-len", type=int, default=defaults.seq_len, help="bytes per window")
    setting("--lr", type=float, default=defaults.lr, help="peak learning rate")
    setting(
        "--schedule",
        default=defaults.schedule,
        help="wsd (warmup, constant, linear decay), wsd-exp (the decay exponential: MiniCPM's, "
        "JetMoE's phase 2) or cosine",
    )
    setting(
        "--decay-fraction",
        type=float,
        default=defaults.decay_fraction,
        help="wsd, wsd-exp: the share of --steps that decays (phase 2)",
    )
    setting(
        "--min-lr-ratio",
        type=float,
        default=defaults.min_lr_ratio,
        help="the learning rate the schedule decays to, as a share of --lr",
    )
    setting(
        "--decay-data",
        type=_absolute_sources,
        metavar="PATH=WEIGHT[,...]",
        help="phase 2's data mixture: from the decay start on, each window is drawn from these "
        "texts (files or folders; stdlib: Python's standard library) in proportion to the "
        "weights; may name --data",
    )
    setting(
        "--warmup-steps",
        type=int,
        default=None,
        help=f"linear warmup steps (default: {DEFAULT_WARMUP_STEPS}, or --steps if fewer)",
    )
    setting("--eval-every", type=int, default=defaults.eval_every, help="validate every N steps")
    setting(
        "--checkpoint-every",
        type=int,
        default=defaults.checkpoint_every,
        help="save a checkpoint every N steps (and at the end, and on Ctrl-C)",
    )
    setting(
        "--keep-checkpoints",
        type=int,
        default=defaults.keep_checkpoints,
        help="how many checkpoints to keep: the newest in OUT/checkpoint, the K-1 before it in "
        "OUT/checkpoint.step-N (default: 1)",
    )
    setting("--seed", type=int, default=defaults.seed, help="initialisation and data order")
    setting("--threads", type=int, help="torch threads (default: torch's)")
    train_parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT up to --steps, with the checkpoint's settings for the "
        "options not given (--steps too); a given option that changes the data or the model "
        "(--preset, --data, --batch-size, --seq-len, --seed, ...) is refused. The learning-rate "
        "schedule depends on --steps (the default warmup, WSD's decay start): a larger --steps "
        "can give the steps done other rates than they had, so the run differs from a straight "
        "run of that length (a note on stderr says so; see docs/train.md)",
    )
    train_parser.add_argument(
        "--overwrite", action="store_true", help="replace the run in OUT, if there is one"
    )
    train_parser.add_argument(
        "--quiet", action="store_true", help="no progress bar (the summary still prints)"
    )
    setting(
        "--resume-from",
        type=_absolute,
        metavar="DIR",
        help="start from this model (a run folder or checkpoint) with a fresh optimizer at step "
        "0, instead of a preset; the corpus it was trained on, if known, is validated too "
        "(old_val_bpb)",
    )
    setting(
        "--train-new-experts-only",
        nargs=0,
        const=True,
        default=False,
        help="with --resume-from a checkpoint written by moe-blocks extend: train only the "
        "added experts (weights, gate rows, priors); everything else stays bit-identical",
    )
    setting(
        "--balance-loss",
        choices=["switch", "mutual_information", "load_concentration", "none"],
        help="every router's balance loss (default: the model's, switch); load_concentration "
        "concentrates routing on few experts before pruning",
    )
    setting(
        "--lora-rank",
        type=int,
        metavar="R",
        help="with --resume-from: train only LoRA adapters of rank R (PEFT; pip install "
        "'moe-blocks[lora]'); the base weights stay frozen and the experts run through "
        "moe-blocks' kernel; checkpoints hold the adapters, model/ the export (--lora-export)",
    )
    setting("--lora-alpha", type=float, metavar="ALPHA",
            help="the adapters add ALPHA/R · B·A (default: ALPHA = 2R)")  # fmt: skip
    setting(
        "--lora-targets",
        metavar="attention,experts",
        help="what the adapters adapt (default both): attention (kv_proj and the MoA experts' "
        "query and output projections) and experts (the MLP experts' [E, out, in] weights)",
    )
    setting(
        "--lora-export",
        choices=["merged", "adapters"],
        help="what OUT/model holds at the end: the merged model in the Hugging Face layout "
        "(default), or the adapters in PEFT's format (transformers' JetMoe names)",
    )
    setting(
        "--activation-checkpointing",
        nargs=0,
        const=True,
        default=False,
        help="recompute each layer's activations in backward instead of keeping them "
        "(less memory; one more forward pass of each layer per step)",
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
        "--max-new-tokens", type=int, default=300, help="tokens (bytes) to generate"
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
    bench_parser.add_argument(
        "--suite", default="mlp", choices=["expert_linear", "mlp", "moa", "layer", "ep", "hf"]
    )
    bench_parser.add_argument(
        "--shapes",
        default="jetmoe-8b,fine-grained",
        help="comma-separated: jetmoe-8b, mixtral, fine-grained, deepseek-v3",
    )
    bench_parser.add_argument(
        "--tokens",
        help="comma-separated counts (default: 1,8,256,2048, 1 being a decode step; --suite ep: "
        "8,256,2048, each divisible by its 1, 2 and 4 processes)",
    )
    bench_parser.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp32, fp16")
    bench_parser.add_argument("--passes", default="both", choices=["fwd", "fwd+bwd", "both"])
    bench_parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present")
    bench_parser.add_argument("--repeats", type=int, default=20, help="at most this many timings")
    bench_parser.add_argument("--budget", type=float, default=2.0, help="seconds per measurement")
    bench_parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    bench_parser.add_argument(
        "--cold-caches", action="store_true",
        help="read a buffer twice the last-level cache before every timed call: weights read "
        "from memory, as in a model larger than the caches (decode)",
    )  # fmt: skip
    bench_parser.add_argument("--out", default="runs/bench", help="folder for JSON and PNG")
    bench_parser.set_defaults(handler=bench_command)

    extend_parser = _model_command(
        commands,
        "extend",
        "add experts to a checkpoint without changing its outputs",
        extend_command,
    )
    extend_parser.add_argument(
        "--add", type=int, required=True, help="experts to add to every MoA and MoE"
    )
    extend_parser.add_argument(
        "--init",
        choices=["copy", "random"],
        default="copy",
        help="copy the most used experts, or draw new ones at the existing weights' scale",
    )
    extend_parser.add_argument(
        "--data",
        help="text whose validation part picks the experts to copy (default: the checkpoint's "
        "training corpus)",
    )
    extend_parser.add_argument("--seed", type=int, default=0, help="for --init random")

    prune_parser = _model_command(
        commands, "prune", "keep the experts a corpus uses most; write the smaller model",
        prune_command,
    )  # fmt: skip
    prune_parser.add_argument(
        "--data", help="the text whose usage decides (default: Python's stdlib)"
    )
    prune_parser.add_argument(
        "--keep-fraction",
        type=float,
        required=True,
        help="share of each block's experts to keep (the same count in every block: "
        "JetMoE's config has one num_local_experts)",
    )
    prune_parser.add_argument("--batches", type=int, default=8, help="usage and validation batches")
    prune_parser.add_argument("--batch-size", type=int, default=16, help="windows per batch")

    upcycle_parser = commands.add_parser(
        "upcycle", help="turn a dense transformers checkpoint into an MoE one (docs/upcycling.md)"
    )
    upcycle_parser.add_argument(
        "dense", help="a transformers checkpoint folder: Llama, Mistral, Qwen2 or Qwen3"
    )
    upcycle_parser.add_argument("--experts", type=int, required=True, help="experts per layer")
    upcycle_parser.add_argument("--top-k", type=int, required=True, help="experts per token")
    upcycle_parser.add_argument(
        "--method", default="copy", help="copy, drop (Drop-Upcycling) or granular"
    )
    upcycle_parser.add_argument(
        "--drop-ratio", type=float, help="drop: share of each expert's neurons redrawn (0.5)"
    )
    upcycle_parser.add_argument(
        "--granularity", type=int, help="granular: slices of the dense MLP (default: --top-k)"
    )
    upcycle_parser.add_argument(
        "--router-std", type=float, default=0.02, help="std of the router's weights (0: zeros)"
    )
    upcycle_parser.add_argument(
        "--noise-std", type=float, default=0.0, help="copy, granular: noise on each expert, "
        "relative to each dense matrix's std"
    )  # fmt: skip
    upcycle_parser.add_argument("--seed", type=int, default=0, help="for every random draw")
    upcycle_parser.add_argument("--out", required=True, help="folder for the MoE checkpoint")
    upcycle_parser.add_argument("--overwrite", action="store_true", help="replace a model in OUT")
    upcycle_parser.set_defaults(handler=upcycle_command)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except TrainingError as error:
        print(f"moe-blocks {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C: one line, the shell's status for SIGINT
        print(f"moe-blocks {args.command}: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
