"""Training a JetMoE-style byte-level language model: the corpus, the loop, checkpoints, the
log and the plot. ``moe-blocks train`` (models/cli.py) is the command-line face of
:func:`train`.

The default corpus is the running interpreter's own standard library (``*.py`` files read as
bytes, vocabulary 256): no download, no tokenizer. Files are sorted by path and split into
train and validation by a stable hash of the path.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import threading
import time
import typing
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe_blocks import FrozenExperts, expert_blocks, freeze_experts
from moe_blocks.kernels.checks import check_positive_int as check_int_at_least_one
from moe_blocks.losses import BALANCE_LOSSES
from moe_blocks.router import named_routers, tokens_per_expert

from .jetmoe import JetMoEConfig, JetMoEForCausalLM, load_json

VALIDATION_PERCENT = 5
SEPARATOR = b"\n\n"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
DEFAULT_SEQ_LEN = 128  # bytes per training window


class TrainingError(Exception):
    """A problem with the user's input, reported as one line by the CLI."""


# --------------------------------------------------------------------------------------------
# Corpus


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 bytes
    validation: torch.Tensor
    description: str


def _in_validation(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode()) % 100 < VALIDATION_PERCENT


def _join(paths: list[Path]) -> torch.Tensor:
    data = SEPARATOR.join(path.read_bytes() for path in paths)
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )


def load_corpus_files() -> list[Path]:
    """The running interpreter's standard-library ``*.py`` files, sorted by path."""
    root = STDLIB
    return sorted(
        path
        for path in root.rglob("*.py")
        if not {"site-packages", "__pycache__"} & set(path.relative_to(root).parts)
    )


