"""The blocks inside someone else's model and training loop (nanoGPT-style): the aux loss in
either mode under gradient accumulation and a GradScaler, padding, the host's init, autocast,
activation checkpointing, the meta device, and errors that name the argument.

The aux-loss oracle is the router's own differentiable ``aux_loss``, recomputed by the test
from a copy of the block's router and added to the loss by hand."""

import copy
import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_blocks.losses
from moe_blocks import KVCache, MoA, MoEMLP, ParallelExperts, aux_loss_scale, collect_aux_loss
from moe_blocks.models.jetmoe import JetMoEConfig, JetMoEForCausalLM
from moe_blocks.router import named_routers

D = 12
BLOCKS = {
    "MoEMLP": lambda **kw: MoEMLP(D, 8, 4, 2, aux_loss_coef=0.3, **kw),
    "MoA": lambda **kw: MoA(D, 4, 2, head_dim=4, num_kv_heads=2, aux_loss_coef=0.3, **kw),
}


def _task_loss(out, target):
    return (out - target).square().mean()


def _oracle_grads(block, batches, targets):
    """The intended gradient of ``Σ_i (task_i + aux_i) / n``: a copy of the block with its
    aux-loss coefficient 0, and each micro-batch's aux loss (the coefficient times balance +
    z-loss of a copy of the router) added to that micro-batch's loss by hand."""
    oracle = copy.deepcopy(block)
    oracle.aux_loss_mode = "attach"
    coef = oracle.router.aux_loss_coef
    oracle.router.aux_loss_coef = 0.0
    for x, target in zip(batches, targets, strict=True):
        router = copy.deepcopy(oracle.router)
        router.layer = oracle.router.layer  # the same gate weights: the gradient reaches them
        router.aux_loss_coef = coef
        aux = router(x.reshape(-1, D)).aux_loss
        ((_task_loss(oracle(x), target) + aux) / len(batches)).backward()
    return {name: p.grad for name, p in oracle.named_parameters()}


