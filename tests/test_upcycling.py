"""Upcycling: block level (moe_blocks.upcycling) against the dense GLU MLP computed by hand;
transformers level (integrations.transformers.upcycle) against the dense model's logits, under
"eager" and "moe_blocks", before and after save/load."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moe_blocks import MoEMLP, upcycle_mlp, upcycle_weights

from .helpers import script_module


class DenseGLU(nn.Module):
    """A dense GLU MLP in transformers' layout (LlamaMLP's attributes)."""

    def __init__(self, d_model, d_ffn, act_fn=F.silu, down_bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ffn, bias=False)
        self.up_proj = nn.Linear(d_model, d_ffn, bias=False)
        self.down_proj = nn.Linear(d_ffn, d_model, bias=down_bias)
        self.act_fn = act_fn


def dense_output(mlp: DenseGLU, x):
    """The dense MLP by hand, in float64."""
    gate, up = (
        (x.double() @ mlp.gate_proj.weight.double().T),
        x.double() @ mlp.up_proj.weight.double().T,
    )
    out = (mlp.act_fn(gate) * up) @ mlp.down_proj.weight.double().T
    return out if mlp.down_proj.bias is None else out + mlp.down_proj.bias.double()


@st.composite
def upcycle_cases(draw, method):
    granularity = draw(st.sampled_from([1, 2, 4])) if method == "granular" else 1
    copies = draw(st.integers(1, 4))
    experts = copies * granularity
    top_k = granularity * draw(st.integers(1, copies))
    zero_router_ok = method == "copy" or top_k == experts  # granular: zeros tie the copies
    return {
        "d_model": draw(st.integers(1, 16)),
        "d_ffn": granularity * draw(st.integers(1, 6)),
        "experts": experts,
        "top_k": top_k,
        "granularity": granularity,
        "router_std": draw(st.sampled_from([0.0, 0.02, 1.0] if zero_router_ok else [0.02, 1.0])),
        "act": draw(st.sampled_from([F.silu, F.gelu])),
        "bias": draw(st.booleans()),
        "tokens": draw(st.integers(1, 20)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _dense(case):
    torch.manual_seed(case["seed"])
    mlp = DenseGLU(case["d_model"], case["d_ffn"], case["act"], case["bias"])
    return mlp, torch.randn(case["tokens"], case["d_model"])


@pytest.mark.parametrize("method", ["copy", "granular"])
@settings(deadline=None, max_examples=40)
@given(data=st.data())
def test_an_upcycled_block_computes_the_dense_mlp(method, data):
    case = data.draw(upcycle_cases(method))
    dense, x = _dense(case)
    before = copy.deepcopy(dense.state_dict())
    options = {"granularity": case["granularity"]} if method == "granular" else {}
    block = upcycle_mlp(
        dense, num_experts=case["experts"], top_k=case["top_k"], method=method,
        router_std=case["router_std"], seed=case["seed"], **options,
    )  # fmt: skip
    assert isinstance(block, MoEMLP) and block.router.num_experts == case["experts"]
    torch.testing.assert_close(block(x).double(), dense_output(dense, x), atol=1e-5, rtol=1e-5)
    for name, value in dense.state_dict().items():  # the dense MLP is not modified
        assert torch.equal(value, before[name])


@given(st.integers(1, 8), st.integers(1, 8), st.data())
def test_our_own_dense_mlp_upcycles_too(d_model, d_ffn, data):
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    dense = MoEMLP(d_model, d_ffn, 1, 1)
    with torch.no_grad():
        dense.bias.normal_()
    experts = data.draw(st.integers(1, 6))
    block = upcycle_mlp(dense, num_experts=experts, top_k=data.draw(st.integers(1, experts)))
    x = torch.randn(7, d_model)
    torch.testing.assert_close(block(x), dense(x), atol=1e-5, rtol=1e-5)


def test_noise_makes_the_copies_differ_by_its_stated_scale():
    torch.manual_seed(0)
    dense = DenseGLU(64, 128)
    weights = upcycle_weights(
        dense.gate_proj.weight, dense.up_proj.weight, dense.down_proj.weight,
        num_experts=4, top_k=2, noise_std=0.1, seed=1,
    )  # fmt: skip
    deviation = weights.w_in[:, :128] - dense.gate_proj.weight
    relative = deviation.std() / dense.gate_proj.weight.std()
    assert 0.09 < relative < 0.11
    assert not torch.equal(weights.w_in[0], weights.w_in[1])
    exact = upcycle_weights(
        dense.gate_proj.weight, dense.up_proj.weight, dense.down_proj.weight,
        num_experts=4, top_k=2, seed=1,
    )  # fmt: skip
    assert all(
        torch.equal(w, torch.cat([dense.gate_proj.weight, dense.up_proj.weight]))
        for w in exact.w_in
    )


@pytest.mark.parametrize("drop_ratio", [0.0, 0.25, 0.5, 1.0])
def test_drop_upcycling_redraws_a_different_fraction_of_each_expert(drop_ratio):
    torch.manual_seed(0)
    d_model, d_ffn, experts = 32, 400, 4
    dense = DenseGLU(d_model, d_ffn)
    gate, up, down = dense.gate_proj.weight, dense.up_proj.weight, dense.down_proj.weight
    weights = upcycle_weights(gate, up, down, num_experts=experts, top_k=2, method="drop",
                              drop_ratio=drop_ratio, seed=3)  # fmt: skip
    dropped_sets = []
    for expert in range(experts):
        gate_kept = (weights.w_in[expert, :d_ffn] == gate).all(1)
        up_kept = (weights.w_in[expert, d_ffn:] == up).all(1)
        down_kept = (weights.w_out[expert] == down).all(0)
        assert torch.equal(gate_kept, up_kept) and torch.equal(gate_kept, down_kept)
        assert int((~gate_kept).sum()) == round(drop_ratio * d_ffn)
        dropped_sets.append(frozenset((~gate_kept).nonzero().flatten().tolist()))
        if drop_ratio:
            for new, old in ((weights.w_in[expert, :d_ffn][~gate_kept], gate),
                             (weights.w_out[expert][:, ~gate_kept], down)):  # fmt: skip
                assert abs(new.mean() - old.mean()) < 3 * old.std() / new.numel() ** 0.5 + 1e-3
                assert abs(new.std() / old.std() - 1) < 0.1
    if 0 < drop_ratio < 1:
        assert len(set(dropped_sets)) == experts
    block = upcycle_mlp(dense, num_experts=experts, top_k=2, method="drop",
                        drop_ratio=drop_ratio, seed=3)  # fmt: skip
    x = torch.randn(5, d_model)
    close = torch.allclose(block(x).double(), dense_output(dense, x), atol=1e-5, rtol=1e-5)
    assert close == (drop_ratio == 0)


def test_an_upcycled_block_trains():
    torch.manual_seed(0)
    dense = DenseGLU(16, 24)
    block = upcycle_mlp(dense, num_experts=4, top_k=2, method="drop", seed=0)
    x = torch.randn(3, 5, 16)
    loss = block(x).square().mean()
    loss.backward()
    assert block.router.last_aux_loss > 0
    for name, param in block.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert block.router.layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=2, top_k=3), "top_k"),
        (dict(num_experts=0, top_k=1), "num_experts"),
        (dict(num_experts=4, top_k=2, method="merge"), "method"),
        (dict(num_experts=6, top_k=4, method="granular"), "num_experts"),  # G = top_k = 4
        (dict(num_experts=6, top_k=2, method="granular", granularity=4), "num_experts"),
        (dict(num_experts=8, top_k=2, method="granular", granularity=4), "top_k"),
        (dict(num_experts=8, top_k=4, method="granular", granularity=3), "d_ffn"),
        (
            dict(num_experts=8, top_k=4, method="granular", granularity=4, router_std=0),
            "router_std",
        ),
        (dict(num_experts=4, top_k=2, method="drop", drop_ratio=1.5), "drop_ratio"),
        (dict(num_experts=4, top_k=2, drop_ratio=0.5), "drop_ratio"),
        (dict(num_experts=4, top_k=2, granularity=2), "granularity"),
        (dict(num_experts=4, top_k=2, router_std=-1.0), "router_std"),
        (dict(num_experts=4, top_k=2, method="drop", noise_std=0.1), "noise_std"),
    ],
)
def test_bad_options_are_refused_naming_the_option(kwargs, message):
    dense = DenseGLU(8, 16)
    before = copy.deepcopy(dense.state_dict())
    with pytest.raises(ValueError, match=message):
        upcycle_mlp(dense, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())


def test_a_seed_that_is_no_int_is_refused_naming_it():
    from moe_blocks.integrations.transformers import upcycle

    for seed in ("1", 1.5, True):
        with pytest.raises(TypeError, match="seed must be an int"):
            upcycle_mlp(DenseGLU(8, 16), num_experts=2, top_k=1, seed=seed)
        with pytest.raises(TypeError, match="seed must be an int"):
            upcycle(dense_model("llama"), num_experts=2, top_k=1, seed=seed)


def test_what_is_not_a_dense_glu_mlp_is_refused():
    with pytest.raises(TypeError, match="mlp must be a dense GLU MLP"):
        upcycle_mlp(nn.Linear(4, 4), num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="num_experts=1"):
        upcycle_mlp(MoEMLP(4, 8, 2, 1), num_experts=2, top_k=1)
    biased = DenseGLU(4, 8)
    biased.up_proj = nn.Linear(4, 8)
    with pytest.raises(ValueError, match="biases"):
        upcycle_mlp(biased, num_experts=2, top_k=1)


# ------------------------------------------------------------------------------------------
# transformers level

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "MixtralForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MixtralForCausalLM", {"sliding_window": 4}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", {"head_dim": 12}),
}
ROUTINGS = [
    ("copy", 8, 2, {}),
    ("copy", 4, 1, {"router_std": 0.0}),
    ("copy", 4, 4, {"noise_std": 0.0}),
    ("granular", 8, 4, {"granularity": 2}),
    ("granular", 4, 4, {"granularity": 4}),
    ("granular", 8, 2, {}),  # granularity top_k: each token's 2 experts are one whole copy
]


def dense_model(family, seed=0, **overrides):
    import transformers

    config_name, model_name, _, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, **extra | overrides,
    )  # fmt: skip
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # larger weights than the init's, so that the MLPs matter
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, experts, top_k, options", ROUTINGS)
def test_upcycled_transformers_model_gives_the_dense_logits(
    family, method, experts, top_k, options, tmp_path
):
    from transformers import AutoModelForCausalLM

    from moe_blocks.integrations.transformers import register, upcycle

    dense = dense_model(family)
    before = copy.deepcopy(dense.state_dict())
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        expected = dense(ids).logits
    moe = upcycle(dense, num_experts=experts, top_k=top_k, method=method, seed=5, **options)
    assert type(moe).__name__ == FAMILIES[family][2]
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())
    register()
    moe.save_pretrained(tmp_path)
    for implementation in ("eager", "moe_blocks"):
        moe.set_experts_implementation(implementation)
        with torch.no_grad():
            torch.testing.assert_close(moe(ids).logits, expected, atol=1e-5, rtol=1e-5)
        loaded = AutoModelForCausalLM.from_pretrained(
            tmp_path, experts_implementation=implementation
        ).eval()
        assert type(loaded).__name__ == FAMILIES[family][2]
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)


# Attention per layer: a window on every layer (Mistral), on the layers ``layer_types`` marks
# (Qwen2 and Qwen3: from max_window_layers on), on none; Qwen3's query/key/value biases.
ATTENTION_VARIANTS = [
    ("mistral", {"sliding_window": 3}),
    ("mistral", {"sliding_window": None}),
    ("llama", {"sliding_window": 3}),  # a stray field Llama ignores: so must Mixtral
    *[
        (family, {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": layers})
        for family in ("qwen2", "qwen3")
        for layers in (0, 1, 2)  # of the dense model's two layers: all, one, none sliding
    ],
    ("qwen3", {"attention_bias": True}),
]


@pytest.mark.parametrize("family, overrides", ATTENTION_VARIANTS)
def test_upcycled_attention_is_the_dense_models_or_refused(family, overrides):
    """Every layer's attention (its window, its biases) as in the dense model: equal logits
    over 11 tokens (a window of 3 changes them) under both experts implementations, or a
    ValueError naming what the MoE class cannot represent (Qwen3-MoE slides every layer or
    none) before anything is built."""
    from moe_blocks.integrations.transformers import upcycle

    dense = dense_model(family, **overrides)
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        expected = dense(ids).logits
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in dense.model.layers]
    if family == "qwen3" and len(set(windows)) > 1:
        with pytest.raises(ValueError, match="sliding window on some layers only"):
            upcycle(dense, num_experts=4, top_k=2, seed=0)
        return
    moe = upcycle(dense, num_experts=4, top_k=2, seed=0)
    for implementation in ("eager", "moe_blocks"):
        moe.set_experts_implementation(implementation)
        with torch.no_grad():
            torch.testing.assert_close(moe(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_drop_upcycled_transformers_model_keeps_the_other_neurons():
    from moe_blocks.integrations.transformers import upcycle

    dense = dense_model("llama")
    moe = upcycle(dense, num_experts=4, top_k=2, method="drop", drop_ratio=0.25, seed=0)
    for dense_layer, moe_layer in zip(dense.model.layers, moe.model.layers, strict=True):
        gate = dense_layer.mlp.gate_proj.weight
        for expert_up in moe_layer.mlp.experts.gate_up_proj:
            kept = (expert_up[:48] == gate).all(1)
            assert int((~kept).sum()) == 12


def test_qwen2_moe_shared_expert_is_the_dense_copy_at_half_weight():
    """The stated property: the shared expert is the dense MLP, its gate sigmoid(0) = 1/2, and
    the routed experts alone compute half the dense MLP."""
    from moe_blocks.integrations.transformers import upcycle

    dense = dense_model("qwen2")
    moe = upcycle(dense, num_experts=4, top_k=2, seed=0)
    x = torch.randn(1, 6, 32)
    for dense_layer, moe_layer in zip(dense.model.layers, moe.model.layers, strict=True):
        block = moe_layer.mlp
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(block.shared_expert, name).weight,
                               getattr(dense_layer.mlp, name).weight)  # fmt: skip
        assert not block.shared_expert_gate.weight.any()
        with torch.no_grad():
            dense_out = dense_layer.mlp(x)
            torch.testing.assert_close(block(x), dense_out, atol=1e-5, rtol=1e-5)
            routed_only = copy.deepcopy(block)
            routed_only.shared_expert.down_proj.weight.zero_()
            torch.testing.assert_close(routed_only(x), dense_out / 2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_upcycled_transformers_model_trains_on_our_kernel(family):
    from moe_blocks.integrations.transformers import register, upcycle

    register()
    moe = upcycle(dense_model(family), num_experts=4, top_k=2, method="drop", seed=0)
    moe.config.output_router_logits = True
    moe.set_experts_implementation("moe_blocks")
    moe.train()
    ids = torch.randint(0, 61, (2, 9))
    out = moe(ids, labels=ids)
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    out.loss.backward()
    for name, param in moe.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name
    assert moe.model.layers[0].mlp.experts.gate_up_proj.grad.abs().sum() > 0
    assert moe.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_unsupported_models_are_refused_with_the_reason():
    from transformers import GPT2Config, GPT2LMHeadModel

    from moe_blocks.integrations.transformers import upcycle

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=11))
    with pytest.raises(ValueError, match="dense causal LM|model_type"):
        upcycle(gpt2, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="attention_bias"):
        upcycle(dense_model("llama", attention_bias=True), num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        upcycle(dense_model("llama"), num_experts=2, top_k=3)
    with pytest.raises(TypeError, match="transformers model"):
        upcycle(nn.Linear(2, 2), num_experts=2, top_k=1)


# ------------------------------------------------------------------------------------------
# moe-blocks upcycle


@pytest.fixture
def dense_checkpoint(tmp_path):
    model = dense_model("qwen3")
    folder = tmp_path / "dense"
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return model, folder


def test_the_upcycle_command_writes_a_model_transformers_loads(dense_checkpoint, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from moe_blocks.models.cli import main

    dense, folder = dense_checkpoint
    out = tmp_path / "moe"
    code = main([
        "upcycle", str(folder), "--experts", "8", "--top-k", "4", "--method", "granular",
        "--granularity", "2", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    assert "qwen3 -> qwen3_moe" in capsys.readouterr().out
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    record = json.loads((out / "upcycle.json").read_text())
    assert record["method"] == "granular" and record["max_logit_change"] < 1e-5
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 61, (1, 13))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--experts", "2", "--top-k", "3"], "--top-k (3) must not exceed --experts (2)"),
        (["--experts", "4", "--top-k", "2", "--method", "merge"], "--method must be one of"),
        (["--experts", "6", "--top-k", "4", "--method", "granular"], "--granularity (4)"),
        (["--experts", "4", "--top-k", "2", "--drop-ratio", "0.3"], "--drop-ratio applies"),
        (["--experts", "0", "--top-k", "1"], "--experts"),
    ],
)
def test_bad_upcycle_arguments_are_one_line_and_write_nothing(
    dense_checkpoint, tmp_path, capsys, arguments, message
):
    from moe_blocks.models.cli import main

    out = tmp_path / "moe"
    assert main(["upcycle", str(dense_checkpoint[1]), *arguments, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error
    assert not out.exists()


def test_the_upcycle_command_refuses_what_is_not_a_dense_causal_lm(
    dense_checkpoint, tmp_path, capsys
):
    from moe_blocks.models.cli import main

    _, folder = dense_checkpoint
    config = json.loads((folder / "config.json").read_text())
    cases = {
        "moe": config | {"model_type": "qwen3_moe"},
        "classifier": config | {"architectures": ["Qwen3ForSequenceClassification"]},
        "gpt2": config | {"model_type": "gpt2"},
    }
    for name, changed in cases.items():
        source = tmp_path / name
        source.mkdir()
        (source / "config.json").write_text(json.dumps(changed))
        out = tmp_path / f"{name}-out"
        assert (
            main(["upcycle", str(source), "--experts", "4", "--top-k", "2", "--out", str(out)]) == 2
        )
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and str(source) in error, error
        assert not out.exists()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text((folder / "config.json").read_text())
    (damaged / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "damaged-out"
    assert main(["upcycle", str(damaged), "--experts", "4", "--top-k", "2", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(damaged) in error, error
    assert not out.exists()
    missing = tmp_path / "nothing"
    assert (
        main(
            [
                "upcycle",
                str(missing),
                "--experts",
                "4",
                "--top-k",
                "2",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "not a folder" in capsys.readouterr().err


def test_the_upcycle_command_checks_bf16_experts_of_any_width(tmp_path, capsys):
    """bf16 experts 12 wide (48 / granularity 4): 24-byte rows, which transformers' default
    grouped_mm refuses; the command's logit check runs on our kernel and the model loads."""
    from transformers import AutoModelForCausalLM

    from moe_blocks.models.cli import main

    dense = dense_model("mistral").to(torch.bfloat16)
    dense.save_pretrained(tmp_path / "dense")
    out = tmp_path / "moe"
    arguments = ["--experts", "4", "--top-k", "4", "--method", "granular", "--out", str(out)]
    assert main(["upcycle", str(tmp_path / "dense"), *arguments]) == 0, capsys.readouterr().err
    assert json.loads((out / "upcycle.json").read_text())["max_logit_change"] < 0.1
    loaded = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager").eval()
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids).logits.float(), dense(ids).logits.float(), atol=0.1, rtol=0.05
        )


