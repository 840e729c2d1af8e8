"""A run folder (``--out``) and its checkpoints: the one checkpoint writer (every save
consistent or absent), recovery after a crash, the trainer state, the log, the model export's
step, and the checks made before a run writes anything."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import typing
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe_blocks.router import named_routers

from ..jetmoe import JetMoEForCausalLM, load_json
from .data import same_path
from .lora import (
    ADAPTER_CONFIG,
    attach_lora,
    load_adapters,
    lora_config,
    merged_model,
    read_adapter_config,
    save_adapters,
)
from .settings import TrainingError, TrainSettings, is_int, message_lines
from .tokens import copy_tokenizer_files

# 2: tokens_per_expert keyed by router name; 3: every entry of log.json is a step (the
# validation before the first step is that step's val_bpb_before, not an entry of its own).
CHECKPOINT_FORMAT = "moe-blocks-train/3"


RESUMABLE_FORMATS = ("moe-blocks-train/2", CHECKPOINT_FORMAT)  # 2's log is converted


# What a run writes into --out (model/: the Hugging Face export of a sharded run).
RUN_FILES = ("checkpoint", "log.json", "training.png", "model")
# What to do about a damaged file of the checkpoint --resume reads
RESUME_ADVICE = "restore the checkpoint folder from a copy, or start over with --overwrite"


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
        for target in [out / name for name in RUN_FILES] + kept_checkpoints(out / "checkpoint"):
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def check_space(out: Path, model, settings: TrainSettings) -> None:
    """Refuse to start when ``out``'s disk has no room for one more checkpoint (times
    ``keep_checkpoints``): the weights and AdamW's two moments (a new checkpoint is written
    beside the last one); with LoRA, for
    the merged model's export (adapters are small beside it; an adapters export needs none)."""
    copies = 3 if settings.lora_rank is None else int(settings.lora_export != "adapters")
    copies *= settings.keep_checkpoints  # the newest and the kept ones
    needed = copies * sum(p.numel() * p.element_size() for p in model.parameters())
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


EXPORT_FILE = "export.json"  # in a torchrun or LoRA run's model/: the training step it holds


def is_sharded_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a checkpoint of a torchrun run (DCP shards)."""
    return (Path(directory) / ".metadata").is_file()


def check_shards_readable(checkpoint: Path) -> None:
    """TrainingError (for ``--resume``) if ``checkpoint`` holds a torchrun run's shards but no
    ``.metadata``, without which DCP reads none of them."""
    if not is_sharded_checkpoint(checkpoint) and any(checkpoint.glob("*.distcp")):
        raise TrainingError(
            f"--resume: {checkpoint} holds the shards of a torchrun run but no .metadata "
            "(deleted: a save never publishes without it); the checkpoint cannot be read: "
            "restore the file, or start over with --overwrite"
        )


def exports_model(directory: Path) -> bool:
    """Whether the checkpoint in ``directory`` is not itself the model, which the run writes
    to ``model/`` at its end: a torchrun run's (shards) or a LoRA run's (adapters)."""
    return is_sharded_checkpoint(directory) or (directory / ADAPTER_CONFIG).is_file()


def write_export_step(folder: Path, step: int) -> None:
    (folder / EXPORT_FILE).write_text(json.dumps({"step": step}) + "\n")


def _recorded_step(path: Path) -> int | None:
    """The ``"step"`` a JSON file records, None when it is missing, unreadable or says none."""
    return _recorded(path, "step")


def _recorded(path: Path, *keys: str) -> int | None:
    """The integer a JSON file records under ``keys`` (nested), None when it is missing,
    unreadable or says none."""
    try:
        value = load_json(path)
        for key in keys:
            value = value.get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if is_int(value) else None


def export_step(folder: Path) -> int | None:
    """The training step a run's ``model/`` export holds, None when it does not say."""
    return _recorded_step(folder / EXPORT_FILE)


