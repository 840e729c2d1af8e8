"""Sharded JetMoE training's public names under the import path docs/parallel.md gives:
the plan (defined in :mod:`.jetmoe.sharding`), sharded checkpoints, the Hugging Face export
and ``spawn_local`` (:mod:`.train.distributed`), the sharded entry point (:mod:`.train.run`),
and ``clip_grad_norm_`` for the plan's mixed meshes (:mod:`moe_blocks.parallel`'s, as earlier
docs imported it from here). Importing it loads torch.distributed's checkpoint and FSDP modules."""

from moe_blocks.parallel import clip_grad_norm_

from .jetmoe.sharding import parallelize
from .train.distributed import (
    Ranks,
    export_hf,
    init_distributed,
    load_sharded,
    save_sharded,
    spawn_local,
)
from .train.run import launched_by_torchrun, train_sharded

__all__ = [
    "Ranks",
    "clip_grad_norm_",
    "export_hf",
    "init_distributed",
    "launched_by_torchrun",
    "load_sharded",
    "parallelize",
    "save_sharded",
    "spawn_local",
    "train_sharded",
]
