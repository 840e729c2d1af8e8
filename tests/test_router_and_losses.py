"""TopKRouter's score modes and balancing bias; the Switch, z- and mutual-information losses
against float64 references written here."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_blocks import (
    TopKRouter,
    load_balancing_loss,
    mutual_information_loss,
    router_stats,
    router_z_loss,
)
from moe_blocks.kernels import expert_linear, gather_scores
from moe_blocks.losses import BALANCE_LOSSES, attach_aux_loss, load_concentration_loss

SCORES = ("topk_softmax", "softmax_topk", "sigmoid")


@st.composite
def router_cases(draw):
    experts = draw(st.integers(1, 16))
    return {
        "experts": experts,
        "top_k": draw(st.integers(1, experts)),
        "tokens": draw(st.integers(1, 40)),
        "d_model": draw(st.integers(1, 24)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _router(case, **options):
    torch.manual_seed(case["seed"])
    router = TopKRouter(case["d_model"], case["experts"], case["top_k"], **options)
    x = torch.randn(case["tokens"], case["d_model"])
    return router, x


@given(router_cases(), st.sampled_from(SCORES), st.booleans())
def test_router_picks_the_top_k_scores_and_makes_gates(case, score, renormalize):
    router, x = _router(case, score=score, renormalize=renormalize)
    out = router(x)
    logits = x.double() @ router.layer.weight.double().T
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits.double(), logits, atol=1e-5, rtol=1e-5)
    scores = {
        "topk_softmax": out.logits,
        "softmax_topk": out.logits.softmax(-1),
        "sigmoid": out.logits.sigmoid(),
    }[score]
    chosen = scores.gather(1, out.expert_idx)
    for token in range(case["tokens"]):
        assert len(set(out.expert_idx[token].tolist())) == case["top_k"]
        others = [e for e in range(case["experts"]) if e not in out.expert_idx[token].tolist()]
        if others:
            assert chosen[token].min() >= scores[token, others].max()
    if score == "topk_softmax":
        expected_gates = chosen.softmax(-1)
    elif renormalize:
        expected_gates = chosen / chosen.sum(-1, keepdim=True)
    else:
        expected_gates = chosen
    torch.testing.assert_close(out.gates, expected_gates)
    sums = out.gates.sum(-1)
    if score == "topk_softmax" or renormalize:
        torch.testing.assert_close(sums, torch.ones_like(sums))
    elif score == "softmax_topk":
        assert bool((sums <= 1 + 1e-6).all())
    assert torch.equal(out.plan.expert_idx, out.expert_idx)


@pytest.mark.parametrize("score", SCORES)
def test_ties_never_duplicate_an_expert(score):
    router = TopKRouter(8, 6, 4, score=score)
    torch.nn.init.zeros_(router.layer.weight)  # every logit ties
    out = router(torch.randn(10, 8))
    for row in out.expert_idx.tolist():
        assert len(set(row)) == 4


def test_selection_bias_changes_choice_not_gate_values():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 1, score="sigmoid", bias_update_rate=0.5)
    x = torch.randn(32, 8)
    before = router(x)
    router.selection_bias[2] = 100.0
    after = router(x)
    assert bool((after.expert_idx == 2).all())
    assert not bool((before.expert_idx == 2).all())
    expected = after.logits.sigmoid()[:, 2:3]
    torch.testing.assert_close(after.gates, expected)


def test_update_selection_bias_moves_towards_balance():
    router = TopKRouter(4, 4, 1, bias_update_rate=0.1)
    router.train()
    router.load_since_update.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    router.update_selection_bias()
    torch.testing.assert_close(router.selection_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert router.load_since_update.sum() == 0
    router(torch.randn(6, 4))
    assert router.load_since_update.sum() == 6
    with pytest.raises(RuntimeError, match="bias_update_rate"):
        TopKRouter(4, 4, 1).update_selection_bias()


def test_router_rejects_bad_configuration():
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(8, 4, 5)
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(8, 4, 0)
    with pytest.raises(ValueError, match="score"):
        TopKRouter(8, 4, 2, score="softmax")
    with pytest.raises(ValueError, match="balance_loss"):
        TopKRouter(8, 4, 2, balance_loss="gshard")
    with pytest.raises(ValueError, match="d_model"):
        TopKRouter(8, 4, 2)(torch.randn(3, 7))
    with pytest.raises(ValueError, match="bias_update_rate must be positive"):
        TopKRouter(8, 4, 2, bias_update_rate=0.0)
    for bad, error in ((float("nan"), ValueError), (float("inf"), ValueError), (-0.1, ValueError),
                       (True, TypeError), ("0.1", TypeError)):  # fmt: skip
        with pytest.raises(error, match="bias_update_rate"):
            TopKRouter(8, 4, 2, bias_update_rate=bad)


def test_default_aux_loss_is_jetmoes_and_statistics_are_not_saved():
    """JetMoE trained each router with 0.01 · (Switch loss + 0.1 · z-loss); the per-batch
    statistics are not part of the state dict (a JetMoE checkpoint holds only the gate)."""
    torch.manual_seed(0)
    router = TopKRouter(12, 5, 2)
    x = torch.randn(20, 12)
    out = router(x)
    logits = x.double() @ router.layer.weight.detach().double().T
    expected = 0.01 * (
        _switch_reference(logits, out.expert_idx, 5)
        + 0.1 * torch.logsumexp(logits, -1).square().mean()
    )
    torch.testing.assert_close(out.aux_loss.double(), expected, atol=1e-7, rtol=1e-5)
    assert set(router.state_dict()) == {"layer.weight"}
    assert router.last_tokens_per_expert.dtype == torch.int64  # counts, for logging
    assert torch.equal(router.last_tokens_per_expert, out.plan.tokens_per_expert)


def _switch_reference(logits, expert_idx, experts):
    probs = torch.softmax(logits, -1)
    counts = torch.tensor([(expert_idx == e).sum().item() for e in range(experts)])
    return experts * sum(
        counts[e] / expert_idx.numel() * probs[:, e].mean() for e in range(experts)
    )


@pytest.mark.parametrize("top_k", [1, 2])
def test_switch_loss_is_exactly_one_at_perfect_balance_for_every_expert_count(top_k):
    """``E · Σ_e f_e · P_e`` is exactly 1.0 when both factors are uniform: for E = 1..64, with
    uniform logits of any offset and each expert chosen equally often."""
    for experts in range(1, 65):
        if top_k > experts:
            continue
        tokens = 2 * experts
        logits = torch.full((tokens, experts), float(experts % 7) - 3.0)
        balanced = torch.arange(tokens * top_k).view(tokens, top_k) % experts
        loss = load_balancing_loss(logits, balanced, experts)
        assert loss.dtype == torch.float32 and loss.item() == 1.0, experts


def test_switch_loss_is_one_at_perfect_balance_and_grows_with_skew():
    experts, tokens = 4, 8
    uniform_logits = torch.zeros(tokens, experts)
    balanced = torch.arange(tokens * 2).view(tokens, 2) % experts
    assert load_balancing_loss(uniform_logits, balanced, experts).item() == 1.0
    skewed_logits = torch.zeros(tokens, experts)
    skewed_logits[:, 0] = 3.0
    skewed_idx = torch.stack([torch.zeros(tokens), torch.ones(tokens)], 1).long()
    assert load_balancing_loss(skewed_logits, skewed_idx, experts).item() > 1.5


@given(router_cases())
def test_loss_values_and_gradients_match_float64_references(case):
    torch.manual_seed(case["seed"])
    experts, top_k = case["experts"], case["top_k"]
    logits = (torch.randn(case["tokens"], experts) * 3).requires_grad_()
    expert_idx = logits.detach().topk(top_k).indices
    reference = logits.detach().double().requires_grad_()
    pairs = [
        (load_balancing_loss(logits, expert_idx, experts),
         _switch_reference(reference, expert_idx, experts)),
        (router_z_loss(logits), torch.logsumexp(reference, -1).pow(2).mean()),
        (mutual_information_loss(logits), _mi_reference(reference)),
    ]  # fmt: skip
    for ours, expected in pairs:
        (grad,) = torch.autograd.grad(ours, logits)
        (expected_grad,) = torch.autograd.grad(expected, reference)
        torch.testing.assert_close(ours.double(), expected.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad.double(), expected_grad, atol=1e-5, rtol=1e-4)


def _mi_reference(logits):
    probs = torch.softmax(logits, -1)
    conditional = sum(-(p * p.log()).sum() for p in probs) / len(probs)
    marginal = probs.mean(0)
    return conditional - (-(marginal * marginal.log()).sum())


def _concentration_reference(logits):
    marginal = torch.softmax(logits, -1).mean(0)
    return -(marginal * marginal.log()).sum()


BALANCE_REFERENCES = {
    "switch": _switch_reference,
    "mutual_information": lambda logits, expert_idx, experts: _mi_reference(logits),
    "load_concentration": lambda logits, expert_idx, experts: _concentration_reference(logits),
    "none": lambda logits, expert_idx, experts: logits.sum() * 0.0,
}


def test_every_balance_loss_has_a_reference_here():
    assert set(BALANCE_REFERENCES) == set(BALANCE_LOSSES)


@pytest.mark.parametrize("balance_loss", list(BALANCE_REFERENCES))
def test_router_aux_loss_is_the_chosen_balance_loss_plus_the_weighted_z_loss(balance_loss):
    """Value and gradient of RouterOutput.aux_loss, ``aux_loss_coef · (balance + z_loss_weight
    · z-loss)``, against float64 references of the configured balance loss."""
    torch.manual_seed(0)
    experts, coef, z_weight = 5, 0.7, 0.3
    router = TopKRouter(
        12, experts, 2, balance_loss=balance_loss, z_loss_weight=z_weight, aux_loss_coef=coef
    )
    x = torch.randn(20, 12)
    out = router(x)
    weight = router.layer.weight.detach().double().requires_grad_()
    logits = x.double() @ weight.T
    balance = BALANCE_REFERENCES[balance_loss](logits, out.expert_idx, experts)
    expected = coef * (balance + z_weight * torch.logsumexp(logits, -1).square().mean())
    torch.testing.assert_close(out.aux_loss.double(), expected.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        router.last_balance_loss.double(), balance.detach(), atol=1e-6, rtol=1e-5
    )
    (grad,) = torch.autograd.grad(out.aux_loss, router.layer.weight)
    (expected_grad,) = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(grad.double(), expected_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("balance_loss", BALANCE_LOSSES)
def test_an_empty_batch_routes_nothing_and_adds_no_loss(balance_loss):
    router = TopKRouter(8, 4, 2, balance_loss=balance_loss)
    out = router(torch.randn(0, 8))
    assert out.logits.shape == (0, 4) and out.expert_idx.shape == out.gates.shape == (0, 2)
    assert out.plan.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert out.aux_loss.item() == 0.0
    (grad,) = torch.autograd.grad(out.aux_loss, router.layer.weight)
    assert not grad.any()
    stats = (router.last_aux_loss, router.last_balance_loss, router.last_z_loss)
    assert [s.item() for s in stats] == [0.0, 0.0, 0.0]


def test_losses_of_an_empty_batch_are_zero_with_zero_gradients():
    logits = torch.zeros(0, 4, requires_grad=True)
    losses = {
        "switch": load_balancing_loss(logits, torch.zeros(0, 2, dtype=torch.int64), 4),
        "z": router_z_loss(logits),
        "mutual information": mutual_information_loss(logits),
        "load concentration": load_concentration_loss(logits),
    }
    for name, loss in losses.items():
        assert loss.item() == 0.0, name
        (grad,) = torch.autograd.grad(loss, logits)
        assert grad.shape == (0, 4), name


def test_float64_logits_give_float64_losses_that_pass_gradcheck():
    """The losses keep float64 logits in float64 (fp32 logits give fp32), so their gradients are
    those of the float64 formulas: ``torch.autograd.gradcheck``."""
    torch.manual_seed(4)
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    expert_idx = logits.detach().topk(2).indices
    losses = {
        "switch": lambda t: load_balancing_loss(t, expert_idx, 5),
        "z": router_z_loss,
        "mutual information": mutual_information_loss,
        "load concentration": load_concentration_loss,
    }
    for name, loss in losses.items():
        assert loss(logits).dtype == torch.float64, name
        assert loss(logits.detach().float()).dtype == torch.float32, name
        assert torch.autograd.gradcheck(loss, (logits,)), name


def test_losses_reject_bad_input_naming_the_argument():
    logits, idx = torch.randn(6, 4), torch.randint(0, 4, (6, 2))
    cases = [
        (lambda: load_balancing_loss(logits.long(), idx, 4), TypeError, "logits"),
        (lambda: load_balancing_loss(logits[None], idx[None], 4), ValueError, "logits"),
        (lambda: load_balancing_loss(logits, idx, 5), ValueError, "num_experts"),
        (lambda: load_balancing_loss(logits, idx, 0), ValueError, "num_experts"),
        (lambda: load_balancing_loss(logits, idx.float(), 4), TypeError, "expert_idx"),
        (lambda: load_balancing_loss(logits, idx[:5], 4), ValueError, "expert_idx"),
        (lambda: load_balancing_loss(logits, idx.flatten(), 4), ValueError, "expert_idx"),
        (lambda: load_balancing_loss(logits, idx + 4, 4), ValueError, "expert_idx"),
        (lambda: load_balancing_loss(logits, idx - 4, 4), ValueError, "expert_idx"),
        (
            lambda: load_balancing_loss(logits, idx, 4, tokens_per_expert=torch.ones(3)),
            ValueError,
            "tokens_per_expert",
        ),
        (lambda: router_z_loss(logits.flatten()), ValueError, "logits"),
        (lambda: mutual_information_loss(logits.long()), TypeError, "logits"),
        (lambda: load_concentration_loss(logits[None]), ValueError, "logits"),
    ]
    for call, error, name in cases:
        with pytest.raises(error, match=name):
            call()


def test_switch_loss_accepts_any_integer_expert_idx():
    logits = torch.randn(6, 4)
    idx = logits.topk(2).indices
    expected = load_balancing_loss(logits, idx, 4)
    torch.testing.assert_close(load_balancing_loss(logits, idx.to(torch.int32), 4), expected)


def test_mutual_information_loss_bounds():
    experts = 4
    confident = torch.eye(experts).repeat(3, 1) * 50.0  # each token sure, experts balanced
    assert mutual_information_loss(confident).item() == pytest.approx(-math.log(experts), 1e-4)
    assert mutual_information_loss(torch.zeros(5, experts)).item() == pytest.approx(0.0, abs=1e-6)


def test_router_stats_sum_over_a_model():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": TopKRouter(8, 4, 2), "b": TopKRouter(8, 4, 1)})
    x = torch.randn(10, 8)
    outs = [model["a"](x), model["b"](x)]
    stats = router_stats(model)
    assert stats["aux_loss"] == pytest.approx(sum(o.aux_loss.item() for o in outs), rel=1e-6)
    assert stats["tokens_per_expert"]["a"] == outs[0].plan.tokens_per_expert.tolist()
    assert sum(stats["tokens_per_expert"]["b"]) == 10
    z = sum(router_z_loss(o.logits).item() for o in outs)
    assert stats["z_loss"] == pytest.approx(z, rel=1e-6)


@given(router_cases())
def test_gather_scores_matches_torch_gather_and_its_gradient(case):
    gen = torch.Generator().manual_seed(case["seed"])
    scores = torch.randn(case["tokens"], case["experts"], generator=gen, dtype=torch.float64)
    expert_idx = torch.stack(
        [torch.randperm(case["experts"], generator=gen)[: case["top_k"]] for _ in scores]
    )
    upstream = torch.randn(expert_idx.shape, generator=gen, dtype=torch.float64)
    ours, reference = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    (gather_scores(ours, expert_idx) * upstream).sum().backward()
    (reference.gather(1, expert_idx) * upstream).sum().backward()
    assert torch.equal(gather_scores(scores, expert_idx), scores.gather(1, expert_idx))
    assert torch.equal(ours.grad, reference.grad)


def test_router_gradient_under_compile_with_aux_loss():
    """The router's gate gradient and its aux-loss gradient meet in the logits' gradient. With
    a plain ``gather`` there, torch 2.13's CPU Inductor read that sum before the gather's
    backward scatter had written it: the router weight lost its gate gradient."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    tokens, experts, top_k = 12, 4, 2
    router = TopKRouter(16, experts, top_k)
    x = torch.randn(tokens, 16)
    rows = torch.randn(tokens * top_k, 8)
    weight = torch.randn(experts, 16, 8)

    def step(x, rows):
        route = router(x)
        out = expert_linear(rows, weight, route.plan, gates=route.gates)
        return attach_aux_loss(out, router.aux_loss_coef * route.aux_loss)

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        fn(x, rows).sum().backward()
        grads.append(router.layer.weight.grad.clone())
        router.zero_grad()
    torch.testing.assert_close(grads[1], grads[0])