def export_lags(out: Path, step: int) -> bool:
    """Whether the torchrun or LoRA run in ``out``, whose checkpoint is at ``step``, has a
    ``model/`` export of another step or none (a crash between the checkpoint and the
    export)."""
    return exports_model(out / "checkpoint") and export_step(out / "model") != step


def run_outputs_lag(out: Path, step: int) -> bool:
    """Whether the run in ``out``, whose checkpoint is at ``step``, lacks what its end writes
    beside the checkpoint: a current ``model/`` export (:func:`export_lags`), or the
    ``log.json`` of that step (written after ``training.png``: a full disk or a kill there)."""
    if export_lags(out, step):
        return True
    try:
        log = read_json(out / "log.json", list)
    except TrainingError:
        return True
    return not log or not isinstance(log[-1], dict) or log[-1].get("step") != step


def checkpoint_folder(path: str | Path) -> Path:
    """The model folder given either itself or the run folder (``--out``) holding it: the run's
    ``checkpoint/``, or for a sharded (torchrun) or LoRA run, whose ``checkpoint/`` holds
    shards or adapters, its export ``model/`` (the model in the Hugging Face layout, or LoRA
    adapters: :func:`load_model` reads either); read-only commands read a ``.previous`` that a
    killed save left (:func:`recover_checkpoint` puts it back at the next ``train``). A
    torchrun run without its export: TrainingError saying how to rebuild it."""
    path = Path(path)
    if is_model_folder(path):
        if path.name == "model" and (path.parent / "checkpoint").is_dir():  # a run's export
            _warn_if_export_lags(path.parent, path)
        return path
    # (.previous: the last complete one when a save was killed between its two renames)
    for name in ("checkpoint", "checkpoint.previous", "model", "model.previous"):
        if (path / name / "config.json").exists() or (
            name.startswith("model") and is_model_folder(path / name)
        ):
            if name.startswith("model"):
                _warn_if_export_lags(path, path / name)
            return path / name
    checkpoint = path / "checkpoint"
    if is_sharded_checkpoint(checkpoint):  # no model/: stopped before exporting, or deleted
        step = _recorded_step(checkpoint / "trainer_state.json")
        raise TrainingError(
            f"{path} is a torchrun run whose model/ export is missing (its {checkpoint} holds "
            f"shards only): rebuild it with moe-blocks train --out {path} --resume --steps "
            f"{step if step is not None else 'STEP'}"
        )
    return checkpoint if checkpoint.is_dir() else path


def is_model_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a model: its ``config.json``, or LoRA adapters (of a model
    named in their config)."""
    return (folder / "config.json").exists() or (folder / ADAPTER_CONFIG).exists()


def _warn_if_export_lags(run: Path, model: Path) -> None:
    """Say so when a torchrun or LoRA run's ``model/`` export holds another step than its
    checkpoint (the reader gets the older weights; ``train --resume --steps STEP`` rebuilds
    it)."""
    step = _recorded_step(run / "checkpoint" / "trainer_state.json")
    if not exports_model(run / "checkpoint") or step is None:
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
    any_rank: Callable[[bool], bool] = lambda failed: failed,
    keep: int | None = None,
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
    ``barrier``: ``dist.barrier``, ``any_rank``: whether a flag holds on any rank), so a write
    that fails on one rank fails the save on all of them (none waits for it forever).

    ``keep`` (a training checkpoint's; None: leave ``<directory>.step-N`` siblings alone): how
    many checkpoints stay, this one and the ``keep - 1`` newest before it. Once the new one is
    published the replaced one becomes ``<directory>.step-N`` (N: the step its
    ``trainer_state.json`` records, when below the new one's), and kept ones beyond ``keep - 1``
    are deleted, oldest first, as are any of a step at or after the new one's (left by a run
    this one replaced or rolled back: :func:`kept_checkpoints`)."""
    partial, previous = sibling(directory, "partial"), sibling(directory, "previous")
    if main:  # an earlier save killed between its renames (a second Ctrl-C): its checkpoint
        recover_checkpoint(directory)  # back in place before this one moves it aside
        partial.mkdir(parents=True)
    barrier()
    error = None
    try:
        write(partial)
        _sync(partial)
    except (OSError, SafetensorError) as caught:
        error = caught
    if any_rank(error is not None):
        if main:
            shutil.rmtree(partial, ignore_errors=True)
        kept = f"{directory} still holds the last checkpoint" if directory.exists() else (
            "no earlier checkpoint")  # fmt: skip
        reason = error if error is not None else "on another rank"
        raise TrainingError(f"writing {directory} failed ({reason}); {kept}")
    barrier()
    if main:
        shutil.rmtree(previous, ignore_errors=True)
        if directory.exists():
            directory.rename(previous)
        partial.rename(directory)
        _sync(directory.parent, recurse=False)
        if keep is not None:
            _keep_replaced(directory, previous, keep)
        shutil.rmtree(previous, ignore_errors=True)
    barrier()


