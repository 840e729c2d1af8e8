"""Timing and memory: a case's implementations built together and timed in alternating
rounds (medians), the memory a step keeps for backward (CPU) or peaks at (CUDA)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .baselines import build
from .cases import (
    HF_SUITE,
    KERNEL_SUITE,
    LOOP_BASELINES,
    MEMORY_MEASURES,
    SUITES,
    Case,
    applies,
    cases,
    hf_shapes,
    implementations,
    shapes_for,
)


def step_function(module: nn.Module, x: Tensor, backward: bool):
    """The callable that one timing repetition runs."""
    if not backward:  # inference: eval mode (no dropout, no router aux loss), no autograd
        module.eval()

        def forward_only():
            with torch.no_grad():
                return module(x)

        return forward_only
    x = x.detach().requires_grad_()

    def forward_backward():
        for param in module.parameters():
            param.grad = None
        x.grad = None
        out = module(x)
        out.backward(torch.ones_like(out))
        return out

    return forward_backward


def sync_device(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_medians_ms(
    steps: dict,
    device: str,
    *,
    min_repeats: int = 3,
    max_repeats: int = 50,
    budget_s: float = 1.5,
    before_each: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Median milliseconds of each callable in ``steps``, timed in rounds that run every one
    of them once, so a slow spell on a shared machine slows them all alike and their ratios
    hold. At least ``min_repeats`` rounds (never more than ``max_repeats``), then more while
    within ``budget_s`` per callable (the time of ``before_each``, called untimed before
    every timed call, counts too). Each round after the first runs them in a new order
    (seeded, so a run repeats): one that leaves the caches full of its own dirty data slows
    whichever runs next (transformers' ``batched_mm`` at 8 fine-grained tokens copies 134 MB
    of weights: the one after it took 1 ms more of 7), and a fixed order charged that to the
    same one every round."""
    if max_repeats < 1:
        raise ValueError(f"max_repeats must be >= 1, got {max_repeats}")
    for fn in steps.values():
        fn()
    sync_device(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    order, shuffle = list(steps), random.Random(0).shuffle
    started, rounds = time.perf_counter(), 0
    while rounds < min(min_repeats, max_repeats) or (
        rounds < max_repeats and time.perf_counter() - started < budget_s * len(steps)
    ):
        for name in order:
            if before_each is not None:
                before_each()
                sync_device(device)
            begin = time.perf_counter()
            steps[name]()
            sync_device(device)
            times[name].append((time.perf_counter() - begin) * 1e3)
        rounds += 1
        shuffle(order)
    return {name: statistics.median(values) for name, values in times.items()}


CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def last_level_cache_bytes(device: str, cpu_caches: Path = CPU_CACHES) -> int:
    """The size of the last cache level that data passes on ``device``: CUDA's L2, the CPU's
    largest cache as Linux lists it in ``cpu_caches`` (``index*/size``: ``480M``, ``2048K``);
    256 MiB where none can be read."""
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    sizes = []
    for entry in cpu_caches.glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=256 * 2**20)