def test_gather_scores_rejects_bad_input():
    scores = torch.randn(3, 4)
    with pytest.raises(ValueError, match="expert_idx"):
        gather_scores(scores, torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="rows"):
        gather_scores(scores, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        gather_scores(scores, torch.full((3, 2), 4))
    with pytest.raises(ValueError, match="scores"):
        gather_scores(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))


@pytest.mark.parametrize(("training", "grad"), [(False, False), (False, True), (True, False)])
def test_inference_routes_alike_and_skips_only_the_aux_loss(training, grad):
    """Eval mode without autograd (generate, evaluation): the same routing and gates, the token
    counts still kept, no aux loss (0) and the aux statistics of the last other forward kept.
    Eval with autograd, or training without it, compute the aux loss as before."""
    torch.manual_seed(0)
    router = TopKRouter(32, 8, 2, aux_loss_coef=0.01, z_loss_weight=0.1)
    first, second = torch.randn(16, 32), torch.randn(10, 32)
    router(first)  # a training forward leaves its statistics
    kept = [
        router.last_aux_loss.clone(),
        router.last_balance_loss.clone(),
        router.last_z_loss.clone(),
    ]
    reference = router(second)  # the training forward, as the oracle of the routing
    router(first)
    router.train(training)
    with torch.set_grad_enabled(grad):
        out = router(second)
    torch.testing.assert_close(out.expert_idx, reference.expert_idx, atol=0, rtol=0)
    torch.testing.assert_close(out.gates, reference.gates.detach(), atol=0, rtol=0)
    counts = torch.bincount(
        second.new_tensor(reference.expert_idx.flatten(), dtype=torch.long), minlength=8
    )
    assert router.last_tokens_per_expert.tolist() == counts.tolist()
    if not training and not grad:
        assert out.aux_loss.item() == 0.0
        stats = [router.last_aux_loss, router.last_balance_loss, router.last_z_loss]
        assert all(torch.equal(a, b) for a, b in zip(stats, kept, strict=True))
    else:
        torch.testing.assert_close(out.aux_loss.detach(), reference.aux_loss.detach())


