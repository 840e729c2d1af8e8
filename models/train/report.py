"""What a run shows: the summary before it starts, the progress bar, the validations
in its log, and the plot of its curves and expert loads."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from .data import Corpus
from .run_folder import TrainerState
from .settings import TrainSettings, learning_rate


def announce(settings: TrainSettings, corpus: Corpus, model, state: TrainerState | None) -> None:
    """Print what is about to run, in four lines (corpus, model, steps, output folder); on
    stderr, a note when a resume (``state``) changes the learning rates of the steps done."""
    preset = f"preset {settings.preset}" + (
        f" with {settings.overrides}" if settings.overrides else ""
    )
    if settings.resume_from is not None:
        preset = "--resume-from's"
    start_step = state.step if state is not None else 0
    count = settings.steps - start_step
    steps = f"{count} step{'s' * (count != 1)}"
    if start_step:
        steps += f" more ({start_step} -> {settings.steps})"
    print(f"corpus: {corpus.description}")
    print(
        f"model:  {preset}, {model.num_parameters():,} parameters "
        f"({model.num_parameters(active=True):,} active per token)"
    )
    print(
        f"train:  {steps} of {settings.batch_size} x {settings.seq_len} {corpus.unit}, "
        f"lr {settings.lr:g} ({settings.schedule}, warmup {settings.warmup})"
    )
    print(f"output: {settings.out}")
    if state is None:
        return
    changed = [
        step
        for step in range(state.step)
        if learning_rate(state.settings, step) != learning_rate(settings, step)
        or (settings.decay_data is not None  # a step's batch from the other phase's data
            and (step >= state.settings.decay_start) != (step >= settings.decay_start))
    ]  # fmt: skip
    if changed:
        print(
            f"note: the learning-rate schedule changed ({_schedule(state.settings)} -> "
            f"{_schedule(settings)}): steps {changed[0] + 1}-{state.step} were trained at other "
            f"rates than the new one gives, so this run will not equal a straight "
            f"{settings.steps}-step run",
            file=sys.stderr,
        )


def describe_decay(settings: TrainSettings, decay: list[tuple[Corpus, float]]) -> str:
    """One line: from which step the batches come from the ``--decay-data`` mixture."""
    first = math.ceil(settings.decay_start)
    parts = ", ".join(f"{share:.0%} {corpus.description.split(':')[0]}" for corpus, share in decay)
    return f"decay:  from step {first + 1} on, batches drawn from {parts}"


def _schedule(settings: TrainSettings) -> str:
    return (
        f"{settings.schedule}, lr {settings.lr:g}, warmup {settings.warmup} of "
        f"{settings.steps} steps"
    )


def validations(log: list[dict], key: str = "val_bpb") -> list[tuple[int, float]]:
    """``(step, bits per byte)`` of each validation ``key`` in ``log``, in order: the one
    before the first step (step 0, the first entry's ``{key}_before``) and those after steps."""
    points = []
    for entry in log:
        if f"{key}_before" in entry:
            points.append((entry["step"] - 1, entry[f"{key}_before"]))
        if key in entry:
            points.append((entry["step"], entry[key]))
    return points


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def plot_run(log: list[dict], path: Path) -> None:
    """Loss curves (train LM loss and validation, in bits per byte) and a heatmap of the share
    of tokens each expert received, per router (the keys of the entries'
    ``tokens_per_expert``), over the whole run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in log]
    train_bpb = [e["lm_loss"] / math.log(2) for e in log]
    val, old = validations(log), validations(log, "old_val_bpb")
    per_step = [e["tokens_per_expert"] for e in log]
    routers = list(per_step[0]) if per_step else []
    loads = torch.tensor(
        [[step_loads[name] for name in routers] for step_loads in per_step], dtype=torch.float64
    )
    figure, (curves, heat) = plt.subplots(
        1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.3, 1]}
    )
    curves.plot(steps, train_bpb, lw=0.8, alpha=0.7, label="train (LM loss)")
    curves.plot([s for s, _ in val], [b for _, b in val], "o-", label="validation")
    if old:
        curves.plot([s for s, _ in old], [b for _, b in old], "s--", label="validation, old corpus")
    curves.set_xlabel("step")
    curves.set_ylabel("bits per byte")
    curves.set_title("Loss")
    curves.grid(alpha=0.3)
    curves.legend()
    if loads.numel():
        share = loads.sum(0)
        share = share / share.sum(-1, keepdim=True).clamp_min(1)
        image = heat.imshow(share.numpy(), cmap="viridis", aspect="auto", vmin=0)
        heat.set_yticks(range(len(routers)), routers)
        heat.set_xticks(range(share.shape[1]), [f"expert {e}" for e in range(share.shape[1])])
        for (row, col), value in zip(
            [(r, c) for r in range(share.shape[0]) for c in range(share.shape[1])],
            share.flatten().tolist(),
            strict=True,
        ):
            heat.text(col, row, f"{value:.2f}", ha="center", va="center", color="w", fontsize=8)
        figure.colorbar(image, ax=heat, label="share of the router's assignments")
    heat.set_title("Tokens per expert (whole run)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
