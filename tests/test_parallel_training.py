"""Sharded JetMoE training (models/parallel.py) on gloo in spawned CPU processes, against the
one-process trainer with the same global batch, the balance loss on: 2 ranks as FSDP and as
dp 1 x ep 2, and 4 ranks as dp 2 x ep 2, give its losses step by step (relative error <= 1e-5)
and weights; the sharded checkpoint resumes at 2 ranks and in one process with its next-step
loss; the Hugging Face export equals its save_pretrained; a SIGINT'ed run saves the step all
ranks agree on; --train-new-experts-only trains what one process trains and keeps the other
experts bit-identical. (The gradients on every mesh: tests/test_parallel_gradients.py.)"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from moe_blocks.models import parallel as parallel_module
from moe_blocks.models import train as train_module
from moe_blocks.models.cli import main
from moe_blocks.models.parallel import spawn_local, train_sharded
from moe_blocks.models.train import TrainSettings, continual, loop, report, train

# Step losses: one process and several ranks sum in different orders, ~1e-7 apart.
LOSS_TOLERANCE = {"atol": 0.0, "rtol": 1e-5}
# A later step's loss after resuming: Adam's update amplifies the last bits a little.
TOLERANCE = {"atol": 2e-5, "rtol": 2e-5}
# Weights after AdamW steps: where an element's gradient is near zero, its update lr·m/√v
# turns summation-order noise into up to lr (3e-3) per step; typical differences are ~1e-6,
# one element in 8192 reached 2.1e-5. A real error (a gradient missing a rank's share, a
# wrong expert) moves weights by ~lr per step.
WEIGHT_TOLERANCE = {"atol": 1e-4, "rtol": 2e-5}
# A small JetMoE (the tiny preset, narrower), its aux loss (balance + z-loss) on: with global
# balance statistics the sharded runs compute the one-process losses.
OVERRIDES = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=64, kv_channels=16)


def _settings(out, data, steps: int) -> TrainSettings:
    return TrainSettings(
        data=str(data), out=str(out), steps=steps, batch_size=8, seq_len=16, lr=3e-3,
        warmup_steps=1, decay_fraction=0.0, eval_every=100, eval_batches=1,
        checkpoint_every=100, overrides=OVERRIDES,
    )  # fmt: skip


def _no_plot(log, path) -> None:
    """Stands in for plot_run: the plot is not what these tests check (~1 s each)."""


def _train_four(rank: int, world_size: int, settings: TrainSettings) -> None:
    report.plot_run = _no_plot
    train_sharded(settings, ep=2, progress=False)


def _train_ranks(rank: int, world_size: int, settings: TrainSettings, ep: int) -> None:
    report.plot_run = _no_plot
    train(settings, ep=ep, progress=False)  # the one entry point: sharded in a process group


def _resume_two_then_interrupt(rank: int, world_size: int, settings: TrainSettings) -> None:
    """Resume at 2 ranks (ep 2) for one step; then continue towards step 6 while rank 1 gets
    a SIGINT during step 4: both ranks must stop after step 4 and save it."""
    report.plot_run = _no_plot
    train_sharded(settings, ep=2, resume=True, progress=False)
    learning_rate = train_module.learning_rate

    def interrupting(settings, step):
        if step == 3 and rank == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return learning_rate(settings, step)

    loop.learning_rate = interrupting
    longer = dataclasses.replace(settings, steps=6)
    result = train_sharded(longer, ep=2, resume=True, progress=False)
    assert result.interrupted and result.log[-1]["step"] == 4, result.log[-1]


def _losses(log: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log if "loss" in entry]


def _trainer_state(out) -> dict:
    return json.loads((out / "checkpoint" / "trainer_state.json").read_text())


@pytest.mark.slow  # 33-70 s on this 2-core machine (other jobs): spawns of 4 and 2 ranks
def test_sharded_training_equals_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "plot_run", _no_plot)
    data = _text(tmp_path / "text.txt")

    # One process, 2 steps, then its HF files; resumed to step 3 for the next-step loss.
    single = train(_settings(tmp_path / "single", data, 2), progress=False)
    shutil.copytree(tmp_path / "single" / "checkpoint", tmp_path / "single_step2")
    single_next = train(_settings(tmp_path / "single", data, 3), resume=True, progress=False)

    # 4 ranks as dp 2 x ep 2, the same global batch of 8 windows (2 per rank).
    spawn_local(_train_four, 4, _settings(tmp_path / "four", data, 2))
    four_log = json.loads((tmp_path / "four" / "log.json").read_text())
    torch.testing.assert_close(_losses(four_log), _losses(single.log), **LOSS_TOLERANCE)
    assert _trainer_state(tmp_path / "four")["sharded"] == {"world_size": 4, "ep": 2}
    assert sorted(p.name for p in tmp_path.iterdir() if ".partial" in p.name) == []

    # The HF export of the sharded run is the one-process run's save_pretrained.
    exported, expected = tmp_path / "four" / "model", tmp_path / "single_step2"
    assert json.loads((exported / "config.json").read_text()) == json.loads(
        (expected / "config.json").read_text()
    )
    ours, theirs = (load_file(str(d / "model.safetensors")) for d in (exported, expected))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], msg=key, **WEIGHT_TOLERANCE)

    # Resume the 4-rank checkpoint at 2 ranks and in one plain process: the step-3 loss.
    for world in (2, 1):
        shutil.copytree(tmp_path / "four", tmp_path / f"resume{world}")
    spawn_local(_resume_two_then_interrupt, 2, _settings(tmp_path / "resume2", data, 3))
    one = train_sharded(_settings(tmp_path / "resume1", data, 3), resume=True, progress=False)
    two_log = json.loads((tmp_path / "resume2" / "checkpoint" / "log.json").read_text())
    expected_next = _losses(single_next.log)[-1]
    torch.testing.assert_close(_losses(one.log)[-1], expected_next, **TOLERANCE)
    torch.testing.assert_close(_losses(two_log)[2], expected_next, **TOLERANCE)

    # The interrupted run saved step 4, consistently: its state, log and shards agree.
    state = _trainer_state(tmp_path / "resume2")
    assert state["step"] == 4 and state["sharded"] == {"world_size": 2, "ep": 2}
    assert [entry["step"] for entry in two_log if "loss" in entry] == [1, 2, 3, 4]
    assert not (tmp_path / "resume2" / "checkpoint.partial").exists()


def _text(path) -> str:
    generator = torch.Generator().manual_seed(0)
    path.write_bytes(bytes(torch.randint(32, 127, (6000,), generator=generator).tolist()))
    return path


@pytest.mark.parametrize("ep", [1, 2], ids=["fsdp2", "dp1xep2"])
def test_two_rank_training_equals_one_process(ep, tmp_path, monkeypatch):
    """torchrun 2 as FSDP, and --ep 2 (data-parallel size 1, where torch's FSDP2 would divide
    expert gradients twice): the one-process losses step by step, balance loss on. Run through
    train(), which takes the sharded path by itself inside a process group (ep 1 too). The
    --ep 2 run recomputes its layers in backward (--activation-checkpointing), which must
    change no loss."""
    monkeypatch.setattr(report, "plot_run", _no_plot)
    data = _text(tmp_path / "text.txt")
    single = train(_settings(tmp_path / "single", data, 3), progress=False)
    sharded = _settings(tmp_path / "two", data, 3)
    sharded.activation_checkpointing = ep == 2
    spawn_local(_train_ranks, 2, sharded, ep)
    two_log = json.loads((tmp_path / "two" / "log.json").read_text())
    assert all(entry["aux_loss"] > 0 for entry in single.log)
    torch.testing.assert_close(_losses(two_log), _losses(single.log), **LOSS_TOLERANCE)
    tokens = [entry["tokens_per_expert"] for entry in (single.log[-1], two_log[-1])]
    assert tokens[0] == tokens[1]  # global statistics: every router counts the whole batch
    assert _trainer_state(tmp_path / "two")["sharded"] == {"world_size": 2, "ep": ep}


@pytest.mark.parametrize(
    "balance, ep",
    [("mutual_information", 1), ("load_concentration", 2)],
    ids=["mi-fsdp2", "lc-dp1xep2"],
)
def test_a_balance_loss_of_the_batch_marginal_equals_one_process_sharded(
    balance, ep, tmp_path, monkeypatch
):
    """The mutual-information and load-concentration losses take the entropy of the batch's
    mean routing distribution: sharded, the whole batch's (summed over the ranks with
    autograd), not each rank's (their losses were 1.5e-5 to 6.8e-5 off one process's)."""
    monkeypatch.setattr(report, "plot_run", _no_plot)
    data = _text(tmp_path / "text.txt")
    settings = dataclasses.replace(_settings(tmp_path / "single", data, 3), balance_loss=balance)
    single = train(settings, progress=False)
    sharded = dataclasses.replace(settings, out=str(tmp_path / "two"))
    spawn_local(_train_ranks, 2, sharded, ep)
    two_log = json.loads((tmp_path / "two" / "log.json").read_text())
    assert all(entry["aux_loss"] != 0 for entry in single.log)
    torch.testing.assert_close(_losses(two_log), _losses(single.log), **LOSS_TOLERANCE)


def test_training_only_new_experts_under_expert_parallelism_equals_one_process(
    tmp_path, monkeypatch
):
    """moe-blocks extend, then train --resume-from EXT --train-new-experts-only at 2 ranks with
    --ep 2: the one-process losses, and the old experts bit-identical in the exported model."""
    monkeypatch.setattr(report, "plot_run", _no_plot)
    data = _text(tmp_path / "text.txt")
    train(_settings(tmp_path / "base", data, 2), progress=False)
    extended = tmp_path / "extended"
    assert main(["extend", str(tmp_path / "base"), "--add", "2", "--out", str(extended)]) == 0
    tuned = {"resume_from": str(extended), "train_new_experts_only": True}
    single = train(dataclasses.replace(_settings(tmp_path / "single", data, 2), **tuned),
                   progress=False)  # fmt: skip
    settings = dataclasses.replace(_settings(tmp_path / "two", data, 2), **tuned)
    spawn_local(_train_ranks, 2, settings, 2)
    two_log = json.loads((tmp_path / "two" / "log.json").read_text())
    torch.testing.assert_close(_losses(two_log), _losses(single.log), **LOSS_TOLERANCE)
    before = load_file(str(extended / "model.safetensors"))
    after = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    per_expert = ("input_linear.weight", "output_linear.weight", "router.layer.weight",
                  "router.expert_prior")  # fmt: skip
    expert_tensors = [key for key in before if key.endswith(per_expert)]
    assert len(expert_tensors) >= 4 * OVERRIDES["num_hidden_layers"]
    for key in expert_tensors:
        assert before[key].shape[0] == 6, key  # 4 experts and 2 new ones
        assert torch.equal(after[key][:4], before[key][:4]), key
        assert not torch.equal(after[key][4:], before[key][4:]), key


def test_a_sharded_run_interrupted_before_its_first_step_saves_that_step(tmp_path, monkeypatch):
    """Under torchrun a SIGINT only sets a flag once the loop has begun: one during the
    validation before step 1 lets step 1 finish, which is saved (one process: nothing is)."""
    monkeypatch.setattr(report, "plot_run", _no_plot)
    data = tmp_path / "text.txt"
    data.write_bytes(bytes(range(32, 127)) * 20)
    evaluate = train_module.evaluate

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(continual, "evaluate", interrupted)
    result = train_sharded(_settings(tmp_path / "run", data, 3), progress=False)
    assert result.interrupted and [entry["step"] for entry in result.log] == [1]
    assert _trainer_state(tmp_path / "run")["step"] == 1


def test_train_cli_rejects_bad_ep(tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "run"), "--quiet"]
    assert main([*args, "--ep", "2"]) == 2  # one process, not started by torchrun
    assert "--ep 2 must divide the number of processes (1" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()  # the one-process group it made is gone
    assert main([*args, "--ep", "0"]) == 2
    assert "--ep must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_parallelize_is_importable_as_issue_11_names_it():
    from moe_blocks.models import parallelize

    assert parallelize is parallel_module.parallelize


def test_clip_grad_norm_is_importable_where_the_trainer_docs_named_it():
    """Issue 19 names ``moe_blocks.models.parallel.clip_grad_norm_``: the library's own."""
    import moe_blocks.parallel
    from moe_blocks.models.parallel import clip_grad_norm_

    assert clip_grad_norm_ is moe_blocks.parallel.clip_grad_norm_


