"""A training run's settings (``moe-blocks train``'s options), their checks, and the
learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from moe_blocks.kernels.checks import check_positive_int as check_int_at_least_one
from moe_blocks.losses import BALANCE_LOSSES

from ..jetmoe import JetMoEConfig

DEFAULT_SEQ_LEN = 128  # bytes per training window


class TrainingError(Exception):
    """A problem with the user's input, reported as one line by the CLI."""


def message_lines(error: BaseException) -> list[str]:
    """The lines of ``error``'s message, or its type's name when it has none: what a one-line
    report quotes of an error raised by a library."""
    return str(error).strip().splitlines() or [type(error).__name__]


DEFAULT_WARMUP_STEPS = 30
SCHEDULES = ("wsd", "wsd-exp", "cosine")
BUILTIN_CORPUS = "stdlib"  # names the built-in corpus (data=None) in --decay-data
LORA_TARGETS = ("attention", "experts")  # --lora-targets (what each adapts: lora.py)
LORA_EXPORTS = ("merged", "adapters")  # --lora-export


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
    schedule: str = "wsd"  # warmup-stable-decay, linear (wsd) or exponential (wsd-exp), or cosine
    decay_fraction: float = 0.2
    decay_data: str | None = None  # "PATH=WEIGHT,...": phase 2's mixture (decay_sources)
    tokenizer: str | None = None  # "bytes", a folder, or None: --resume-from's own, else bytes
    weight_decay: float = 0.1
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 1  # the newest in checkpoint/, older ones in checkpoint.step-N/
    seed: int = 0
    threads: int | None = None
    overrides: dict = field(default_factory=dict)
    resume_from: str | None = None  # start from this model (fresh optimizer, step 0)
    train_new_experts_only: bool = False  # with resume_from: an extended checkpoint
    balance_loss: str | None = None  # set every router's balance loss (None: the model's)
    lora_rank: int | None = None  # with resume_from: train LoRA adapters only (lora.py)
    lora_alpha: float | None = None  # None: 2 · lora_rank (the adapters' scale alpha / rank)
    lora_targets: str | None = None  # "attention,experts" (None: both)
    lora_export: str | None = None  # "merged" (None) or "adapters": what model/ holds
    activation_checkpointing: bool = False  # recompute each layer in backward

    @property
    def decay_start(self) -> float:
        """Where WSD's decay (and the ``decay_data`` mixture) begins: steps at or after it
        decay. ``steps · (1 - decay_fraction)`` with the fraction taken as the decimal it was
        written as: in floats 10 · (1 - 0.7) is 3.0000000000000004, and step 3 would not decay."""
        return float(self.steps * (1 - Fraction(repr(float(self.decay_fraction)))))

    def decay_sources(self) -> list[tuple[str | None, float]]:
        """``decay_data`` as ``(path, share)`` pairs, the shares summing to 1; the path None for
        the built-in corpus (named ``stdlib``). A TrainingError naming ``--decay-data`` when it
        is not ``PATH=WEIGHT[,PATH=WEIGHT...]`` with positive weights and distinct paths."""
        sources, usage = [], "give PATH=WEIGHT[,PATH=WEIGHT...] with weights > 0"
        for part in (self.decay_data or "").split(","):
            path, equals, weight = part.strip().rpartition("=")
            try:
                share = float(weight) if equals and path else -1.0
            except ValueError:
                share = -1.0
            if not (share > 0 and math.isfinite(share)):
                raise TrainingError(f"--decay-data: {part.strip()!r} is not PATH=WEIGHT; {usage}")
            sources.append((None if path == BUILTIN_CORPUS else path, share))
        paths = [path for path, _ in sources]
        if len(set(paths)) < len(paths):
            raise TrainingError(f"--decay-data names a source twice: {self.decay_data}")
        total = sum(share for _, share in sources)
        return [(path, share / total) for path, share in sources]

    @property
    def lora_target_names(self) -> list[str]:
        """``lora_targets`` as a list (by default attention and experts)."""
        targets = "attention,experts" if self.lora_targets is None else self.lora_targets
        return [part.strip() for part in targets.split(",")]

    @property
    def lora_scale_alpha(self) -> float:
        """LoRA's alpha in effect: the adapters add ``alpha / rank · B·A``."""
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

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
            "keep_checkpoints",
        ):
            check_positive_int(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.threads is not None:
            check_positive_int("--threads", self.threads)
        for name in ("out", "resume_from", "tokenizer"):
            check_path_given(f"--{name.replace('_', '-')}", getattr(self, name), "a folder")
        given = self.warmup_steps
        if given is not None and (not is_int(given) or not 0 <= given <= self.steps):
            raise TrainingError(
                f"--warmup-steps must be an integer from 0 to --steps ({self.steps}), "
                f"got {self.warmup_steps}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"--lr must be positive and finite, got {self.lr}")
        check_seed("--seed", self.seed)
        if self.schedule not in SCHEDULES:
            raise TrainingError(
                f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule}"
            )
        if isinstance(self.decay_fraction, bool) or not 0 <= self.decay_fraction <= 1:
            raise TrainingError(f"--decay-fraction must lie in [0, 1], got {self.decay_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainingError(f"--min-lr-ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.schedule == "wsd-exp" and self.min_lr_ratio == 0:
            raise TrainingError(
                "--schedule wsd-exp decays exponentially to --min-lr-ratio, which must be above 0"
            )
        if self.decay_data is not None:
            if self.schedule == "cosine":
                raise TrainingError(
                    "--decay-data starts at the decay of --schedule wsd or wsd-exp; cosine has none"
                )
            self.decay_sources()  # parsed and checked
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
        self._check_lora()
        if self.balance_loss is not None and self.balance_loss not in BALANCE_LOSSES:
            raise TrainingError(
                f"--balance-loss must be one of {', '.join(BALANCE_LOSSES)}, "
                f"got {self.balance_loss!r}"
            )

    def _check_lora(self) -> None:
        if self.lora_rank is None:
            given = [name for name in ("lora_alpha", "lora_targets", "lora_export")
                     if getattr(self, name) is not None]  # fmt: skip
            if given:
                raise TrainingError(f"--{given[0].replace('_', '-')} needs --lora-rank R")
            return
        check_positive_int("--lora-rank", self.lora_rank)
        if self.resume_from is None:
            raise TrainingError(
                "--lora-rank fine-tunes a trained model: give --resume-from DIR (a checkpoint "
                "or a transformers JetMoe folder)"
            )
        if self.train_new_experts_only:
            raise TrainingError("--lora-rank and --train-new-experts-only exclude each other")
        alpha = self.lora_alpha
        if alpha is not None and not (isinstance(alpha, (int, float)) and 0 < alpha < math.inf):
            raise TrainingError(f"--lora-alpha must be a positive number, got {alpha}")
        names = self.lora_target_names
        if any(name not in LORA_TARGETS for name in names) or len(set(names)) < len(names):
            raise TrainingError(
                f"--lora-targets must name some of {', '.join(LORA_TARGETS)} (comma-separated, "
                f"each once), got {self.lora_targets!r}"
            )
        if self.lora_export not in (None, *LORA_EXPORTS):
            raise TrainingError(
                f"--lora-export must be one of {', '.join(LORA_EXPORTS)}, got {self.lora_export!r}"
            )


def check_positive_int(flag: str, value: object) -> None:
    """The library's check (an int >= 1, not a bool), as a TrainingError naming ``flag``."""
    try:
        check_int_at_least_one(flag, value)
    except ValueError:
        raise TrainingError(f"{flag} must be a positive integer, got {value}") from None


SEED_BOUND = 2**32  # |seed| below it: the batches' generators seed with seed·1000003 + step


def check_seed(flag: str, value: object) -> None:
    """A TrainingError naming ``flag`` unless ``value`` is an integer of magnitude below
    SEED_BOUND (a nanosecond timestamp as a seed overflowed the batches' 64-bit seeds)."""
    if not is_int(value) or not -SEED_BOUND < value < SEED_BOUND:
        raise TrainingError(f"{flag} must be an integer between -2**32 and 2**32, got {value}")


def check_path_given(flag: str, path: str | None, what: str) -> None:
    """A TrainingError naming ``flag`` when ``path`` is empty: ``Path("")`` is the current
    folder, which nobody means by it."""
    if path == "":
        raise TrainingError(f"{flag} is empty: give {what}")


def is_int(value: object) -> bool:
    """Whether ``value`` is an int and not a bool (JSON's true is no step count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def learning_rate(settings: TrainSettings, step: int) -> float:
    """Linear warmup, then WSD (constant, then a decay over the last ``decay_fraction``:
    linear for ``wsd``; exponential for ``wsd-exp``, MiniCPM's form, halving every
    ``decay steps / log2(1 / min_lr_ratio)`` steps) or cosine, down to ``min_lr_ratio · lr``
    (which the decays reach after the last step)."""
    peak, floor = settings.lr, settings.lr * settings.min_lr_ratio
    warmup = settings.warmup
    if step < warmup:
        return peak * (step + 1) / warmup
    if settings.schedule == "cosine":
        progress = (step - warmup) / max(1, settings.steps - warmup)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = settings.decay_start
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, settings.steps - decay_start))
    if settings.schedule == "wsd-exp":
        return peak * (floor / peak) ** progress
    return peak + (floor - peak) * progress
