"""The one trainer: :func:`run_training` sets a run up and trains it with :func:`run_steps`, in
one process (:class:`OneProcess`) or on every rank of a torchrun job
(:class:`~.distributed.Ranks`), which answer what differs between the two."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from moe_blocks.router import tokens_per_expert

from ..jetmoe import JetMoEForCausalLM
from . import report
from .continual import (
    check_overwrite_keeps_origin,
    load_origin,
    prepare_model,
    starting_model,
    validate,
)
from .data import Corpus, batch_at, load_corpus, load_decay_corpora, mixture_batch
from .lora import attach_lora, describe_lora, load_adapters, lora_config
from .run_folder import (
    TrainerState,
    check_output,
    check_shards_readable,
    check_space,
    checkpoint_folder,
    export_lora,
    load_log,
    load_model,
    prepare_output,
    recover_run,
    restore_optimizer,
    save_checkpoint,
)
from .settings import TrainingError, TrainSettings, learning_rate
from .tokens import check_vocabulary, load_tokenizer


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


class StopRequest:
    """While entered, SIGINT and SIGTERM set ``requested`` instead of interrupting. A torchrun
    rank's whole run: the training loop stops after the step in which any rank saw one (ranks
    agree through the per-step all-reduce), so every rank saves the same step. Every run's
    end (its last checkpoint, export and log; ``second_interrupts``): the first signal waits
    for them to be written, in one process as under torchrun, and a second one interrupts
    (KeyboardInterrupt: a save that hangs can still be stopped; the writer leaves the last
    complete checkpoint). (Only the main thread can take signals; elsewhere nothing
    changes.)"""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, *, second_interrupts: bool = False) -> None:
        self.requested = False
        self.second_interrupts = second_interrupts
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and self.second_interrupts:
            raise KeyboardInterrupt("interrupted twice while the run's end was written")
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():  # (None: a handler not set from Python)
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM wait: once the block has run they go, in the order they came,
    to the handlers in place before it (Ctrl-C's KeyboardInterrupt, :func:`sigterm_as_interrupt`,
    a torchrun rank's stop request). A step's weight update, its count and its log entry are
    one: an interrupt between them saved weights one update ahead of the step recorded, or
    dropped the step from the log. (Only the main thread can take signals; elsewhere nothing
    changes.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:  # (a handler not set from Python reads as None: the default's place)
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(caught):  # also when the block raised: not lost
            signal.raise_signal(signum)


def make_optimizer(model, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) over the parameters that require gradients, with weight decay
    on the matrices, none on norms and biases; fused: on the 2-core AVX2 EPYC the tiny preset's
    update took 3.4 ms against the default single-tensor update's 9.6, on the AMX Xeon an
    8-expert model's (4 layers, d 512) 38 against 198 (docs/benchmarks.md). Not fused when the
    parameters are DTensors of several meshes (expert parallelism: the experts' 2-D mesh and
    the others' flattened one), which one fused step over all of them mixes, and DTensor
    accepts that only in newer torch releases than this package requires."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or name.endswith("layernorm.weight") else decay).append(param)
    meshes = {param.device_mesh for param in decay + no_decay if isinstance(param, DTensor)}
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.lr,
        betas=(0.9, 0.95),
        fused=len(meshes) <= 1,
    )


def step_statistics(model, output) -> dict:
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
    loop: StepLoop, *, progress: bool, decay: list | None = None,
) -> tuple[int, bool]:  # fmt: skip
    """Train from ``start_step`` to ``settings.steps``, appending an entry per step to ``log``
    (validation every ``eval_every`` steps and at the end; when ``log`` is empty, also before
    the first step, logged in its entry with the suffix ``_before``: ``val_bpb_before``),
    checkpointing every ``checkpoint_every`` steps before the last; a progress bar on stderr
    when ``progress``. Batches come from ``corpus``, and from the decay start on from the
    ``decay`` mixture (:func:`load_decay_corpora`) when it is given.
    Stops early on a KeyboardInterrupt or when ``loop.statistics`` says so (after that step);
    a step's entry is logged before the validation after it, which an interrupt leaves out of
    the entry. A KeyboardInterrupt before this call's first step has finished propagates
    (there is no step to save), with a message saying so. Returns the last step trained and
    whether it stopped early."""
    tokens_per_step = settings.batch_size * settings.seq_len
    bar = report.progress_bar(settings.steps, start_step, progress)
    step, stopped = start_step, False
    try:
        before = {} if log else {f"{key}_before": bpb for key, bpb in loop.validate().items()}
        last_bpb = before["val_bpb_before"] if before else report.validations(log)[-1][1]
        while step < settings.steps:
            started = time.perf_counter()
            lr = learning_rate(settings, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if decay and step >= settings.decay_start:  # phase 2: the --decay-data mixture
                batch = mixture_batch(decay, step, settings.seed, settings.batch_size,
                                      settings.seq_len)  # fmt: skip
            else:
                batch = batch_at(corpus.train, step, settings.seed, settings.batch_size,
                                 settings.seq_len)  # fmt: skip
            window = batch[loop.rows].to(loop.device)
            optimizer.zero_grad(set_to_none=True)  # the last step's gradients, before the forward
            output = model(window, labels=window)  # shifted inside: seq_len targets
            output.loss.backward()
            loop.clip()
            with deferred_signals():  # the update, the count and the entry: all or none
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


def _write_run_log(out: Path, log: list[dict], step: int) -> None:
    """``training.png``, then ``log.json`` in one step (a new file renamed over the old: a
    current log.json says both are written, :func:`run_outputs_lag`); a TrainingError saying
    how to write them again when the disk refuses."""
    partial = out / "log.json.partial"
    try:
        try:
            report.plot_run(log, out / "training.png")
        except OSError:
            raise
        except Exception:  # a plot that fails otherwise loses no log (the error propagates)
            _replace_file(partial, out / "log.json", json.dumps(log) + "\n")
            raise
        _replace_file(partial, out / "log.json", json.dumps(log) + "\n")
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise TrainingError(
            f"--out {out}: cannot write training.png and log.json ({error.strerror or error}); "
            f"the checkpoint of step {step} is complete: free space, then moe-blocks train "
            f"--out {out} --resume --steps {step} writes them"
        ) from None


def _replace_file(partial: Path, path: Path, text: str) -> None:
    """Write ``text`` to ``partial``, then rename it over ``path`` (one step)."""
    partial.write_text(text)
    os.replace(partial, path)


@dataclass
class TrainResult:
    """A finished (or interrupted) run: its folder and log; ``main``: this process wrote the
    files (rank 0 of a sharded run); ``sharded``: its checkpoint holds shards and ``out/model``
    the Hugging Face export."""

    out: Path
    log: list
    interrupted: bool
    main: bool = True
    sharded: bool = False

    @property
    def start_bpb(self) -> float:
        """Validation bits per byte before the run's first step."""
        return report.validations(self.log)[0][1]

    @property
    def final_bpb(self) -> float:
        """The last validation's bits per byte."""
        return report.validations(self.log)[-1][1]


