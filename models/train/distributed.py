"""Every rank of a torchrun job: joining the process group and building the mesh, how the
ranks train (:class:`Ranks`, for :func:`~.loop.run_training`), sharded checkpoints (saved by
every rank, loaded at any world size) and the export to the Hugging Face layout; and
:func:`spawn_local`, which runs a worker on N local processes for tests and benchmarks."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moe_blocks.parallel import MESH_DIMS, clip_grad_norm_
from moe_blocks.router import TopKRouter, named_routers

from ..jetmoe import JetMoEForCausalLM
from ..jetmoe.sharding import parallelize
from .continual import starting_model
from .loop import StopRequest
from .run_folder import (
    CHECKPOINT_FORMAT,
    RESUME_ADVICE,
    check_shards_readable,
    is_sharded_checkpoint,
    write_checkpoint,
    write_export_step,
)
from .settings import TrainingError, TrainSettings, message_lines
from .tokens import copy_tokenizer_files


def spawn_local(worker, nprocs: int, *args, backend: str = "gloo") -> None:
    """Run ``worker(rank, nprocs, *args)`` in ``nprocs`` fresh processes on this machine,
    joined by a ``backend`` process group (rendezvous through a file, no port to pick), with
    ``torch.multiprocessing.spawn``; an exception in any of them is raised here and ends the
    others. For tests and benchmarks on one machine: training runs under torchrun."""
    with tempfile.TemporaryDirectory() as folder:
        store = f"file://{Path(folder) / 'store'}"
        mp.spawn(_spawned, args=(nprocs, store, backend, worker, args), nprocs=nprocs)


def _spawned(rank: int, nprocs: int, store: str, backend: str, worker, args) -> None:
    dist.init_process_group(
        backend, init_method=store, rank=rank, world_size=nprocs, timeout=timedelta(minutes=5)
    )
    try:
        worker(rank, nprocs, *args)
    finally:
        dist.destroy_process_group()
    # A clean finish skips the interpreter's shutdown: in torch 2.13 a gloo worker thread
    # (ProcessGroupGloo::runLoop) may still be dropping a finished all-reduce's tensors then,
    # and their Python objects cannot be released while Python finalises: std::terminate,
    # SIGABRT, about one run in ten when the last collective is right before the end.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def save_sharded(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, files: dict,
    keep: int | None = None,
) -> None:  # fmt: skip
    """Save ``model`` and ``optimizer`` with ``torch.distributed.checkpoint``: every rank writes
    its own shards, rank 0 also the text ``files`` (name -> content, e.g. the trainer state),
    published by :func:`~moe_blocks.models.train.write_checkpoint` (consistent or absent, never
    partial; ``keep``: its own). Collective."""
    rank = dist.get_rank()

    def write(folder: Path) -> None:
        try:
            dcp.save(_state(model, optimizer), checkpoint_id=folder)
        except CheckpointException as error:  # every rank raises it: one line, as an OSError
            raise OSError(_last_line(error)) from None
        if rank == 0:
            for name, content in files.items():
                (folder / name).write_text(content)

    write_checkpoint(Path(directory), write, main=rank == 0, barrier=dist.barrier,
                     any_rank=_any_rank, keep=keep)  # fmt: skip


def load_sharded(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Load what :func:`save_sharded` wrote into ``model`` (and ``optimizer``), sharded as they
    are now: the world size and mesh may differ from the saving run's (DCP reshards). A model
    without a process group (one plain process) loads too. Collective."""
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=Path(directory))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def export_hf(
    model: JetMoEForCausalLM,
    path: str | Path,
    *,
    step: int | None = None,
    tokenizer: str | None = None,
) -> None:
    """Write a sharded (or plain) model in the Hugging Face layout: rank 0 gathers the full
    weights on CPU and writes them with :meth:`JetMoEForCausalLM.save_pretrained`, so the
    files equal those of the unsharded model; with ``step``, also the training step they are
    of (``export.json``), which readers compare with the run's checkpoint; with
    ``tokenizer`` (a run's tokenizer folder), its files. Collective; published as
    :func:`save_sharded` publishes a checkpoint."""
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() == 0:
        with torch.device("meta"):
            plain = JetMoEForCausalLM(model.config)
        plain.load_state_dict(full, strict=False, assign=True)
        plain.tie_weights()

        def write(folder: Path) -> None:
            plain.save_pretrained(folder)
            copy_tokenizer_files(tokenizer, folder)
            if step is not None:
                write_export_step(folder, step)

        write_checkpoint(Path(path), write)
    dist.barrier()


