"""What the blocks accept and refuse, and how they initialise: input dtypes, MoA's mask kinds,
constructor validation, reset_parameters after a meta-device build, and the names and weights
of router_stats."""

import math

import pytest
import torch
from torch import nn

from moe_blocks import MoA, MoEMLP, ParallelExperts, TopKRouter, router_stats

BLOCKS = {
    "MoEMLP": (lambda **kw: MoEMLP(8, 6, 4, 2, **kw), (2, 3, 8)),
    "MoA": (lambda **kw: MoA(8, 4, 2, head_dim=2, num_kv_heads=2, **kw), (2, 3, 8)),
    "TopKRouter": (lambda **kw: TopKRouter(8, 4, 2, **kw), (6, 8)),
}


@pytest.mark.parametrize("kind", BLOCKS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.float16, torch.bfloat16])
def test_an_input_of_another_dtype_gets_a_type_error_naming_x(kind, dtype):
    make, shape = BLOCKS[kind]
    block = make()
    x = torch.randn(shape).to(dtype)
    with pytest.raises(TypeError, match=r"^x (has dtype|must be a floating)"):
        block(x)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        block(x.tolist())


@pytest.mark.parametrize("kind", BLOCKS)
def test_autocast_still_accepts_another_floating_dtype(kind):
    make, shape = BLOCKS[kind]
    block = make()
    x = torch.randn(shape)
    expected = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x.to(torch.float16))
    out = out.logits if kind == "TopKRouter" else out
    expected = expected.logits if kind == "TopKRouter" else expected
    scale = expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= 0.05 * scale


@pytest.mark.parametrize("kind", BLOCKS)
def test_autocast_does_not_excuse_a_dtype_it_does_not_cast(kind):
    make, shape = BLOCKS[kind]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"^x has dtype torch.float64"):
            make()(torch.randn(shape, dtype=torch.float64))


def _moa_and_input():
    torch.manual_seed(0)
    moa = MoA(8, 4, 2, head_dim=2, num_kv_heads=2)
    return moa, torch.randn(2, 5, 8)


def test_moa_rejects_a_float_mask_and_never_breaks_causality():
    moa, x = _moa_and_input()
    additive_keep_all = torch.zeros(2, 5)  # "keep all" as an additive mask
    with pytest.raises(TypeError, match="attention_mask"):
        moa(x, attention_mask=additive_keep_all)
    with pytest.raises(TypeError, match="attention_mask"):
        moa(x, attention_mask=torch.ones(2, 5))


def test_moa_integer_masks_must_be_zero_or_one_and_mean_what_bool_masks_mean():
    moa, x = _moa_and_input()
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, :2] = False
    expected = moa(x, attention_mask=keep)
    for dtype in (torch.int64, torch.int32, torch.uint8):
        torch.testing.assert_close(moa(x, attention_mask=keep.to(dtype)), expected)
    with pytest.raises(ValueError, match="attention_mask"):
        moa(x, attention_mask=keep.long() * 2)
    # Changing a later token never changes an earlier real token's output.
    changed = x.clone()
    changed[:, 3:] = torch.randn(2, 2, 8)
    out = moa(changed, attention_mask=keep.long())
    torch.testing.assert_close(out[:, :3][keep[:, :3]], expected[:, :3][keep[:, :3]])


@pytest.mark.parametrize("kind", ["MoEMLP", "MoA"])
@pytest.mark.parametrize("backend", ["Torch", "cuda", "", None])
def test_a_bad_backend_is_rejected_by_the_constructor(kind, backend):
    make, _ = BLOCKS[kind]
    with pytest.raises(ValueError, match="backend"):
        make(backend=backend)
    with pytest.raises(ValueError, match="backend"):
        ParallelExperts(4, 8, 6, backend=backend)


@pytest.mark.parametrize("kind", BLOCKS)
@pytest.mark.parametrize("name", ["aux_loss_coef", "z_loss_weight"])
@pytest.mark.parametrize("value", [-1.0, -1e-9, math.nan, math.inf])
def test_a_negative_or_non_finite_loss_weight_is_rejected(kind, name, value):
    make, _ = BLOCKS[kind]
    with pytest.raises(ValueError, match=name):
        make(**{name: value})


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: MoA(8, 4, 2, head_dim=2, rope_theta=0.0), "rope_theta"),
        (lambda: MoA(8, 4, 2, head_dim=2, rope_theta=-5.0), "rope_theta"),
        (lambda: MoA(8, 4, 2, head_dim=2, rope_theta=math.nan), "rope_theta"),
        (lambda: MoA(8, 4, 2, head_dim=2, attention_dropout=1.5), "attention_dropout"),
        (lambda: MoA(8, 4, 2, head_dim=2, attention_dropout=-0.5), "attention_dropout"),
        (lambda: MoA(8, 4, 2, head_dim=2, attention_dropout=1.0), "attention_dropout"),
        (lambda: ParallelExperts(-1, 4, 4), "num_experts"),
        (lambda: ParallelExperts(0, 4, 4), "num_experts"),
        (lambda: ParallelExperts(2, 2.5, 4), "in_features"),
        (lambda: ParallelExperts(2, 4, -1), "out_features"),
    ],
)  # fmt: skip
def test_bad_sizes_and_rates_are_refused_by_the_constructor_naming_them(make, name):
    """(A rope_theta of 0 gave NaN RoPE tables, which CPU attention turned into an output of
    the bias alone; a dropout of 1.5 failed inside attention.)"""
    with pytest.raises((ValueError, TypeError), match=name):
        make()