def test_a_model_in_inference_returns_its_language_model_loss_alone():
    from moe_blocks.models.jetmoe import JetMoEConfig, JetMoEForCausalLM

    torch.manual_seed(0)
    model = JetMoEForCausalLM(JetMoEConfig.from_preset("tiny", num_hidden_layers=1))
    ids = torch.randint(0, 256, (2, 8))
    trained = model(ids, labels=ids)
    assert trained.aux_loss.item() > 0
    with torch.no_grad():
        out = model.eval()(ids, labels=ids)
    torch.testing.assert_close(out.lm_loss, trained.lm_loss.detach())
    assert out.aux_loss.item() == 0.0 and out.loss.item() == out.lm_loss.item()


@pytest.mark.parametrize("inference_mode", [False, True])
def test_token_counts_are_the_reduced_ones_in_training_and_inference(inference_mode):
    """With a count reduction (expert parallelism's global balance sums every rank's counts),
    ``last_tokens_per_expert`` holds the reduced counts whether or not the aux loss is
    computed: inference counts what training counts."""
    torch.manual_seed(0)
    router = TopKRouter(16, 4, 2)
    router.reduce_tokens_per_expert = lambda counts: 3 * counts  # stands for three ranks
    x = torch.randn(9, 16)
    router.train(not inference_mode)
    with torch.set_grad_enabled(not inference_mode):
        out = router(x)
    local = torch.bincount(out.expert_idx.flatten(), minlength=4)
    assert router.last_tokens_per_expert.tolist() == (3 * local).tolist()


