"""Expert parallelism (moe_blocks.parallel) on gloo in spawned CPU processes: an expert-parallel
MoEMLP gives the outputs and gradients of the single-process MoEMLP run on the concatenation of
every rank's tokens. One spawn of 4 processes runs every case (ep=2 as two groups of 2, then
ep=4), since start-up dominates."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from moe_blocks import MoA, MoEMLP
from moe_blocks.models.parallel import spawn_local
from moe_blocks.testing import tolerances, unit_roundoff

from .helpers import assert_matches

D_MODEL, D_HIDDEN, TOP_K = 16, 8, 2


# --------------------------------------------------------------------------------------------
# The workers


def _cases(world_size: int) -> list[tuple[str, list[int]]]:
    """(routing, tokens on each rank): tokens differ per rank in every case. At ep=4 the
    skewed and empty-rank cases only (start-up dominates, but each case costs too)."""
    cases = [
        # every token's first choice is expert 0; the last expert gets no token anywhere
        ("skewed", [4, 7, 5, 2][:world_size]),
        # rank 1 (and rank 3) route no tokens at all, yet their experts serve the others
        ("random", [5, 0, 6, 0][:world_size]),
    ]
    if world_size == 2:
        cases.append(("random", [3, 5]))
    return cases


def _reference(routing: str, num_experts: int, dtype: torch.dtype, seed: int) -> MoEMLP:
    """The single-process block, the same on every rank; with "skewed" the router's first
    feature column makes expert 0 everyone's top choice and the last expert nobody's."""
    torch.manual_seed(seed)
    block = MoEMLP(D_MODEL, D_HIDDEN, num_experts, TOP_K, aux_loss_coef=0.0, dtype=dtype)
    if routing == "skewed":
        with torch.no_grad():
            column = torch.zeros(num_experts)
            column[0], column[-1] = 4.0, -4.0
            block.router.layer.weight[:, 0] = column.to(dtype)
    return block


def _inputs(routing: str, total: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(total, D_MODEL, generator=generator)
    if routing == "skewed":
        x[:, 0] = 3.0
    grad_out = torch.randn(total, D_MODEL, generator=generator)
    return x.to(dtype), grad_out.to(dtype)


def _check_equivalence(mesh) -> None:
    """Every case on the 1-D ``mesh`` (the EP group): each of its ranks runs its tokens through
    the expert-parallel block, every rank also runs the reference on the group's batch."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_blocks import ExpertParallel

    rank, world_size = mesh.get_local_rank(), mesh.size()
    num_experts = 2 * world_size
    owned = slice(rank * 2, rank * 2 + 2)
    for dtype in (torch.float32, torch.bfloat16):
        for case, (routing, sizes) in enumerate(_cases(world_size)):
            what = f"ep={world_size} {dtype} {routing} tokens {sizes}"
            seed = 10 * case
            reference = _reference(routing, num_experts, dtype, seed)
            block = _reference(routing, num_experts, dtype, seed)
            # each EP group is a job of its own here: its balance statistics count the group
            parallelize_module(block, mesh, ExpertParallel(balance_group=mesh.get_group()))
            weight = block.input_linear.weight
            assert isinstance(weight, DTensor) and weight.placements == (Shard(0),), what
            assert weight.to_local().shape[0] == 2, what

            x, grad_out = _inputs(routing, sum(sizes), dtype, seed)
            mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            x_full = x.clone().requires_grad_()
            expected = reference(x_full)
            (expected * grad_out).sum().backward()
            x_mine = x[mine].clone().requires_grad_()
            given = x_mine.detach().clone()
            out = block(x_mine)
            (out * grad_out[mine]).sum().backward()

            counts = reference.router.last_tokens_per_expert
            if routing == "skewed":  # the routing really is as skewed as the case says
                assert counts[0] == sum(sizes) and counts[-1] == 0, (what, counts)
            assert torch.equal(x_mine.detach(), given), f"{what}: the input was modified"
            assert out.shape == x_mine.shape and out.dtype == dtype, what
            # Both sides are rounded computations (the reference is no float64 oracle): twice
            # the roundings of one result.
            close = functools.partial(assert_matches, dtype=dtype, roundings=4)
            close(out.detach(), expected[mine].detach().double(), what=f"{what} out")
            close(x_mine.grad, x_full.grad[mine].double(), what=f"{what} x.grad")
            for name in ("input_linear", "output_linear"):
                local_grad = getattr(block, name).weight.grad.to_local()
                full_grad = getattr(reference, name).weight.grad[owned]
                close(local_grad, full_grad.double(), what=f"{what} {name} grad")
            for name in ("router.layer.weight", "bias"):
                _check_summed(block.get_parameter(name).grad, reference.get_parameter(name).grad,
                              mesh, f"{what} {name} grad")  # fmt: skip
            # "global" balancing: the counts are those of the whole batch, the Switch loss
            # E·Σ f_e·P_e takes f_e from them and P_e from this rank's tokens
            assert torch.equal(block.router.last_tokens_per_expert, counts), what
            if sizes[rank]:
                logits = block.router.layer(x_mine.detach()).double()
                fraction = counts.double() / (sum(sizes) * TOP_K)
                balance = num_experts * (fraction * logits.softmax(-1).mean(0)).sum()
                assert_matches(block.router.last_balance_loss, balance, torch.float32, what)