def _character_tokenizer(folder) -> None:
    """A transformers tokenizer of the printable ASCII characters (97 ids with end and unknown
    tokens: a vocabulary under 256), saved in ``folder``."""
    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1} | {chr(c): c - 30 for c in range(32, 127)}
    character = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    character.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=character, eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(folder)


def test_sharded_training_with_a_tokenizer_equals_one_process_and_exports_it(tmp_path, monkeypatch):
    """--ep 2 with a 97-token tokenizer: the one-process losses, and the model/ export carries
    the tokenizer files (a later --resume-from or generate reads them)."""
    monkeypatch.setattr(report, "plot_run", _no_plot)
    data = _text(tmp_path / "text.txt")
    tokenizer = tmp_path / "tokenizer"
    _character_tokenizer(tokenizer)
    settings = {"tokenizer": str(tokenizer)}
    single = train(
        dataclasses.replace(_settings(tmp_path / "single", data, 3), **settings), progress=False
    )
    spawn_local(
        _train_ranks, 2, dataclasses.replace(_settings(tmp_path / "two", data, 3), **settings), 2
    )
    two_log = json.loads((tmp_path / "two" / "log.json").read_text())
    torch.testing.assert_close(_losses(two_log), _losses(single.log), **LOSS_TOLERANCE)
    for folder in (tmp_path / "single" / "checkpoint", tmp_path / "two" / "model"):
        assert (folder / "tokenizer.json").read_bytes() == (
            tokenizer / "tokenizer.json"
        ).read_bytes()
        assert json.loads((folder / "config.json").read_text())["vocab_size"] == 97
    _extend_and_prune_keep_the_tokenizer(tmp_path / "two", data, tokenizer, tmp_path)


def _extend_and_prune_keep_the_tokenizer(run, data, tokenizer, tmp_path) -> None:
    """extend and prune on a torchrun run folder whose model has a 97-token tokenizer: the run's
    corpus is known (from its checkpoint's trainer state: it was "unknown" through model/), the
    text is read as its tokens (as bytes before, ids past the vocabulary: a traceback), and the
    tokenizer goes with the new model."""
    from moe_blocks.models.cli import main

    extended, pruned = tmp_path / "extended", tmp_path / "pruned"
    assert main(["extend", str(run), "--add", "1", "--seq-len", "8", "--out", str(extended)]) == 0
    record = json.loads((extended / "extension.json").read_text())
    assert record["previous_data"] == str(data)
    small = ["--batches", "1", "--batch-size", "2", "--seq-len", "8", "--data", str(data)]
    assert main(["prune", str(run), "--keep-fraction", "0.5", *small, "--out", str(pruned)]) == 0
    for folder in (extended, pruned):
        assert (folder / "tokenizer.json").read_bytes() == (
            tokenizer / "tokenizer.json"
        ).read_bytes()
        assert json.loads((folder / "config.json").read_text())["vocab_size"] == 97