@pytest.mark.parametrize("loss", ["mutual_information", "load_concentration"])
def test_a_process_without_tokens_still_joins_the_group_sum_of_the_marginal(loss):
    """Sharded, the marginal's sums go through the balance group's sum on every process: one
    with no tokens must still take part (a collective it skipped would leave the others
    waiting), adding nothing, and its loss is the whole batch's marginal term."""
    from moe_blocks import load_concentration_loss, mutual_information_loss

    function = {"mutual_information": mutual_information_loss,
                "load_concentration": load_concentration_loss}[loss]  # fmt: skip
    others = torch.randn(10, 4, dtype=torch.float64)  # the other processes' tokens
    their_sums = torch.cat([others.softmax(-1).sum(0), torch.tensor([10.0], dtype=torch.float64)])
    calls = []

    def group_sum(sums):
        calls.append(sums.detach().clone())
        return sums + their_sums.to(sums.dtype)

    empty = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    value = function(empty, group_sum=group_sum)
    assert len(calls) == 1 and torch.equal(calls[0], torch.zeros(5, dtype=torch.float64))
    marginal = others.softmax(-1).mean(0)
    entropy = -(marginal * marginal.log()).sum()
    torch.testing.assert_close(value, entropy if loss == "load_concentration" else -entropy)
    value.backward()  # attached: no error, a zero gradient for no tokens
    assert empty.grad.shape == (0, 4)