def load_corpus(data: str | Path | None, seq_len: int = DEFAULT_SEQ_LEN) -> Corpus:
    """The text to train and validate on, each part at least one window of ``seq_len + 1``
    bytes: the standard library's Python sources (``data=None``), every file under a folder, or
    one file. Files are split by a stable hash of their relative path; when that leaves either
    part shorter than a window (one file, or a folder of few files), the text of all of them
    is split by position instead: the last 5 %, and at least a window, is validation. Text
    shorter than two windows is a :class:`TrainingError`."""
    if data is None:
        root = STDLIB
        files = load_corpus_files()
        description = f"Python {sysconfig.get_python_version()} standard library ({root})"
    else:
        check_path_given(
            "--data",
            data,
            "a text file or folder (or leave --data out for Python's standard library)",
        )
        root = Path(data)
        if not root.exists():
            raise TrainingError(f"--data {data}: no such file or folder")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        description = str(root)
    hashed = [_in_validation(path.relative_to(root).as_posix()) for path in files]
    train = _join([path for path, val in zip(files, hashed, strict=True) if not val])
    validation = _join([path for path, val in zip(files, hashed, strict=True) if val])
    window = seq_len + 1
    split = "split by path hash"
    if min(train.numel(), validation.numel()) < window:  # one file is all on one side
        text = _join(files)
        if text.numel() < 2 * window:
            source = "Python's standard library" if data is None else f"--data {data}"
            raise TrainingError(
                f"--seq-len {seq_len}: {source} has {text.numel():,} bytes of text, fewer than "
                f"two windows of --seq-len + 1 ({window}) bytes, one to train on and one to "
                "validate; use a smaller --seq-len or more text"
            )
        size = max(text.numel() * VALIDATION_PERCENT // 100, window)
        train, validation = text[:-size], text[-size:]
        split = "split by position"
    count = f"{len(files):,} file{'s' * (len(files) != 1)}"
    return Corpus(
        train,
        validation,
        f"{description}: {count}, {train.numel():,} + {validation.numel():,} bytes ({split})",
    )


def batch_at(
    data: torch.Tensor, step: int, seed: int, batch_size: int, length: int
) -> torch.Tensor:
    """Windows ``[batch_size, length + 1]`` (int64) of the uint8 text ``data`` (at least
    ``length + 1`` bytes) for one step, a function of (seed, step) only, so a resumed run sees
    the same data order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, _window_starts(data, length), (batch_size,), generator=generator)
    return _windows(data, starts, length)


def _window_starts(data: torch.Tensor, length: int) -> int:
    """How many windows of ``length + 1`` bytes fit."""
    return data.numel() - length


def _windows(data: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    return data[starts[:, None] + torch.arange(length + 1)].long()


# --------------------------------------------------------------------------------------------
# Settings and schedule


DEFAULT_WARMUP_STEPS = 30


@dataclass
class TrainSettings:
    preset: str = "tiny"
    data: str | None = None
    out: str = "runs/tiny"
    steps: int = 600
    batch_size: int = 16
    seq_len: int = DEFAULT_SEQ_LEN
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # None: min(DEFAULT_WARMUP_STEPS, steps)
    schedule: str = "wsd"  # warmup-stable-decay (JetMoE, MiniCPM) or cosine
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 200
    seed: int = 0
    threads: int | None = None
    overrides: dict = field(default_factory=dict)
    resume_from: str | None = None  # start from this model (fresh optimizer, step 0)
    train_new_experts_only: bool = False  # with resume_from: an extended checkpoint
    balance_loss: str | None = None  # set every router's balance loss (None: the model's)

    @property
    def warmup(self) -> int:
        """The warmup steps in effect: ``warmup_steps``, by default at most 30."""
        if self.warmup_steps is None:
            return min(DEFAULT_WARMUP_STEPS, self.steps)
        return self.warmup_steps

    def check(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
        ):
            check_positive_int(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.threads is not None:
            check_positive_int("--threads", self.threads)
        for name in ("out", "resume_from"):
            check_path_given(f"--{name.replace('_', '-')}", getattr(self, name), "a folder")
        given = self.warmup_steps
        if given is not None and (not _is_int(given) or not 0 <= given <= self.steps):
            raise TrainingError(
                f"--warmup-steps must be an integer from 0 to --steps ({self.steps}), "
                f"got {self.warmup_steps}"
            )
        if not self.lr > 0:
            raise TrainingError(f"--lr must be positive, got {self.lr}")
        if self.schedule not in ("wsd", "cosine"):
            raise TrainingError(f"--schedule must be wsd or cosine, got {self.schedule}")
        if self.preset not in JetMoEConfig.PRESETS:
            raise TrainingError(
                f"--preset: unknown preset {self.preset!r}; presets: "
                f"{', '.join(JetMoEConfig.PRESETS)}"
            )
        if self.train_new_experts_only and self.resume_from is None:
            raise TrainingError(
                "--train-new-experts-only needs --resume-from DIR (a checkpoint written by "
                "moe-blocks extend)"
            )
        if self.balance_loss is not None and self.balance_loss not in BALANCE_LOSSES:
            raise TrainingError(
                f"--balance-loss must be one of {', '.join(BALANCE_LOSSES)}, "
                f"got {self.balance_loss!r}"
            )


def check_positive_int(flag: str, value: object) -> None:
    """The library's check (an int >= 1, not a bool), as a TrainingError naming ``flag``."""
    try:
        check_int_at_least_one(flag, value)
    except ValueError:
        raise TrainingError(f"{flag} must be a positive integer, got {value}") from None


def check_path_given(flag: str, path: str | None, what: str) -> None:
    """A TrainingError naming ``flag`` when ``path`` is empty: ``Path("")`` is the current
    folder, which nobody means by it."""
    if path == "":
        raise TrainingError(f"{flag} is empty: give {what}")


def _is_int(value: object) -> bool:
    """Whether ``value`` is an int and not a bool (JSON's true is no step count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def learning_rate(settings: TrainSettings, step: int) -> float:
    """Linear warmup, then WSD (constant, then linear decay over the last ``decay_fraction``)
    or cosine, down to ``min_lr_ratio · lr``."""
    peak, floor = settings.lr, settings.lr * settings.min_lr_ratio
    warmup = settings.warmup
    if step < warmup:
        return peak * (step + 1) / warmup
    if settings.schedule == "cosine":
        progress = (step - warmup) / max(1, settings.steps - warmup)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = settings.steps * (1 - settings.decay_fraction)
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1, settings.steps - decay_start)
    return peak + (floor - peak) * min(1.0, progress)


# --------------------------------------------------------------------------------------------
# Checkpoints: the model in the Hugging Face layout, the trainer state beside it

# 2: tokens_per_expert keyed by router name; 3: every entry of log.json is a step (the
# validation before the first step is that step's val_bpb_before, not an entry of its own).
CHECKPOINT_FORMAT = "moe-blocks-train/3"
RESUMABLE_FORMATS = ("moe-blocks-train/2", CHECKPOINT_FORMAT)  # 2's log is converted
# What a run writes into --out (model/: the Hugging Face export of a sharded run).
RUN_FILES = ("checkpoint", "log.json", "training.png", "model")


def prepare_output(out: Path, *, overwrite: bool) -> None:
    """Create ``out`` and check that files can be written there (before any step, not at the
    first save); with ``overwrite`` first delete what an earlier run wrote there
    (:data:`RUN_FILES`), so none of it mixes with the new run's files (a one-process
    checkpoint written over a sharded one would keep its shards, which --resume reads)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise TrainingError(f"--out {out}: {error.strerror}") from None
    if overwrite:
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def check_space(out: Path, model) -> None:
    """Refuse to start when ``out``'s disk has no room for one more checkpoint: the weights
    and AdamW's two moments (a new checkpoint is written beside the last one)."""
    needed = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    free = shutil.disk_usage(out).free
    if free < needed:
        raise TrainingError(
            f"--out {out}: {free / 1e6:.0f} MB free, a checkpoint of this model needs about "
            f"{needed / 1e6:.0f} MB: free some space or write elsewhere"
        )


def recover_run(out: Path) -> None:
    """:func:`recover_checkpoint` for the run's checkpoint and its model export."""
    for folder in (out / "checkpoint", out / "model"):
        recover_checkpoint(folder)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """In one process, SIGTERM (a scheduler, ``kill``) interrupts as Ctrl-C does, so the run
    saves its last finished step instead of dying without a checkpoint. (Only the main thread
    can take signals; elsewhere nothing changes.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


EXPORT_FILE = "export.json"  # in a torchrun run's model/: the training step it holds


def is_sharded_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a checkpoint of a torchrun run (DCP shards)."""
    return (Path(directory) / ".metadata").is_file()