def cache_flush(device: str) -> Callable[[], None]:
    """A callable that reads a buffer twice :func:`last_level_cache_bytes`, so the next call
    finds none of its weights in the caches: a block of a model larger than the caches, whose
    other layers run between two uses of its weights (every decode step). A read, not a
    write: written lines would be left dirty, and the timed call would pay for writing them
    back."""
    buffer = torch.ones(2 * last_level_cache_bytes(device) // 4, dtype=torch.float32, device=device)

    def flush() -> None:
        buffer.sum()

    return flush


def memory_mb(module: nn.Module, x: Tensor, device: str) -> float:
    """MiB of one forward+backward, measured as :data:`MEMORY_MEASURES` names it per device.

    CUDA, ``peak_allocated``: ``torch.cuda.max_memory_allocated()`` during the step minus
    ``torch.cuda.memory_allocated()`` before it, with no gradients held then: the peak of
    everything the step allocates (activations, what autograd saves, temporaries, the
    gradients) above the input and the weights.

    CPU, ``saved_for_backward``: the bytes of the distinct storages autograd saves for backward
    in the step, the weights' excluded (the input's included where saved). Not a peak: it leaves
    out temporaries and the gradients (the CPU allocator keeps no peak statistics)."""
    step = step_function(module, x, backward=True)
    for param in module.parameters():  # a previous step's gradients are not the step's memory
        param.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    seen: dict[int, int] = {}

    def pack(tensor: Tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(size for ptr, size in seen.items() if ptr not in parameters) / 2**20


@dataclass
class Result:
    """One implementation's timing of a case, or (``error``) why it has none."""

    suite: str
    shape: str
    tokens: int
    dtype: str
    device: str
    impl: str
    backward: bool
    median_ms: float | None
    tflops: float | None
    memory_mb: float | None  # forward+backward only; what it is: memory_measure
    vs_dense: float | None = None
    # times faster than the suite's per-expert loop (LOOP_BASELINES): transformers' JetMoe
    # module, in the hf suite transformers' eager experts, in expert_linear per_expert_loop
    vs_transformers: float | None = None
    vs_grouped_mm: float | None = None  # (hf suite only)
    # forward only: bytes of the weights of the experts the case's routing uses (one expert for
    # dense), per second: the memory-bandwidth bound of small token counts, beside the FLOPs
    weight_gbs: float | None = None
    error: str | None = None
    cold_caches: bool = False  # timed after a cache flush (:func:`cache_flush`), else warm

    @property
    def memory_measure(self) -> str:
        """What ``memory_mb`` holds on this device (:func:`memory_mb`)."""
        return MEMORY_MEASURES[self.device]


def run_case(
    case: Case,
    backward: bool,
    impls: tuple[str, ...] | None = None,
    measure_memory: bool = True,
    **timing,
) -> list[Result]:
    """Time every implementation of ``case`` that applies (of ``impls``, by default its
    suite's: :func:`implementations`). On CPU they are built together and timed in alternating
    rounds (shared CPUs drift by 10-20 % within minutes; the ratios are what the tables report).
    On a GPU one at a time: the full-size weights of all of them may not fit together
    (DeepSeek-V3's experts are 22 GB per implementation in bf16).

    An implementation that raises (out of memory, say) gets a result with its ``error`` and no
    timing; the others are still timed (on CPU, then one at a time)."""
    impls = implementations(case.suite) if impls is None else impls
    applicable = [impl for impl in impls if applies(case, impl)]
    pending = [applicable] if case.device == "cpu" else [[impl] for impl in applicable]
    results = []
    while pending:
        group = pending.pop(0)
        try:
            results += _measure(case, backward, group, measure_memory, timing)
        except Exception as error:
            if len(group) > 1:  # time them one at a time to find the one that fails
                pending[:0] = [[impl] for impl in group]
            else:
                message = f"{type(error).__name__}: {error}"[:2000]
                failed = (group[0], backward, None, None, None)
                results.append(Result(*_case_fields(case), *failed, error=message))
    times = {r.impl: r.median_ms for r in results if r.error is None}
    for r in results:
        if r.error is not None:
            continue
        if "dense" in times:
            r.vs_dense = r.median_ms / times["dense"]
        baseline = LOOP_BASELINES.get(case.suite, "transformers")
        if baseline in times:
            r.vs_transformers = times[baseline] / r.median_ms
        if case.suite == HF_SUITE and "grouped_mm" in times:
            r.vs_grouped_mm = times["grouped_mm"] / r.median_ms
    return results


def _case_fields(case: Case) -> tuple:
    return case.suite, case.shape, case.tokens, case.dtype, case.device


def _measure(
    case: Case, backward: bool, impls: list[str], measure_memory: bool, timing: dict
) -> list[Result]:
    """Build ``impls`` together and time them in alternating rounds."""
    built = {impl: build(case, impl) for impl in impls}
    steps = {impl: step_function(module, x, backward) for impl, (module, x) in built.items()}
    elapsed = time_medians_ms(steps, case.device, **timing)
    used = None if backward else _used_experts(case, built)
    results = []
    for impl, (module, x) in built.items():
        memory = memory_mb(module, x, case.device) if backward and measure_memory else None
        tflops = case.matmul_flops(backward) / (elapsed[impl] / 1e3) / 1e12
        result = Result(*_case_fields(case), impl, backward, elapsed[impl], tflops, memory)
        result.cold_caches = timing.get("before_each") is not None
        if used is not None:
            experts = 1 if impl == "dense" else used
            result.weight_gbs = experts * case.expert_bytes() / (elapsed[impl] / 1e3) / 1e9
        results.append(result)
    return results


def _used_experts(case: Case, built: dict) -> int | None:
    """How many experts the routing of ``case`` uses (the same for every implementation: same
    router weights and input), read from our built module after its timing: the kernel
    suite's fixed ``expert_idx``, the MLP router's last token counts. None elsewhere."""
    if "moe_blocks" not in built:
        return None
    module = built["moe_blocks"][0]
    if case.suite == KERNEL_SUITE:
        return module.expert_idx.unique().numel()
    if case.suite == "mlp":
        return int((module.router.last_tokens_per_expert > 0).sum())
    return None


def run_suite(
    suite: str,
    shapes: list[str],
    tokens: list[int],
    dtypes: list[str],
    device: str,
    *,
    tiny: bool = False,
    passes=(False, True),
    cold_caches: bool = False,
    **timing,
) -> list[Result]:
    """Every case of ``suite`` timed by :func:`run_case`; with ``cold_caches`` each call after
    :func:`cache_flush` (the weights read from memory, as in a model larger than the caches)."""
    if suite not in (*SUITES, HF_SUITE):
        raise ValueError(f"suite must be one of {(*SUITES, HF_SUITE)}, got {suite!r}")
    table = hf_shapes(device, tiny) if suite == HF_SUITE else shapes_for(device, tiny)
    if cold_caches:
        timing["before_each"] = cache_flush(device)
    results = []
    for case in cases(suite, shapes, tokens, dtypes, device, table):
        for backward in passes:
            results.append(run_case(case, backward, **timing))
    return [r for group in results for r in group]
