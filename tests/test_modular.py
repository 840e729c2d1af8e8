"""Modularity: add_experts, freeze_experts, expert_usage, prune_experts, the load-concentration
loss, expert priors, shared experts (against transformers' Qwen2-MoE), and the CLI's extend,
prune and train --resume-from --train-new-experts-only."""

import json
import math

import numpy as np
import pytest
import torch

import moe_blocks
from moe_blocks import (
    MoA,
    MoEMLP,
    TopKRouter,
    add_experts,
    expert_usage,
    freeze_experts,
    load_balancing_loss,
    load_concentration_loss,
    prune_experts,
)
from moe_blocks.models.train import TrainSettings, make_optimizer

D = 16
MODES = [("topk_softmax", False), ("softmax_topk", False), ("softmax_topk", True),
         ("sigmoid", True), ("sigmoid", False)]  # fmt: skip


def make_block(kind, score="topk_softmax", renormalize=False, num_experts=4, **options):
    router = {"score": score, "renormalize": renormalize}
    if kind == "mlp":
        return MoEMLP(D, 24, num_experts, 2, **router, **options)
    return MoA(D, num_experts, 2, head_dim=4, num_kv_heads=2, **router, **options)


def routing(block, x):
    """The block's router decision for ``x`` (tokens as the block flattens them)."""
    with torch.no_grad():
        return block.router(x.reshape(-1, D))


def state(block):
    return {name: tensor.clone() for name, tensor in block.state_dict().items()}


def assert_same_state(block, saved):
    now = block.state_dict()
    assert now.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(now[name], tensor), name


# --------------------------------------------------------------------------------------------
# Extend


@pytest.mark.parametrize("kind", ["mlp", "moa"])
@pytest.mark.parametrize(("score", "renormalize"), MODES)
@pytest.mark.parametrize("init", ["copy", "random"])
def test_add_experts_leaves_routing_and_output_unchanged(kind, score, renormalize, init):
    torch.manual_seed(hash((kind, score, renormalize, init)) % 2**31)
    block = make_block(kind, score, renormalize)
    x = torch.randn(6, 20, D)
    before, route = block(x).detach(), routing(block, x)
    block.add_experts(3, init=init)
    after, new_route = block(x).detach(), routing(block, x)
    assert block.router.num_experts == block.input_linear.weight.shape[0] == 7
    assert torch.equal(new_route.expert_idx, route.expert_idx)
    assert block.router.last_tokens_per_expert[4:].sum() == 0
    # The same experts, gates and output, bit for bit: the router's fp32 logits do not depend
    # on the gate's row count (moe_blocks.router.gate_logits).
    assert torch.equal(new_route.gates, route.gates)
    assert torch.equal(after, before)


def test_closed_experts_are_never_chosen_even_with_a_selection_bias():
    # DeepSeek-V3 balancing: old experts' biases pushed far down; a new expert's score 0 plus
    # its bias 0 would beat them all if closed experts were not masked out of the choice.
    torch.manual_seed(15)
    block = make_block("mlp", "sigmoid", True, bias_update_rate=0.01)
    with torch.no_grad():
        block.router.selection_bias.fill_(-5.0)
    x = torch.randn(50, D)
    before, route = block(x).detach(), routing(block, x)
    block.add_experts(2, init="random")
    assert block.router.selection_bias.tolist() == [-5.0] * 4 + [0.0] * 2
    assert torch.equal(routing(block, x).expert_idx, route.expert_idx)
    torch.testing.assert_close(block(x), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "moa"])
def test_fewer_open_experts_than_top_k_is_an_error_not_a_closed_choice(kind):
    """Training moves the priors and can close experts (a prior at 0 or below): with fewer
    than top_k open, a token's choice would include a closed expert (gate 0, counted as
    used; NaN gates with none open): refused, naming the priors."""
    torch.manual_seed(16)
    block = make_block(kind, num_experts=4)
    block.add_experts(2, init="random")
    x = torch.randn(2, 5, D)
    block(x)  # 4 open of 6, top_k 2
    with torch.no_grad():
        block.router.expert_prior[:3] = torch.tensor([-0.1, 0.0, -2.0])  # one open left
    with pytest.raises(ValueError, match="fewer than top_k=2 experts are open.*expert_prior"):
        block(x)


