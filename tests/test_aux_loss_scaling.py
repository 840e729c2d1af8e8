"""The blocks' aux loss reaches the gradient exactly as if the caller had added it to the loss
it backpropagates: under gradient accumulation, a hand-scaled loss and fp16 GradScaler.

The oracle is a second copy of the block with ``aux_loss_coef=0`` whose caller adds the router's
differentiable ``RouterOutput.aux_loss`` to the loss by hand (the block's router computes it from
the same weights and input)."""

import copy

import pytest
import torch

from moe_blocks import MoA, MoEMLP, aux_loss_scale
from moe_blocks.models.jetmoe import JetMoEConfig, JetMoEForCausalLM

BLOCKS = {
    "MoEMLP": lambda: MoEMLP(12, 8, 4, 2, aux_loss_coef=0.3),
    "MoA": lambda: MoA(12, 4, 2, head_dim=4, num_kv_heads=2, aux_loss_coef=0.3),
}


def _task_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).square().mean()


def _explicit_grads(block, batches, targets):
    """Oracle: coef 0 in the block; the caller adds the router's aux loss to each micro-batch's
    loss, then backpropagates the mean over micro-batches."""
    oracle = copy.deepcopy(block)
    oracle.router.aux_loss_coef = 0.0
    for x, target in zip(batches, targets, strict=True):
        out = oracle(x)
        aux = block.router.aux_loss_coef * _unweighted_aux(oracle, x)
        ((_task_loss(out, target) + aux) / len(batches)).backward()
    return {name: p.grad.clone() for name, p in oracle.named_parameters()}


def _unweighted_aux(block, x):
    """The router's balance + z-loss on the block's tokens (its coefficient is 0 here)."""
    router = block.router
    router.aux_loss_coef = 1.0
    try:
        return router(x.reshape(-1, x.shape[-1])).aux_loss
    finally:
        router.aux_loss_coef = 0.0


def _grads(block):
    return {name: p.grad.clone() for name, p in block.named_parameters()}


