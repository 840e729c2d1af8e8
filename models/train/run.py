"""The entry point of ``moe-blocks train``: :func:`train` runs the one trainer
(:func:`~.loop.run_training`) in this process, or on every rank of a sharded run."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from .loop import OneProcess, TrainResult, run_training
from .run_folder import is_sharded_checkpoint, published
from .settings import TrainingError, TrainSettings, check_positive_int


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher that sets ``WORLD_SIZE``) started this process."""
    return "WORLD_SIZE" in os.environ


def train(
    settings: TrainSettings,
    *,
    ep: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train, evaluate, checkpoint, log and plot into ``settings.out``: in this one process
    (:class:`~.loop.OneProcess`), or sharded (:func:`train_sharded`) when ``ep`` > 1, when
    torchrun started the process, inside an initialised process group, or to resume a sharded
    checkpoint. Either way the same trainer, :func:`~.loop.run_training`, runs.

    ``resume``: continue from ``out/checkpoint`` (same data order: batches depend on seed and
    step only) up to ``settings.steps``, which must lie beyond the checkpoint's step.
    ``overwrite``: replace a run already in ``out``; without it (or ``resume``) an existing run
    is an error. Every input is checked before training starts. Prints a summary (corpus,
    model size, steps, output folder) to stdout, then a progress bar to stderr when
    ``progress``. A KeyboardInterrupt (or SIGTERM) saves a checkpoint and returns with
    ``interrupted``; before the run's first step has finished it propagates (see
    :func:`~.loop.run_steps`)."""
    settings.check()
    check_positive_int("--ep", ep)
    sharded = (
        ep != 1
        or launched_by_torchrun()
        or dist.is_initialized()
        or (resume and is_sharded_checkpoint(published(Path(settings.out) / "checkpoint")))
    )
    options = {"resume": resume, "overwrite": overwrite, "progress": progress}
    if sharded:
        return _train_ranks(settings, ep, options)
    device = "cuda" if torch.cuda.is_available() else None  # one process: the GPU if any
    return run_training(settings, OneProcess(device), **options)


def train_sharded(
    settings: TrainSettings,
    *,
    ep: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """:func:`train` on every process of a torchrun job (or on one process with a sharded
    checkpoint): the model :func:`~moe_blocks.models.parallelize`-d over ``world/ep × ep``
    ranks, each rank training on its ``batch_size / world`` windows of every step's batch (the
    same global batch as one process would use), the reported losses the means over all ranks.

    Rank 0 alone prints, shows the progress bar and writes ``log.json`` and ``training.png``.
    Checkpoints (``OUT/checkpoint``) are sharded (:func:`~.distributed.save_sharded`): ``resume``
    works at any world size and ``ep``. At the end, the model is also written in the Hugging
    Face layout to ``OUT/model`` (:func:`~.distributed.export_hf`). SIGINT or SIGTERM (Ctrl-C;
    torchrun forwards it to every rank) ends the run after the step all ranks agree on, with a
    checkpoint of that step.

    Returns the :class:`~.loop.TrainResult` on every rank.
    """
    settings.check()
    check_positive_int("--ep", ep)
    return _train_ranks(settings, ep, {"resume": resume, "overwrite": overwrite,
                                       "progress": progress})  # fmt: skip


def _train_ranks(settings: TrainSettings, ep: int, options: dict) -> TrainResult:
    """The sharded run of checked ``settings`` and ``ep``: :func:`run_training` with
    :class:`~.distributed.Ranks`, in the process group it joins (or creates, then ends)."""
    if settings.lora_rank is not None:
        raise TrainingError(
            "--lora-rank trains in one process: leave out --ep and torchrun (LoRA's adapters "
            "are small; --activation-checkpointing saves activation memory instead)"
        )
    # torch.distributed's checkpoint and FSDP modules take about a second to import: only here
    from .distributed import Ranks, init_distributed

    created = not dist.is_initialized()
    try:
        mesh, device = init_distributed(ep, torchrun=launched_by_torchrun())
        return run_training(settings, Ranks(mesh, device, ep), **options)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