@pytest.mark.parametrize("kind", ["mlp", "moa"])
def test_add_experts_is_bitwise_exact_with_shared_experts(kind):
    torch.manual_seed(1)
    options = {"num_shared_experts": 1} if kind == "mlp" else {}
    block = make_block(kind, **options)
    x = torch.randn(5, 12, D)
    before = block(x).detach()
    block.add_experts(2, init="random")
    assert torch.equal(block(x), before)


def test_add_experts_copies_the_most_used_experts_by_default():
    torch.manual_seed(2)
    block = make_block("mlp", num_experts=5)
    block(torch.randn(64, D))
    usage = block.router.last_tokens_per_expert.clone()
    most_used = sorted(range(5), key=lambda e: (-usage[e].item(), e))[:2]
    old_weight = block.input_linear.weight.detach().clone()
    old_gate = block.router.layer.weight.detach().clone()
    add_experts(block, 2)
    assert torch.equal(block.input_linear.weight[5:], old_weight[most_used])
    assert torch.equal(block.router.layer.weight[5:], old_gate[most_used])
    assert block.router.expert_prior.tolist() == [1.0] * 5 + [0.0] * 2
    block.add_experts(1, source=3)
    assert torch.equal(block.input_linear.weight[7], old_weight[3])


def test_new_experts_train_and_take_tokens_while_frozen_ones_stay_bit_identical():
    """Data the old experts serve badly (a target unrelated to them): training only the new
    experts, with the train command's AdamW (weight decay 0.1), opens them (their prior grows)
    and moves tokens to them; every frozen row stays bit-identical."""
    torch.manual_seed(3)
    block = make_block("mlp")
    block.bias.requires_grad_(False)
    x = torch.randn(256, D)
    target = torch.sin(3 * x @ torch.randn(D, D))
    block.add_experts(2)
    saved = state(block)
    frozen = freeze_experts(block, trainable_experts=[4, 5])
    optimizer = make_optimizer(block, TrainSettings(lr=1e-2))  # made after freezing
    losses = []
    for _ in range(40):
        loss = (block(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert block.router.last_tokens_per_expert[4:].sum() > 0.1 * 256 * 2
    assert losses[-1] < losses[0]
    for name, tensor in block.state_dict().items():
        if name == "bias":
            assert torch.equal(tensor, saved[name])
        else:
            assert torch.equal(tensor[:4], saved[name][:4]), name
            assert not torch.equal(tensor[4:], saved[name][4:]), name
    frozen.remove()


def test_frozen_rows_get_zero_gradient_and_trainable_rows_their_own():
    torch.manual_seed(4)
    block = make_block("moa")
    block.add_experts(1)
    with torch.no_grad():
        block.router.expert_prior.fill_(0.5)  # everything open, so every row has a gradient
    twin = make_block("moa", num_experts=5, expert_prior=True)
    twin.load_state_dict(block.state_dict())
    frozen = freeze_experts(block, experts=[0, 2])
    x = torch.randn(3, 10, D)
    block(x).square().sum().backward()
    twin(x).square().sum().backward()
    frozen.remove()
    twin_params = dict(twin.named_parameters())
    for name, ours in block.named_parameters():
        theirs = twin_params[name]
        if ours.dim() and ours.shape[0] == 5:
            assert ours.grad[[0, 2]].abs().sum() == 0, name
            assert torch.equal(ours.grad[[1, 3, 4]], theirs.grad[[1, 3, 4]]), name
        else:
            assert torch.equal(ours.grad, theirs.grad), name


def test_optimizer_steps_keep_frozen_rows_despite_momentum_and_weight_decay():
    torch.manual_seed(5)
    block = make_block("mlp")
    optimizer = make_optimizer(block, TrainSettings(lr=1e-2))
    x = torch.randn(64, D)
    for _ in range(3):  # momentum on every row
        optimizer.zero_grad()
        block(x).square().mean().backward()
        optimizer.step()
    saved = state(block)
    frozen = freeze_experts(block, experts=1)  # the optimizer was made before freezing
    for _ in range(3):
        optimizer.zero_grad()
        block(x).square().mean().backward()
        optimizer.step()
    now = block.state_dict()
    for name in ("input_linear.weight", "output_linear.weight", "router.layer.weight"):
        assert torch.equal(now[name][1], saved[name][1])
        assert not torch.equal(now[name][0], saved[name][0])
    frozen.remove()
    optimizer.zero_grad()
    block(x).square().mean().backward()
    optimizer.step()
    assert not torch.equal(block.input_linear.weight[1], saved["input_linear.weight"][1])


# --------------------------------------------------------------------------------------------
# Usage and prune


def test_expert_usage_counts_what_a_float64_router_chooses():
    torch.manual_seed(6)
    block = make_block("mlp", num_experts=6)
    batches = [torch.randn(40, D) for _ in range(3)]
    usage = expert_usage(block, batches)
    weight = block.router.layer.weight.detach().double()
    expected = sum(
        torch.bincount((x.double() @ weight.T).topk(2).indices.reshape(-1), minlength=6)
        for x in batches
    )
    assert list(usage) == [""]
    assert torch.equal(usage[""], expected)
    assert block.training


def _kept_only_data(block, x, pruned):
    """The sequences of ``x`` [B, T, D] none of whose tokens chose an expert in ``pruned``."""
    chosen = routing(block, x).expert_idx.view(x.shape[0], -1)
    avoided = ~torch.isin(chosen, torch.tensor(pruned)).any(-1)
    return x[avoided]


@pytest.mark.parametrize("kind", ["mlp", "moa"])
@pytest.mark.parametrize(
    ("score", "renormalize"), [m for m in MODES if m != ("softmax_topk", False)]
)
def test_prune_keeps_outputs_where_pruned_experts_were_never_chosen(kind, score, renormalize):
    torch.manual_seed(7)
    block = make_block(kind, score, renormalize, num_experts=6)
    x = _kept_only_data(block, torch.randn(600, 3, D), pruned=[1, 4])
    assert len(x) > 10
    before, route = block(x).detach(), routing(block, x)
    usage = expert_usage(block, x)[""]
    assert usage[[1, 4]].sum() == 0
    prune_experts(block, [5, 0, 2, 3])
    new_ids = torch.tensor([0, -1, 1, 2, -1, 3])  # old id -> new id
    after, new_route = block(x).detach(), routing(block, x)
    assert block.router.num_experts == block.output_linear.weight.shape[0] == 4
    assert torch.equal(new_route.expert_idx, new_ids[route.expert_idx])
    assert torch.equal(new_route.gates, route.gates)
    assert torch.equal(after, before)


@pytest.mark.parametrize("kind", ["mlp", "moa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_scores_keep_their_experts_when_experts_are_added_or_pruned(kind, dtype):
    """Sigmoid scores of large logits round to exactly 1 (and bf16 logits tie often): which of
    the tied experts a token gets must not depend on the expert count, or adding closed
    experts, or pruning one no token chose, changes the outputs."""
    torch.manual_seed(11)
    block = make_block(kind, "sigmoid", True, num_experts=8).to(dtype)
    with torch.no_grad():
        block.router.layer.weight.mul_(200.0)  # most scores exactly 1.0
        block.router.layer.weight[5] = -block.router.layer.weight[5].abs()  # never chosen...
    x = torch.randn(4, 30, D, dtype=dtype).abs()  # ...for inputs >= 0
    route = routing(block, x)
    scores = torch.sigmoid(route.logits.double()).float()
    assert (scores == 1.0).sum(-1).max() > block.router.top_k  # ties the choice must break
    assert not (route.expert_idx == 5).any()
    before = block(x).detach()
    block.add_experts(3, init="random")
    assert torch.equal(routing(block, x).expert_idx, route.expert_idx)
    assert torch.equal(block(x), before)
    prune_experts(block, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10])  # expert 5 goes, and nothing else
    new_ids = torch.tensor([0, 1, 2, 3, 4, -1, 5, 6])
    assert torch.equal(routing(block, x).expert_idx, new_ids[route.expert_idx])
    assert torch.equal(block(x), before)


def test_prune_is_bitwise_exact_with_gated_shared_experts():
    torch.manual_seed(8)
    block = make_block("mlp", num_experts=6, num_shared_experts=2, shared_gate=True)
    x = _kept_only_data(block, torch.randn(400, 1, D), pruned=[0, 3])
    before = block(x).detach()
    prune_experts(block, [1, 2, 4, 5])
    assert torch.equal(block(x), before)


def test_prune_refuses_softmax_topk_without_renormalize_unless_told():
    block = make_block("mlp", "softmax_topk", False, num_experts=6)
    saved = state(block)
    with pytest.raises(ValueError, match="normalize"):
        prune_experts(block, [0, 1, 2])
    assert_same_state(block, saved)
    prune_experts(block, [0, 1, 2], exact=False)
    assert block.router.num_experts == 3


@pytest.mark.parametrize(
    ("keep", "error", "match"),
    [
        ([0], ValueError, "fewer than the router's top_k"),
        ([], ValueError, "keep names no expert"),
        ([0, 6], ValueError, "expert 6 does not exist"),
        ([0, -1], ValueError, "expert -1 does not exist"),
        ([1, 1, 2], ValueError, "more than once"),
        (torch.tensor([0.0, 1.0]), TypeError, "keep must be expert ids"),
        ("01", TypeError, "keep must be"),
        ([0, True], TypeError, "int expert ids"),
    ],
)
def test_prune_rejects_bad_keep_and_leaves_the_block_unchanged(keep, error, match):
    block = make_block("moa", num_experts=6)
    saved = state(block)
    with pytest.raises(error, match=match):
        prune_experts(block, keep)
    assert_same_state(block, saved)
    assert block.router.num_experts == 6


@pytest.mark.parametrize(
    "keep",
    [
        [0, 2, 5],
        (0, 2, 5),
        range(0, 6, 5),
        torch.tensor([0, 2, 5]),
        np.array([0, 2, 5]),
        [np.int64(0), torch.tensor(2), 5],
    ],
    ids=["list", "tuple", "range", "tensor", "numpy", "mixed"],
)
def test_prune_takes_ids_in_any_integer_form(keep):
    block = make_block("mlp", num_experts=6)
    expected = block.input_linear.weight.detach()[list(map(int, keep))].clone()
    prune_experts(block, keep)
    assert torch.equal(block.input_linear.weight, expected)


def test_prune_counts_only_open_experts_towards_top_k():
    block = make_block("mlp")
    block.add_experts(2)
    saved = state(block)
    with pytest.raises(ValueError, match="open experts"):
        prune_experts(block, [0, 4, 5])
    assert_same_state(block, saved)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": 0}, ValueError, "n must be a positive int"),
        ({"n": -2}, ValueError, "n must be a positive int"),
        ({"n": True}, ValueError, "n must be a positive int"),
        ({"n": 1, "init": "zeros"}, ValueError, "init must be one of"),
        ({"n": 2, "source": 7}, ValueError, "expert 7 does not exist"),
        ({"n": 2, "source": [0, 1, 2]}, ValueError, "source must name one expert or n = 2"),
        ({"n": 1, "init": "random", "source": 0}, ValueError, "only used with"),
    ],
)
def test_add_experts_rejects_bad_arguments_and_leaves_the_block_unchanged(kwargs, error, match):
    block = make_block("mlp")
    saved = state(block)
    with pytest.raises(error, match=match):
        add_experts(block, **kwargs)
    assert_same_state(block, saved)
    assert block.router.expert_prior is None and block.router.num_experts == 4


def test_operations_reject_what_is_not_a_block():
    with pytest.raises(TypeError, match="block must be an MoEMLP or MoA"):
        add_experts(torch.nn.Linear(4, 4), 1)
    with pytest.raises(TypeError, match="holds no MoEMLP or MoA"):
        expert_usage(torch.nn.Linear(4, 4), torch.randn(2, 4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of experts"),
        ({"experts": [0], "trainable_experts": [1]}, "exactly one of experts"),
        ({"experts": [0, 1, 2, 3]}, "experts: all 4 experts"),
        ({"trainable_experts": []}, "trainable_experts names no expert"),
        ({"trainable_experts": [4]}, "expert 4 does not exist"),
    ],
)
def test_freeze_rejects_bad_arguments(kwargs, match):
    block = make_block("mlp")
    with pytest.raises(ValueError, match=match):
        freeze_experts(block, **kwargs)
    block(torch.randn(64, D)).sum().backward()  # no hook was left behind: every used expert
    used = block.router.last_tokens_per_expert > 0  # gets a gradient
    assert block.input_linear.weight.grad.abs().sum(dim=(1, 2))[used].gt(0).all()


# --------------------------------------------------------------------------------------------
# Losses with expert priors; load concentration


def _reference_marginal_entropy(logits):
    marginal = torch.softmax(logits, -1).mean(0)
    return -(marginal * marginal.log()).sum()


def test_load_concentration_loss_and_gradient_match_float64():
    torch.manual_seed(9)
    for tokens, experts in [(1, 2), (17, 4), (64, 8)]:
        logits = (torch.randn(tokens, experts) * 2).requires_grad_()
        reference = logits.detach().double().requires_grad_()
        ours, expected = load_concentration_loss(logits), _reference_marginal_entropy(reference)
        (grad,) = torch.autograd.grad(ours, logits)
        (expected_grad,) = torch.autograd.grad(expected, reference)
        torch.testing.assert_close(ours.double(), expected.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad.double(), expected_grad, atol=1e-6, rtol=1e-4)
    assert load_concentration_loss(torch.zeros(5, 8)).item() == pytest.approx(math.log(8))
    assert load_concentration_loss(torch.tensor([[30.0, 0, 0]] * 4)).item() < 1e-9


def test_router_adds_the_load_concentration_loss_to_its_aux_loss():
    torch.manual_seed(10)
    router = TopKRouter(D, 4, 2, balance_loss="load_concentration", aux_loss_coef=0.5)
    x = torch.randn(32, D)
    out = router(x)
    logits = x.double() @ router.layer.weight.detach().double().T
    concentration = _reference_marginal_entropy(logits)
    z_loss = torch.logsumexp(logits, -1).square().mean()
    expected = 0.5 * (concentration + 0.1 * z_loss)
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_switch_loss_with_priors_matches_float64_and_opens_closed_experts():
    torch.manual_seed(11)
    logits = (torch.randn(20, 5) * 2).requires_grad_()
    prior = torch.tensor([1.0, 0.7, 1.0, 0.0, 0.0], requires_grad=True)
    idx = (logits.detach() + prior.detach().log()).topk(2).indices
    ref_logits = logits.detach().double().requires_grad_()
    ref_prior = prior.detach().double().requires_grad_()
    weights = ref_prior * ref_logits.exp()
    probs = weights / weights.sum(-1, keepdim=True)
    counts = torch.bincount(idx.reshape(-1), minlength=5).double()
    expected = 5 * (counts / counts.sum() * probs.mean(0)).sum()
    ours = load_balancing_loss(logits, idx, 5, prior=prior)
    grads = torch.autograd.grad(ours, (logits, prior))
    expected_grads = torch.autograd.grad(expected, (ref_logits, ref_prior))
    torch.testing.assert_close(ours.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    assert (grads[1][3:] < 0).all()  # descent opens the closed experts


@pytest.mark.parametrize("balance_loss", ["switch", "mutual_information", "load_concentration"])
def test_closed_experts_give_finite_losses_and_gradients(balance_loss):
    torch.manual_seed(12)
    router = TopKRouter(D, 5, 2, balance_loss=balance_loss, expert_prior=True)
    with torch.no_grad():
        router.expert_prior[3:] = 0.0
    out = router(torch.randn(30, D))
    out.aux_loss.backward()
    assert torch.isfinite(out.aux_loss)
    assert torch.isfinite(router.layer.weight.grad).all()
    assert torch.isfinite(router.expert_prior.grad).all()
    assert (out.expert_idx < 3).all()


# --------------------------------------------------------------------------------------------
# Shared experts


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_shared_experts_match_transformers_qwen2_moe(norm_topk_prob):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(13)
    config = Qwen2MoeConfig(
        hidden_size=D, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
        shared_expert_intermediate_size=24, norm_topk_prob=norm_topk_prob, hidden_act="silu",
    )  # fmt: skip
    theirs = Qwen2MoeSparseMoeBlock(config)
    for param in theirs.parameters():
        torch.nn.init.normal_(param, std=0.3)
    ours = MoEMLP(
        D, 12, 4, 2, score="softmax_topk", renormalize=norm_topk_prob, bias=False,
        num_shared_experts=2, shared_d_hidden=12, shared_gate=True,
    )  # fmt: skip
    shared = theirs.shared_expert
    with torch.no_grad():
        ours.router.layer.weight.copy_(theirs.gate.weight)
        ours.input_linear.weight.copy_(theirs.experts.gate_up_proj)
        ours.output_linear.weight.copy_(theirs.experts.down_proj)
        ours.shared_input_linear.weight.copy_(
            torch.cat((shared.gate_proj.weight, shared.up_proj.weight))
        )
        ours.shared_output_linear.weight.copy_(shared.down_proj.weight)
        ours.shared_gate.weight.copy_(theirs.shared_expert_gate.weight)
    x = torch.randn(3, 11, D)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("glu", [True, False])
def test_ungated_shared_experts_add_a_dense_mlp_to_the_routed_output(glu):
    torch.manual_seed(14)
    block = MoEMLP(D, 8, 4, 2, glu=glu, activation="gelu", num_shared_experts=3, shared_d_hidden=5)
    assert block.shared_output_linear.weight.shape == (D, 15)
    routed_only = MoEMLP(D, 8, 4, 2, glu=glu, activation="gelu")
    routed_only.load_state_dict(block.state_dict(), strict=False)
    x = torch.randn(20, D)
    hidden = x.double() @ block.shared_input_linear.weight.double().T
    if glu:
        gate, up = hidden.chunk(2, -1)
        hidden = torch.nn.functional.gelu(gate) * up
    else:
        hidden = torch.nn.functional.gelu(hidden)
    expected = routed_only(x).double() + hidden @ block.shared_output_linear.weight.double().T
    torch.testing.assert_close(block(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_shared_experts": -1}, "num_shared_experts must be a positive int"),
        ({"num_shared_experts": True}, "num_shared_experts must be an int"),
        ({"num_shared_experts": 1, "shared_d_hidden": 0}, "shared_d_hidden"),
        ({"shared_gate": True}, "need num_shared_experts"),
        ({"shared_d_hidden": 8}, "need num_shared_experts"),
    ],
)
def test_shared_expert_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEMLP(D, 8, 4, 2, **kwargs)


def test_everything_is_exported():
    for name in ("add_experts", "prune_experts", "freeze_experts", "expert_usage",
                 "load_concentration_loss", "FrozenExperts", "expert_blocks"):  # fmt: skip
        assert name in moe_blocks.__all__ and hasattr(moe_blocks, name)


# --------------------------------------------------------------------------------------------
# The CLI: extend, train --resume-from --train-new-experts-only, prune

FAST = ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--eval-every", "6",
        "--warmup-steps", "1", "--checkpoint-every", "3", "--quiet"]  # fmt: skip
WORDS = "the licence grants permission to copy modify and distribute any work under terms".split()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """An old corpus (a slice of the standard library's sources) and a new one (English-like
    words), as folders."""
    from moe_blocks.models.train import load_corpus_files

    root = tmp_path_factory.mktemp("corpora")
    old, new = root / "old", root / "new"
    old.mkdir()
    new.mkdir()
    for index, source in enumerate(load_corpus_files()[:30]):
        (old / f"{index:02d}.py").write_bytes(source.read_bytes()[:3000])
    generator = torch.Generator().manual_seed(0)
    for index in range(30):
        picks = torch.randint(0, len(WORDS), (500,), generator=generator).tolist()
        (new / f"{index:02d}.txt").write_text(" ".join(WORDS[i] for i in picks) + "\n")
    return old, new


@pytest.fixture(scope="module")
def base_run(corpora, tmp_path_factory):
    from moe_blocks.models.cli import main

    out = tmp_path_factory.mktemp("runs") / "base"
    assert main(["train", "--data", str(corpora[0]), "--out", str(out), *FAST]) == 0
    return out


def cli(*args):
    from moe_blocks.models.cli import main

    return main([str(arg) for arg in args])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def checkpoint_logits(folder, ids):
    from moe_blocks.models.jetmoe import JetMoEForCausalLM

    model = JetMoEForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


def test_extend_then_train_new_experts_only_forgets_no_weight(base_run, corpora, tmp_path, capsys):
    from safetensors.torch import load_file

    extended, run = tmp_path / "extended", tmp_path / "run"
    assert cli("extend", base_run, "--add", 2, "--out", extended, "--seq-len", 16) == 0
    config = json.loads((extended / "config.json").read_text())
    assert config["num_local_experts"] == 6 and config["expert_prior"] is True
    ids = torch.randint(0, 256, (2, 24))
    torch.testing.assert_close(
        checkpoint_logits(extended, ids), checkpoint_logits(base_run / "checkpoint", ids),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    capsys.readouterr()
    new_data = ["--data", corpora[1], "--resume-from", extended, "--train-new-experts-only"]
    new_data += ["--lr", "0.05"]  # Adam moves a prior by about lr a step: open them quickly
    assert cli("train", *new_data, "--out", run, *FAST) == 0
    printed = capsys.readouterr().out
    assert "only experts 4..5" in printed and "validation on the old corpus" in printed
    # Continue the run: the freezing is set up again from the settings.
    assert cli("train", *new_data, "--out", run, "--resume", *FAST[:1], 6, *FAST[2:]) == 0
    log = json.loads((run / "log.json").read_text())
    assert [e["step"] for e in log if "old_val_bpb" in e] == [3, 6]
    assert [e["step"] for e in log if "val_bpb" in e] == [3, 6]
    assert {"val_bpb_before", "old_val_bpb_before"} <= set(log[0])  # before the first step
    last = log[-1]["tokens_per_expert"]
    assert sum(counts[4] + counts[5] for counts in last.values()) > 0  # the new experts work
    assert log[-1]["val_bpb"] != log[0]["val_bpb_before"]
    before = load_file(extended / "model.safetensors")
    after = load_file(run / "checkpoint" / "model.safetensors")
    assert before.keys() == after.keys()
    moved = []
    for key, tensor in before.items():
        expert = (
            tensor.dim() >= 1
            and tensor.shape[0] == 6
            and "router" in key
            or (key.endswith(("input_linear.weight", "output_linear.weight")))
        )
        if expert:
            assert torch.equal(after[key][:4], tensor[:4]), key
            moved.append(not torch.equal(after[key][4:], tensor[4:]))
        else:
            assert torch.equal(after[key], tensor), key
    assert all(moved) and len(moved) == 4 * 2 * 4  # 4 layers, MoA and MoE, 4 tensors


def test_prune_writes_a_smaller_model_that_ours_and_transformers_load(
    base_run, corpora, tmp_path, capsys
):
    transformers = pytest.importorskip("transformers")
    tuned, pruned = tmp_path / "tuned", tmp_path / "pruned"
    # Fine-tune with the load-concentration loss first, as ModuleFormer does before pruning.
    options = ["--data", corpora[0], "--resume-from", base_run, "--balance-loss"]
    assert cli("train", *options, "load_concentration", "--out", tuned, *FAST) == 0
    capsys.readouterr()
    small = ["--batches", 2, "--batch-size", 2, "--seq-len", 16]
    assert cli("prune", tuned, "--data", corpora[0], "--keep-fraction", 0.5, "--out", pruned,
               *small) == 0  # fmt: skip
    printed = capsys.readouterr().out
    config = json.loads((pruned / "config.json").read_text())
    assert config["num_local_experts"] == 2 and "expert_prior" not in config
    report = json.loads((pruned / "prune.json").read_text())
    assert f"{report['val_bpb_before']:.3f} -> {report['val_bpb_after']:.3f}" in printed
    assert f"{report['parameters_after']:,}" in printed
    ours = moe_blocks.models.jetmoe.JetMoEForCausalLM.from_pretrained(pruned).eval()
    theirs = transformers.JetMoeForCausalLM.from_pretrained(pruned).eval()
    assert ours.num_parameters() == report["parameters_after"] == theirs.num_parameters()
    assert report["parameters_after"] < report["parameters_before"]
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
    for name, kept in report["kept_experts"].items():  # the most used experts were kept
        usage = torch.tensor(report["usage"][name])
        dropped = [e for e in range(len(usage)) if e not in kept]
        assert usage[kept].min() >= usage[dropped].max()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["extend", "{base}", "--add", "0", "--out", "{tmp}/x"], "--add must be a positive"),
        (["extend", "{tmp}/none", "--add", "1", "--out", "{tmp}/x"], "CHECKPOINT"),
        (["extend", "{base}", "--add", "1", "--out", "{base}/checkpoint"], "already holds"),
        (["prune", "{base}", "--keep-fraction", "0.25", "--out", "{tmp}/x"], "fewer than the 2"),
        (["prune", "{base}", "--keep-fraction", "1.5", "--out", "{tmp}/x"], "(0, 1]"),
        (["prune", "{base}", "--keep-fraction", "0", "--out", "{tmp}/x"], "(0, 1]"),
        (["train", "--train-new-experts-only", "--out", "{tmp}/x"], "needs --resume-from"),
        (["train", "--resume-from", "{base}", "--train-new-experts-only", "--out", "{tmp}/x"],
         "has no new experts"),
        (["train", "--resume-from", "{tmp}", "--out", "{tmp}/x"], "no checkpoint there"),
    ],
)  # fmt: skip
def test_bad_modularity_commands_fail_in_one_line(args, message, base_run, tmp_path, capsys):
    from moe_blocks.models.train import loop

    filled = [a.format(base=base_run, tmp=tmp_path) for a in args]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "batch_at", lambda *a: pytest.fail("training started"))
        assert cli(*filled) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("balance", ["mutual_information", "load_concentration", "none"])