def _check_shard_files(checkpoint: Path) -> None:
    """TrainingError (for ``--resume``) naming the file, unless ``checkpoint``'s ``.metadata``
    reads and every shard file it names is there with as many bytes as it says: what DCP would
    otherwise fail on with every rank's traceback."""
    try:
        metadata = dcp.FileSystemReader(checkpoint).read_metadata()
    except Exception as error:
        raise TrainingError(
            f"--resume: {checkpoint / '.metadata'} is damaged ({_last_line(error)}); "
            + RESUME_ADVICE
        ) from None
    ends: dict[str, int] = {}
    for item in metadata.storage_data.values():
        end = item.offset + item.length
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), end)
    for name, end in sorted(ends.items()):
        shard = checkpoint / name
        if not shard.is_file():
            raise TrainingError(f"--resume: {shard} is missing; {RESUME_ADVICE}")
        size = shard.stat().st_size
        if size < end:
            raise TrainingError(
                f"--resume: {shard} is cut short ({size:,} of {end:,} bytes); {RESUME_ADVICE}"
            )


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank of the default group (collective)."""
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, flag)
    return any(flags)


def _last_line(error: BaseException) -> str:
    """The last line of ``error``'s message (DCP's carry every rank's traceback), at most 200
    characters."""
    return message_lines(error)[-1][:200]


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def init_distributed(ep: int = 1, *, torchrun: bool) -> tuple[DeviceMesh, torch.device]:
    """Join the process group torchrun describes in the environment (``torchrun``: torchrun
    started this process; else a one-process group; an existing group is used as it is): NCCL
    on CUDA, each process on GPU ``LOCAL_RANK``; gloo on CPU. Returns the mesh for
    :func:`parallelize`, ``("dp", "ep")`` of ``world/ep × ep`` ranks (1-D ``("dp",)`` when ``ep``
    is 1), and this process's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if torchrun:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if world % ep:
        raise TrainingError(
            f"--ep {ep} must divide the number of processes ({world}: torchrun --nproc-per-node)"
        )
    if ep == 1:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("dp",)), device
    return init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=MESH_DIMS), device