def _assert_grads(block, expected):
    for name, param in block.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def _micro_batches(n, seed):
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randn(2, 5, D, generator=generator) for _ in range(n)]
    return batches, [torch.randn(2, 5, D, generator=generator) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# The aux loss in a nanoGPT-style loop: gradient accumulation and a GradScaler


@pytest.mark.parametrize("kind", BLOCKS)
def test_collected_aux_loss_is_exact_under_accumulation_and_a_grad_scaler(kind):
    """nanoGPT's train.py: loss / gradient_accumulation_steps, scaler.scale(loss).backward(),
    scaler.unscale_ before clipping. In the explicit mode the aux loss is part of that loss, so
    the gradients after unscale_ are the intended ones."""
    torch.manual_seed(0)
    block = BLOCKS[kind](aux_loss="collect")
    batches, targets = _micro_batches(4, seed=1)
    expected = _oracle_grads(block, batches, targets)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    optimizer = torch.optim.SGD(block.parameters(), lr=0.0)
    for x, target in zip(batches, targets, strict=True):
        loss = (_task_loss(block(x), target) + collect_aux_loss(block)) / len(batches)
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    _assert_grads(block, expected)
    assert block.router.layer.weight.grad.abs().max() > 0


@pytest.mark.parametrize("kind", BLOCKS)
def test_attached_aux_loss_is_exact_in_the_same_loop_with_aux_loss_scale(kind):
    """The attached mode gives the same gradients when the forward runs inside
    aux_loss_scale(scaler scale / n), as the README says."""
    torch.manual_seed(0)
    block = BLOCKS[kind]()
    batches, targets = _micro_batches(4, seed=1)
    expected = _oracle_grads(block, batches, targets)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    optimizer = torch.optim.SGD(block.parameters(), lr=0.0)
    for x, target in zip(batches, targets, strict=True):
        with aux_loss_scale(scaler.get_scale() / len(batches)):
            out = block(x)
        scaler.scale(_task_loss(out, target) / len(batches)).backward()
    scaler.unscale_(optimizer)
    _assert_grads(block, expected)


@pytest.mark.parametrize("kind", BLOCKS)
def test_attached_aux_loss_under_fp16_autocast_without_a_scale_raises(kind):
    """fp16 autocast means a GradScaler, which would shrink an attached aux loss to nothing
    (x 1/65536): the backward raises and names both fixes. With aux_loss_scale it runs."""
    torch.manual_seed(0)
    block = BLOCKS[kind]()
    x = torch.randn(2, 5, D)
    with torch.autocast("cpu", dtype=torch.float16):
        out = block(x)
    with pytest.raises(RuntimeError, match="aux_loss='collect'.*aux_loss_scale"):
        out.float().sum().backward()
    with torch.autocast("cpu", dtype=torch.float16), aux_loss_scale(1.0):
        out = block(x)
    out.float().sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 needs no scaler
        block(x).float().sum().backward()


@pytest.mark.parametrize("kind", BLOCKS)
def test_a_collect_mode_forward_whose_aux_loss_was_never_collected_cannot_backward(kind):
    torch.manual_seed(0)
    block = BLOCKS[kind](aux_loss="collect")
    x = torch.randn(2, 5, D)
    with pytest.raises(RuntimeError, match="never collected.*collect_aux_loss"):
        block(x).sum().backward()
    with torch.no_grad():  # evaluation: nothing to collect, nothing raised
        block(x)
    out = block(x)
    aux = collect_aux_loss(block)
    assert aux.requires_grad and aux.dim() == 0
    torch.testing.assert_close(aux.detach(), block.router.last_aux_loss)
    (out.sum() + aux).backward()


@pytest.mark.parametrize("kind", BLOCKS)
def test_collecting_one_forward_twice_or_a_reentrant_checkpoint_is_refused(kind):
    """Two mix-ups that gave a wrong router gradient silently: the aux loss collected twice
    (counted twice), and a block under reentrant activation checkpointing, whose first forward
    runs without autograd (its aux loss would add no gradient)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = BLOCKS[kind](aux_loss="collect")
    x = torch.randn(2, 5, D)
    out = block(x)
    aux = collect_aux_loss(block)
    with pytest.raises(RuntimeError, match="already collected"):
        collect_aux_loss(block)
    (out.sum() + aux).backward()
    out = checkpoint(block, x.requires_grad_(), use_reentrant=True)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        collect_aux_loss(block)
    out = checkpoint(block, x, use_reentrant=False)
    (out.sum() + collect_aux_loss(block)).backward()


@pytest.mark.parametrize("device", ["meta", "cpu"])
@pytest.mark.parametrize("mode", ["train", "inference", "backward"])
@pytest.mark.parametrize(("glu", "experts"), [(True, 6), (False, 6), (True, 64)])
def test_flop_counting_counts_the_experts(device, mode, glu, experts):
    """torch's FlopCounterMode on a MoEMLP (on meta too, for shape and FLOP planning): the
    router's product plus each assignment's expert products, 2 FLOPs per multiply-add
    (backward: twice the forward's products again), as for the same products written dense."""
    from torch.utils.flop_counter import FlopCounterMode

    tokens, d_model, hidden, k = 24 if experts < 64 else 256, 16, 40, 2  # 64: _grouped_mm runs
    with torch.device(device):
        block = MoEMLP(d_model, hidden, experts, k, glu=glu)
        x = torch.randn(tokens, d_model)
    block.train(mode != "inference")
    first = (2 if glu else 1) * hidden
    forward = 2 * tokens * d_model * experts + 2 * tokens * k * (d_model * first + hidden * d_model)
    with torch.set_grad_enabled(mode != "inference"), FlopCounterMode(display=False) as counter:
        out = block(x.requires_grad_(mode == "backward"))
        if mode == "backward":
            out.sum().backward()
    assert counter.get_total_flops() == (3 * forward if mode == "backward" else forward)


def test_collect_mode_compiles_in_one_graph_with_the_eager_gradients():
    """torch.compile(fullgraph=True) of a collect-mode block (with bias balancing): the same
    gradients and load as eager (the never-collected check is eager-only)."""
    torch.manual_seed(0)
    block = BLOCKS["MoEMLP"](aux_loss="collect", bias_update_rate=0.01)
    eager = copy.deepcopy(block)
    x = torch.randn(2, 5, D)
    compiled = torch.compile(block, fullgraph=True)
    (compiled(x).sum() + collect_aux_loss(block)).backward()
    (eager(x).sum() + collect_aux_loss(eager)).backward()
    for name, param in eager.named_parameters():
        torch.testing.assert_close(block.get_parameter(name).grad, param.grad, msg=name)
    assert torch.equal(block.router.load_since_update, eager.router.load_since_update)


def test_collect_aux_loss_sums_a_models_collect_mode_blocks_and_refuses_attached_ones():
    torch.manual_seed(0)
    model = nn.Sequential(BLOCKS["MoA"](aux_loss="collect"), BLOCKS["MoEMLP"](aux_loss="collect"))
    model(torch.randn(2, 5, D))
    total = collect_aux_loss(model)
    expected = sum(block.router.last_aux_loss for block in model)
    torch.testing.assert_close(total.detach(), expected)
    attached = nn.Sequential(BLOCKS["MoEMLP"]())
    attached(torch.randn(2, 5, D))
    with pytest.raises(ValueError, match="count it twice"):
        collect_aux_loss(attached)
    with pytest.raises(TypeError, match="no MoEMLP or MoA"):
        collect_aux_loss(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="run forward"):
        collect_aux_loss(BLOCKS["MoEMLP"](aux_loss="collect"))
    with pytest.raises(ValueError, match="aux_loss must be one of"):
        BLOCKS["MoEMLP"](aux_loss="add")


# --------------------------------------------------------------------------------------------
# Padding


@pytest.mark.parametrize("kind", BLOCKS)
def test_padding_counts_in_no_statistic(kind):
    """With 12 of 16 positions padding, the router's statistics are those of the 4 real
    tokens alone (computed by a copy of the router on them); outputs are unchanged."""
    torch.manual_seed(0)
    block = BLOCKS[kind](bias_update_rate=0.01)
    x = torch.randn(2, 8, D)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :3] = mask[1, 5] = True
    reference = copy.deepcopy(block.router)
    plain = copy.deepcopy(block)(x)
    out = block(x, token_mask=mask)
    reference(x[mask])
    router = block.router
    assert int(router.last_tokens_per_expert.sum()) == 4 * 2
    assert torch.equal(router.last_tokens_per_expert, reference.last_tokens_per_expert)
    assert torch.equal(router.load_since_update, reference.load_since_update)
    for name in ("last_aux_loss", "last_balance_loss", "last_z_loss"):
        torch.testing.assert_close(getattr(router, name), getattr(reference, name), msg=name)
    torch.testing.assert_close(out, plain)
    with pytest.raises(ValueError, match="token_mask must have shape"):
        block(x, token_mask=mask[:, :4])
    with pytest.raises(TypeError, match="token_mask must be bool or integer"):
        block(x, token_mask=mask.float())
    with pytest.raises(ValueError, match=r"token_mask values must lie in \[0, 2\)"):
        block(x, token_mask=mask.long() * 2)


def test_each_loss_with_a_token_mask_is_the_loss_of_the_real_tokens():
    """Masked tokens enter as zero weights (no host read, one compiled graph): the result is
    the loss of the real tokens alone; with none real, 0."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 5, generator=generator, dtype=torch.float64)
    expert_idx = logits.topk(2, dim=-1).indices
    mask = torch.rand(10, generator=generator) < 0.5
    mask[0] = True
    for name in ("router_z_loss", "mutual_information_loss", "load_concentration_loss"):
        loss = getattr(moe_blocks.losses, name)
        torch.testing.assert_close(loss(logits, token_mask=mask), loss(logits[mask]), msg=name)
        assert loss(logits, token_mask=torch.zeros(10, dtype=torch.bool)) == 0, name
    switch = moe_blocks.losses.load_balancing_loss
    torch.testing.assert_close(
        switch(logits, expert_idx, 5, token_mask=mask), switch(logits[mask], expert_idx[mask], 5)
    )
    prior = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0])  # expert priors, one expert closed
    torch.testing.assert_close(
        switch(logits, expert_idx, 5, token_mask=mask, prior=prior),
        switch(logits[mask], expert_idx[mask], 5, prior=prior),
    )
    assert switch(logits, expert_idx, 5, token_mask=torch.zeros(10, dtype=torch.bool)) == 0
    with pytest.raises(ValueError, match="token_mask must be"):
        switch(logits, expert_idx, 5, token_mask=mask[:4])


def test_moa_takes_padding_from_its_attention_mask_and_jetmoe_from_its_own():
    torch.manual_seed(0)
    moa = BLOCKS["MoA"]()
    x = torch.randn(2, 8, D)
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[:, :6] = 0  # left padding: 2 real tokens per row
    moa(x, attention_mask=attention_mask)
    assert int(moa.router.last_tokens_per_expert.sum()) == 4 * 2
    config = JetMoEConfig.from_preset(
        "tiny", hidden_size=32, num_hidden_layers=2, kv_channels=8, intermediate_size=32
    )
    model = JetMoEForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 8))
    model(ids, attention_mask=attention_mask)
    for router in named_routers(model).values():
        assert int(router.last_tokens_per_expert.sum()) == 4 * config.num_experts_per_tok


# --------------------------------------------------------------------------------------------
# Init, autocast, checkpointing, meta


def test_the_experts_take_an_init_and_a_hosts_init_reaches_them():
    torch.manual_seed(0)
    block = MoEMLP(256, 256, 8, 2, init_method=0.02, output_init_method=0.0071)
    assert abs(block.input_linear.weight.std().item() - 0.02) < 1e-3
    assert abs(block.output_linear.weight.std().item() - 0.0071) < 4e-4
    moa = MoA(64, 4, 2, head_dim=8, num_kv_heads=2,
              init_method=functools.partial(nn.init.constant_, val=0.5))  # fmt: skip
    assert (moa.input_linear.weight == 0.5).all() and (moa.output_linear.weight == 0.5).all()
    with pytest.raises(TypeError, match="init_method"):
        MoEMLP(D, 8, 4, 2, init_method="normal")
    with pytest.raises(ValueError, match="output_init_method"):
        MoEMLP(D, 8, 4, 2, output_init_method=-1.0)

    def host_init(module):  # nanoGPT's _init_weights, with ParallelExperts beside nn.Linear
        if isinstance(module, nn.Linear | ParallelExperts):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    block.apply(host_init)
    for weight in (block.input_linear.weight, block.output_linear.weight):
        assert abs(weight.std().item() - 0.02) < 1e-3


@pytest.mark.parametrize("kind", BLOCKS)
@pytest.mark.parametrize("bias", [True, False])
def test_under_autocast_the_output_has_the_autocast_dtype_like_nn_linear(kind, bias):
    block = BLOCKS[kind](bias=bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(torch.randn(2, 5, D))
        assert out.dtype == nn.Linear(D, D)(torch.randn(2, D)).dtype == torch.bfloat16


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("kind", BLOCKS)
def test_activation_checkpointing_counts_each_token_once(kind, reentrant):
    torch.manual_seed(0)
    block = BLOCKS[kind](bias_update_rate=0.01)
    x = torch.randn(2, 8, D, requires_grad=True)
    checkpoint(block, x, use_reentrant=reentrant).sum().backward()
    assert int(block.router.load_since_update.sum()) == 2 * 8 * 2
    assert block.router.layer.weight.grad is not None


@pytest.mark.parametrize("kind", BLOCKS)
def test_a_forward_on_the_meta_device_gives_the_shape(kind):
    block = BLOCKS[kind](device="meta")
    x = torch.randn(3, 7, D, device="meta", requires_grad=True)
    out = block(x)
    assert out.shape == x.shape and out.device.type == "meta"
    out.sum().backward()
    assert x.grad.shape == x.shape


# --------------------------------------------------------------------------------------------
# MoA's errors name the argument


def test_moa_errors_name_the_argument():
    torch.manual_seed(0)
    moa = BLOCKS["MoA"]()
    x = torch.randn(2, 3, D)
    with pytest.raises(ValueError, match=r"position_ids must be \[B, T\]"):
        moa(x, position_ids=torch.arange(4))
    with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
        moa(x, position_ids=torch.arange(3.0))
    cache = KVCache()
    moa(x, kv_cache=cache)
    load = moa.router.last_tokens_per_expert.clone()
    with pytest.raises(ValueError, match="kv_cache holds keys of batch size 2"):
        moa(torch.randn(3, 1, D), kv_cache=cache)
    other = MoA(D, 4, 2, head_dim=2, num_kv_heads=3)
    other_load = other.router.last_tokens_per_expert.clone()
    with pytest.raises(ValueError, match="kv_cache holds keys of batch size 2, 2 KV heads"):
        other(torch.randn(2, 1, D), kv_cache=cache)
    # refused before the router counted the tokens of the forward that failed
    assert torch.equal(moa.router.last_tokens_per_expert, load)
    assert torch.equal(other.router.last_tokens_per_expert, other_load)
    with pytest.raises(
        ValueError, match=r"attention_mask values must lie in \[0, 2\), got .*\[0, 2\]"
    ):
        moa(x, attention_mask=torch.tensor([[1, 1, 2], [0, 1, 1]]))
