"""MoEMLP and MoA forward and forward+backward beside transformers' JetMoe MoE and MoA modules
holding the same weights (the per-expert loop most people run today).

    python -m pytest benches/test_bench_blocks.py --benchmark-warmup=on --benchmark-min-rounds=5
"""

import pytest
import torch

from moe_blocks import MoA, MoEMLP

from .conftest import DEVICE, TINY

# (batch, length, d_model, ffn, experts, top_k, kv_heads, head_dim), scaled to 2 CPU cores.
SHAPES = {
    "jetmoe-like": (2, 256, 1024, 1408, 8, 2, 8, 64),
    "fine-grained": (2, 256, 512, 128, 32, 4, 4, 32),
}
if TINY:
    SHAPES = {"tiny": (1, 8, 32, 16, 4, 2, 2, 8)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _config(shape):
    from transformers import JetMoeConfig

    _, _, d_model, ffn, experts, top_k, kv_heads, head_dim = shape
    config = JetMoeConfig(
        vocab_size=16, hidden_size=d_model, intermediate_size=ffn, num_hidden_layers=1,
        num_local_experts=experts, num_experts_per_tok=top_k, num_key_value_heads=kv_heads,
        kv_channels=head_dim,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


def build(block, impl, shape, dtype):
    """The block (ours or transformers') with shared random weights, and its input."""
    from transformers.models.jetmoe.modeling_jetmoe import (
        JetMoeAttention,
        JetMoeMoE,
        JetMoeRotaryEmbedding,
    )

    batch, length, d_model, ffn, experts, top_k, kv_heads, head_dim = shape
    torch.manual_seed(0)
    config = _config(shape)
    reference = JetMoeMoE(config) if block == "mlp" else JetMoeAttention(config, layer_idx=0)
    for param in reference.parameters():
        torch.nn.init.normal_(param, std=0.02)
    reference = reference.to(DEVICE, dtype)
    x = torch.randn(batch, length, d_model, device=DEVICE, dtype=dtype)
    if impl == "transformers":
        if block == "mlp":
            return reference, x
        cos_sin = JetMoeRotaryEmbedding(config).to(DEVICE)(x, torch.arange(length)[None])
        run = lambda h: reference(h, attention_mask=None, position_embeddings=cos_sin)[0]  # noqa: E731
        return run, x
    if block == "mlp":
        ours = MoEMLP(d_model, ffn, experts, top_k)
        state = reference.state_dict()
    else:
        ours = MoA(d_model, experts, top_k, head_dim=head_dim, num_kv_heads=kv_heads)
        state = {k.replace("experts.", ""): v for k, v in reference.state_dict().items()}
    ours = ours.to(DEVICE, dtype)
    ours.load_state_dict(state)
    return ours, x


def _params():
    for block in ("mlp", "moa"):
        for shape_name in SHAPES:
            for dtype_name in DTYPES:
                yield pytest.param(
                    block, shape_name, dtype_name, id=f"{block}-{shape_name}-{dtype_name}"
                )


@pytest.mark.parametrize("impl", ["moe_blocks", "transformers"])
@pytest.mark.parametrize("block,shape_name,dtype_name", list(_params()))
def test_forward(benchmark, impl, block, shape_name, dtype_name):
    benchmark.group = f"{block} forward {shape_name} {dtype_name}"
    module, x = build(block, impl, SHAPES[shape_name], DTYPES[dtype_name])
    with torch.no_grad():
        out = benchmark(module, x)
    assert out.shape == x.shape


@pytest.mark.parametrize("impl", ["moe_blocks", "transformers"])
@pytest.mark.parametrize("block,shape_name,dtype_name", list(_params()))
def test_forward_backward(benchmark, impl, block, shape_name, dtype_name):
    benchmark.group = f"{block} forward+backward {shape_name} {dtype_name}"
    module, x = build(block, impl, SHAPES[shape_name], DTYPES[dtype_name])
    x.requires_grad_()

    def step():
        x.grad = None
        out = module(x)
        out.backward(torch.ones_like(out))

    benchmark(step)
    assert x.grad is not None
