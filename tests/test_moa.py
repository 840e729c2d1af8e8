"""MoA: causality, the E=1/k=1 case against plain multi-head attention written here, KV-cache
decoding, the padding mask, parity with transformers' JetMoeAttention, both backends,
torch.compile, bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_blocks import KVCache, MoA, load_balancing_loss, router_z_loss

from .conftest import DEVICE
from .helpers import (
    assert_autocast_matches_rounded_inputs,
    assert_backends_agree,
    assert_empty_batch_is_handled,
)


@st.composite
def moa_cases(draw):
    experts = draw(st.integers(1, 6))
    return {
        "d_model": draw(st.integers(1, 24)),
        "experts": experts,
        "top_k": draw(st.integers(1, experts)),
        "head_dim": 2 * draw(st.integers(1, 6)),
        "kv_heads": draw(st.integers(1, 3)),
        "batch": draw(st.integers(1, 2)),
        "length": draw(st.integers(2, 10)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _moa(case, **options):
    torch.manual_seed(case["seed"])
    moa = MoA(
        case["d_model"], case["experts"], case["top_k"], head_dim=case["head_dim"],
        num_kv_heads=case["kv_heads"], **options,
    )  # fmt: skip
    with torch.no_grad():
        for param in moa.parameters():
            param.normal_(std=0.3)
    x = torch.randn(case["batch"], case["length"], case["d_model"])
    return moa, x


@given(moa_cases(), st.data())
def test_changing_a_later_token_never_changes_an_earlier_output(case, data):
    moa, x = _moa(case)
    out = moa(x)
    position = data.draw(st.integers(1, case["length"] - 1))
    changed = x.clone()
    changed[:, position:] = torch.randn_like(changed[:, position:])
    torch.testing.assert_close(moa(changed)[:, :position], out[:, :position])


@given(moa_cases(), st.data())
def test_decoding_with_the_kv_cache_matches_the_full_forward(case, data):
    moa, x = _moa(case)
    full = moa(x)
    cache = KVCache()
    prefill = data.draw(st.integers(1, case["length"]))
    pieces = [moa(x[:, :prefill], kv_cache=cache)]
    for position in range(prefill, case["length"]):
        pieces.append(moa(x[:, position : position + 1], kv_cache=cache))
    assert cache.length == case["length"]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@given(moa_cases(), st.data())
def test_given_rope_tables_are_the_tables_of_the_positions(case, data):
    """``position_embeddings`` from :meth:`MoA.rotary_tables` of some positions (per row or
    shared, with a KV cache or without) give the bits of passing those positions; the
    default positions continue the cache."""
    moa, x = _moa(case)
    batch, length = case["batch"], case["length"]
    per_row = data.draw(st.booleans())
    shape = (batch, length) if per_row else (length,)
    positions = torch.randint(0, 4096, shape, generator=torch.Generator().manual_seed(case["seed"]))
    tables = moa.rotary_tables(positions)
    assert all(t.dtype == torch.float32 and t.shape == (*shape, case["head_dim"]) for t in tables)
    expected = moa(x, position_ids=positions)
    assert torch.equal(moa(x, position_embeddings=tables), expected)
    if not per_row:  # a [T, hd] table beside its [B, T, hd] and [1, T, hd] forms
        cos, sin = tables
        mixed = (cos.expand(batch, -1, -1).contiguous(), sin[None])
        assert torch.equal(moa(x, position_embeddings=mixed), expected)
    prefill = data.draw(st.integers(1, length - 1))
    caches = KVCache(), KVCache()
    moa(x[:, :prefill], kv_cache=caches[0])
    moa(x[:, :prefill], kv_cache=caches[1])
    following = torch.arange(prefill, length)
    given_tables = moa(x[:, prefill:], kv_cache=caches[0],
                       position_embeddings=moa.rotary_tables(following))  # fmt: skip
    assert torch.equal(given_tables, moa(x[:, prefill:], kv_cache=caches[1]))


def test_bad_rope_tables_are_refused_naming_the_argument():
    moa = MoA(32, 4, 2, head_dim=4, num_kv_heads=2)
    x, positions = torch.randn(2, 3, 32), torch.arange(3)
    tables = moa.rotary_tables(positions)
    with pytest.raises(ValueError, match="position_ids or position_embeddings"):
        moa(x, position_ids=positions, position_embeddings=tables)
    with pytest.raises(TypeError, match="position_embeddings"):
        moa(x, position_embeddings=tables[0])
    with pytest.raises(TypeError, match="position_embeddings"):
        moa(x, position_embeddings=(tables[0], positions))
    with pytest.raises(ValueError, match="position_embeddings"):
        moa(x, position_embeddings=moa.rotary_tables(torch.arange(4)))
    with pytest.raises(ValueError, match="position_embeddings"):
        moa(x, position_embeddings=MoA(32, 4, 2, head_dim=8).rotary_tables(positions))
    with pytest.raises(TypeError, match="position_embeddings"):
        moa(x, position_embeddings=tuple(t.bfloat16() for t in tables))  # not fp32
    with pytest.raises(ValueError, match="position_embeddings"):
        moa(x, position_embeddings=tuple(t.to("meta") for t in tables))
    with pytest.raises(ValueError, match="position_ids"):
        moa(x, position_ids=positions.to("meta"))
    with pytest.raises(TypeError, match="position_ids"):
        moa.rotary_tables(positions.float())
    counts = moa.router.last_tokens_per_expert.clone()
    with pytest.raises(ValueError, match="position_embeddings"):  # refused before routing
        moa(torch.randn(2, 3, 32), position_embeddings=moa.rotary_tables(torch.arange(5)))
    assert torch.equal(moa.router.last_tokens_per_expert, counts)


def _rope(t, positions, theta=10000.0):
    """Rotate-half RoPE written out pair by pair: dims i and i + d/2 rotate by pos·θ^(-2i/d)."""
    half = t.shape[-1] // 2
    out = t.clone()
    for i in range(half):
        angle = positions.double() * theta ** (-2 * i / t.shape[-1])
        cos, sin = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
        a, b = t[..., :, i], t[..., :, i + half]
        out[..., :, i] = a * cos.squeeze(-1) - b * sin.squeeze(-1)
        out[..., :, i + half] = b * cos.squeeze(-1) + a * sin.squeeze(-1)
    return out


def test_one_expert_top_1_is_plain_multi_head_attention():
    torch.manual_seed(0)
    heads, head_dim, d_model, length = 3, 8, 20, 7
    moa = MoA(d_model, 1, 1, head_dim=head_dim, num_kv_heads=heads)
    with torch.no_grad():
        moa.bias.normal_()
    x = torch.randn(2, length, d_model, dtype=torch.float64)
    w_q = moa.input_linear.weight[0].double()
    w_o = moa.output_linear.weight[0].double()
    w_k, w_v = moa.kv_proj.weight.double().chunk(2, dim=0)
    split = lambda t: t.view(2, length, heads, head_dim).transpose(1, 2)  # noqa: E731
    positions = torch.arange(length)
    q, k, v = (
        _rope(split(x @ w_q.T), positions),
        _rope(split(x @ w_k.T), positions),
        split(x @ w_v.T),
    )
    scores = q @ k.transpose(-1, -2) / head_dim**0.5
    scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, length, heads * head_dim)
    expected = attended @ w_o.T + moa.bias.double()
    torch.testing.assert_close(moa(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


@given(moa_cases(), st.data())
def test_padding_is_never_attended(case, data):
    moa, x = _moa(case)
    pad = data.draw(st.integers(1, case["length"] - 1))
    mask = torch.ones(case["batch"], case["length"], dtype=torch.bool)
    mask[0, :pad] = False  # left padding in the first sequence
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    out = moa(x, attention_mask=mask, position_ids=positions)
    # a padding query sees no key: zero attention output (as transformers' SDPA), only the bias
    torch.testing.assert_close(out[0, :pad], moa.bias.expand(pad, -1))
    out.sum().backward()  # and no NaN in the backward pass either
    assert all(torch.isfinite(param.grad).all() for param in moa.parameters())
    noisy = x.clone()
    noisy[0, :pad] = torch.randn_like(noisy[0, :pad]) * 10
    torch.testing.assert_close(
        moa(noisy, attention_mask=mask, position_ids=positions)[0, pad:], out[0, pad:]
    )
    alone = moa(x[:1, pad:])  # the same real tokens, unpadded, at positions 0..
    torch.testing.assert_close(out[0, pad:], alone[0], atol=1e-5, rtol=1e-5)


JETMOE_CASES = [
    dict(hidden_size=32, num_local_experts=4, num_experts_per_tok=2, kv_channels=8,
         num_key_value_heads=2),
    dict(hidden_size=24, num_local_experts=3, num_experts_per_tok=3, kv_channels=4,
         num_key_value_heads=3),
    dict(hidden_size=16, num_local_experts=1, num_experts_per_tok=1, kv_channels=16,
         num_key_value_heads=1),
]  # fmt: skip


@pytest.mark.parametrize("case", JETMOE_CASES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_transformers_jetmoe_attention(case, backend):
    from transformers import JetMoeConfig
    from transformers.models.jetmoe.modeling_jetmoe import (
        JetMoeAttention,
        JetMoeRotaryEmbedding,
    )

    torch.manual_seed(0)
    config = JetMoeConfig(vocab_size=10, num_hidden_layers=1, intermediate_size=8, **case)
    config._attn_implementation = "sdpa"
    reference = JetMoeAttention(config, layer_idx=0)
    for param in reference.parameters():
        torch.nn.init.normal_(param, std=0.2)
    ours = MoA(
        case["hidden_size"], case["num_local_experts"], case["num_experts_per_tok"],
        head_dim=case["kv_channels"], num_kv_heads=case["num_key_value_heads"],
        backend=backend, aux_loss_coef=0.0,
    )  # fmt: skip
    ours.load_state_dict(
        {name.replace("experts.", ""): t for name, t in reference.state_dict().items()}
    )
    reference, ours = reference.to(DEVICE), ours.to(DEVICE)
    x = torch.randn(2, 9, case["hidden_size"]).to(DEVICE).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    positions = torch.arange(9, device=DEVICE)[None]
    cos_sin = JetMoeRotaryEmbedding(config).to(DEVICE)(x_ref, positions)
    expected = reference(x_ref, attention_mask=None, position_embeddings=cos_sin)[0]
    out = ours(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    ref_params = {n.replace("experts.", ""): p for n, p in reference.named_parameters()}
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, ref_params[name].grad, atol=1e-5, rtol=1e-5)


def test_backends_agree_on_outputs_and_gradients():
    assert_backends_agree(lambda: MoA(24, 4, 2, head_dim=6, num_kv_heads=2), (2, 5, 24))


def test_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        MoA(30, 4, 2, num_kv_heads=4)
    with pytest.raises(ValueError, match="even"):
        MoA(32, 4, 2, head_dim=5, num_kv_heads=2)
    with pytest.raises(ValueError, match="top_k"):
        MoA(32, 4, 5, head_dim=4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        MoA(32, 4, 2, head_dim=4, num_kv_heads=0)
    moa = MoA(32, 4, 2, head_dim=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="d_model"):
        moa(torch.randn(2, 3, 31))
    with pytest.raises(ValueError, match="d_model"):
        moa(torch.randn(3, 32))
    with pytest.raises(ValueError, match="attention_mask"):
        moa(torch.randn(2, 3, 32), attention_mask=torch.ones(2, 4))


def test_runs_under_autocast_with_fp32_weights():
    """bf16 autocast against the float64 block on bf16-rounded weights and input. The model
    allows six bf16 roundings of the output's scale (projections, RoPE, attention, the expert
    output; about three were seen): 2.3 %, where a uniform 15 % error used to pass."""
    case = {"d_model": 16, "experts": 4, "top_k": 2, "head_dim": 4, "kv_heads": 2, "batch": 2,
            "length": 5, "seed": 0}  # fmt: skip
    moa, x = _moa(case)
    assert_autocast_matches_rounded_inputs(moa, x, roundings=6)


def test_aux_loss_reaches_the_router_through_the_returned_tensor_alone():
    """The router's gradient with aux_loss_coef c is the gradient with c = 0 plus c times the
    gradient of the router's balance and z-losses, computed here from its logits."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    grads, extra = {}, {}
    for coef in (0.0, 0.3):
        torch.manual_seed(1)
        moa = MoA(16, 4, 2, head_dim=4, num_kv_heads=2, aux_loss_coef=coef)
        moa(x).sum().backward()
        grads[coef] = moa.router.layer.weight.grad.clone()
        logits = moa.router.layer(x.reshape(-1, 16)).float()
        expert_idx = logits.topk(2, dim=-1).indices
        aux = load_balancing_loss(logits, expert_idx, 4) + 0.1 * router_z_loss(logits)
        (extra[coef],) = torch.autograd.grad(coef * aux, moa.router.layer.weight)
    torch.testing.assert_close(grads[0.3], grads[0.0] + extra[0.3])
    assert extra[0.3].abs().max() > 1e-3 * grads[0.0].abs().max()  # a visible contribution


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(2, 0, 16), (0, 3, 16)])
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(backend, shape):
    torch.manual_seed(0)
    moa = MoA(16, 4, 2, head_dim=4, num_kv_heads=2, backend=backend).to(DEVICE)
    assert_empty_batch_is_handled(moa, shape)