def write_export_step(folder: Path, step: int) -> None:
    (folder / EXPORT_FILE).write_text(json.dumps({"step": step}) + "\n")


def _recorded_step(path: Path) -> int | None:
    """The ``"step"`` a JSON file records, None when it is missing, unreadable or says none."""
    try:
        step = load_json(path).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if _is_int(step) else None


def export_step(folder: Path) -> int | None:
    """The training step a run's ``model/`` export holds, None when it does not say."""
    return _recorded_step(folder / EXPORT_FILE)


def export_lags(out: Path, step: int) -> bool:
    """Whether the torchrun run in ``out``, whose checkpoint is at ``step``, has a ``model/``
    export of another step or none (a crash between the checkpoint and the export)."""
    return is_sharded_checkpoint(out / "checkpoint") and export_step(out / "model") != step


def checkpoint_folder(path: str | Path) -> Path:
    """The model folder given either itself or the run folder (``--out``) holding it: the run's
    ``checkpoint/``, or for a sharded (torchrun) run, whose ``checkpoint/`` holds shards, its
    Hugging Face export ``model/``; read-only commands read a ``.previous`` that a killed save
    left (:func:`recover_checkpoint` puts it back at the next ``train``)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    # (.previous: the last complete one when a save was killed between its two renames)
    for name in ("checkpoint", "checkpoint.previous", "model", "model.previous"):
        if (path / name / "config.json").exists():
            if name.startswith("model"):
                _warn_if_export_lags(path, path / name)
            return path / name
    return path / "checkpoint" if (path / "checkpoint").is_dir() else path


def _warn_if_export_lags(run: Path, model: Path) -> None:
    """Say so when a torchrun run's ``model/`` export holds another step than its checkpoint
    (the reader gets the older weights; ``train --resume --steps STEP`` rebuilds it)."""
    step = _recorded_step(run / "checkpoint" / "trainer_state.json")
    if not is_sharded_checkpoint(run / "checkpoint") or step is None:
        return  # (no step to compare with: --resume names what is wrong with that file)
    held = export_step(model)
    if held != step:
        warnings.warn(
            f"{model} holds the weights of step {held if held is not None else '(unknown)'} but "
            f"{run / 'checkpoint'} is at step {step}: rebuild the export with moe-blocks train "
            f"--out {run} --resume --steps {step}",
            stacklevel=3,
        )


def sibling(directory: Path, suffix: str) -> Path:
    """``directory.<suffix>``: where :func:`write_checkpoint` stages (``partial``) and keeps
    the replaced checkpoint until the new one is published (``previous``)."""
    return directory.with_name(f"{directory.name}.{suffix}")


def write_checkpoint(
    directory: Path,
    write: Callable[[Path], None],
    *,
    main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> None:
    """The one way a checkpoint (or model export) is written: consistent or absent, never
    partial. ``write(folder)`` fills ``<directory>.partial``; once every file is written and
    synced to disk, the main process publishes it: the current ``directory`` is renamed to
    ``<directory>.previous``, the new folder to ``directory``, and the previous one deleted.
    A crash at any moment leaves either the old checkpoint at ``directory``, or none there and
    the old one complete at ``<directory>.previous``, which :func:`recover_checkpoint` puts
    back; a ``.partial`` folder is never read. A failed write (a full disk) removes the new
    folder and raises a :class:`TrainingError` saying the last checkpoint is intact.

    Under torchrun every rank calls it with its own ``write`` (its shards; ``main``: rank 0,
    ``barrier``: ``dist.barrier``)."""
    partial, previous = sibling(directory, "partial"), sibling(directory, "previous")
    if main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    try:
        write(partial)
        _sync(partial)
    except (OSError, SafetensorError) as error:
        if main:
            shutil.rmtree(partial, ignore_errors=True)
        kept = f"{directory} still holds the last checkpoint" if directory.exists() else (
            "no earlier checkpoint")  # fmt: skip
        raise TrainingError(f"writing {directory} failed ({error}); {kept}") from None
    barrier()
    if main:
        shutil.rmtree(previous, ignore_errors=True)
        if directory.exists():
            directory.rename(previous)
        partial.rename(directory)
        _sync(directory.parent, recurse=False)
        shutil.rmtree(previous, ignore_errors=True)
    barrier()


def recover_checkpoint(directory: Path) -> None:
    """Undo what a crash inside :func:`write_checkpoint` left: a complete ``.previous`` with
    no ``directory`` (killed between its two renames) becomes ``directory`` again; a
    ``.partial`` (never published) is deleted, and so is a ``.previous`` beside a published
    ``directory``. Main process only, before anything reads the checkpoint."""
    partial, previous = sibling(directory, "partial"), sibling(directory, "previous")
    if previous.is_dir() and not directory.exists():
        previous.rename(directory)
    for leftover in (partial, previous):
        if leftover.exists():
            shutil.rmtree(leftover)


def _sync(path: Path, *, recurse: bool = True) -> None:
    """fsync every file below ``path`` (with ``recurse``) and ``path`` itself."""
    if recurse:
        for file in path.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(
    directory: Path, model, optimizer, settings: TrainSettings, step: int, log: list
) -> None:
    """The one-process checkpoint of ``step``: the model in the Hugging Face layout, the
    optimizer state, the trainer state and the log, published by :func:`write_checkpoint`."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                tensors[f"{names[id(param)]}::{key}"] = value.detach().contiguous()
    state = {"format": CHECKPOINT_FORMAT, "step": step, "settings": asdict(settings)}

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        save_file(tensors, str(folder / "optimizer.safetensors"))
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
        (folder / "log.json").write_text(json.dumps(log) + "\n")

    write_checkpoint(directory, write)