def _assert_grads_equal(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", BLOCKS)
@pytest.mark.parametrize("micro_batches", [1, 4])
def test_gradient_accumulation_equals_adding_the_aux_loss(kind, micro_batches):
    torch.manual_seed(micro_batches)
    block = BLOCKS[kind]()
    x = torch.randn(1, 6, 12)
    batches = [x] * micro_batches  # identical micro-batches: the sum equals one pass
    targets = [torch.randn(1, 6, 12)] * micro_batches
    for x_micro, target in zip(batches, targets, strict=True):
        with aux_loss_scale(1 / micro_batches):
            out = block(x_micro)
        (_task_loss(out, target) / micro_batches).backward()
    accumulated = _grads(block)
    _assert_grads_equal(accumulated, _explicit_grads(block, batches, targets))

    one_pass = copy.deepcopy(block)
    one_pass.zero_grad()
    _task_loss(one_pass(x), targets[0]).backward()
    _assert_grads_equal(accumulated, _grads(one_pass))


@pytest.mark.parametrize("kind", BLOCKS)
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("evaluated", [False, True])
def test_accumulation_under_activation_checkpointing_equals_adding_the_aux_loss(
    kind, reentrant, evaluated
):
    """As above, each micro-batch's forward through torch.utils.checkpoint, the scale's context
    closed before backward (as the docs' loop has it): reentrant checkpointing runs the block's
    forward again in backward, outside the context, and attached the aux loss at scale 1 (n
    times too much), silently. With an evaluation forward (eval mode, no grad) between a
    forward and its backward too."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(3)
    block = BLOCKS[kind]()
    batches = [torch.randn(1, 6, 12) for _ in range(3)]
    targets = [torch.randn(1, 6, 12) for _ in range(3)]
    for x_micro, target in zip(batches, targets, strict=True):
        x_micro = x_micro.requires_grad_(reentrant)  # reentrant needs an input that does
        with aux_loss_scale(1 / 3):
            out = checkpoint(block, x_micro, use_reentrant=reentrant)
        if evaluated:
            block.eval()
            with torch.no_grad():
                block(torch.randn(1, 6, 12))
            block.train()
        (_task_loss(out, target) / 3).backward()
    _assert_grads_equal(_grads(block), _explicit_grads(block, batches, targets))


def _block_and_plain_run(kind, seed):
    """A block, an input and target, and the gradients of a plain unscaled run of a copy."""
    torch.manual_seed(seed)
    block = BLOCKS[kind]()
    x, target = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    plain = copy.deepcopy(block)
    _task_loss(plain(x), target).backward()
    return block, x, target, _grads(plain)


@pytest.mark.parametrize("kind", BLOCKS)
def test_a_scaled_loss_unscaled_by_hand_equals_the_unscaled_run(kind):
    block, x, target, plain_grads = _block_and_plain_run(kind, seed=0)
    scale = 1024.0
    with aux_loss_scale(scale):
        out = block(x)
    (_task_loss(out, target) * scale).backward()
    unscaled = {name: grad / scale for name, grad in _grads(block).items()}
    _assert_grads_equal(unscaled, plain_grads)
    aux_share = plain_grads["router.layer.weight"] - _explicit_grads_without_aux(block, x, target)
    assert aux_share.abs().max() > 1e-4  # the aux loss is a visible part of this gradient


def _explicit_grads_without_aux(block, x, target):
    bare = copy.deepcopy(block)
    bare.zero_grad()
    bare.router.aux_loss_coef = 0.0
    _task_loss(bare(x), target).backward()
    return bare.router.layer.weight.grad


@pytest.mark.parametrize("kind", BLOCKS)
def test_fp16_grad_scaler_on_cpu(kind):
    block, x, target, plain_grads = _block_and_plain_run(kind, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    optimizer = torch.optim.SGD(block.parameters(), lr=0.0)
    with aux_loss_scale(scaler.get_scale()):
        out = block(x)
    scaler.scale(_task_loss(out, target)).backward()
    scaler.unscale_(optimizer)
    _assert_grads_equal(_grads(block), plain_grads)


def test_the_scale_may_be_the_scalers_tensor_and_contexts_nest():
    torch.manual_seed(2)
    block = BLOCKS["MoEMLP"]()
    x = torch.randn(3, 12)
    reference = copy.deepcopy(block)
    with aux_loss_scale(0.25):
        reference(x).sum().backward()
    with aux_loss_scale(8.0):
        with aux_loss_scale(torch.tensor(0.25)):
            out = block(x)
    out.sum().backward()
    _assert_grads_equal(_grads(block), _grads(reference))


def test_jetmoe_loss_under_accumulation_equals_one_pass():
    config = JetMoEConfig.from_preset(
        "tiny", hidden_size=32, num_hidden_layers=1, kv_channels=8, intermediate_size=16
    )
    torch.manual_seed(0)
    model = JetMoEForCausalLM(config)
    one_pass = copy.deepcopy(model)
    ids = torch.randint(0, 256, (2, 12))
    one_pass(ids, labels=ids).loss.backward()
    for _ in range(3):
        with aux_loss_scale(1 / 3):
            loss = model(ids, labels=ids).loss
        (loss / 3).backward()
    for (name, ours), theirs in zip(model.named_parameters(), one_pass.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    "scale, error",
    [(-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
     ("1", TypeError), (torch.ones(2), ValueError), (torch.tensor(1), ValueError)],
)  # fmt: skip
def test_bad_scale_is_rejected(scale, error):
    with pytest.raises(error, match="scale"):
        with aux_loss_scale(scale):
            pass


@pytest.mark.parametrize("kind", BLOCKS)
def test_the_output_may_be_modified_in_place(kind):
    """A block replaces an MLP anywhere, residual ``y += x`` and in-place dropout included; the
    gradient is still the task loss's plus the aux loss's, computed by hand (the oracle)."""
    torch.manual_seed(3)
    block = BLOCKS[kind]()
    x = torch.randn(2, 5, 12, requires_grad=True)
    target = torch.randn(2, 5, 12)
    out = block(x)
    out += x
    out.mul_(0.5)
    _task_loss(out, target).backward()

    oracle = copy.deepcopy(block)
    oracle.zero_grad()
    oracle.router.aux_loss_coef = 0.0
    x_oracle = x.detach().clone().requires_grad_()
    aux = block.router.aux_loss_coef * _unweighted_aux(oracle, x_oracle)
    (_task_loss((oracle(x_oracle) + x_oracle) * 0.5, target) + aux).backward()
    _assert_grads_equal(_grads(block), _grads(oracle))
    torch.testing.assert_close(x.grad, x_oracle.grad, atol=1e-6, rtol=1e-5)