def _keep_replaced(directory: Path, previous: Path, keep: int) -> None:
    """:func:`write_checkpoint`'s ``keep``, once ``directory`` holds the new checkpoint and
    ``previous`` the one it replaced."""
    step = _recorded_step(directory / "trainer_state.json")
    replaced = _recorded_step(previous / "trainer_state.json")
    if keep > 1 and replaced is not None and step is not None and replaced < step:
        shutil.rmtree(sibling(directory, f"step-{replaced}"), ignore_errors=True)
        previous.rename(sibling(directory, f"step-{replaced}"))
    kept = kept_checkpoints(directory)  # the replaced one among them: below the new step
    stale = [path for path in kept if step is not None and _kept_step(path) >= step]
    kept = [path for path in kept if path not in stale]
    for old in stale + kept[: max(0, len(kept) - (keep - 1))]:
        shutil.rmtree(old)


def kept_checkpoints(directory: Path) -> list[Path]:
    """The older checkpoints :func:`write_checkpoint` kept beside ``directory``
    (``<directory>.step-N``), oldest first."""
    found = [path for path in directory.parent.glob(f"{directory.name}.step-*")
             if path.name.rpartition("-")[2].isdigit() and path.is_dir()]  # fmt: skip
    return sorted(found, key=_kept_step)


def _kept_step(path: Path) -> int:
    """The step N of a kept checkpoint ``<directory>.step-N``."""
    return int(path.name.rpartition("-")[2])


def published(directory: Path) -> Path:
    """The folder that holds the checkpoint ``directory`` names: itself, or, when a save was
    killed between its two renames, ``<directory>.previous`` (:func:`recover_checkpoint` puts
    it back; a reader before that, on any rank, reads it there)."""
    previous = sibling(directory, "previous")
    return previous if not directory.exists() and previous.is_dir() else directory