def _check_summed(partial: torch.Tensor, expected: torch.Tensor, mesh, what: str) -> None:
    """The sum over the group of each rank's ``partial`` gradient (summed in fp32) equals the
    single-process ``expected``: within the rounded computations of both sides, plus one
    rounding to the gradient's dtype of each rank's partial sum."""
    summed, magnitude = partial.float(), partial.float().abs()
    for tensor in (summed, magnitude):
        dist.all_reduce(tensor, group=mesh.get_group())
    tolerance = tolerances(partial.dtype, roundings=4)
    scale = max(1.0, expected.abs().max().item())
    bound = (
        tolerance["atol"] * scale
        + tolerance["rtol"] * expected.float().abs()
        + unit_roundoff(partial.dtype) * magnitude
    )
    error = (summed - expected.float()).abs()
    assert (error <= bound).all(), f"{what}: error {error.max()} > bound at {error.argmax()}"


def _check_local_balance_and_errors(mesh) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_blocks import ExpertParallel

    rank, world_size = mesh.get_local_rank(), mesh.size()
    torch.manual_seed(0)
    block = MoEMLP(D_MODEL, D_HIDDEN, 4, TOP_K, aux_loss_coef=0.0)
    parallelize_module(block, mesh, ExpertParallel(balance="local"))
    x = torch.randn(3 + rank, D_MODEL)
    block(x)
    local = torch.bincount(block.router.layer(x).topk(TOP_K).indices.flatten(), minlength=4)
    assert torch.equal(block.router.last_tokens_per_expert, local)

    with pytest.raises(ValueError, match="already"):
        parallelize_module(block, mesh, ExpertParallel())
    with pytest.raises(ValueError, match="divisible"):
        parallelize_module(MoEMLP(D_MODEL, D_HIDDEN, 3, TOP_K), mesh, ExpertParallel())
    two_d = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "ep"))
    with pytest.raises(ValueError, match="1-D"):
        parallelize_module(MoEMLP(D_MODEL, D_HIDDEN, 4, TOP_K), two_d, ExpertParallel())
    with pytest.raises(TypeError, match="MoEMLP"):
        parallelize_module(MoA(D_MODEL, 4, TOP_K, head_dim=4), mesh, ExpertParallel())