@dataclass
class TrainerState:
    """What ``trainer_state.json`` says: the steps done and the run's settings."""

    step: int
    settings: TrainSettings


def load_trainer_state(directory: Path) -> TrainerState:
    """The trainer state of the checkpoint in ``directory``; a :class:`TrainingError` naming
    the file when it is missing or not one that moe-blocks train wrote."""
    state_file = directory / "trainer_state.json"
    if not state_file.is_file():
        raise TrainingError(
            f"{directory} holds no moe-blocks training checkpoint ({state_file.name} missing)"
        )
    state = read_json(state_file, dict)
    if state.get("format") not in RESUMABLE_FORMATS:
        raise TrainingError(
            f"{state_file}: format {state.get('format')!r}, not {CHECKPOINT_FORMAT!r} "
            "(written by another version of moe-blocks train, or by something else)"
        )
    step, settings = state.get("step"), state.get("settings")
    if not _is_int(step) or step < 0 or not isinstance(settings, dict):
        raise TrainingError(f"{state_file}: no step count and settings of moe-blocks train")
    return TrainerState(step, _settings_from_json(settings, state_file))


def _settings_from_json(saved: dict, state_file: Path) -> TrainSettings:
    """The :class:`TrainSettings` that ``trainer_state.json`` holds (those it lacks take their
    defaults), each of its declared type and passing :meth:`TrainSettings.check`; a
    :class:`TrainingError` naming the file and the setting otherwise."""
    types = typing.get_type_hints(TrainSettings)
    for name, value in saved.items():
        if name not in types:
            raise TrainingError(f"{state_file}: unknown setting {name!r}")
        allowed = typing.get_args(types[name]) or (types[name],)
        if float in allowed:
            allowed += (int,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise TrainingError(
                f"{state_file}: setting {name} is {value!r}, not "
                f"{TrainSettings.__annotations__[name]}"
            )
    settings = TrainSettings(**saved)
    try:
        settings.check()
    except TrainingError as error:
        raise TrainingError(f"{state_file}: {error}") from None
    return settings


def read_json(path: Path, kind: type[dict] | type[list]) -> dict | list:
    """The JSON object (``kind`` dict) or array (list) in ``path``; a :class:`TrainingError`
    naming the file when it is missing, unreadable, not UTF-8 JSON or not a ``kind``."""
    try:
        value = load_json(path)
    except FileNotFoundError:
        raise TrainingError(f"{path} is missing") from None
    except (OSError, ValueError) as error:  # ValueError: not UTF-8 or not JSON
        raise TrainingError(str(error)) from None
    if not isinstance(value, kind):
        found = "array" if isinstance(value, list) else type(value).__name__
        raise TrainingError(
            f"{path}: a JSON {found}, not {'an object' if kind is dict else 'an array'}"
        )
    return value


def load_model(folder: Path, flag: str) -> JetMoEForCausalLM:
    """The model in ``folder``; a :class:`TrainingError` naming ``flag`` and the file when
    the folder holds none or one that is not ours."""
    try:
        return JetMoEForCausalLM.from_pretrained(folder)
    except (FileNotFoundError, ValueError) as error:
        raise TrainingError(f"{flag}: {error}") from None


def load_log(directory: Path, model) -> list[dict]:
    """The ``log.json`` saved with the checkpoint in ``directory``, whose entries must be
    steps of ``model`` (each with its step, losses and the tokens per expert of the model's
    routers), so that nothing fails on them after training."""
    path = directory / "log.json"
    log = read_json(path, list)
    if log and isinstance(log[0], dict) and "loss" not in log[0]:
        before = log.pop(0)  # format 2: step 0's validation was an entry of its own
        if log and isinstance(log[0], dict):
            log[0].update(
                {f"{key}_before": value for key, value in before.items() if key != "step"}
            )
    experts = {name: router.num_experts for name, router in named_routers(model).items()}
    for index, entry in enumerate(log):
        if not _is_step_entry(entry, experts):
            raise TrainingError(
                f"{path}: entry {index} is not a step of this model (a step count, loss, "
                "lm_loss and other numbers, and tokens_per_expert of its routers)"
            )
    return log


def _is_step_entry(entry: object, experts: dict[str, int]) -> bool:
    if not isinstance(entry, dict) or not {"step", "loss", "lm_loss"} <= entry.keys():
        return False
    loads = entry.get("tokens_per_expert")
    numbers = [v for k, v in entry.items() if k not in ("step", "tokens_per_expert")]
    return (
        _is_int(entry["step"])
        and all(isinstance(v, float) or _is_int(v) for v in numbers)
        and isinstance(loads, dict)
        and {name: len(c) if isinstance(c, list) else None for name, c in loads.items()} == experts
        and all(_is_int(count) for counts in loads.values() for count in counts)
    )


def _restore_optimizer(directory: Path, model, optimizer) -> None:
    path = directory / "optimizer.safetensors"
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise TrainingError(f"--resume: {path} is missing") from None
    except SafetensorError as error:
        raise TrainingError(f"--resume: {path}: {error}") from None
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, _, state_key = key.partition("::")
        param = params.get(name)
        known = param is not None and state_key in ("step", "exp_avg", "exp_avg_sq")
        if not known or value.shape != (() if state_key == "step" else param.shape):
            raise TrainingError(
                f"--resume: {path}: {key!r} is not AdamW state of this model's parameters"
            )
        optimizer.state[params[name]][state_key] = value


# --------------------------------------------------------------------------------------------
# The loop


def make_optimizer(model, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) with weight decay on the matrices, none on norms and biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.dim() < 2 or name.endswith("layernorm.weight") else decay).append(param)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )


def validation_starts(corpus: Corpus, settings: TrainSettings) -> list[torch.Tensor]:
    """Start offsets of the validation windows, ``eval_batches`` batches of ``batch_size``,
    spread evenly over the validation text."""
    count = settings.eval_batches * settings.batch_size
    last_start = _window_starts(corpus.validation, settings.seq_len) - 1
    return list(torch.linspace(0, last_start, count).long().split(settings.batch_size))


@torch.no_grad()
def evaluate(
    model, corpus: Corpus, settings: TrainSettings, *, sharded: bool = False, device=None
) -> float:
    """Validation loss in bits per byte on fixed windows spread over the validation text.
    ``sharded``: each rank of the initialised process group scores its share of every batch
    and the sums are all-reduced (collective: every rank must call it)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)  # summed loss (nats), scored bytes
    for chunk in validation_starts(corpus, settings):
        window = _windows(corpus.validation, chunk.tensor_split(world)[rank], settings.seq_len)
        window = window.to(device)
        logits = model(window[:, :-1]).logits
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), window[:, 1:].reshape(-1), reduction="sum"
        )
        total += torch.stack([loss.double().cpu(), torch.tensor(float(window[:, 1:].numel()))])
    if sharded:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item() / math.log(2)


def _step_statistics(model, output) -> dict:
    """A step's log fields of one process: its losses and each router's tokens per expert,
    keyed by :func:`moe_blocks.router.named_routers`."""
    return {
        "loss": output.loss.item(),
        "lm_loss": output.lm_loss.item(),
        "aux_loss": output.aux_loss.item(),
        "tokens_per_expert": tokens_per_expert(model),
    }


@dataclass
class StepLoop:
    """What a training run plugs into :func:`run_steps`: the gradient clipping, the step's log
    statistics, validation and checkpointing (one process: :func:`train`; every rank of a
    sharded run: :func:`moe_blocks.models.parallel.train_sharded`)."""

    clip: Callable[[], object]
    # (model output, stop requested here) -> (the entry's losses and tokens_per_expert, stop)
    statistics: Callable[[object, bool], tuple[dict, bool]]
    validate: Callable[[], dict]
    checkpoint: Callable[[int], None]
    rows: slice = field(default_factory=lambda: slice(None))  # this process's rows of a batch
    device: torch.device | None = None
    stop_requested: Callable[[], bool] = lambda: False


def run_steps(
    model, optimizer, settings: TrainSettings, corpus: Corpus, log: list[dict], start_step: int,
    loop: StepLoop, *, progress: bool,
) -> tuple[int, bool]:  # fmt: skip
    """Train from ``start_step`` to ``settings.steps``, appending an entry per step to ``log``
    (validation every ``eval_every`` steps and at the end; when ``log`` is empty, also before
    the first step, logged in its entry with the suffix ``_before``: ``val_bpb_before``),
    checkpointing every ``checkpoint_every`` steps before the last; a progress bar on stderr
    when ``progress``.
    Stops early on a KeyboardInterrupt or when ``loop.statistics`` says so (after that step);
    a step's entry is logged before the validation after it, which an interrupt leaves out of
    the entry. A KeyboardInterrupt before this call's first step has finished propagates
    (there is no step to save), with a message saying so. Returns the last step trained and
    whether it stopped early."""
    tokens_per_step = settings.batch_size * settings.seq_len
    bar = _progress_bar(settings.steps, start_step, progress)
    step, stopped = start_step, False
    try:
        before = {} if log else {f"{key}_before": bpb for key, bpb in loop.validate().items()}
        last_bpb = before["val_bpb_before"] if before else validations(log)[-1][1]
        while step < settings.steps:
            started = time.perf_counter()
            lr = learning_rate(settings, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = batch_at(corpus.train, step, settings.seed, settings.batch_size,
                             settings.seq_len)  # fmt: skip
            window = batch[loop.rows].to(loop.device)
            output = model(window, labels=window)  # shifted inside: seq_len targets
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            loop.clip()
            optimizer.step()
            step += 1
            statistics, stopped = loop.statistics(output, loop.stop_requested())
            elapsed = time.perf_counter() - started
            entry = {"step": step, **before, **statistics, "lr": lr,
                     "tokens_per_s": tokens_per_step / elapsed}  # fmt: skip
            log.append(entry)  # before validating: an interrupted validation keeps the step
            before = {}
            if step % settings.eval_every == 0 or step == settings.steps:
                entry.update(loop.validate())
                last_bpb = entry["val_bpb"]
            bar.update(1)
            bar.set_postfix(
                loss=f"{entry['lm_loss']:.3f}",
                tok_s=f"{entry['tokens_per_s']:.0f}",
                lr=f"{lr:.2e}",
                val_bpb=f"{last_bpb:.3f}",
            )
            if stopped:
                break
            if step % settings.checkpoint_every == 0 and step < settings.steps:
                loop.checkpoint(step)
    except KeyboardInterrupt:
        if step == start_step:
            kept = f"the checkpoint of step {step} is kept" if step else "nothing to save"
            raise KeyboardInterrupt(
                f"interrupted before step {step + 1} finished: {kept}"
            ) from None
        stopped = True
    finally:
        bar.close()
    return step, stopped


@dataclass
class TrainResult:
    out: Path
    log: list
    interrupted: bool

    @property
    def start_bpb(self) -> float:
        """Validation bits per byte before the run's first step."""
        return validations(self.log)[0][1]

    @property
    def final_bpb(self) -> float:
        """The last validation's bits per byte."""
        return validations(self.log)[-1][1]