class Ranks:
    """How every rank of a torchrun job trains, for
    :func:`~moe_blocks.models.train.run_training` (which one process runs with
    :class:`~moe_blocks.models.train.OneProcess`): rank 0 writes the files; the model is
    :func:`parallelize`-d over ``("dp", "ep") = (world/ep, ep)``; each rank trains on its
    ``batch_size / world`` windows of every step's batch; checkpoints are sharded
    (:func:`save_sharded`), the model exported in the Hugging Face layout at the end; a step's
    log holds the means over ranks; SIGINT/SIGTERM set a flag the ranks read together."""

    def __init__(self, mesh: DeviceMesh, device: torch.device, ep: int) -> None:
        self.mesh, self.device, self.ep = mesh, device, ep
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.main, self.sharded = self.rank == 0, True
        self.evaluation = {"sharded": True, "device": device}
        self._stop = StopRequest()

    def barrier(self) -> None:
        dist.barrier()

    def check_checkpoint(self, state, checkpoint: Path) -> None:
        if state is None:
            return
        check_shards_readable(checkpoint)
        if not is_sharded_checkpoint(checkpoint):
            raise TrainingError(
                f"--resume: {checkpoint} was written by a one-process run; continue it with "
                "moe-blocks train --resume (without torchrun)"
            )

    def check(self, settings: TrainSettings, model: JetMoEForCausalLM) -> None:
        if settings.batch_size % self.world:
            raise TrainingError(
                f"--batch-size {settings.batch_size} must be divisible by the number of "
                f"processes ({self.world}): each rank trains on an equal share of every batch"
            )
        if model.config.num_local_experts % self.ep:
            raise TrainingError(
                f"--ep {self.ep} must divide the number of experts "
                f"({model.config.num_local_experts})"
            )

    def initial_model(self, settings, origin, state, checkpoint: Path) -> JetMoEForCausalLM:
        # the starting weights of a one-process run on every rank; a checkpoint's come later
        return starting_model(settings, origin)

    def shard(self, model: JetMoEForCausalLM) -> None:
        parallelize(model, self.mesh)

    def restore(self, checkpoint: Path, model, optimizer) -> None:
        _check_shard_files(checkpoint)
        try:
            load_sharded(checkpoint, model, optimizer)
        except (Exception, CheckpointException) as error:  # DCP's is a BaseException
            reason = _last_line(error)
            raise TrainingError(
                f"--resume: {checkpoint} is damaged, a shard cannot be read ({reason}); "
                + RESUME_ADVICE
            ) from None

    def describe(self) -> str:
        return (f"ranks:  {self.world} (data parallel {self.world // self.ep} x expert parallel "
                f"{self.ep}) on {self.device}")  # fmt: skip

    def rows(self, settings: TrainSettings) -> slice:
        share = settings.batch_size // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def clip(self, model) -> None:
        clip_grad_norm_(model, 1.0)

    def statistics(self, model, output, stop_requested: bool) -> tuple[dict, bool]:
        routers = named_routers(model)
        losses, loads, stop = _reduce_step(list(routers.values()), output, stop_requested)
        entry = dict(zip(("loss", "lm_loss", "aux_loss"), losses, strict=True))
        tokens = dict(zip(routers, loads, strict=True))
        return {**entry, "tokens_per_expert": tokens}, stop

    def save(self, checkpoint: Path, model, optimizer, settings, step: int, log: list) -> None:
        trainer_state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "settings": dataclasses.asdict(settings),
            "sharded": {"world_size": self.world, "ep": self.ep},
        }
        files = {
            "trainer_state.json": json.dumps(trainer_state, indent=1) + "\n",
            "log.json": json.dumps(log) + "\n",
        }
        save_sharded(checkpoint, model, optimizer, files, settings.keep_checkpoints)

    def finish(self, model, out: Path, step: int, tokenizer: str | None) -> None:
        export_hf(model, out / "model", step=step, tokenizer=tokenizer)

    def stopping(self) -> StopRequest:
        return self._stop

    def stop_requested(self) -> bool:
        return self._stop.requested


def _reduce_step(routers: list[TopKRouter], output, stop: bool):
    """One all-reduce per step: the mean over ranks of (loss, LM loss, aux loss), the tokens
    per expert of each of ``routers`` over all ranks, and whether any rank was asked to stop."""
    local = torch.cat(
        [
            torch.stack([output.loss.detach(), output.lm_loss.detach(),
                         torch.as_tensor(output.aux_loss).detach()]).double().cpu(),
            torch.stack([r.last_tokens_per_expert for r in routers]).double().cpu().flatten(),
            torch.tensor([float(stop)], dtype=torch.float64),
        ]
    )  # fmt: skip
    dist.all_reduce(local)
    world = dist.get_world_size()
    losses = (local[:3] / world).tolist()
    loads = local[3:-1].view(len(routers), -1)
    # With "global" balance every router already counts all ranks' tokens.
    shared = torch.tensor([r.reduce_tokens_per_expert is not None for r in routers])
    loads[shared] /= world
    return losses, loads.round().long().tolist(), bool(local[-1] > 0)
