"""The training application: ``moe-blocks train`` and the workflows around it.

Its rooms, each importing only those above it in this list:

- :mod:`.settings`: a run's settings, their checks, the learning-rate schedule;
- :mod:`.tokens`: bytes or a tokenizer's ids, the cached token files;
- :mod:`.data`: the corpus, its batches, the validation loss;
- :mod:`.lora`: LoRA adapters (PEFT) on a model, their files, the merged model;
- :mod:`.run_folder`: ``--out`` and its checkpoints (the one atomic writer, recovery, the
  trainer state, the log, the model export's step);
- :mod:`.continual`: starting from another model (``--resume-from``,
  ``--train-new-experts-only``, ``--balance-loss``) and the ``extend``/``prune`` workflows;
- :mod:`.sample`: ``moe-blocks generate``, text sampled from a checkpoint;
- :mod:`.report`: the summary, progress bar, validations and plot of a run;
- :mod:`.loop`: the one trainer (:func:`run_training`, :func:`run_steps`) and how one process
  trains (:class:`OneProcess`);
- :mod:`.distributed`: how every rank of a torchrun job trains (``Ranks``), sharded
  checkpoints, the Hugging Face export, ``spawn_local`` (imported on first use: it needs
  torch.distributed's checkpoint and FSDP modules);
- :mod:`.run`: :func:`train`, the entry point for one process and for torchrun alike.
"""

from .continual import EXTENSION_FILE, EXTENSION_FORMAT
from .data import STDLIB, Corpus, batch_at, evaluate, load_corpus, load_corpus_files
from .loop import OneProcess, TrainResult, make_optimizer, run_steps, run_training
from .report import plot_run, validations
from .run import launched_by_torchrun, train, train_sharded
from .run_folder import (
    CHECKPOINT_FORMAT,
    checkpoint_folder,
    export_step,
    load_trainer_state,
    read_json,
    recover_checkpoint,
    write_checkpoint,
)
from .settings import DEFAULT_WARMUP_STEPS, TrainingError, TrainSettings, learning_rate

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_WARMUP_STEPS",
    "EXTENSION_FILE",
    "EXTENSION_FORMAT",
    "STDLIB",
    "Corpus",
    "OneProcess",
    "TrainResult",
    "TrainSettings",
    "TrainingError",
    "batch_at",
    "checkpoint_folder",
    "evaluate",
    "export_step",
    "launched_by_torchrun",
    "learning_rate",
    "load_corpus",
    "load_corpus_files",
    "load_trainer_state",
    "make_optimizer",
    "plot_run",
    "read_json",
    "recover_checkpoint",
    "run_steps",
    "run_training",
    "train",
    "train_sharded",
    "validations",
    "write_checkpoint",
]