def test_training_only_new_experts_that_no_loss_opens_is_refused(
    balance, base_run, tmp_path, capsys
):
    """The new experts are closed (prior 0) and only the Switch loss's gradient opens them:
    with another balance loss a --train-new-experts-only run would train nothing (no token
    reaches them); refused in one line before any step."""
    from moe_blocks.models.train import loop

    extended = tmp_path / "extended"
    assert cli("extend", base_run, "--add", 2, "--out", extended, "--seq-len", 16) == 0
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "batch_at", lambda *a: pytest.fail("training started"))
        assert cli("train", "--resume-from", extended, "--train-new-experts-only",
                   "--balance-loss", balance, "--out", tmp_path / "x", *FAST) == 2  # fmt: skip
    error = one_line_error(capsys)
    assert "--balance-loss" in error and "switch" in error


def test_freezing_follows_a_replaced_weight_and_lets_the_old_one_go():
    """Sharding replaces a module's weight by a new tensor: the frozen rows of the new one get
    a zero gradient, and the replaced one is not kept alive by the hooks (its memory is freed)."""
    import gc
    import weakref

    torch.manual_seed(7)
    block = make_block("mlp")
    frozen = freeze_experts(block, experts=[0])
    old = weakref.ref(block.input_linear.weight)
    block.input_linear.weight = torch.nn.Parameter(block.input_linear.weight.detach().clone())
    frozen.refresh()
    gc.collect()
    assert old() is None
    block(torch.randn(16, D)).square().sum().backward()
    grad = block.input_linear.weight.grad
    assert not grad[0].any() and grad[1:].any()
    frozen.remove()


@pytest.mark.parametrize(
    "balance_loss, coef, warns",
    [("switch", 0.01, False), ("switch", 0.0, True), ("mutual_information", 0.01, True),
     ("load_concentration", 0.01, True), ("none", 0.01, True)],
)  # fmt: skip
def test_adding_experts_that_nothing_will_open_warns(balance_loss, coef, warns):
    """Only the Switch loss's gradient opens closed experts: with another balance loss, or none
    weighted, add_experts says they will stay closed (the output is unchanged either way)."""
    import warnings

    block = MoEMLP(8, 6, 4, 2, balance_loss=balance_loss, aux_loss_coef=coef)
    x = torch.randn(5, 8)
    before = block(x).detach()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_experts(block, 2)
    said = [str(w.message) for w in caught if "stay closed" in str(w.message)]
    assert len(said) == int(warns) and (not warns or balance_loss in said[0])
    assert torch.equal(block(x), before)
