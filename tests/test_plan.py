import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_blocks.kernels import plan_dispatch
from moe_blocks.kernels.plan import token_sum
from moe_blocks.testing import routings


@given(routings(max_tokens=200))
def test_plan_groups_every_assignment_by_expert(routing):
    plan = plan_dispatch(routing.expert_idx, routing.num_experts)
    num_assignments = routing.num_tokens * routing.top_k
    flat = routing.expert_idx.reshape(-1)

    assert plan.num_experts == routing.num_experts
    assert (plan.num_tokens, plan.top_k) == (routing.num_tokens, routing.top_k)
    assert plan.num_assignments == num_assignments
    assert plan.expert_idx.dtype == torch.int64
    assert torch.equal(plan.expert_idx, routing.expert_idx)

    assert sorted(plan.sorted_indices.tolist()) == list(range(num_assignments))
    grouped_experts = flat[plan.sorted_indices]
    assert torch.equal(grouped_experts, plan.sorted_experts)
    assert bool((grouped_experts[1:] >= grouped_experts[:-1]).all())
    counts = torch.bincount(flat, minlength=routing.num_experts)
    assert torch.equal(plan.tokens_per_expert, counts)
    assert plan.expert_offsets[0] == 0
    assert torch.equal(plan.expert_offsets[1:], counts.cumsum(0))
    for expert in range(routing.num_experts):
        start, end = plan.expert_offsets[expert], plan.expert_offsets[expert + 1]
        assert bool((plan.sorted_experts[start:end] == expert).all())


@given(routings(max_tokens=50))
def test_plan_is_stable_within_an_expert(routing):
    plan = plan_dispatch(routing.expert_idx, routing.num_experts)
    for expert in range(routing.num_experts):
        start, end = plan.expert_offsets[expert], plan.expert_offsets[expert + 1]
        ids = plan.sorted_indices[start:end]
        assert bool((ids[1:] > ids[:-1]).all())


@given(routings(min_tokens=1, max_tokens=1))
def test_a_one_token_plans_order_read_on_the_host_is_its_grouping(routing):
    """``one_token_order`` (a decode step's products, read from ``expert_idx`` on the host)
    lists the slots and experts of the plan's own grouping, repeated experts included; a plan
    of another token count is refused."""
    plan = plan_dispatch(routing.expert_idx, routing.num_experts)
    slots, experts = plan.one_token_order()
    assert slots == plan.sorted_indices.tolist()
    assert experts == plan.sorted_experts.tolist()
    repeated = plan_dispatch(torch.tensor([[2, 0, 2, 1, 0]]), 3)
    assert repeated.one_token_order() == ([1, 4, 3, 0, 2], [0, 0, 1, 2, 2])
    for tokens in (0, 2):
        with pytest.raises(ValueError, match="one token"):
            plan_dispatch(torch.zeros(tokens, 2, dtype=torch.long), 3).one_token_order()


@pytest.mark.parametrize("block", ["MoEMLP", "MoA"])
@pytest.mark.parametrize("tokens", [1, 2])
def test_a_one_token_decode_step_on_cpu_computes_no_grouping(tokens, block):
    """A plan sorts its assignments only when its grouping is first read: a one-token
    inference step on CPU reads none (its products take the order from the host, the router
    counts the token's experts itself), so none of the grouping's small ops runs, in MoEMLP's
    one pass as in MoA's two ``expert_linear`` calls; with two tokens each router's plan is
    grouped once. Either way the bits of the autograd path (the kernel calls)."""
    from unittest import mock

    from moe_blocks import MoA, MoEMLP

    torch.manual_seed(0)
    if block == "MoEMLP":
        module, x = MoEMLP(16, 32, 6, 2, backend="torch"), torch.randn(tokens, 16)
    else:
        module = MoA(16, 6, 2, head_dim=4, num_kv_heads=2, backend="torch")
        x = torch.randn(1, tokens, 16)
    module.eval()
    with mock.patch.object(torch, "searchsorted", wraps=torch.searchsorted) as grouping:
        with torch.no_grad():
            out = module(x)
    assert grouping.call_count == (0 if tokens == 1 else 1)
    reference = module(x.clone().requires_grad_())  # autograd: the kernel calls, which group
    torch.testing.assert_close(out, reference.detach(), atol=0, rtol=0)
    routed = module.router(x.reshape(-1, 16)).expert_idx.flatten()
    counts = torch.bincount(routed, minlength=6)
    assert module.router.last_tokens_per_expert.tolist() == counts.tolist()


def test_plan_accepts_any_integer_dtype():
    idx = torch.tensor([[0, 2], [1, 2]], dtype=torch.int32)
    plan = plan_dispatch(idx, 3)
    assert plan.expert_idx.dtype == plan.sorted_indices.dtype == torch.int64
    assert plan.tokens_per_expert.tolist() == [1, 1, 2]


def test_plan_does_not_modify_its_input():
    idx = torch.randint(0, 5, (20, 2), dtype=torch.int32)
    before = idx.clone()
    plan_dispatch(idx, 5)
    assert torch.equal(idx, before)


@pytest.mark.parametrize("bad", [torch.tensor([[0.0, 1.0]]), torch.tensor([[True, False]])])
def test_plan_rejects_non_integer_expert_idx(bad):
    with pytest.raises(TypeError, match="expert_idx"):
        plan_dispatch(bad, 2)


@pytest.mark.parametrize("value", [-1, 4])
def test_plan_rejects_out_of_range_experts(value):
    idx = torch.tensor([[0, 1], [2, value]])
    with pytest.raises(ValueError, match=r"expert_idx values must lie in \[0, num_experts=4\)"):
        plan_dispatch(idx, 4)


def test_plan_rejects_bad_shapes_and_counts():
    with pytest.raises(ValueError, match=r"expert_idx must be 2-D \[T, k\]"):
        plan_dispatch(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match=r"expert_idx must have at least one column"):
        plan_dispatch(torch.zeros(3, 0, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="num_experts"):
        plan_dispatch(torch.tensor([[0]]), 0)
    with pytest.raises(ValueError, match="num_experts"):
        plan_dispatch(torch.tensor([[0]]), 2.0)
    with pytest.raises(TypeError, match="expert_idx"):
        plan_dispatch([[0, 1]], 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("gated", [False, True])
@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1))
def test_token_sum_gates_each_widened_row_and_leaves_its_inputs(dtype, gated, seed):
    """token_sum's terms are float(row) * gate, each exact in the wide dtype's product (one
    rounding), summed over the k slots in it: equal to the float64 sum of those rounded terms
    within the wide sum's error, in the wide dtype; the rows and gates given are not changed
    (fp32 rows are their own wide dtype: no in-place product on them)."""
    generator = torch.Generator().manual_seed(seed)
    tokens, fan_out, width = 6, 3, 20
    rows = torch.randn(tokens * fan_out, width, generator=generator).to(dtype)
    gates = torch.rand(tokens, fan_out, generator=generator) if gated else None
    given = rows.clone(), None if gates is None else gates.clone()
    summed = token_sum(rows, fan_out, gates)
    wide = torch.promote_types(dtype, torch.float32)
    assert summed.dtype == wide and summed.shape == (tokens, width)
    terms = rows.to(wide).view(tokens, fan_out, width)
    if gated:
        terms = terms * gates.to(wide)[..., None]  # each term rounded once in the wide dtype
    exact = terms.double().sum(1)
    bound = fan_out * torch.finfo(wide).eps * terms.double().abs().sum(1)
    assert ((summed.double() - exact).abs() <= bound).all()
    assert torch.equal(rows, given[0]) and (gates is None or torch.equal(gates, given[1]))
