"""Sharded JetMoE training (models/parallel.py) on gloo in spawned CPU processes, against the
one-process trainer with the same global batch: 4 ranks as dp 2 x ep 2 give its losses and
weights; the sharded checkpoint resumes at 2 ranks and in one process with its next-step loss;
the Hugging Face export equals its save_pretrained; a SIGINT'ed run saves the step all ranks
agree on. fp32 throughout; losses and weights agree to 2e-5 (one process and several ranks
sum in different orders, and Adam's update amplifies the last bits a little)."""

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
from moe_blocks.models.parallel import spawn_local, train_sharded
from moe_blocks.models.train import TrainSettings, train

TOLERANCE = {"atol": 2e-5, "rtol": 2e-5}
# Weights after AdamW steps: where an element's gradient is near zero, its update lr·m/√v
# turns summation-order noise into up to lr (3e-3) per step; typical differences are ~1e-6,
# one element in 8192 reached 2.1e-5. A real error (a gradient missing a rank's share, a
# wrong expert) moves weights by ~lr per step.
WEIGHT_TOLERANCE = {"atol": 1e-4, "rtol": 2e-5}
# A small JetMoE (the tiny preset, narrower); aux_loss_coef 0: the MoA routers' balance
# statistics are each rank's own, so with an aux loss sharded and one-process training differ.
OVERRIDES = dict(
    hidden_size=64, num_hidden_layers=2, intermediate_size=64, kv_channels=16, aux_loss_coef=0.0
)


def _settings(out, data, steps: int) -> TrainSettings:
    return TrainSettings(
        data=str(data), out=str(out), steps=steps, batch_size=8, seq_len=16, lr=3e-3,
        warmup_steps=1, decay_fraction=0.0, eval_every=100, eval_batches=1,
        checkpoint_every=100, overrides=OVERRIDES,
    )  # fmt: skip


def _no_plot(log, path) -> None:
    """Stands in for plot_run: the plot is not what these tests check (~1 s each)."""


def _train_four(rank: int, world_size: int, settings: TrainSettings) -> None:
    parallel_module.plot_run = _no_plot
    train_sharded(settings, ep=2, progress=False)
    _check_gradients(rank, world_size)


def _check_gradients(rank: int, world_size: int) -> None:
    """After one backward on each rank's quarter of a batch, the parallelized model's gradients
    (every parameter, gathered) and their total norm are those of one process on the batch.
    (Adam's update barely depends on the gradients' scale: the losses alone would not show an
    expert gradient averaged over the wrong number of ranks.)"""
    from torch.distributed.device_mesh import init_device_mesh

    from moe_blocks.models.jetmoe import JetMoEConfig, JetMoEForCausalLM
    from moe_blocks.models.parallel import clip_grad_norm_, parallelize

    config = JetMoEConfig.from_preset("tiny", **OVERRIDES)
    torch.manual_seed(0)
    reference = JetMoEForCausalLM(config)
    model = JetMoEForCausalLM(config)
    model.load_state_dict(reference.state_dict())
    parallelize(model, init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep")))
    ids = torch.randint(0, config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(1))
    reference(ids, labels=ids).loss.backward()
    mine = ids.tensor_split(world_size)[rank]
    model(mine, labels=mine).loss.backward()
    for name, param in model.named_parameters():
        expected = reference.get_parameter(name).grad
        torch.testing.assert_close(param.grad.full_tensor(), expected, msg=name, **TOLERANCE)
    expected_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
    torch.testing.assert_close(clip_grad_norm_(model, 1e9), expected_norm, **TOLERANCE)

    with pytest.raises(TypeError, match="JetMoEForCausalLM"):
        parallelize(reference.model, init_device_mesh("cpu", (world_size,)))
    misnamed = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "dp"))
    with pytest.raises(ValueError, match="names"):
        parallelize(JetMoEForCausalLM(config), misnamed)


def _resume_two_then_interrupt(rank: int, world_size: int, settings: TrainSettings) -> None:
    """Resume at 2 ranks (ep 2) for one step; then continue towards step 6 while rank 1 gets
    a SIGINT during step 4: both ranks must stop after step 4 and save it."""
    parallel_module.plot_run = _no_plot
    train_sharded(settings, ep=2, resume=True, progress=False)
    learning_rate = train_module.learning_rate

    def interrupting(settings, step):
        if step == 3 and rank == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return learning_rate(settings, step)

    train_module.learning_rate = interrupting
    longer = dataclasses.replace(settings, steps=6)
    result = train_sharded(longer, ep=2, resume=True, progress=False)
    assert result.interrupted and result.log[-1]["step"] == 4, result.log[-1]


def _losses(log: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log if "loss" in entry]


def _trainer_state(out) -> dict:
    return json.loads((out / "checkpoint" / "trainer_state.json").read_text())


@pytest.mark.slow  # 33-70 s on this 2-core machine (other jobs): spawns of 4 and 2 ranks
def test_sharded_training_equals_one_process(tmp_path, monkeypatch):
    for module in (train_module, parallel_module):
        monkeypatch.setattr(module, "plot_run", _no_plot)
    data = tmp_path / "text.txt"
    generator = torch.Generator().manual_seed(0)
    data.write_bytes(bytes(torch.randint(32, 127, (6000,), generator=generator).tolist()))

    # One process, 2 steps, then its HF files; resumed to step 3 for the next-step loss.
    single = train(_settings(tmp_path / "single", data, 2), progress=False)
    shutil.copytree(tmp_path / "single" / "checkpoint", tmp_path / "single_step2")
    single_next = train(_settings(tmp_path / "single", data, 3), resume=True, progress=False)

    # 4 ranks as dp 2 x ep 2, the same global batch of 8 windows (2 per rank).
    spawn_local(_train_four, 4, _settings(tmp_path / "four", data, 2))
    four_log = json.loads((tmp_path / "four" / "log.json").read_text())
    torch.testing.assert_close(_losses(four_log), _losses(single.log), **TOLERANCE)
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


def test_a_sharded_run_interrupted_before_its_first_step_saves_that_step(tmp_path, monkeypatch):
    """Under torchrun a SIGINT only sets a flag once the loop has begun: one during the
    validation before step 1 lets step 1 finish, which is saved (one process: nothing is)."""
    monkeypatch.setattr(parallel_module, "plot_run", _no_plot)
    data = tmp_path / "text.txt"
    data.write_bytes(bytes(range(32, 127)) * 20)
    evaluate = parallel_module.evaluate

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(parallel_module, "evaluate", interrupted)
    result = train_sharded(_settings(tmp_path / "run", data, 3), progress=False)
    assert result.interrupted and [entry["step"] for entry in result.log] == [1]
    assert _trainer_state(tmp_path / "run")["step"] == 1


def test_train_cli_rejects_bad_ep(tmp_path, capsys):
    from moe_blocks.models.cli import main

    args = ["train", "--out", str(tmp_path / "run"), "--quiet"]
    assert main([*args, "--ep", "2"]) == 2  # one process, not started by torchrun
    assert "--ep 2 must divide the number of processes (1" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()  # the one-process group it made is gone
    assert main([*args, "--ep", "0"]) == 2
    assert "--ep must be a positive integer" in capsys.readouterr().err
    assert main([*args, "--ep", "2", "--balance-loss", "switch"]) == 2
    assert "run in one process only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_parallelize_is_importable_as_issue_11_names_it():
    from moe_blocks.models import parallelize

    assert parallelize is parallel_module.parallelize
