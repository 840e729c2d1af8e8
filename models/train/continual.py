"""Runs that start from another model: ``--resume-from``, ``--train-new-experts-only``,
``--balance-loss``, and the ``extend`` and ``prune`` workflows that write such models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from moe_blocks import (
    FrozenExperts,
    add_experts,
    expert_blocks,
    expert_usage,
    freeze_experts,
    prune_experts,
)
from moe_blocks.modular import most_used
from moe_blocks.router import named_routers

from ..jetmoe import JetMoEConfig, JetMoEForCausalLM
from .data import (
    Corpus,
    batch_at,
    evaluate,
    load_corpus,
    same_path,
    validation_starts,
    windows,
)
from .lora import ADAPTER_CONFIG
from .run_folder import (
    EXPORT_FILE,
    check_not_a_file,
    checkpoint_folder,
    is_model_folder,
    load_model,
    load_trainer_state,
    read_json,
    write_checkpoint,
)
from .settings import (
    TrainingError,
    TrainSettings,
    check_path_given,
    check_positive_int,
    is_int,
    message_lines,
)
from .tokens import TOKENIZER_FILES, check_vocabulary, copy_tokenizer_files, load_tokenizer


def starting_model(settings: TrainSettings, origin: Origin | None) -> JetMoEForCausalLM:
    """The weights a new run starts from: the ``--resume-from`` model, or a new one from
    ``--seed`` (the same on every process)."""
    if origin is not None:
        return load_model(origin.checkpoint, "--resume-from")
    torch.manual_seed(settings.seed)
    return JetMoEForCausalLM(JetMoEConfig.from_preset(settings.preset, **settings.overrides))


EXTENSION_FILE = "extension.json"  # written by moe-blocks extend beside the checkpoint


EXTENSION_FORMAT = "moe-blocks-extend/1"


def read_extension(checkpoint: Path) -> dict | None:
    """The record ``moe-blocks extend`` wrote beside a checkpoint, or None."""
    path = checkpoint / EXTENSION_FILE
    if not path.is_file():
        return None
    record = read_json(path, dict)
    if record.get("format") != EXTENSION_FORMAT:
        raise TrainingError(f"{path}: format {record.get('format')!r}, not {EXTENSION_FORMAT!r}")
    counts = record.get("base_experts"), record.get("added")
    data = record.get("previous_data")
    if not all(is_int(count) and count >= 1 for count in counts) or not (
        data is None or isinstance(data, str)
    ):
        raise TrainingError(
            f"{path}: not a record of moe-blocks extend (base_experts and added counts, "
            "previous_data a path or null)"
        )
    return record


def previous_data(checkpoint: Path) -> tuple[bool, str | None]:
    """``(known, data)``: the ``--data`` a checkpoint was trained on (None: the standard
    library), from its extension record or its trainer state; ``known`` is False when neither
    says."""
    extension = read_extension(checkpoint)
    if extension is not None and "previous_data" in extension:
        return True, extension["previous_data"]
    state = checkpoint
    if (
        checkpoint.name in ("model", "model.previous")
        and not (checkpoint / "trainer_state.json").is_file()
    ):
        state = checkpoint.parent / "checkpoint"  # a torchrun or LoRA run's export: its run's
    if (state / "trainer_state.json").is_file():
        return True, load_trainer_state(state).settings.data
    return False, None


@dataclass
class Origin:
    """Where a ``--resume-from`` run starts: the checkpoint, the experts that ``moe-blocks
    extend`` added to it (if any) and the corpus it was trained on (when known and not the
    run's own: the "old" corpus whose validation is logged too, as ``old_val_bpb``)."""

    checkpoint: Path
    new_experts: range | None
    previous: Corpus | None
    previous_name: str

    def summary(self, settings: TrainSettings) -> str:
        lines = [f"from:   {self.checkpoint}"]
        if settings.train_new_experts_only:
            first, last = self.new_experts[0], self.new_experts[-1]
            lines.append(
                f"train:  only experts {first}..{last} of every MoA and MoE; the rest frozen"
            )
        if self.previous is not None:
            lines.append(f"old:    {self.previous_name} (validated too, as old_val_bpb)")
        return "\n".join(lines)


def load_origin(settings: TrainSettings, tokenizer=None) -> Origin | None:
    """Check ``--resume-from`` (and ``--train-new-experts-only``) before anything runs; the
    corpus it was trained on, when known, is read in the run's ``tokenizer``."""
    if settings.resume_from is None:
        return None
    checkpoint = checkpoint_folder(settings.resume_from)
    if not is_model_folder(checkpoint):
        raise TrainingError(
            f"--resume-from {settings.resume_from}: no checkpoint there (config.json missing)"
        )
    extension = read_extension(checkpoint)
    new_experts = None
    if extension is not None:
        new_experts = range(
            extension["base_experts"], extension["base_experts"] + extension["added"]
        )
    if settings.train_new_experts_only and new_experts is None:
        raise TrainingError(
            f"--train-new-experts-only: {checkpoint} has no new experts ({EXTENSION_FILE} "
            "missing): add some with moe-blocks extend CHECKPOINT --add N --out DIR"
        )
    known, data = previous_data(checkpoint)
    previous = None
    if known and not same_path(data, settings.data):
        previous = load_corpus(data, settings.seq_len, tokenizer=tokenizer)
    name = "Python's standard library" if data is None else str(data)
    return Origin(checkpoint, new_experts, previous, name)


def prepare_model(model, settings: TrainSettings, origin: Origin | None) -> FrozenExperts | None:
    """Apply ``--balance-loss`` to every router; with ``--train-new-experts-only`` freeze all
    but the new experts (their weights, gate rows and priors): returns the
    :class:`~moe_blocks.FrozenExperts` (its hooks keep the frozen rows through every step)."""
    if settings.balance_loss is not None:
        for router in named_routers(model).values():
            router.balance_loss = settings.balance_loss
    if not settings.train_new_experts_only:
        return None
    routers = [r for r in named_routers(model).values() if r.expert_prior is not None]
    other = sorted({r.balance_loss for r in routers if r.balance_loss != "switch"})
    if other or any(r.aux_loss_coef == 0 for r in routers):
        cause, fix = (
            (f"--balance-loss {other[0]}", "train with --balance-loss switch")
            if other
            else ("an aux loss coefficient of 0", "give the model's routers an aux_loss_coef > 0")
        )
        raise TrainingError(
            "--train-new-experts-only: the new experts are closed (expert prior 0) and open "
            f"only through the Switch balance loss's gradient on their priors; with {cause} no "
            f"token ever reaches them: {fix}"
        )
    model.requires_grad_(False)
    for block in expert_blocks(model).values():
        for param in (block.input_linear.weight, block.output_linear.weight):
            param.requires_grad_(True)
        block.router.requires_grad_(True)
    return freeze_experts(model, trainable_experts=list(origin.new_experts))


def check_overwrite_keeps_origin(
    settings: TrainSettings, origin: Origin | None, *, overwrite: bool
) -> None:
    """Refuse an ``--overwrite`` of ``--out`` that would delete the ``--resume-from`` model."""
    out = Path(settings.out)
    if overwrite and origin is not None and out.resolve() in origin.checkpoint.resolve().parents:
        raise TrainingError(
            f"--resume-from {settings.resume_from} lies in --out {out}, which --overwrite "
            "would delete: write the new run elsewhere"
        )


def validate(
    model, corpus: Corpus, settings: TrainSettings, origin: Origin | None, **evaluation
) -> dict:
    """``val_bpb`` on the run's corpus, and ``old_val_bpb`` on the corpus the starting
    checkpoint was trained on when there is one; ``evaluation``: :func:`evaluate`'s options."""
    result = {"val_bpb": evaluate(model, corpus, settings, **evaluation)}
    if origin is not None and origin.previous is not None:
        result["old_val_bpb"] = evaluate(model, origin.previous, settings, **evaluation)
    return result


# --------------------------------------------------------------------------------------------
# moe-blocks extend and moe-blocks prune: a checkpoint in, a new model written to a folder


def new_output_folder(path: str, overwrite: bool) -> Path:
    """``--out`` as a Path, refused if it is a file, already holds a model (unless
    ``overwrite``), or holds files that are not a model's (writing replaces the whole folder,
    :func:`write_checkpoint`); checked before any work."""
    check_path_given("--out", path, "a folder")
    out = Path(path)
    check_not_a_file(out)
    if not out.is_dir():
        return out
    if is_model_folder(out) and not overwrite:
        raise TrainingError(f"--out {out} already holds a model: choose another or --overwrite")
    others = sorted(p.name for p in out.iterdir() if not _model_file(p))
    if others:
        raise TrainingError(
            f"--out {out} holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}, "
            "not a model's files: writing replaces the whole folder; choose a new or empty one"
        )
    return out


def _model_file(path: Path) -> bool:
    """Whether ``path`` is a file that the model folders written here hold (weights, configs,
    tokenizer files, the records of extend, prune, upcycle and a run's export)."""
    name = path.name
    return path.is_file() and (
        name.endswith((".safetensors", ".safetensors.index.json"))
        or name
        in {
            "config.json",
            "generation_config.json",
            ADAPTER_CONFIG,
            EXPORT_FILE,
            EXTENSION_FILE,
            "prune.json",
            UPCYCLE_FILE,
            *TOKENIZER_FILES,
        }  # fmt: skip
    )


def validation_windows(data: str | None, seq_len: int, tokenizer) -> list[torch.Tensor]:
    """A few input windows ``[batch, seq_len]`` from the validation text of ``data``, as the
    ids of ``tokenizer`` (None: bytes)."""
    settings = TrainSettings(batch_size=8, seq_len=seq_len, eval_batches=4)
    corpus = load_corpus(data, settings.seq_len, tokenizer=tokenizer)
    return [
        windows(corpus.validation, starts, settings.seq_len)[:, :-1]
        for starts in validation_starts(corpus, settings)
    ]


@dataclass
class Extension:
    """What :func:`extend_checkpoint` did: the expert counts, the blocks, the parameter counts,
    and the largest change of the logits on ``checked_tokens`` tokens (closed experts: ~0)."""

    out: Path
    base_experts: int
    experts: int
    blocks: int
    parameters_before: int
    parameters_after: int
    checked_tokens: int
    max_logit_change: float


def model_and_tokenizer(checkpoint: str, tokenizer: str | None) -> tuple[Path, object, object]:
    """The folder, model and tokenizer (None: bytes) of ``extend``'s and ``prune``'s
    CHECKPOINT: ``tokenizer`` as ``train --tokenizer`` (None: the checkpoint's own when it has
    one), checked against the model's vocabulary."""
    source = checkpoint_folder(checkpoint)
    model = load_model(source, "CHECKPOINT")
    text_tokenizer = load_tokenizer(tokenizer, source)
    check_vocabulary(text_tokenizer, model.config.vocab_size, f"CHECKPOINT {source}")
    return source, model, text_tokenizer


def _write_model(
    folder: Path, model, tokenizer_folder: str | None, record_name: str, record: dict
) -> None:
    """Write ``model``, the tokenizer files found in ``tokenizer_folder`` (None: none) and the
    JSON ``record`` as ``folder`` in one step (:func:`write_checkpoint`): extend's, prune's
    and upcycle's output."""

    def write(target: Path) -> None:
        model.save_pretrained(target)
        copy_tokenizer_files(tokenizer_folder, target)
        (target / record_name).write_text(json.dumps(record, indent=1) + "\n")

    write_checkpoint(folder, write)


def _name(tokenizer) -> str | None:
    """The folder ``tokenizer`` was loaded from (None: bytes)."""
    return None if tokenizer is None else tokenizer.name_or_path


def extend_checkpoint(
    checkpoint: str, out: str, *, add: int, init: str = "copy", data: str | None = None,
    seq_len: int = 128, seed: int = 0, overwrite: bool = False, tokenizer: str | None = None,
) -> Extension:  # fmt: skip
    """Add ``add`` closed experts (prior 0: the outputs stay the same) to every MoA and MoE of
    ``checkpoint`` and write the model with its ``extension.json`` record (and its tokenizer,
    :func:`model_and_tokenizer`) to ``out``; ``init`` "copy" copies the experts the validation
    text of ``data`` (default: the checkpoint's corpus) uses most, "random" draws new ones
    (seeded by ``seed``)."""
    check_positive_int("--add", add)
    check_positive_int("--seq-len", seq_len)
    folder = new_output_folder(out, overwrite)
    source, model, text_tokenizer = model_and_tokenizer(checkpoint, tokenizer)
    known, previous = previous_data(source)
    blocks = expert_blocks(model)
    base_experts = model.config.num_local_experts
    sample = validation_windows(previous if data is None else data, seq_len, text_tokenizer)
    sources = {}
    if init == "copy":
        if data is None and not known:
            raise TrainingError(
                f"{source}: unknown training corpus; give --data to find the most used experts "
                "to copy, or --init random"
            )
        usage = expert_usage(model, sample)
        sources = {name: most_used(usage[name], add) for name in blocks}
    torch.manual_seed(seed)
    with torch.no_grad():
        before = model(sample[0]).logits
    parameters = model.num_parameters()
    for name, block in blocks.items():
        add_experts(block, add, init=init, source=sources.get(name))
    model.config.num_local_experts += add
    model.config.expert_prior = True
    with torch.no_grad():
        change = (model(sample[0]).logits - before).abs().max().item()
    record = {
        "format": EXTENSION_FORMAT, "base_experts": base_experts, "added": add, "init": init,
        "sources": sources, "base_checkpoint": str(source),
    }  # fmt: skip
    if known:
        record["previous_data"] = previous
    _write_model(folder, model, _name(text_tokenizer), EXTENSION_FILE, record)
    return Extension(folder, base_experts, model.config.num_local_experts, len(blocks),
                     parameters, model.num_parameters(), sample[0].numel(), change)  # fmt: skip


@dataclass
class Pruning:
    """What :func:`prune_checkpoint` wrote to ``out/prune.json`` (``report``), and ``out``."""

    out: Path
    report: dict


def prune_checkpoint(
    checkpoint: str, out: str, *, keep_fraction: float, data: str | None = None,
    batches: int = 8, batch_size: int = 16, seq_len: int = 128, overwrite: bool = False,
    tokenizer: str | None = None,
) -> Pruning:  # fmt: skip
    """Keep the ``keep_fraction`` of each block's experts that ``batches`` training batches of
    ``data`` (default: the standard library) use most, write the smaller model and
    ``prune.json`` (kept experts, usage, the share of assignments lost, validation before and
    after, parameter counts), and its tokenizer (:func:`model_and_tokenizer`), to ``out``. A
    router left with every prior at 1 becomes the plain router (no prior), exactly."""
    for flag, value in (("--batches", batches), ("--batch-size", batch_size),
                        ("--seq-len", seq_len)):  # fmt: skip
        check_positive_int(flag, value)
    if not 0 < keep_fraction <= 1:
        raise TrainingError(f"--keep-fraction must lie in (0, 1], got {keep_fraction}")
    folder = new_output_folder(out, overwrite)
    _, model, text_tokenizer = model_and_tokenizer(checkpoint, tokenizer)
    config = model.config
    keep = round(config.num_local_experts * keep_fraction)
    if keep < config.num_experts_per_tok:
        raise TrainingError(
            f"--keep-fraction {keep_fraction} keeps {keep} of {config.num_local_experts} "
            f"experts, fewer than the {config.num_experts_per_tok} each token uses"
        )
    settings = TrainSettings(batch_size=batch_size, seq_len=seq_len, eval_batches=batches)
    corpus = load_corpus(data, seq_len, tokenizer=text_tokenizer)
    usage = expert_usage(
        model,
        [batch_at(corpus.train, step, 0, batch_size, seq_len)[:, :-1] for step in range(batches)],
    )
    bpb_before, parameters = evaluate(model, corpus, settings), model.num_parameters()
    kept = {name: sorted(most_used(counts, keep)) for name, counts in usage.items()}
    lost = {
        name: 1 - usage[name][kept[name]].sum().item() / max(1, usage[name].sum().item())
        for name in usage
    }
    for name, block in expert_blocks(model).items():
        prune_experts(block, kept[name])
        prior = block.router.expert_prior
        if prior is not None and bool((prior == 1).all()):
            block.router.expert_prior = None  # all open at 1: the plain router, exactly
    config.num_local_experts = keep
    config.expert_prior = any(r.expert_prior is not None for r in named_routers(model).values())
    bpb_after = evaluate(model, corpus, settings)
    report = {
        "data": data, "keep_fraction": keep_fraction, "kept_experts": kept,
        "usage": {name: counts.tolist() for name, counts in usage.items()},
        "share_of_assignments_lost": lost, "val_bpb_before": bpb_before,
        "val_bpb_after": bpb_after, "parameters_before": parameters,
        "parameters_after": model.num_parameters(),
    }  # fmt: skip
    _write_model(folder, model, _name(text_tokenizer), "prune.json", report)
    return Pruning(folder, report)


UPCYCLE_FILE = "upcycle.json"
_UPCYCLE_FLAGS = {"num_experts": "--experts", "top_k": "--top-k", "drop_ratio": "--drop-ratio",
                  "granularity": "--granularity", "router_std": "--router-std",
                  "noise_std": "--noise-std", "method": "--method"}  # fmt: skip


@dataclass
class Upcycling:
    """What :func:`upcycle_checkpoint` wrote to ``out`` (``record``: ``upcycle.json``)."""

    out: Path
    record: dict


def upcycle_checkpoint(
    dense: str, out: str, *, num_experts: int, top_k: int, method: str = "copy",
    overwrite: bool = False, **options,
) -> Upcycling:  # fmt: skip
    """Upcycle the dense transformers checkpoint ``dense`` (Llama, Mistral, Qwen2, Qwen3: see
    :func:`moe_blocks.integrations.transformers.upcycle`) and write the MoE model to ``out``
    (config.json, safetensors, the tokenizer files found beside it, ``upcycle.json``: the
    method, its options, and the largest change of the logits on random tokens). Every option
    and the checkpoint's config are checked before a weight is read; ``out`` is written in one
    step (:func:`write_checkpoint`): after an error nothing is there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_blocks.integrations.transformers import UPCYCLE_FAMILIES, upcycle, upcycle_config
    from moe_blocks.upcycling import UpcycleOptions

    check_path_given("DENSE", dense, "a transformers checkpoint folder")
    source = Path(dense)
    config = read_json(source / "config.json", dict) if source.is_dir() else None
    if config is None:
        raise TrainingError(f"DENSE {source}: not a folder holding a transformers checkpoint")
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type not in UPCYCLE_FAMILIES:
        raise TrainingError(
            f"DENSE {source}: model_type {model_type!r} is not a dense family upcycling "
            f"supports ({', '.join(sorted(UPCYCLE_FAMILIES))})"
        )
    if not any(name.endswith("ForCausalLM") for name in architectures):
        raise TrainingError(
            f"DENSE {source}: architectures {architectures} hold no causal LM (…ForCausalLM)"
        )
    try:
        options_given = {name: value for name, value in options.items() if name != "seed"}
        chosen = UpcycleOptions(method=method, **options_given).checked(
            config.get("intermediate_size"), num_experts, top_k
        )
    except ValueError as error:
        message = str(error)
        for name, flag in _UPCYCLE_FLAGS.items():
            message = message.replace(name, flag)
        raise TrainingError(message) from None
    try:  # the MoE config (a dense config it cannot represent is refused here), no weights
        dense_config = AutoConfig.from_pretrained(source)
        upcycle_config(
            dense_config, num_experts=num_experts, top_k=top_k,
            expert_hidden=dense_config.intermediate_size // (chosen.granularity or 1),
        )  # fmt: skip
    except (OSError, ValueError) as error:
        raise TrainingError(f"DENSE {source}: {message_lines(error)[0]}") from None
    folder = new_output_folder(out, overwrite)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto").eval()
        moe = upcycle(model, num_experts=num_experts, top_k=top_k, method=method, **options)
    except (OSError, ValueError, SafetensorError) as error:  # missing or damaged weights
        raise TrainingError(f"DENSE {source}: {message_lines(error)[0]}") from None
    ids = torch.randint(
        0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)
    )
    moe.set_experts_implementation("moe_blocks")  # any expert width and dtype (transformers'
    # default grouped_mm refuses 16-bit rows whose stride is no multiple of 16 bytes)
    with torch.no_grad():
        change = (moe(ids).logits.float() - model(ids).logits.float()).abs().max().item()
    record = {
        "format": 1, "dense": str(source.resolve()), "model_type": model_type,
        "moe_model_type": moe.config.model_type, "num_experts": num_experts, "top_k": top_k,
        "method": method, "options": options, "checked_tokens": ids.numel(),
        "max_logit_change": change,
    }  # fmt: skip
    _write_model(folder, moe, str(source), UPCYCLE_FILE, record)
    return Upcycling(folder, record)