def recover_checkpoint(directory: Path) -> None:
    """Undo what a crash inside :func:`write_checkpoint` left: a complete ``.previous`` with
    no ``directory`` (killed between its two renames) becomes ``directory`` again; a
    ``.partial`` (never published) is deleted. A ``.previous`` beside a published
    ``directory`` (killed after publishing) is what that save replaced: kept as
    ``<directory>.step-N`` where the save's ``keep_checkpoints`` (its ``trainer_state.json``
    records it) would have kept it, else deleted. Main process only, before anything reads the
    checkpoint."""
    partial, previous = sibling(directory, "partial"), sibling(directory, "previous")
    if previous.is_dir() and not directory.exists():
        previous.rename(directory)
    elif previous.is_dir():  # the save's last step, as it would have done it
        keep = _recorded(directory / "trainer_state.json", "settings", "keep_checkpoints")
        if keep is not None:
            _keep_replaced(directory, previous, keep)
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
    """The one-process checkpoint of ``step``: the model in the Hugging Face layout (with the
    run's tokenizer files, if it has a tokenizer), the optimizer state, the trainer state and
    the log, published by :func:`write_checkpoint`."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                tensors[f"{names[id(param)]}::{key}"] = value.detach().cpu().contiguous()
    state = {"format": CHECKPOINT_FORMAT, "step": step, "settings": asdict(settings)}

    def write(folder: Path) -> None:
        if settings.lora_rank is not None:  # the base model is --resume-from's
            save_adapters(model, lora_config(settings), folder)
        else:
            model.save_pretrained(folder)
        copy_tokenizer_files(settings.tokenizer, folder)
        save_file(tensors, str(folder / "optimizer.safetensors"))
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
        (folder / "log.json").write_text(json.dumps(log) + "\n")

    write_checkpoint(directory, write, keep=settings.keep_checkpoints)


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
    if not is_int(step) or step < 0 or not isinstance(settings, dict):
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
    if saved.get("lora_targets") == "":  # written before "" was refused: it meant both
        saved = saved | {"lora_targets": None}
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
    """The model in ``folder`` (LoRA adapters: their base model with them merged in); a
    :class:`TrainingError` naming ``flag`` and the file when the folder holds none or one
    that is not ours."""
    if (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").exists():
        config = read_adapter_config(folder)
        base = config.base_model_name_or_path
        if not base:
            raise TrainingError(f"{flag}: {folder / ADAPTER_CONFIG} names no base model")
        model = load_model(checkpoint_folder(base), f"{flag} {folder}'s base model")
        try:
            lora = attach_lora(model, config)
        except ValueError as error:  # PEFT's: a target the model lacks (another model's)
            raise TrainingError(
                f"{flag}: {folder}'s adapters do not fit their base model {base} "
                f"({message_lines(error)[0]})"
            ) from None
        load_adapters(model, folder)
        return merged_model(lora).eval()
    try:
        return JetMoEForCausalLM.from_pretrained(folder)
    except (FileNotFoundError, ValueError) as error:
        advice = f"; {RESUME_ADVICE}" if flag == "--resume" else ""
        raise TrainingError(f"{flag}: {error}{advice}") from None


def export_lora(lora, out: Path, settings: TrainSettings, step: int) -> None:
    """A LoRA run's ``model/`` at ``step``: the merged model (``--lora-export merged``, the
    Hugging Face layout) or the adapters (PEFT's files), with the tokenizer files and the
    step, published as a checkpoint is. Merging changes the model in place: the last use."""
    model = merged_model(lora) if settings.lora_export != "adapters" else lora.model

    def write(folder: Path) -> None:
        if settings.lora_export == "adapters":
            save_adapters(model, lora_config(settings), folder)
        else:
            model.save_pretrained(folder)
        copy_tokenizer_files(settings.tokenizer, folder)
        write_export_step(folder, step)

    write_checkpoint(out / "model", write)


def load_log(directory: Path, model) -> list[dict]:
    """The ``log.json`` saved with the checkpoint in ``directory``, whose entries must be
    steps of ``model`` (each with its step, losses and the tokens per expert of the model's
    routers), so that nothing fails on them after training."""
    path = directory / "log.json"
    try:
        log = read_json(path, list)
    except TrainingError as error:
        raise TrainingError(f"{error}; {RESUME_ADVICE}") from None
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
                f"lm_loss and other numbers, and tokens_per_expert of its routers); {RESUME_ADVICE}"
            )
    return log


def _is_step_entry(entry: object, experts: dict[str, int]) -> bool:
    if not isinstance(entry, dict) or not {"step", "loss", "lm_loss"} <= entry.keys():
        return False
    loads = entry.get("tokens_per_expert")
    numbers = [v for k, v in entry.items() if k not in ("step", "tokens_per_expert")]
    return (
        is_int(entry["step"])
        and all(isinstance(v, float) or is_int(v) for v in numbers)
        and isinstance(loads, dict)
        and {name: len(c) if isinstance(c, list) else None for name, c in loads.items()} == experts
        and all(is_int(count) for counts in loads.values() for count in counts)
    )


def restore_optimizer(directory: Path, model, optimizer) -> None:
    path = directory / "optimizer.safetensors"
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise TrainingError(f"--resume: {path} is missing; {RESUME_ADVICE}") from None
    except SafetensorError as error:
        raise TrainingError(f"--resume: {path}: {error}; {RESUME_ADVICE}") from None
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, _, state_key = key.partition("::")
        param = params.get(name)
        known = param is not None and state_key in ("step", "exp_avg", "exp_avg_sq")
        if not known or value.shape != (() if state_key == "step" else param.shape):
            raise TrainingError(
                f"--resume: {path}: {key!r} is not AdamW state of this model's parameters; "
                f"{RESUME_ADVICE}"
            )
        # copied: on CPU load_file's tensors are copy-on-write views of the file's pages
        optimizer.state[params[name]][state_key] = value.to(param.device, copy=True)


def check_not_a_file(out: Path) -> None:
    """TrainingError naming ``--out`` when ``out`` is a file: a folder (or nothing) it must be."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a folder")