def test_a_dense_config_without_an_moe_equivalent_is_refused_before_any_weight(
    dense_checkpoint, tmp_path, capsys
):
    """A config the MoE class cannot represent (Qwen3 sliding one of its two layers): one line
    naming it, read from config.json alone (the folder holds no weights to load)."""
    from moe_blocks.models.cli import main

    config = json.loads((dense_checkpoint[1] / "config.json").read_text())
    source = tmp_path / "half-sliding"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(config | {
        "use_sliding_window": True, "sliding_window": 4,
        "layer_types": ["full_attention", "sliding_attention"],
    }))  # fmt: skip
    out = tmp_path / "out"
    assert main(["upcycle", str(source), "--experts", "4", "--top-k", "2", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "sliding window on some layers only" in error, error
    assert not out.exists()


def test_the_upcycle_command_replaces_no_folder_that_holds_other_files(
    dense_checkpoint, tmp_path, capsys
):
    """Writing replaces the whole --out folder: one holding files that are not a model's is
    refused, with or without --overwrite, a model beside them too (a cloned model repository's
    README); an empty folder, or one that holds only a model with --overwrite, is written."""
    from moe_blocks.models.cli import main

    dense = str(dense_checkpoint[1])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine\n")
    beside = tmp_path / "beside"
    dense_checkpoint[0].save_pretrained(beside)
    (beside / "README.md").write_text("mine\n")
    capsys.readouterr()
    for out, kept in ((notes, "notes.txt"), (beside, "README.md")):
        for extra in ([], ["--overwrite"]) if out == notes else (["--overwrite"],):
            arguments = ["--experts", "4", "--top-k", "2", "--out", str(out), *extra]
            assert main(["upcycle", dense, *arguments]) == 2
            error = capsys.readouterr().err
            assert error.count("\n") == 1 and f"holds {kept}, not a model's files" in error
            assert (out / kept).read_text() == "mine\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    for extra in ([], ["--overwrite"]):
        arguments = ["--experts", "4", "--top-k", "2", "--out", str(empty), *extra]
        assert main(["upcycle", dense, *arguments]) == 0
        assert (empty / "config.json").is_file()


def test_upcycling_registers_the_moe_blocks_experts_implementation(tmp_path):
    """In a fresh process, without register(): the upcycled model saved, then loaded with
    experts_implementation="moe_blocks", gives the dense logits."""
    import subprocess
    import sys

    code = f"""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from moe_blocks.integrations.transformers import upcycle
torch.manual_seed(0)
dense = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
upcycle(dense, num_experts=4, top_k=2, seed=0).save_pretrained({str(tmp_path)!r})
loaded = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r},
    experts_implementation="moe_blocks").eval()
ids = torch.randint(0, 61, (1, 7))
with torch.no_grad():
    torch.testing.assert_close(loaded(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# benches/upcycling_curves.py, the demonstration in docs/upcycling.md


def test_the_demonstration_starts_each_upcycled_model_where_the_dense_one_ended(tmp_path):
    result = script_module("benches/upcycling_curves.py").main([
        "--out", str(tmp_path), "--dense-steps", "3", "--steps", "2", "--eval-every", "1",
        "--eval-batches", "1", "--batch-size", "2", "--seq-len", "16", "--d-model", "16",
        "--d-ffn", "32", "--layers", "1", "--heads", "2", "--experts", "4", "--top-k", "2",
        "--methods", "copy,granular,drop", "--warmup", "1",
    ])  # fmt: skip
    curves = result["curves"]
    dense_end = curves["dense (phase 1)"][-1]["val_bpb"]
    for label in ("upcycled (copy)", "upcycled (granular)", "dense (continued)"):
        assert curves[label][0]["val_bpb"] == pytest.approx(dense_end, abs=1e-5), label
    assert curves["upcycled (drop)"][0]["val_bpb"] != pytest.approx(dense_end, abs=1e-5)
    assert [point["step"] for point in curves["MoE from scratch"]] == [0, 1, 2]
    assert json.loads((tmp_path / "upcycling.json").read_text())["curves"] == curves
    assert (tmp_path / "upcycling.png").stat().st_size > 0