def train(
    settings: TrainSettings, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> TrainResult:
    """Train, evaluate, checkpoint, log and plot into ``settings.out``, in this one process
    (:func:`run_training` with :class:`OneProcess`; under torchrun:
    :func:`moe_blocks.models.parallel.train_sharded`, the same trainer on every rank).

    ``resume``: continue from ``out/checkpoint`` (same data order: batches depend on seed and
    step only) up to ``settings.steps``, which must lie beyond the checkpoint's step.
    ``overwrite``: replace a run already in ``out``; without it (or ``resume``) an existing run
    is an error. Every input is checked before training starts. Prints a summary (corpus,
    model size, steps, output folder) to stdout, then a progress bar to stderr when
    ``progress``. A KeyboardInterrupt (or SIGTERM) saves a checkpoint and returns with
    ``interrupted``; before the run's first step has finished it propagates (see
    :func:`run_steps`)."""
    settings.check()
    return run_training(settings, OneProcess(), resume=resume, overwrite=overwrite,
                        progress=progress)  # fmt: skip


def starting_model(settings: TrainSettings, origin: Origin | None) -> JetMoEForCausalLM:
    """The weights a new run starts from: the ``--resume-from`` model, or a new one from
    ``--seed`` (the same on every process)."""
    if origin is not None:
        return load_model(origin.checkpoint, "--resume-from")
    torch.manual_seed(settings.seed)
    return JetMoEForCausalLM(JetMoEConfig.from_preset(settings.preset, **settings.overrides))


class OneProcess:
    """How one plain process trains, for :func:`run_training`. Every rank of a torchrun job
    trains through :class:`moe_blocks.models.parallel.Ranks`, which answers the same
    questions: which process writes files, how the model is sharded, saved, restored and
    clipped, what a step logs, how a stop is asked for."""

    main, rank, world, device = True, 0, 1, None
    evaluation: dict = {}  # evaluate's options

    def barrier(self) -> None:
        pass

    def check_checkpoint(self, state: TrainerState | None, checkpoint: Path) -> None:
        if state is not None and not (checkpoint / "config.json").exists():
            if any(checkpoint.glob("*.distcp")):
                raise TrainingError(
                    f"--resume: {checkpoint} holds the shards of a torchrun run but no "
                    ".metadata (deleted: a save never publishes without it); the checkpoint "
                    "cannot be read: restore the file, or start over with --overwrite"
                )

    def check(self, settings: TrainSettings, model) -> None:
        pass

    def initial_model(self, settings, origin, state, checkpoint: Path) -> JetMoEForCausalLM:
        if state is not None:
            return load_model(checkpoint, "--resume")
        return starting_model(settings, origin)

    def shard(self, model) -> None:
        pass

    def restore(self, checkpoint: Path, model, optimizer) -> None:
        _restore_optimizer(checkpoint, model, optimizer)

    def describe(self) -> str | None:
        return None

    def rows(self, settings: TrainSettings) -> slice:
        return slice(None)

    def clip(self, model) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    def statistics(self, model, output, stop: bool) -> tuple[dict, bool]:
        return _step_statistics(model, output), stop

    def save(self, checkpoint: Path, model, optimizer, settings, step: int, log: list) -> None:
        save_checkpoint(checkpoint, model, optimizer, settings, step, log)

    def finish(self, model, out: Path, step: int) -> None:
        pass  # the one-process checkpoint is itself the model in the Hugging Face layout

    def stopping(self):
        return sigterm_as_interrupt()  # a SIGTERM saves the last step, as Ctrl-C does

    def stop_requested(self) -> bool:
        return False


def run_training(
    settings: TrainSettings, processes, *, resume: bool, overwrite: bool, progress: bool
) -> TrainResult:
    """The one trainer, for one process and for every rank of a torchrun job alike: check
    the output and the inputs, build (or load) the model, shard it, restore a checkpoint,
    train with :func:`run_steps`, save, log and plot. ``processes`` (:class:`OneProcess` or
    :class:`moe_blocks.models.parallel.Ranks`) answers what differs between them."""
    out = Path(settings.out)
    checkpoint_dir = out / "checkpoint"
    if processes.main:
        recover_run(out)
    processes.barrier()
    state = _check_output(settings, resume=resume, overwrite=overwrite)
    processes.check_checkpoint(state, checkpoint_dir)
    corpus = load_corpus(settings.data, settings.seq_len)
    origin = load_origin(settings)
    check_overwrite_keeps_origin(settings, origin, overwrite=overwrite)
    model = processes.initial_model(settings, origin, state, checkpoint_dir)
    processes.check(settings, model)
    processes.barrier()  # every process has looked at OUT before the main one writes into it
    if processes.main:
        prepare_output(out, overwrite=overwrite)
        check_space(out, model)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model.train()
    frozen = prepare_model(model, settings, origin)
    processes.shard(model)
    optimizer = make_optimizer(model, settings)
    log: list[dict] = []
    start_step = 0
    if state is not None:
        processes.restore(checkpoint_dir, model, optimizer)
        start_step = state.step
        log = load_log(checkpoint_dir, model)
    if processes.main:
        announce(settings, corpus, model, state)
        for line in (origin and origin.summary(settings), processes.describe()):
            if line:
                print(line)

    def save(step: int) -> None:
        processes.save(checkpoint_dir, model, optimizer, settings, step, log)

    steps = StepLoop(
        clip=lambda: processes.clip(model),
        statistics=lambda output, stop: processes.statistics(model, output, stop),
        validate=lambda: validate(model, corpus, settings, origin, **processes.evaluation),
        checkpoint=save,
        rows=processes.rows(settings),
        device=processes.device,
        stop_requested=processes.stop_requested,
    )
    with processes.stopping():
        step, interrupted = run_steps(model, optimizer, settings, corpus, log, start_step, steps,
                                      progress=progress and processes.main)  # fmt: skip
        if frozen is not None:
            frozen.remove()  # the model is not used here after training
        save(step)
        processes.finish(model, out, step)
    if processes.main:
        (out / "log.json").write_text(json.dumps(log) + "\n")
        plot_run(log, out / "training.png")
    return TrainResult(out, log, interrupted)


def _check_output(settings: TrainSettings, *, resume: bool, overwrite: bool) -> TrainerState | None:
    """Refuse an ``out`` that would fail after training or lose a run; with ``resume``, return
    the checkpoint's trainer state once it agrees with ``settings``."""
    out = Path(settings.out)
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite exclude each other: continue or replace")
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a folder")
    if not resume:
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found and not overwrite:
            raise TrainingError(
                f"--out {out} already holds a run ({', '.join(found)}): continue it with "
                "--resume or replace it with --overwrite"
            )
        return None
    state = load_trainer_state(out / "checkpoint")
    saved = state.settings
    for name in (
        "preset", "batch_size", "seq_len", "seed", "data", "overrides", "resume_from",
        "train_new_experts_only", "balance_loss",
    ):  # fmt: skip
        theirs, ours = getattr(saved, name), getattr(settings, name)
        if not (same_path(theirs, ours) if name in ("data", "resume_from") else theirs == ours):
            raise TrainingError(
                f"--resume: --{name.replace('_', '-')} {ours} differs from the checkpoint's "
                f"({theirs}); leave it out to keep the checkpoint's"
            )
    if settings.steps < state.step or (
        settings.steps == state.step and not export_lags(out, state.step)
    ):  # the same step again only rebuilds a torchrun run's lagging model/ export
        raise TrainingError(
            f"--resume: the checkpoint is at step {state.step}; --steps {settings.steps} "
            "must be above it to train further"
        )
    return state


def same_path(theirs: str | None, ours: str | None) -> bool:
    """Whether two ``--data`` (or ``--resume-from``) values name the same files: both None (the
    standard library) or the same path once resolved (a checkpoint written before paths were
    saved absolute holds a relative one)."""
    if theirs is None or ours is None:
        return theirs is ours
    return Path(theirs).resolve() == Path(ours).resolve()


def resumed_settings(out: str, given: dict) -> TrainSettings:
    """The settings of the run in ``out`` (its checkpoint's) with ``given`` (the options on
    the command line) in place of theirs; :func:`train` refuses a given one that changes the
    data or the model."""
    return replace(load_trainer_state(Path(out) / "checkpoint").settings, out=out, **given)


def announce(settings: TrainSettings, corpus: Corpus, model, state: TrainerState | None) -> None:
    """Print what is about to run, in four lines (corpus, model, steps, output folder); on
    stderr, a note when a resume (``state``) changes the learning rates of the steps done."""
    preset = f"preset {settings.preset}" + (
        f" with {settings.overrides}" if settings.overrides else ""
    )
    start_step = state.step if state is not None else 0
    count = settings.steps - start_step
    steps = f"{count} step{'s' * (count != 1)}"
    if start_step:
        steps += f" more ({start_step} -> {settings.steps})"
    print(f"corpus: {corpus.description}")
    print(
        f"model:  {preset}, {model.num_parameters():,} parameters "
        f"({model.num_parameters(active=True):,} active per token)"
    )
    print(
        f"train:  {steps} of {settings.batch_size} x {settings.seq_len} bytes, "
        f"lr {settings.lr:g} ({settings.schedule}, warmup {settings.warmup})"
    )
    print(f"output: {settings.out}")
    if state is None:
        return
    changed = [
        step
        for step in range(state.step)
        if learning_rate(state.settings, step) != learning_rate(settings, step)
    ]
    if changed:
        print(
            f"note: the learning-rate schedule changed ({_schedule(state.settings)} -> "
            f"{_schedule(settings)}): steps {changed[0] + 1}-{state.step} were trained at other "
            f"rates than the new one gives, so this run will not equal a straight "
            f"{settings.steps}-step run",
            file=sys.stderr,
        )


def _schedule(settings: TrainSettings) -> str:
    return (
        f"{settings.schedule}, lr {settings.lr:g}, warmup {settings.warmup} of "
        f"{settings.steps} steps"
    )


def validations(log: list[dict], key: str = "val_bpb") -> list[tuple[int, float]]:
    """``(step, bits per byte)`` of each validation ``key`` in ``log``, in order: the one
    before the first step (step 0, the first entry's ``{key}_before``) and those after steps."""
    points = []
    for entry in log:
        if f"{key}_before" in entry:
            points.append((entry["step"] - 1, entry[f"{key}_before"]))
        if key in entry:
            points.append((entry["step"], entry[key]))
    return points


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Starting from another model: --resume-from, --train-new-experts-only, --balance-loss

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
    if not all(_is_int(count) and count >= 1 for count in counts) or not (
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
    if (checkpoint / "trainer_state.json").is_file():
        return True, load_trainer_state(checkpoint).settings.data
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


def load_origin(settings: TrainSettings) -> Origin | None:
    """Check ``--resume-from`` (and ``--train-new-experts-only``) before anything runs."""
    if settings.resume_from is None:
        return None
    checkpoint = checkpoint_folder(settings.resume_from)
    if not (checkpoint / "config.json").is_file():
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
        previous = load_corpus(data, settings.seq_len)
    name = "Python's standard library" if data is None else str(data)
    return Origin(checkpoint, new_experts, previous, name)


def prepare_model(model, settings: TrainSettings, origin: Origin | None) -> FrozenExperts | None:
    """Apply ``--balance-loss`` to every router; with ``--train-new-experts-only`` freeze all
    but the new experts (their weights, gate rows and priors): returns the
    :class:`~moe_blocks.FrozenExperts` (its hooks keep the frozen rows through every step)."""
    if settings.balance_loss is not None:
        for router in model.routers():
            router.balance_loss = settings.balance_loss
    if not settings.train_new_experts_only:
        return None
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
# The plot


def plot_run(log: list[dict], path: Path) -> None:
    """Loss curves (train LM loss and validation, in bits per byte) and a heatmap of the share
    of tokens each expert received, per router (the keys of the entries'
    ``tokens_per_expert``), over the whole run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in log]
    train_bpb = [e["lm_loss"] / math.log(2) for e in log]
    val, old = validations(log), validations(log, "old_val_bpb")
    per_step = [e["tokens_per_expert"] for e in log]
    routers = list(per_step[0]) if per_step else []
    loads = torch.tensor(
        [[step_loads[name] for name in routers] for step_loads in per_step], dtype=torch.float64
    )
    figure, (curves, heat) = plt.subplots(
        1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.3, 1]}
    )
    curves.plot(steps, train_bpb, lw=0.8, alpha=0.7, label="train (LM loss)")
    curves.plot([s for s, _ in val], [b for _, b in val], "o-", label="validation")
    if old:
        curves.plot([s for s, _ in old], [b for _, b in old], "s--", label="validation, old corpus")
    curves.set_xlabel("step")
    curves.set_ylabel("bits per byte")
    curves.set_title("Loss")
    curves.grid(alpha=0.3)
    curves.legend()
    if loads.numel():
        share = loads.sum(0)
        share = share / share.sum(-1, keepdim=True).clamp_min(1)
        image = heat.imshow(share.numpy(), cmap="viridis", aspect="auto", vmin=0)
        heat.set_yticks(range(len(routers)), routers)
        heat.set_xticks(range(share.shape[1]), [f"expert {e}" for e in range(share.shape[1])])
        for (row, col), value in zip(
            [(r, c) for r in range(share.shape[0]) for c in range(share.shape[1])],
            share.flatten().tolist(),
            strict=True,
        ):
            heat.text(col, row, f"{value:.2f}", ha="center", va="center", color="w", fontsize=8)
        figure.colorbar(image, ax=heat, label="share of the router's assignments")
    heat.set_title("Tokens per expert (whole run)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