def check_output(settings: TrainSettings, *, resume: bool, overwrite: bool) -> TrainerState | None:
    """Refuse an ``out`` that would fail after training or lose a run; with ``resume``, return
    the checkpoint's trainer state once it agrees with ``settings``."""
    out = Path(settings.out)
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite exclude each other: continue or replace")
    check_not_a_file(out)
    if not resume:
        found = [name for name in RUN_FILES if (out / name).exists()]
        found += [path.name for path in kept_checkpoints(out / "checkpoint")]
        if found and not overwrite:
            raise TrainingError(
                f"--out {out} already holds a run ({', '.join(found)}): continue it with "
                "--resume or replace it with --overwrite"
            )
        return None
    state = resumed_state(out / "checkpoint")
    saved = state.settings
    for name in (
        "preset", "batch_size", "seq_len", "seed", "data", "overrides", "resume_from",
        "train_new_experts_only", "balance_loss", "decay_data", "tokenizer", "lora_rank",
        "lora_alpha", "lora_targets",
    ):  # fmt: skip
        theirs, ours = getattr(saved, name), getattr(settings, name)
        paths = ("data", "resume_from", "tokenizer")
        if not (same_path(theirs, ours) if name in paths else theirs == ours):
            raise TrainingError(
                f"--resume: --{name.replace('_', '-')} {ours} differs from the checkpoint's "
                f"({theirs}); leave it out to keep the checkpoint's"
            )
    if settings.steps < state.step or (
        settings.steps == state.step and not run_outputs_lag(out, state.step)
    ):  # the same step again only writes what the run's end did not (export, log, plot)
        raise TrainingError(
            f"--resume: the checkpoint is at step {state.step}; --steps {settings.steps} "
            "must be above it to train further"
        )
    return state


def resumed_settings(out: str, given: dict) -> TrainSettings:
    """The settings of the run in ``out`` (its checkpoint's) with ``given`` (the options on
    the command line) in place of theirs; :func:`train` refuses a given one that changes the
    data or the model."""
    check_not_a_file(Path(out))
    checkpoint = Path(out) / "checkpoint"
    try:
        state = load_trainer_state(published(checkpoint))
    except TrainingError:  # the main process put a .previous back meanwhile (torchrun)
        state = resumed_state(checkpoint)
    return replace(state.settings, out=out, **given)


def resumed_state(checkpoint: Path) -> TrainerState:
    """:func:`load_trainer_state` of the checkpoint ``--resume`` continues, its errors with
    what to do about them."""
    try:
        return load_trainer_state(checkpoint)
    except TrainingError as error:
        raise TrainingError(f"{error}; {RESUME_ADVICE}") from None
