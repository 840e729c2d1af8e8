"""torch.compile(fullgraph=True) of MoEMLP, MoA and the JetMoE model compiles once and runs at
new batch sizes and sequence lengths without recompiling; decoding with the KV cache compiles
too and stops recompiling after its first steps. Compiled results equal eager ones.

Sizes 0 and 1 are specialised by torch itself (its 0/1 specialisation), so the shapes here have
B, T >= 2; decoding (T = 1) is its own graph."""

import pytest
import torch
from torch._dynamo.utils import counters

from moe_blocks import KVCache, MoA, MoEMLP
from moe_blocks.models.jetmoe import JetMoEConfig, JetMoEForCausalLM

from .conftest import DEVICE

SHAPES = [(2, 8), (3, 9), (4, 5)]

pytestmark = pytest.mark.slow


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


def _check_block_compiles_once(block, make_kwargs, mark_dynamic):
    """On the test device: the Triton kernels on a GPU (benches/gpu_check.py runs this)."""
    block = block.to(DEVICE)
    _fresh_dynamo()
    if mark_dynamic:  # default compile; the caller marks the token dimensions dynamic
        compiled = torch.compile(block, fullgraph=True)
    else:
        compiled = torch.compile(block, fullgraph=True, dynamic=True)
    for batch, length in SHAPES:
        x = torch.randn(batch, length, 16, device=DEVICE)
        if mark_dynamic:
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(x, 1)
        kwargs = make_kwargs(batch, length)
        block.zero_grad()
        out = compiled(x, **kwargs)
        out.square().sum().backward()
        compiled_grads = _grads(block)
        block.zero_grad()
        expected = block(x, **kwargs)
        expected.square().sum().backward()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        for got, want in zip(compiled_grads, _grads(block), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert _graphs() == 1, f"compiled {_graphs()} graphs for {len(SHAPES)} shapes"


@pytest.mark.parametrize("mark_dynamic", [False, True], ids=["dynamic=True", "mark_dynamic"])
def test_moe_mlp_compiles_once_for_new_shapes(mark_dynamic):
    torch.manual_seed(0)
    _check_block_compiles_once(MoEMLP(16, 8, 4, 2), lambda b, t: {}, mark_dynamic)


def _padding_mask(batch, length):
    mask = torch.ones(batch, length, dtype=torch.bool, device=DEVICE)
    mask[0, : length // 2] = False  # left padding in the first sequence
    return {"attention_mask": mask}


@pytest.mark.parametrize("with_mask", [False, True], ids=["causal", "padding mask"])
def test_moa_compiles_once_for_new_shapes(with_mask):
    torch.manual_seed(0)
    moa = MoA(16, 4, 2, head_dim=4, num_kv_heads=2)
    _check_block_compiles_once(moa, _padding_mask if with_mask else lambda b, t: {}, False)


def _tiny_jetmoe():
    torch.manual_seed(0)
    config = JetMoEConfig.from_preset(
        "tiny", hidden_size=32, num_hidden_layers=2, kv_channels=8, intermediate_size=16
    )
    return JetMoEForCausalLM(config)


def test_jetmoe_training_step_compiles_once_for_new_shapes():
    model = _tiny_jetmoe()
    _fresh_dynamo()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for shape in SHAPES:
        ids = torch.randint(0, 256, shape)
        model.zero_grad()
        loss = compiled(ids, labels=ids).loss
        loss.backward()
        compiled_grads = _grads(model)
        model.zero_grad()
        expected = model(ids, labels=ids).loss
        expected.backward()
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
        for got, want in zip(compiled_grads, _grads(model), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert _graphs() == 1


@torch.no_grad()
def test_jetmoe_decoding_with_the_kv_cache_compiles_and_stops_recompiling():
    model = _tiny_jetmoe().eval()
    _fresh_dynamo()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    layers = model.config.num_hidden_layers
    caches, eager_caches = [KVCache() for _ in range(layers)], [KVCache() for _ in range(layers)]
    step_ids = torch.randint(0, 256, (2, 6))
    graphs_per_step = []
    for _ in range(7):  # the prefill, then six decoding steps of one token
        logits = compiled(step_ids, kv_caches=caches).logits
        expected = model(step_ids, kv_caches=eager_caches).logits
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        graphs_per_step.append(_graphs())
        step_ids = logits[:, -1:].argmax(-1)
    assert caches[0].length == 12
    # prefill; the first step (cache built by the prefill); then a cache of any length
    assert graphs_per_step[-1] <= 3
    assert graphs_per_step[3:] == [graphs_per_step[3]] * 4, graphs_per_step
