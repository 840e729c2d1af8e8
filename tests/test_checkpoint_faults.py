"""Faults in the middle of a save: a full disk, a process killed at each point of writing and
publishing a checkpoint, SIGTERM. After each, ``--resume`` must end with the losses of an
uninterrupted run (never a mix of two steps' state), in one process and under torchrun
(2 spawned gloo ranks). Runs of 6 steps of a small JetMoE checkpoint every 2 steps; the fault
hits the save of step 4, so the run resumes from step 2 (or from 4 where the new checkpoint
was already published)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from moe_blocks.models import train as train_module
from moe_blocks.models.parallel import spawn_local, train_sharded
from moe_blocks.models.train import (
    TrainingError,
    TrainSettings,
    checkpoint_folder,
    distributed,
    load_trainer_state,
    loop,
    report,
    run_folder,
    train,
)

from .helpers import zero_safetensors_in_place

OVERRIDES = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=32, kv_channels=8)


class Killed(BaseException):
    """Stands for the process dying (SIGKILL): nothing catches it, nothing cleans up."""


def _settings(out: Path, data: Path, steps: int = 6) -> TrainSettings:
    return TrainSettings(
        data=str(data), out=str(out), steps=steps, batch_size=4, seq_len=16, lr=3e-3,
        warmup_steps=1, decay_fraction=0.0, eval_every=100, eval_batches=1,
        checkpoint_every=2, overrides=OVERRIDES,
    )  # fmt: skip


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    generator = torch.Generator().manual_seed(0)
    path.write_bytes(bytes(torch.randint(32, 127, (4000,), generator=generator).tolist()))
    return path


@pytest.fixture(autouse=True)
def _no_plot(monkeypatch):
    monkeypatch.setattr(report, "plot_run", lambda log, path: None)


def _losses(log) -> list[float]:
    return [entry["loss"] for entry in log]


def _fail_on_call(number: int, error: BaseException, original):
    calls = []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise error
        return original(*args, **kwargs)

    return patched


def _at_the_rename_publishing(original, directory: str):
    """Path.rename that dies when it would publish ``directory.partial`` while the previous
    checkpoint has been moved aside: between the two renames."""

    def rename(self, target):
        if self.name == f"{directory}.partial" and self.with_name(f"{directory}.previous").exists():
            raise Killed
        return original(self, target)

    return rename


def _after_publishing(original):
    """shutil.rmtree that dies when it would delete the replaced checkpoint."""

    def rmtree(path, *args, **kwargs):
        if Path(path).name == "checkpoint.previous" and Path(path).exists():
            raise Killed
        return original(path, *args, **kwargs)

    return rmtree


FAULTS = {
    # the optimizer state's file, the second checkpoint's: no space left
    "disk full": lambda mp: mp.setattr(run_folder, "save_file", _fail_on_call(
        2, OSError(errno.ENOSPC, "No space left on device"), run_folder.save_file)),
    # killed while writing, after the model weights, before the optimizer state
    "killed while writing": lambda mp: mp.setattr(
        run_folder, "save_file", _fail_on_call(2, Killed(), run_folder.save_file)),
    "killed between the renames": lambda mp: mp.setattr(
        Path, "rename", _at_the_rename_publishing(Path.rename, "checkpoint")),
    "killed after publishing": lambda mp: mp.setattr(
        run_folder.shutil, "rmtree", _after_publishing(shutil.rmtree)),
}  # fmt: skip


@pytest.mark.parametrize("via", ["python", "cli"])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_during_a_save_never_mixes_two_steps(fault, via, tmp_path, data, monkeypatch):
    """``via``: resumed by ``train(resume=True)`` or by ``moe-blocks train --resume``, which
    reads the checkpoint's settings before the trainer starts (and read a checkpoint killed
    between its renames as missing)."""
    from moe_blocks.models.cli import main

    reference = train(_settings(tmp_path / "reference", data), progress=False)
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        FAULTS[fault](patch)
        with pytest.raises((Killed, TrainingError)) as raised:
            train(_settings(run, data), progress=False)
    if fault == "killed between the renames":  # generate reads the last complete one
        assert checkpoint_folder(run) == run / "checkpoint.previous"
    if fault == "disk full":  # one line saying what happened and what is kept
        message = str(raised.value)
        assert "No space left on device" in message and "still holds the last" in message
        assert not (run / "checkpoint.partial").exists()
    if via == "cli":
        assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
        log = run_folder.read_json(run / "log.json", list)
    else:
        log = train(_settings(run, data), resume=True, progress=False).log
    assert _losses(log) == _losses(reference.log)
    assert load_trainer_state(run / "checkpoint").step == 6
    assert not [p.name for p in run.iterdir() if p.name.endswith((".partial", ".previous"))]


def test_sigterm_in_one_process_saves_the_last_step(tmp_path, data, monkeypatch):
    reference = train(_settings(tmp_path / "reference", data), progress=False)
    learning_rate = train_module.learning_rate

    def terminated_in_step_4(settings, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return learning_rate(settings, step)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "learning_rate", terminated_in_step_4)
        result = train(_settings(tmp_path / "run", data), progress=False)
    assert result.interrupted and load_trainer_state(tmp_path / "run" / "checkpoint").step == 3
    resumed = train(_settings(tmp_path / "run", data), resume=True, progress=False)
    assert _losses(resumed.log) == _losses(reference.log)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_last_save_in_one_process_waits_for_it(signum, tmp_path, data):
    """Ctrl-C or SIGTERM while the run's last checkpoint is written (one process): the save
    completes and the run ends as asked, as under torchrun, where a signal only asks to stop.
    It was an interrupt that abandoned the save: the checkpoint stayed at the step before,
    with a checkpoint.partial beside it."""
    run = tmp_path / "run"
    save_file = run_folder.save_file
    calls = []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the last save (step 2 saved the first), its optimizer state
            os.kill(os.getpid(), signum)
        return save_file(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_folder, "save_file", signalled)
        result = train(_settings(run, data, steps=4), progress=False)
    assert len(calls) == 2 and result.interrupted
    assert load_trainer_state(run / "checkpoint").step == 4
    assert run_folder.read_json(run / "log.json", list)[-1]["step"] == 4
    assert not [p.name for p in run.iterdir() if p.name.endswith((".partial", ".previous"))]


def test_a_second_signal_during_the_last_save_interrupts_it(tmp_path, data):
    """Twice Ctrl-C while the last checkpoint is written: the second interrupts (a save that
    hangs can be stopped); the last complete checkpoint is kept and --resume ends as an
    uninterrupted run."""
    reference = train(_settings(tmp_path / "reference", data, steps=4), progress=False)
    run = tmp_path / "run"
    save_file = run_folder.save_file
    calls = []

    def signalled_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the last save (step 2 saved the first)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return save_file(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_folder, "save_file", signalled_twice)
        with pytest.raises(KeyboardInterrupt, match="interrupted twice"):
            train(_settings(run, data, steps=4), progress=False)
    assert load_trainer_state(run / "checkpoint").step == 2
    resumed = train(_settings(run, data, steps=4), resume=True, progress=False)
    assert _losses(resumed.log) == _losses(reference.log)


def _interrupting(signum: int, when):
    """An optimizer step post-hook that sends ``signum`` to this process after the update
    ``when(updates)`` names: the signal lands between the weights' update and the step's
    count and log entry."""
    updates = []

    def hook(optimizer, args, kwargs):
        updates.append(1)
        if when(len(updates)):
            os.kill(os.getpid(), signum)

    return register_optimizer_step_post_hook(hook), updates


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_right_after_a_weight_update_saves_that_step_whole(signum, tmp_path, data):
    """Ctrl-C (or SIGTERM) that lands after the update of step 3 but before the loop counted
    it: the checkpoint is step 3's (its weights and its count and log entry), so --resume
    gives the uninterrupted losses and a log of every step once (it saved step 2's count
    with step 3's weights, and the resumed run updated twice)."""
    reference = train(_settings(tmp_path / "reference", data), progress=False)
    handle, updates = _interrupting(signum, lambda count: count == 3)
    try:
        result = train(_settings(tmp_path / "run", data), progress=False)
    finally:
        handle.remove()
    assert result.interrupted and len(updates) == 3
    assert load_trainer_state(tmp_path / "run" / "checkpoint").step == 3
    assert [entry["step"] for entry in result.log] == [1, 2, 3]
    resumed = train(_settings(tmp_path / "run", data), resume=True, progress=False)
    assert _losses(resumed.log) == _losses(reference.log)
    assert [entry["step"] for entry in resumed.log] == list(range(1, 7))


def test_a_signal_deferred_over_a_step_that_raises_is_not_lost():
    with pytest.raises(KeyboardInterrupt):
        with loop.deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            raise ValueError("the step failed")


def test_ctrl_c_twice_in_a_save_keeps_a_checkpoint(tmp_path, data, monkeypatch):
    """The first Ctrl-C lands between the two renames of step 4's save (the old checkpoint
    moved aside, the new not yet published); the run saves again, and a second Ctrl-C lands
    in that save once the new folder is written: the step-2 checkpoint (or step 4's) must
    still be there for --resume (the retry deleted the moved-aside one first)."""
    reference = train(_settings(tmp_path / "reference", data), progress=False)
    run = tmp_path / "run"
    rename, interrupts = Path.rename, []

    def interrupted_rename(self, target):
        if self.name == "checkpoint.partial" and len(interrupts) < 2:
            if interrupts or (run / "checkpoint.previous").exists():
                interrupts.append(1)
                raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        train(_settings(run, data), progress=False)
    monkeypatch.setattr(Path, "rename", rename)
    assert len(interrupts) == 2
    resumed = train(_settings(run, data), resume=True, progress=False)
    assert _losses(resumed.log) == _losses(reference.log)


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_checkpoints_keeps_the_newest_k(keep, sharded, tmp_path, data, monkeypatch):
    """``keep_checkpoints`` K (``--keep-checkpoints``): after saves at steps 2, 4 and 6 the run
    holds the newest in checkpoint/ and the K - 1 before it as checkpoint.step-N/, each the
    checkpoint of its step (a run of N steps stops with the same weights and state), and
    --resume still reads checkpoint/."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    settings = replace(_settings(run, data), keep_checkpoints=keep)
    (train_sharded if sharded else train)(settings, progress=False)
    kept = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint"))
    expected = ["checkpoint", *[f"checkpoint.step-{s}" for s in (2, 4)][3 - keep :]]
    assert kept == sorted(expected)
    assert load_trainer_state(run / "checkpoint").step == 6
    for name in expected[1:]:
        step = int(name.rpartition("-")[2])
        assert load_trainer_state(run / name).step == step
        short = tmp_path / f"short{step}"
        (train_sharded if sharded else train)(
            replace(_settings(short, data, steps=step), steps=step), progress=False
        )
        for file in ("model.safetensors", "optimizer.safetensors") if not sharded else ():
            ours, theirs = (
                load_file(str(run / name / file)),
                load_file(str(short / "checkpoint" / file)),
            )
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs), (name, file)
    assert train(replace(settings, steps=8), resume=True, progress=False).log[-1]["step"] == 8


def _save_steps(
    directory: Path, steps: list[int], keep: int | None, *, recorded: bool = False
) -> None:
    """write_checkpoint of a checkpoint per step (its trainer_state.json, which with
    ``recorded`` also holds ``keep`` in its settings, as a training checkpoint's), in order."""
    for step in steps:
        state = {"step": step} | ({"settings": {"keep_checkpoints": keep}} if recorded else {})
        run_folder.write_checkpoint(
            directory,
            lambda folder, state=state: (folder / "trainer_state.json").write_text(
                json.dumps(state)
            ),
            keep=keep,
        )


def _kept(directory: Path) -> list[str]:
    return [path.name for path in run_folder.kept_checkpoints(directory)]


def test_kept_checkpoints_are_the_newest_of_earlier_steps_only(tmp_path):
    """The same step saved twice (Ctrl-C right after a periodic save) keeps no copy of
    itself in place of an older step; kept ones of a later step than a new save (a run
    rolled back, or replaced) go; a writer without ``keep`` (an export) leaves siblings
    alone."""
    checkpoint = tmp_path / "checkpoint"
    _save_steps(checkpoint, [2, 4, 4], keep=2)
    assert _kept(checkpoint) == ["checkpoint.step-2"]
    _save_steps(checkpoint, [6, 8], keep=3)
    assert _kept(checkpoint) == ["checkpoint.step-4", "checkpoint.step-6"]
    _save_steps(checkpoint, [5], keep=3)  # rolled back to step 4, saved step 5
    assert _kept(checkpoint) == ["checkpoint.step-4"]
    assert run_folder.load_json(checkpoint / "trainer_state.json") == {"step": 5}
    _save_steps(checkpoint, [7], keep=1)
    assert _kept(checkpoint) == []
    export = tmp_path / "model"
    (tmp_path / "model.step-3").mkdir()
    _save_steps(export, [1, 2], keep=None)
    assert _kept(export) == ["model.step-3"]


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_a_save_killed_after_publishing_still_keeps_what_it_replaced(keep, tmp_path, monkeypatch):
    """Killed once the new checkpoint is published but before the one it replaced became
    ``checkpoint.step-N``: the next start's recovery (:func:`recover_checkpoint`, which
    ``train`` runs first) keeps it as the save would have (``keep_checkpoints`` from the new
    checkpoint's trainer state), so the run still holds its newest K. An export's
    ``.previous`` (no trainer state) is deleted, as before."""
    checkpoint = tmp_path / "checkpoint"
    _save_steps(checkpoint, [2, 4], keep=keep, recorded=True)
    with monkeypatch.context() as patch:
        patch.setattr(run_folder, "_keep_replaced", _fail_on_call(1, Killed(), None))
        with pytest.raises(Killed):
            _save_steps(checkpoint, [6], keep=keep, recorded=True)
    assert (tmp_path / "checkpoint.previous").is_dir()
    run_folder.recover_checkpoint(checkpoint)
    assert _kept(checkpoint) == [f"checkpoint.step-{step}" for step in (2, 4)][3 - keep :]
    assert run_folder.load_json(checkpoint / "trainer_state.json")["step"] == 6
    assert not (tmp_path / "checkpoint.previous").exists()
    _save_steps(checkpoint, [8], keep=keep, recorded=True)  # and the next save goes on
    assert _kept(checkpoint) == [f"checkpoint.step-{step}" for step in (2, 4, 6)][4 - keep :]
    export = tmp_path / "model"
    _save_steps(export, [1, 2], keep=None)
    (tmp_path / "model.previous").mkdir()
    run_folder.recover_checkpoint(export)
    assert not (tmp_path / "model.previous").exists() and _kept(export) == []


def test_overwrite_removes_the_kept_checkpoints_of_the_run_it_replaces(tmp_path, data):
    run = tmp_path / "run"
    train(replace(_settings(run, data), keep_checkpoints=3), progress=False)
    assert _kept(run / "checkpoint") == ["checkpoint.step-2", "checkpoint.step-4"]
    with pytest.raises(TrainingError, match="checkpoint.step-2"):  # a run is there
        train(_settings(run, data, steps=2), progress=False)
    train(_settings(run, data, steps=2), overwrite=True, progress=False)
    assert _kept(run / "checkpoint") == []


def test_no_room_for_a_checkpoint_is_refused_before_any_step(tmp_path, data, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(TrainingError, match=r"MB free, a checkpoint of this model needs"):
        train(_settings(tmp_path / "run", data), progress=False)
    assert not (tmp_path / "run" / "checkpoint").exists()


def _dies(*args, **kwargs):
    os._exit(9)  # as SIGKILL: no cleanup; torchrun (here mp.spawn) then ends the other ranks


def _sharded_fault(fault: str, rank: int) -> None:
    """Plant ``fault`` in the second checkpoint (step 4) of a two-rank run."""
    if fault == "disk full" and rank == 0:  # rank 0's trainer state: the others wrote theirs

        def write_text(self, *args, **kwargs):
            if self.name == "trainer_state.json" and '"step": 4' in args[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return original_write_text(self, *args, **kwargs)

        original_write_text = Path.write_text
        Path.write_text = write_text
    elif fault == "killed while writing" and rank == 1:  # in the middle of the shards
        distributed.dcp.save = _fail_on_call(2, Killed(), distributed.dcp.save)
    elif fault == "killed between the renames" and rank == 0:
        Path.rename = _at_the_rename_publishing(Path.rename, "checkpoint")
    elif fault == "killed after publishing" and rank == 0:
        shutil.rmtree = _after_publishing(shutil.rmtree)


def _sharded_run(rank: int, world: int, settings: TrainSettings, fault: str | None) -> None:
    report.plot_run = lambda log, path: None
    if fault is not None:
        _sharded_fault(fault, rank)
    try:
        train_sharded(settings, ep=2, resume=fault is None, progress=False)
    except Killed:
        _dies()
    except TrainingError as error:  # every rank says it: a failed write fails the save
        assert (
            fault == "disk full"
            and "No space left on device" in str(error)
            or ("on another rank" in str(error))
        ), error
        assert "still holds the last checkpoint" in str(error), error
        return
    assert fault is None, f"{fault}: the run went on"


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_during_a_sharded_save_never_mixes_two_steps(fault, tmp_path, data):
    """Under torchrun (two ranks, ep 2) the same writer publishes: a full disk on one rank
    fails the save on every rank (none waits forever) and keeps the last checkpoint; a rank
    killed while writing, between the renames (where the old writer left only
    checkpoint.previous and checkpoint.partial, and --resume said trainer_state.json was
    missing) or after publishing leaves a checkpoint the next start reads; --resume then
    gives the uninterrupted run's losses."""
    reference = train(_settings(tmp_path / "reference", data), progress=False)
    settings = _settings(tmp_path / "run", data)
    if fault == "disk full":
        spawn_local(_sharded_run, 2, settings, fault)
    else:
        with pytest.raises(Exception, match="exit code 9"):
            spawn_local(_sharded_run, 2, settings, fault)
    run = tmp_path / "run"
    if fault == "killed between the renames":
        assert (run / "checkpoint.previous").is_dir() and not (run / "checkpoint").exists()
    spawn_local(_sharded_run, 2, settings, None)
    log = run_folder.read_json(run / "log.json", list)
    torch.testing.assert_close(_losses(log), _losses(reference.log), atol=0.0, rtol=1e-5)
    assert not [p.name for p in run.iterdir() if p.name.endswith((".partial", ".previous"))]


def _first_shard(checkpoint):
    return next(checkpoint.glob("*.distcp"))


SHARD_DAMAGES = {  # what is done to the checkpoint, and what the one line must name
    ".metadata deleted": (lambda c: (c / ".metadata").unlink(), "no .metadata"),
    ".metadata garbage": (lambda c: (c / ".metadata").write_bytes(b"garbage"), ".metadata is"),
    "a shard deleted": (lambda c: _first_shard(c).unlink(), ".distcp is missing"),
    "a shard truncated": (
        lambda c: _first_shard(c).write_bytes(_first_shard(c).read_bytes()[:100]),
        ".distcp is cut short",
    ),
}


@pytest.mark.parametrize("damage", SHARD_DAMAGES)
def test_a_damaged_sharded_checkpoint_is_one_line(damage, tmp_path, data, capsys):
    """A sharded checkpoint with its .metadata deleted or garbled, or a shard deleted or cut
    short: --resume exits 2 with one line naming the file (or the folder) and what to do, not
    DCP's traceback (16 to 60 lines before); the same under torchrun (train_sharded), where a
    missing .metadata was said to be a one-process run's checkpoint."""
    from moe_blocks.models.cli import main

    train_sharded(_settings(tmp_path / "run", data, steps=2), progress=False)
    checkpoint = tmp_path / "run" / "checkpoint"
    damaging, named = SHARD_DAMAGES[damage]
    damaging(checkpoint)
    capsys.readouterr()
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--resume",
            "--steps", "3", "--quiet"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(checkpoint) in err[0] and "--overwrite" in err[0], err
    assert named in err[0], err
    with pytest.raises(TrainingError, match="--overwrite") as raised:
        train_sharded(_settings(tmp_path / "run", data, steps=3), resume=True, progress=False)
    assert named in str(raised.value) and "one-process" not in str(raised.value)
    assert not capsys.readouterr().err  # no rank's traceback


@pytest.mark.parametrize("fault", ["training.png", "log.json"])
def test_a_full_disk_after_the_last_checkpoint_is_one_line_and_resume_writes_the_log(
    fault, tmp_path, data, monkeypatch, capsys
):
    """The disk fills after the last checkpoint, writing the run's plot or its log.json: one
    line (a traceback before) saying the checkpoint is complete and how to write them; that
    command (--resume at the checkpoint's step, refused before: "must be above it") writes
    the checkpoint's log, and once written the same step is refused again."""
    from moe_blocks.models.cli import main

    full = OSError(errno.ENOSPC, "No space left on device")
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--steps", "4", "--quiet",
            "--batch-size", "4", "--seq-len", "16", "--checkpoint-every", "2"]  # fmt: skip
    write_text = Path.write_text

    def fails(path, *args, **kwargs):
        if path in (run / fault, run / f"{fault}.partial"):  # not the checkpoint's log.json
            raise full
        return write_text(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        if fault == "training.png":
            patch.setattr(report, "plot_run", lambda log, path: fails(path))
        patch.setattr(Path, "write_text", fails)
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    resume = f"moe-blocks train --out {run} --resume --steps 4 writes them"
    assert len(err) == 1 and "No space left on device" in err[0] and resume in err[0], err
    assert load_trainer_state(run / "checkpoint").step == 4
    assert not (run / "log.json").exists() and not (run / "log.json.partial").exists()
    resumed = ["train", "--out", str(run), "--resume", "--steps", "4", "--quiet"]
    assert main(resumed) == 0
    log = run_folder.read_json(run / "log.json", list)
    assert log == run_folder.read_json(run / "checkpoint" / "log.json", list)
    assert log[-1]["step"] == 4
    capsys.readouterr()
    assert main(resumed) == 2
    assert "must be above it" in capsys.readouterr().err


def test_a_missing_model_export_is_said_and_rebuilt(tmp_path, data, capsys):
    """A torchrun run without its model/ export (stopped before the first, or deleted): every
    reader says so with the command that rebuilds it (they said "config.json not found"), and
    that command does."""
    import shutil

    from moe_blocks.models.cli import main
    from moe_blocks.models.train import export_step

    run = tmp_path / "run"
    train_sharded(_settings(run, data, steps=2), progress=False)
    shutil.rmtree(run / "model")
    rebuild = f"moe-blocks train --out {run} --resume --steps 2"
    for command in (["generate", "--checkpoint", str(run), "--max-new-tokens", "2"],
                    ["extend", str(run), "--add", "1", "--out", str(tmp_path / "x")]):  # fmt: skip
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "model/ export is missing" in err[0] and rebuild in err[0], err
    args = ["train", "--data", str(data), "--out", str(run), "--resume", "--steps", "2",
            "--quiet", "--batch-size", "4", "--seq-len", "16"]  # fmt: skip
    assert main(args) == 0
    assert export_step(run / "model") == 2 and checkpoint_folder(run) == run / "model"


def test_a_lagging_model_export_is_said_and_rebuilt(tmp_path, data, monkeypatch, capsys):
    """A torchrun run killed after its checkpoint but before its model/ export: readers of the
    run folder are told which step each holds, and train --resume --steps STEP (the
    checkpoint's) rebuilds the export from the checkpoint, which a current export refuses."""
    from moe_blocks.models.cli import main
    from moe_blocks.models.jetmoe import JetMoEForCausalLM
    from moe_blocks.models.parallel import load_sharded
    from moe_blocks.models.train import export_step

    run = tmp_path / "run"
    train_sharded(_settings(run, data, steps=2), progress=False)
    assert export_step(run / "model") == 2

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(distributed, "export_hf", killed)
        with pytest.raises(Killed):
            train_sharded(_settings(run, data, steps=4), resume=True, progress=False)
    assert load_trainer_state(run / "checkpoint").step == 4
    with pytest.warns(UserWarning, match=r"holds the weights of step 2 but .* is at step 4"):
        assert checkpoint_folder(run) == run / "model"
    args = ["train", "--data", str(data), "--out", str(run), "--resume", "--steps", "4",
            "--quiet", "--batch-size", "4", "--seq-len", "16"]  # fmt: skip
    assert main(args) == 0
    assert export_step(run / "model") == 4
    exported = JetMoEForCausalLM.from_pretrained(run / "model")
    expected = JetMoEForCausalLM.from_pretrained(run / "model")
    load_sharded(run / "checkpoint", expected)  # the checkpoint's weights, in one process
    for name, tensor in expected.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    capsys.readouterr()
    assert main(args) == 2  # the export is current: nothing to rebuild, nothing to train
    assert "must be above it" in capsys.readouterr().err


def _terminated_rank(rank: int, world: int, settings: TrainSettings) -> None:
    report.plot_run = lambda log, path: None
    learning_rate = loop.learning_rate

    def terminated_in_step_3(settings, step):
        if step == 2 and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler stopping one rank's job
        return learning_rate(settings, step)

    loop.learning_rate = terminated_in_step_3
    result = train_sharded(settings, ep=2, progress=False)
    assert result.interrupted and result.log[-1]["step"] == 3, result.log[-1]


def test_sigterm_on_one_rank_saves_the_step_all_ranks_agree_on(tmp_path, data):
    """Under torchrun a SIGTERM to one rank stops every rank after the same step, which is
    saved; --resume then gives the uninterrupted run's losses."""
    reference = train(_settings(tmp_path / "reference", data), progress=False)
    settings = _settings(tmp_path / "run", data)
    spawn_local(_terminated_rank, 2, settings)
    assert load_trainer_state(tmp_path / "run" / "checkpoint").step == 3
    spawn_local(_sharded_run, 2, settings, None)
    log = run_folder.read_json(tmp_path / "run" / "log.json", list)
    torch.testing.assert_close(_losses(log), _losses(reference.log), atol=0.0, rtol=1e-5)


def test_restored_optimizer_state_is_not_a_view_of_the_checkpoint_file(tmp_path):
    """safetensors maps the file it loads: AdamW state left as views of it would change when
    the checkpoint is rewritten in place (and copy its pages on the first update)."""
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    saved = {f"{name}::{key}": value for name, param in model.named_parameters()
             for key, value in optimizer.state[param].items()}  # fmt: skip
    run_folder.save_file(saved, str(tmp_path / "optimizer.safetensors"))
    restored = torch.optim.AdamW(model.parameters())
    run_folder.restore_optimizer(tmp_path, model, restored)
    zero_safetensors_in_place(tmp_path / "optimizer.safetensors")
    for name, param in model.named_parameters():
        for key, value in restored.state[param].items():
            assert torch.equal(value, saved[f"{name}::{key}"]), (name, key)