def test_moa_refuses_a_kv_cache_that_is_not_one():
    block = MoA(8, 4, 2, head_dim=2, num_kv_heads=2)
    with pytest.raises(TypeError, match="kv_cache must be a KVCache"):
        block(torch.randn(1, 3, 8), kv_cache={})


def test_the_balance_loss_refuses_a_prior_or_counts_of_another_shape_naming_them():
    from moe_blocks import load_balancing_loss

    logits, expert_idx = torch.randn(6, 4), torch.randint(0, 4, (6, 2))
    for name, bad in (("prior", torch.ones(3)), ("tokens_per_expert", torch.ones(5)),
                      ("tokens_per_expert", [1, 2, 3, 0])):  # fmt: skip
        with pytest.raises((ValueError, TypeError), match=name):
            load_balancing_loss(logits, expert_idx, 4, **{name: bad})


def test_a_loss_weight_that_is_not_a_number_is_a_type_error():
    with pytest.raises(TypeError, match="aux_loss_coef"):
        TopKRouter(8, 4, 2, aux_loss_coef="0.01")


@pytest.mark.parametrize("kind", BLOCKS)
def test_reset_parameters_after_a_meta_build_and_to_empty(kind):
    make, shape = BLOCKS[kind]
    with torch.device("meta"):
        block = make(bias_update_rate=0.1) if kind == "TopKRouter" else make()
    torch.manual_seed(0)
    block.to_empty(device="cpu")
    for tensor in list(block.parameters()) + list(block.buffers()):
        tensor.data.fill_(math.nan if tensor.is_floating_point() else -7)  # garbage
    block.reset_parameters()
    for name, param in block.named_parameters():
        assert torch.isfinite(param).all(), name
        if name == "bias":
            assert torch.equal(param, torch.zeros_like(param))
        else:  # nn.Linear's bound: U(-1/sqrt(in), 1/sqrt(in)), and not all equal
            bound = 1 / math.sqrt(param.shape[-1])
            assert param.abs().max() <= bound and param.std() > bound / 10, name
    for name, buffer in block.named_buffers():
        assert torch.equal(buffer, torch.zeros_like(buffer)), name
    out = block(torch.randn(shape))
    assert torch.isfinite(out.logits if kind == "TopKRouter" else out).all()


def test_reset_parameters_with_an_activation_module():
    """An activation given as a module is a child of the block: one without parameters
    (``nn.GELU``) is left alone (it raised AttributeError), one with them (``nn.PReLU``) is
    re-initialised too, and one with parameters it cannot reset is a TypeError naming it."""
    for activation, parameters in ((nn.GELU(), 0), (nn.PReLU(), 1)):
        block = MoEMLP(8, 6, 4, 2, activation=activation)
        for tensor in block.parameters():
            tensor.data.fill_(math.nan)
        block.reset_parameters()
        assert all(torch.isfinite(p).all() for p in block.parameters())
        assert len(list(activation.parameters())) == parameters
        assert torch.isfinite(block(torch.randn(5, 8))).all()

    class Swish(nn.Module):  # a learned beta, no reset_parameters
        def __init__(self):
            super().__init__()
            self.beta = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x * torch.sigmoid(self.beta * x)

    with pytest.raises(TypeError, match=r"activation \(Swish\) has parameters but no reset"):
        MoEMLP(8, 6, 4, 2, activation=Swish()).reset_parameters()


def test_router_stats_aux_loss_is_weighted_like_the_gradient_and_names_survive_compile():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {"a": MoEMLP(8, 6, 4, 2, aux_loss_coef=0.5), "b": MoEMLP(8, 6, 4, 1, aux_loss_coef=0.02)}
    )
    x = torch.randn(10, 8)
    model["b"](model["a"](x))
    stats = router_stats(model)
    weighted = sum(
        block.router.aux_loss_coef
        * (block.router.last_balance_loss + block.router.z_loss_weight * block.router.last_z_loss)
        for block in model.values()
    )
    assert stats["aux_loss"] == pytest.approx(weighted.item(), rel=1e-6)
    unweighted = sum(block.router.last_balance_loss for block in model.values())
    assert stats["balance_loss"] == pytest.approx(unweighted.item(), rel=1e-6)
    compiled = torch.compile(model["a"], backend="eager")
    compiled(x)
    names = router_stats(torch.nn.ModuleDict({"a": compiled}))["tokens_per_expert"]
    assert list(names) == ["a.router"]
    router = TopKRouter(8, 4, 2)  # compiled itself: its name is "" as in eager ("_orig_mod")
    assert list(router_stats(torch.compile(router, backend="eager"))["tokens_per_expert"]) == [""]
    assert list(router_stats(router)["tokens_per_expert"]) == [""]
