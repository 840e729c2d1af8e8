"""Expert parallelism (``moe-blocks bench --suite ep``): MoEMLP forward+backward on 1, 2
and 4 processes, with the bytes its exchanges move."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from moe_blocks import MoEMLP

from .cases import EP_SIZES, Case, cases, shapes_for
from .measure import step_function, sync_device, time_medians_ms


@dataclass
class EPResult:
    """MoEMLP forward+backward on ``tokens`` global tokens split over ``ep`` processes, each
    with ``threads`` torch threads (``ep`` 0: the plain block in one process, no exchange).

    ``median_ms``: median over rounds of the slowest rank's step. ``exchange_share``: the share
    of the step a rank spends launching and waiting for the exchanges (mean over ranks; on
    CUDA with the device synchronised around each). ``forward_bytes``/``backward_bytes``: the
    token rows that go through ``all_to_all_single`` in one step, summed over ranks (the ``E``
    counts and the balance all-reduce left out), beside ``expected_bytes`` =
    ``2·T·k·d_model·bytes``; ``crossing_bytes``: the part of both that leaves its rank."""

    shape: str
    tokens: int
    dtype: str
    device: str
    ep: int
    threads: int
    median_ms: float
    exchange_share: float | None = None
    forward_bytes: int | None = None
    backward_bytes: int | None = None
    expected_bytes: int | None = None
    crossing_bytes: int | None = None


def run_ep(
    shapes: list[str],
    tokens: list[int],
    dtypes: list[str],
    device: str,
    *,
    tiny: bool = False,
    eps: tuple[int, ...] = EP_SIZES,
    max_repeats: int = 20,
    budget_s: float = 2.0,
) -> list[EPResult]:
    """For each shape, token count and dtype: the plain MoEMLP in this process, then
    ``ExpertParallel`` at each size in ``eps`` in as many spawned processes (gloo on CPU, the
    threads of this process shared among them; NCCL on CUDA, one GPU each, sizes above the
    GPU count skipped), the same global tokens split evenly."""
    from ..train.distributed import spawn_local  # (imports torch.distributed's checkpoint)

    if any(count % size for count in tokens for size in eps):
        raise ValueError(f"--tokens must be divisible by every EP size {eps}, got {tokens}")
    threads = torch.get_num_threads()
    sizes = [s for s in eps if device == "cpu" or s <= torch.cuda.device_count()]
    timing = {"max_repeats": max_repeats, "budget_s": budget_s}
    results = []
    for case in cases("mlp", shapes, tokens, dtypes, device, shapes_for(device, tiny)):
        module, x = _ep_block(case, device)
        step = step_function(module, x, backward=True)
        plain = time_medians_ms({"plain": step}, device, **timing)["plain"]
        results.append(EPResult(case.shape, case.tokens, case.dtype, device, 0, threads, plain))
        del module, x, step
        for size in sizes:
            queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
            backend = "nccl" if device == "cuda" else "gloo"
            spawn_local(_ep_worker, size, case, max(1, threads // size), timing, queue,
                        backend=backend)  # fmt: skip
            results.append(EPResult(**queue.get()))
    return results


def _ep_block(case: Case, device: str) -> tuple[MoEMLP, Tensor]:
    """The MoEMLP of ``case`` (JetMoE's initialisation, seeded) and the global input
    ``[1, T, d_model]``: the same on every rank and in the plain run."""
    d_model, d_ffn, experts, top_k = case.dims
    torch.manual_seed(0)
    module = MoEMLP(d_model, d_ffn, experts, top_k, device=device, dtype=case.torch_dtype)
    x = torch.randn(1, case.tokens, d_model, device=device, dtype=case.torch_dtype)
    return module, x


def _ep_worker(rank: int, size: int, case: Case, threads: int, timing: dict, queue) -> None:
    result = measure_ep(case, threads, **timing)
    if rank == 0:
        queue.put(asdict(result))


def measure_ep(case: Case, threads: int, *, max_repeats: int, budget_s: float) -> EPResult:
    """On every rank of the default process group (the EP group): time ``case``'s MoEMLP
    forward+backward under ``ExpertParallel`` with the global tokens split evenly, then meter
    the exchanges (:class:`ExchangeMeter`). Collective; every rank returns the same
    :class:`EPResult`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_blocks import ExpertParallel

    rank, size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(threads)
    device = f"cuda:{rank}" if case.device == "cuda" else "cpu"
    if case.device == "cuda":
        torch.cuda.set_device(device)
    module, x = _ep_block(case, device)
    parallelize_module(module, init_device_mesh(case.device, (size,)), ExpertParallel())
    mine = x.tensor_split(size, dim=1)[rank]
    step = step_function(module, mine, backward=True)
    step()

    def timed() -> float:
        dist.barrier()
        begin = time.perf_counter()
        step()
        sync_device(case.device)
        return time.perf_counter() - begin

    first = torch.tensor([timed()])
    dist.all_reduce(first, op=dist.ReduceOp.MAX)  # every rank runs the same number of rounds
    rounds = max(3, min(max_repeats, int(budget_s / first.item())))
    slowest = torch.tensor([timed() for _ in range(rounds)])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    share, sent = _meter_exchanges(step, case, rank)
    totals = torch.tensor([share, *sent], dtype=torch.float64)
    dist.all_reduce(totals)
    d_model, _, _, top_k = case.dims
    element = torch.empty((), dtype=case.torch_dtype).element_size()
    return EPResult(
        case.shape, case.tokens, case.dtype, case.device, size, threads,
        median_ms=slowest.median().item() * 1e3, exchange_share=totals[0].item() / size,
        forward_bytes=int(totals[1]), backward_bytes=int(totals[2]),
        expected_bytes=2 * case.tokens * top_k * d_model * element,
        crossing_bytes=int(totals[3]),
    )  # fmt: skip


class ExchangeMeter(TorchDispatchMode):
    """While active: the seconds spent in the functional collectives (launch and wait, the
    device synchronised around each), and the bytes of the token rows that this rank passes to
    ``all_to_all_single`` in forward and in backward, and of those that leave it for another
    rank (read from the op's input and split sizes; ``rank`` is this rank in the op's group)."""

    def __init__(self, rank: int, device: str) -> None:
        super().__init__()
        self.rank, self.device = rank, device
        self.seconds = 0.0
        self.forward_bytes = self.backward_bytes = self.crossing_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "_c10d_functional":
            return func(*args, **(kwargs or {}))
        sync_device(self.device)
        begin = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        sync_device(self.device)
        self.seconds += time.perf_counter() - begin
        rows = args[0]
        if func is torch.ops._c10d_functional.all_to_all_single.default and rows.dim() == 2:
            nbytes = rows.numel() * rows.element_size()
            if torch._C._current_autograd_node() is None:
                self.forward_bytes += nbytes
            else:
                self.backward_bytes += nbytes
            sent = sum(n for peer, n in enumerate(args[2]) if peer != self.rank)
            self.crossing_bytes += sent * rows.shape[1] * rows.element_size()
        return out


def _meter_exchanges(step, case: Case, rank: int) -> tuple[float, list[float]]:
    """Run two steps under an :class:`ExchangeMeter`: the share of their time spent in the
    exchanges, and per step the bytes forward, backward and leaving this rank."""
    import torch.distributed as dist

    meter = ExchangeMeter(rank, case.device)
    dist.barrier()
    begin = time.perf_counter()
    with meter:
        step()
        step()
    sync_device(case.device)
    elapsed = time.perf_counter() - begin
    sent = [meter.forward_bytes / 2, meter.backward_bytes / 2, meter.crossing_bytes / 2]
    return meter.seconds / elapsed, sent