class OneProcess:
    """How one plain process trains, for :func:`run_training`. Every rank of a torchrun job
    trains through :class:`moe_blocks.models.parallel.Ranks`, which answers the same
    questions: which process writes files, how the model is sharded, saved, restored and
    clipped, what a step logs, how a stop is asked for."""

    main, rank, world, sharded = True, 0, 1, False

    def __init__(self, device: torch.device | str | None = None) -> None:
        """``device``: where the model trains (None: where it is loaded, the CPU)."""
        self.device = None if device is None else torch.device(device)
        self.evaluation = {"device": self.device}  # evaluate's options

    def barrier(self) -> None:
        pass

    def check_checkpoint(self, state: TrainerState | None, checkpoint: Path) -> None:
        if state is not None and not (checkpoint / "config.json").exists():
            check_shards_readable(checkpoint)

    def check(self, settings: TrainSettings, model) -> None:
        pass

    def initial_model(self, settings, origin, state, checkpoint: Path) -> JetMoEForCausalLM:
        if state is not None and settings.lora_rank is None:  # (LoRA's holds the adapters)
            model = load_model(checkpoint, "--resume")
        else:
            model = starting_model(settings, origin)
        return model if self.device is None else model.to(self.device)

    def shard(self, model) -> None:
        pass

    def restore(self, checkpoint: Path, model, optimizer) -> None:
        restore_optimizer(checkpoint, model, optimizer)

    def describe(self) -> str | None:
        return None

    def rows(self, settings: TrainSettings) -> slice:
        return slice(None)

    def clip(self, model) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    def statistics(self, model, output, stop: bool) -> tuple[dict, bool]:
        return step_statistics(model, output), stop

    def save(self, checkpoint: Path, model, optimizer, settings, step: int, log: list) -> None:
        save_checkpoint(checkpoint, model, optimizer, settings, step, log)

    def finish(self, model, out: Path, step: int, tokenizer: str | None) -> None:
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
    state = check_output(settings, resume=resume, overwrite=overwrite)
    adapters = lora_config(settings) if settings.lora_rank is not None else None  # needs PEFT
    processes.check_checkpoint(state, checkpoint_dir)
    origin_folder = settings.resume_from and checkpoint_folder(settings.resume_from)
    tokenizer = load_tokenizer(settings.tokenizer, origin_folder)
    if tokenizer is not None:  # recorded as the folder it came from (--resume-from's own)
        settings = replace(settings, tokenizer=tokenizer.name_or_path)
        if origin_folder is None and state is None:  # a preset from scratch: sized for it
            overrides = {"vocab_size": len(tokenizer)} | settings.overrides
            settings = replace(settings, overrides=overrides)
    corpus = load_corpus(settings.data, settings.seq_len, tokenizer=tokenizer)
    decay = load_decay_corpora(settings, corpus, tokenizer)
    origin = load_origin(settings, tokenizer)
    check_overwrite_keeps_origin(settings, origin, overwrite=overwrite)
    model = processes.initial_model(settings, origin, state, checkpoint_dir)
    check_vocabulary(tokenizer, model.config.vocab_size, settings.resume_from or settings.preset)
    processes.check(settings, model)
    processes.barrier()  # every process has looked at OUT before the main one writes into it
    if processes.main:
        prepare_output(out, overwrite=overwrite)
        check_space(out, model, settings)
        report.announce(settings, corpus, model, state)  # (before adapters join the model)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model.train()
    model.gradient_checkpointing = settings.activation_checkpointing
    frozen = prepare_model(model, settings, origin)
    lora = None
    if adapters is not None:  # one process (train refuses a sharded LoRA run)
        lora = attach_lora(model, adapters, seed=settings.seed)
        if state is not None:
            load_adapters(model, checkpoint_dir)
    processes.shard(model)
    optimizer = make_optimizer(model, settings)
    log: list[dict] = []
    start_step = 0
    if state is not None:
        processes.restore(checkpoint_dir, model, optimizer)
        start_step = state.step
        log = load_log(checkpoint_dir, model)
    if processes.main:
        for line in (origin and origin.summary(settings), processes.describe(),
                     lora and describe_lora(model, settings),
                     decay and report.describe_decay(settings, decay)):  # fmt: skip
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
        step, interrupted = run_steps(
            model, optimizer, settings, corpus, log, start_step, steps,
            progress=progress and processes.main, decay=decay,
        )  # fmt: skip
        # SIGINT/SIGTERM from here: the run ends once all is written (a second: at once)
        with StopRequest(second_interrupts=True) as late:
            if frozen is not None:
                frozen.remove()  # the model is not used here after training
            save(step)
            processes.finish(model, out, step, settings.tokenizer)
            if lora is not None:
                export_lora(lora, out, settings, step)
            if processes.main:
                _write_run_log(out, log, step)
    interrupted = interrupted or late.requested
    return TrainResult(out, log, interrupted, processes.main, processes.sharded)