def _check_default_balance_counts_every_rank(ep_mesh) -> None:
    """By default ("global", no balance_group) the statistics count the tokens of all ranks of
    the job, not only the EP group's: data parallel x expert parallel share one global batch."""
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_blocks import ExpertParallel

    torch.manual_seed(0)
    block = MoEMLP(D_MODEL, D_HIDDEN, 4, TOP_K, aux_loss_coef=0.0)
    reference = MoEMLP(D_MODEL, D_HIDDEN, 4, TOP_K, aux_loss_coef=0.0)
    reference.load_state_dict(block.state_dict())
    parallelize_module(block, ep_mesh, ExpertParallel())
    sizes = [3, 5, 2, 6][: dist.get_world_size()]
    x = torch.randn(sum(sizes), D_MODEL, generator=torch.Generator().manual_seed(7))
    rank = dist.get_rank()
    block(x[sum(sizes[:rank]) : sum(sizes[: rank + 1])])
    reference(x)
    assert torch.equal(block.router.last_tokens_per_expert, reference.router.last_tokens_per_expert)


def _check_exchange_volume() -> None:
    """The EP benchmark's measured exchange volume (from the profiled collectives) is the
    arithmetic one: 2·T·k·d_model·bytes per layer in each of forward and backward."""
    from moe_blocks.models import bench

    case = bench.Case("mlp", "jetmoe-8b", 64, "fp32", "cpu", bench.TINY_SHAPES["jetmoe-8b"])
    result = bench.measure_ep(case, 1, max_repeats=3, budget_s=0.0)
    assert result.forward_bytes == result.backward_bytes == result.expected_bytes, result
    assert 0 < result.crossing_bytes <= result.forward_bytes + result.backward_bytes, result


def _worker(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    groups_of_two = init_device_mesh("cpu", (world_size // 2, 2), mesh_dim_names=("dp", "ep"))
    _check_equivalence(groups_of_two["ep"])  # ep=2: two groups side by side
    _check_default_balance_counts_every_rank(groups_of_two["ep"])
    whole = init_device_mesh("cpu", (world_size,))
    _check_equivalence(whole)  # ep=4
    _check_local_balance_and_errors(whole)
    _check_exchange_volume()


# --------------------------------------------------------------------------------------------
# The tests


def test_expert_parallel_equals_one_process():
    """4 processes: at ep=2 (two EP groups) and ep=4, fp32 and bf16, random and skewed routing,
    tokens differing per rank and ranks without tokens, the block's output and gradients equal
    the single-process block's on the group's whole batch; then the "local" balance option, the
    errors and the exchange volume the EP benchmark measures."""
    spawn_local(_worker, 4)


def test_expert_parallel_rejects_unknown_balance():
    from moe_blocks import ExpertParallel

    with pytest.raises(ValueError, match="balance"):
        ExpertParallel(balance="per-expert")


def test_ep_bench_runs_the_plain_block_and_each_ep_size(tmp_path):
    """``run_ep`` (what ``moe-blocks bench --suite ep`` runs): the plain block, then one spawn
    per EP size, whose measured exchange volume is the arithmetic one; tokens that an EP size
    does not divide are refused before anything runs; the command's JSON holds every row
    (writing it raised AttributeError after the table was printed)."""
    import json

    from moe_blocks.models import bench

    with pytest.raises(ValueError, match="divisible"):
        bench.run_ep(["jetmoe-8b"], [6], ["fp32"], "cpu", tiny=True, eps=(4,))
    results = bench.run_ep(
        ["jetmoe-8b"], [16], ["fp32"], "cpu", tiny=True, eps=(2,), max_repeats=3, budget_s=0.0
    )
    plain, parallel = results
    assert (plain.ep, parallel.ep) == (0, 2) and plain.forward_bytes is None
    assert parallel.forward_bytes == parallel.backward_bytes == parallel.expected_bytes
    assert parallel.expected_bytes == 2 * 16 * 2 * bench.TINY_SHAPES["jetmoe-8b"][0] * 4
    table = bench.format_ep_table(results).splitlines()
    assert len(table) == 4 and table[3].split()[4] == "2"
    (written,) = bench.write_results(results, "ep", tmp_path)
    rows = json.loads(written.read_text())
    assert [row["ep"] for row in rows] == [0, 2]
    assert rows[1]["forward_bytes"] == parallel.expected_bytes
