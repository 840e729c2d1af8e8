"""The "moe_blocks" experts implementation for transformers, and patch_jetmoe.

Oracles: transformers' own "eager" implementation of each model in float64 (and, in bf16,
"eager" in bf16 as the bar for rounding), a float64 loop written here from the meaning of
transformers' layout flags (the property test), and the unpatched JetMoe model.
"""

import copy
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from moe_blocks.testing import routings

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, JetMoeConfig  # noqa: E402
from transformers.integrations.moe import (  # noqa: E402
    ALL_EXPERTS_FUNCTIONS,
    use_experts_implementation,
)

from moe_blocks.integrations import transformers as backend  # noqa: E402

from .helpers import watched_inference_paths  # noqa: E402

# Largest error allowed, relative to the reference's largest magnitude (at least 1), for a whole
# model or experts module against float64: fp32 rounding through a few layers is ~1e-6 here;
# bf16 (8 bits) through one layer and its backward reaches ~2e-2, as eager's own does.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2.5e-2}
TINY = {
    "vocab_size": 97,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 24,
}
FAMILIES = {
    "mixtral": {"num_local_experts": 6, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 8, "num_experts_per_tok": 4, "moe_intermediate_size": 16},
    "qwen2_moe": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
    },
    "olmoe": {"num_experts": 8, "num_experts_per_tok": 2},
    "deepseek_v3": {
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 0,
        "moe_intermediate_size": 16,
        "num_key_value_heads": 4,  # MLA: as many KV heads as heads
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
    },
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "phimoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "glm4_moe": {
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 0,
        "moe_intermediate_size": 16,
    },
}


@pytest.fixture
def routed_calls(monkeypatch):
    """How many times the backend's routed computation ran (proof that it, not a fallback, ran)."""
    calls = []
    original = backend.routed_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(backend, "routed_forward", counting)
    return calls


def tiny_model(family: str, layers: int, seed: int):
    config = AutoConfig.for_model(
        family, **{**TINY, "num_hidden_layers": layers, **FAMILIES[family]}
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # experts large enough to matter in the logits (and GPT-OSS's clamp)
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.normal_(std=0.3)
    return model


def logits_and_grads(model, implementation: str, input_ids, probe):
    """Logits and the gradient of every parameter (zeros where none flowed) of
    ``<logits, probe>``, both in float64."""
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids).logits
    (logits.double() * probe).sum().backward()
    grads = {
        name: (param.grad if param.grad is not None else torch.zeros_like(param)).double()
        for name, param in model.named_parameters()
    }
    return logits.detach().double(), grads


def relative_error(actual, expected) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item()


def test_register_is_idempotent_and_returns_the_name():
    assert backend.register() == "moe_blocks"
    assert backend.register() == "moe_blocks"
    assert ALL_EXPERTS_FUNCTIONS["moe_blocks"] is backend.experts_forward


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_gradients_match_eager_in_fp32(family, routed_calls):
    backend.register()
    model = tiny_model(family, layers=2, seed=len(family))
    reference = copy.deepcopy(model).double()
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    probe = torch.randn(2, 9, TINY["vocab_size"], dtype=torch.float64)

    expected_logits, expected_grads = logits_and_grads(reference, "eager", input_ids, probe)
    logits, grads = logits_and_grads(model, "moe_blocks", input_ids, probe)

    assert len(routed_calls) == 2  # both layers' experts ran on our kernel
    tol = TOLERANCE[torch.float32]
    assert relative_error(logits, expected_logits) < tol
    for name, expected in expected_grads.items():
        assert relative_error(grads[name], expected) < tol, name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_gradients_in_bf16_are_as_accurate_as_eager(family, routed_calls):
    """bf16: against the float64 model, our error is within the bf16 tolerance or at most twice
    eager's own bf16 error (one layer, so both run on the same routing)."""
    backend.register()
    model = tiny_model(family, layers=1, seed=100 + len(family))
    reference = copy.deepcopy(model).double()
    model = model.to(torch.bfloat16)
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    probe = torch.randn(2, 9, TINY["vocab_size"], dtype=torch.float64)

    exact_logits, exact_grads = logits_and_grads(reference, "eager", input_ids, probe)
    eager_logits, eager_grads = logits_and_grads(model, "eager", input_ids, probe)
    logits, grads = logits_and_grads(model, "moe_blocks", input_ids, probe)

    assert len(routed_calls) == 1
    floor = TOLERANCE[torch.bfloat16]
    bar = max(2 * relative_error(eager_logits, exact_logits), floor)
    assert relative_error(logits, exact_logits) <= bar
    for name, exact in exact_grads.items():
        bar = max(2 * relative_error(eager_grads[name], exact), floor)
        assert relative_error(grads[name], exact) <= bar, name


def test_from_pretrained_and_set_experts_implementation(tmp_path, routed_calls):
    name = backend.register()
    model = tiny_model("qwen3_moe", layers=1, seed=1)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=name).eval()
    assert loaded.config._experts_implementation == name
    input_ids = torch.randint(0, TINY["vocab_size"], (1, 5))
    with torch.no_grad():
        ours = loaded(input_ids).logits
        assert len(routed_calls) == 1
        loaded.set_experts_implementation("eager")
        eager = loaded(input_ids).logits
    torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_eager():
    """Decoding (one token per step through the KV cache) routes and sums like eager."""
    backend.register()
    model = tiny_model("mixtral", layers=2, seed=7)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 4))
    tokens = {}
    for implementation in ("eager", "moe_blocks"):
        model.set_experts_implementation(implementation)
        tokens[implementation] = model.generate(
            prompt, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert torch.equal(tokens["moe_blocks"], tokens["eager"])


# --------------------------------------------------------------------------------------------
# A bare experts module with random layout flags, against a float64 loop written from the
# flags' meaning (transformers' use_experts_implementation docstring).


def clamped_swiglu(gate_up, limit=1.5, alpha=1.702):
    """A gate of the module's own (GPT-OSS's form): interleaved gate/up, clamped."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(gate * alpha)


# The stand-in post-expert norm's eps: 0.1, not a model's 1e-6. With one feature the norm is
# nearly sign(x), whose gradient near 0 (up to eps^-1/2) turns fp32 rounding into errors above
# the 1e-4 tolerance (a draw with features=1 failed by 1.8e-4); the backend, not fp32's
# conditioning, is what this stand-in checks.
RMS_EPS = 0.1


class RMSNorm(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.5 * torch.randn(features))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * self.weight


def experts_class(flags: dict, own_gate: bool):
    class Experts(nn.Module):
        def __init__(self, config, num_experts, features, hidden, dtype):
            super().__init__()
            self.num_experts = num_experts
            up_width = 2 * hidden if flags["has_gate"] else hidden

            def param(experts_out_in):
                shape = experts_out_in
                if flags["is_transposed"]:
                    shape = (shape[0], shape[2], shape[1])
                return nn.Parameter(torch.randn(shape, dtype=dtype) * 0.5)

            up_name = "gate_up_proj" if flags["has_gate"] else "up_proj"
            setattr(self, up_name, param((num_experts, up_width, features)))
            self.down_proj = param((num_experts, features, hidden))
            if flags["has_bias"]:
                setattr(self, f"{up_name}_bias", nn.Parameter(torch.randn(num_experts, up_width)))
                self.down_proj_bias = nn.Parameter(torch.randn(num_experts, features))
            if flags["has_post_expert_norm"]:
                self.post_expert_norm = RMSNorm(features)
            self.act_fn = nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the moe_blocks implementation replaces this forward")

    if own_gate:
        Experts._apply_gate = lambda self, gate_up: clamped_swiglu(gate_up)
    return use_experts_implementation(**flags)(Experts)


def oracle(module, flags, own_gate, x, top_k_index, top_k_weights):
    """``Σ_j w[t, j] · expert_e(x[t])`` in float64, one assignment at a time, from the
    module's parameters (expert ids >= num_experts skipped)."""
    up_name = "gate_up_proj" if flags["has_gate"] else "up_proj"

    def as_out_in(weight):
        weight = weight.double()
        return weight.mT if flags["is_transposed"] else weight

    up, down = as_out_in(getattr(module, up_name)), as_out_in(module.down_proj)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for token in range(x.shape[0]):
        for slot in range(top_k_index.shape[1]):
            expert = int(top_k_index[token, slot])
            if expert >= module.num_experts:
                continue
            hidden = up[expert] @ x[token].double()
            if flags["has_bias"]:
                hidden = hidden + getattr(module, f"{up_name}_bias")[expert].double()
            if not flags["has_gate"]:
                hidden = torch.nn.functional.silu(hidden)
            elif own_gate:
                hidden = clamped_swiglu(hidden)
            elif flags["is_concatenated"]:
                gate, linear = hidden.chunk(2)
                hidden = torch.nn.functional.silu(gate) * linear
            else:  # interleaved [gate0, up0, gate1, up1, ...]
                hidden = torch.nn.functional.silu(hidden[::2]) * hidden[1::2]
            row = down[expert] @ hidden
            if flags["has_bias"]:
                row = row + module.down_proj_bias[expert].double()
            if flags["has_post_expert_norm"]:
                weight = module.post_expert_norm.weight.double()
                row = row * torch.rsqrt(row.pow(2).mean() + RMS_EPS) * weight
            out[token] = out[token] + top_k_weights[token, slot].double() * row
    return out


FLAG_NAMES = ("has_gate", "is_concatenated", "is_transposed", "has_bias", "has_post_expert_norm")


@given(
    routing=routings(max_tokens=10, max_experts=6),
    flags=st.fixed_dictionaries({name: st.booleans() for name in FLAG_NAMES}),
    own_gate=st.booleans(),
    off_rank_ids=st.booleans(),
    expert_parallel=st.booleans(),
    features=st.integers(1, 12),
    hidden=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_bare_experts_module_matches_the_float64_oracle(
    routing, flags, own_gate, off_rank_ids, expert_parallel, features, hidden, seed
):
    torch.manual_seed(seed)
    own_gate = own_gate and flags["has_gate"]
    num_tokens, num_experts = routing.num_tokens, routing.num_experts
    config = types.SimpleNamespace(_experts_implementation=backend.register())
    module = experts_class(flags, own_gate)(config, num_experts, features, hidden, torch.float32)
    top_k_index = routing.expert_idx.clone()
    if off_rank_ids:  # some assignments go to another rank's experts (ids >= E), with or
        # without transformers' flag (5.24 sets it, 5.17 has none; eager skips them either way)
        module._is_expert_parallel = expert_parallel
        off_rank = torch.rand(top_k_index.shape) < 0.4
        top_k_index[off_rank] = num_experts + torch.randint(0, 3, (int(off_rank.sum()),))
    x = torch.randn(num_tokens, features, requires_grad=True)
    weights = torch.rand(top_k_index.shape, requires_grad=True)
    inputs_before = [t.detach().clone() for t in (x, top_k_index, weights)]

    out = module(x, top_k_index, weights)
    probe = torch.randn(num_tokens, features, dtype=torch.float64)
    (out.double() * probe).sum().backward()
    leaves = [x, weights, *module.parameters()]
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]

    for before, after in zip(inputs_before, (x, top_k_index, weights), strict=True):
        assert torch.equal(before, after.detach())  # nothing the caller passed is modified
    for leaf in leaves:
        leaf.grad = None
    expected = oracle(module, flags, own_gate, x, top_k_index, weights)
    if expected.requires_grad:
        expected_grads = torch.autograd.grad(
            (expected * probe).sum(), leaves, allow_unused=True, materialize_grads=True
        )
    else:  # no assignment ran on this rank's experts
        expected_grads = [torch.zeros_like(leaf, dtype=torch.float64) for leaf in leaves]
    for actual, exact in zip([out, *grads], [expected, *expected_grads], strict=True):
        assert actual.shape == exact.shape
        if exact.numel():
            assert relative_error(actual.double(), exact) < TOLERANCE[torch.float32]


def test_sentinel_ids_skip_as_mixtrals_eager_does_without_the_expert_parallel_flag(monkeypatch):
    """transformers' eager experts loop skips id == num_experts (its expert-parallel sentinel;
    5.17 marks other ranks' assignments so without a flag): ours gives the same output and
    gradients (both in float64, so the only difference is what is summed, not how it is
    rounded)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=16, intermediate_size=12, num_local_experts=4)
    module = MixtralExperts(config).double()
    for param in module.parameters():
        nn.init.normal_(param, std=0.3)
    ids = torch.rand(9, 4).topk(2, dim=1).indices
    ids[torch.rand(ids.shape) < 0.4] = 4
    x = torch.randn(9, 16, dtype=torch.float64)
    weights = torch.rand(ids.shape, dtype=torch.float64)
    calls = []
    kernel = backend.expert_linear
    counted = lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(backend, "expert_linear", counted)
    results = {}
    for name in ("eager", backend.register()):
        module.config._experts_implementation = name
        leaves = [x.clone().requires_grad_(), weights.clone().requires_grad_()]
        for param in module.parameters():
            param.grad = None
        out = module(leaves[0], ids, leaves[1])
        out.square().sum().backward()
        results[name] = [out, *(t.grad for t in leaves), *(p.grad for p in module.parameters())]
    assert calls  # our kernel ran for "moe_blocks"
    for ours, eager in zip(results["moe_blocks"], results["eager"], strict=True):
        torch.testing.assert_close(ours, eager, rtol=1e-12, atol=1e-12)


def test_transposed_weights_are_used_without_a_copy():
    """With is_transposed the kernel gets a view of the parameter itself."""
    flags = dict.fromkeys(FLAG_NAMES, False) | {"has_gate": True, "is_transposed": True}
    config = types.SimpleNamespace(_experts_implementation=backend.register())
    module = experts_class(flags, own_gate=False)(config, 3, 8, 4, torch.float32)
    layout = backend.read_layout(module)
    assert layout.up.data_ptr() == module.gate_up_proj.data_ptr()
    assert layout.up.shape == (3, 8, 8) and layout.down.shape == (3, 8, 4)


# --------------------------------------------------------------------------------------------
# Real experts modules with the rarer flags: has_gate=False (NemotronH), a post-expert norm
# (MuseSpark), against their own eager forward.


def _nemotron_experts():
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    config = AutoConfig.for_model(
        "nemotron_h", hidden_size=16, n_routed_experts=5, moe_intermediate_size=8,
        mlp_hidden_act="relu2",
    )  # fmt: skip
    return NemotronHExperts(config)


def _muse_spark_experts():
    muse_spark = pytest.importorskip("transformers.models.muse_spark.modeling_muse_spark")
    config = muse_spark.MuseSparkTextConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, moe_hidden_size=16,
        moe_intermediate_size=8, num_local_experts=5,
    )  # fmt: skip
    return muse_spark.MuseSparkExperts(config)


@pytest.mark.parametrize("make_experts", [_nemotron_experts, _muse_spark_experts])
def test_flagged_transformers_experts_match_their_eager_forward(make_experts):
    backend.register()
    torch.manual_seed(0)
    module = make_experts().double()
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(std=0.5)
    features = module.down_proj.shape[1]
    x = torch.randn(11, features, dtype=torch.float64)
    top_k_index = torch.rand(11, module.num_experts).topk(2, dim=1).indices
    weights = torch.rand(11, 2, dtype=torch.float64)
    results = {}
    for implementation in ("eager", "moe_blocks"):
        module.config._experts_implementation = implementation
        module.zero_grad(set_to_none=True)
        x_leaf, weights_leaf = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = module(x_leaf, top_k_index, weights_leaf)
        out.square().sum().backward()
        results[implementation] = [out, x_leaf.grad, weights_leaf.grad] + [
            p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()
        ]
    for ours, eager in zip(results["moe_blocks"], results["eager"], strict=True):
        # float64, but MuseSpark's norm computes in fp32 inside
        torch.testing.assert_close(ours, eager, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Errors


def _module(**overrides):
    flags = dict.fromkeys(FLAG_NAMES, False) | {"has_gate": True, "is_concatenated": True}
    config = types.SimpleNamespace(_experts_implementation=backend.register())
    return experts_class(flags | overrides, own_gate=False)(config, 4, 8, 6, torch.float32)


def _call(module, tokens=3, features=8, top_k=2, ids=None):
    ids = torch.randint(0, 4, (tokens, top_k)) if ids is None else ids
    return module(torch.randn(tokens, features), ids, torch.rand(ids.shape))


def test_module_without_layout_flags_is_rejected():
    class Plain(nn.Module):
        gate_up_proj = torch.zeros(2, 4, 3)

    with pytest.raises(ValueError, match="Plain has no has_gate, has_bias, is_transposed"):
        backend.experts_forward(Plain(), torch.randn(2, 3), torch.zeros(2, 1), torch.ones(2, 1))


def test_missing_weight_names_the_flag():
    module = _module()
    module.has_gate = False  # then the up projection is up_proj, which this module lacks
    with pytest.raises(ValueError, match=r"Experts.up_proj must be a 3-D .*has_gate=False"):
        _call(module)


def test_quantized_weights_are_rejected():
    module = _module()
    module.gate_up_proj = nn.Parameter(torch.zeros(4, 12, 8, dtype=torch.int8), False)
    with pytest.raises(TypeError, match=r"Experts.gate_up_proj has dtype torch.int8"):
        _call(module)


def test_missing_bias_names_the_flag():
    module = _module(has_bias=True)
    del module.down_proj_bias
    with pytest.raises(ValueError, match=r"has_bias=True.*down_proj_bias"):
        _call(module)


def test_missing_post_expert_norm_names_the_flag():
    module = _module()
    module.has_post_expert_norm = True
    with pytest.raises(ValueError, match="has_post_expert_norm=True but no post_expert_norm"):
        _call(module)


def test_weights_that_do_not_match_the_transposed_flag_are_rejected():
    module = _module()
    module.is_transposed = True  # the weights are [E, out, in]: the flag is wrong
    with pytest.raises(ValueError, match=r"is_transposed=True"):
        _call(module)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"features": 7}, ValueError, r"hidden_states must be \[T, 8\]"),
        ({"ids": torch.zeros(3, 2)}, TypeError, "top_k_index must be an integer tensor"),
        ({"ids": torch.zeros(4, 2, dtype=torch.long)}, ValueError, "top_k_index must be"),
        (
            {"ids": torch.full((3, 2), -1)},
            ValueError,
            r"Experts: top_k_index holds a negative expert id \(-1\)",
        ),  # fmt: skip
    ],
)
def test_bad_routing_inputs_are_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        _call(_module(), **kwargs)


# --------------------------------------------------------------------------------------------
# JetMoe


def tiny_jetmoe(seed: int):
    from transformers import JetMoeForCausalLM

    config = JetMoeConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, num_local_experts=4,
        num_experts_per_tok=2, kv_channels=8, num_key_value_heads=2, intermediate_size=24,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = JetMoeForCausalLM(config).eval()
    with torch.no_grad():  # the experts' shared output biases start at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=0.3)
    return model


@pytest.mark.parametrize("router_logits", [False, True], ids=["plain", "with_aux_loss"])
def test_patch_jetmoe_gives_the_same_logits_and_gradients(router_logits):
    """Logits and every gradient as unpatched; with ``output_router_logits`` (how JetMoe trains:
    transformers records the router modules' outputs for its aux loss) also the same loss,
    aux loss and router logits."""
    model = tiny_jetmoe(seed=3)
    patched = backend.patch_jetmoe(copy.deepcopy(model))
    assert backend.patch_jetmoe(patched) is patched  # patching twice is harmless
    input_ids = torch.randint(0, 101, (2, 11))
    probe = torch.randn(2, 11, 101)
    results = []
    for candidate in (model, patched):
        if router_logits:
            out = candidate(input_ids, labels=input_ids, output_router_logits=True)
            (out.loss + (out.logits * probe).sum()).backward()
            extra = (out.loss, out.aux_loss, *out.router_logits)
        else:
            out = candidate(input_ids)
            (out.logits * probe).sum().backward()
            extra = ()
        grads = {n: p.grad for n, p in candidate.named_parameters()}
        results.append(((out.logits, *extra), grads))
    (expected, expected_grads), (logits, grads) = results
    assert len(logits) == len(expected)
    for ours, theirs in zip(logits, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for name, expected_grad in expected_grads.items():
        torch.testing.assert_close(grads[name], expected_grad, atol=1e-5, rtol=1e-4, msg=name)


def test_patch_jetmoe_runs_on_our_kernel(monkeypatch):
    calls = []

    def counted(name):  # the calls that computed something (routed_mlp may decline: None)
        original = getattr(backend, name)

        def call(*args, **kwargs):
            result = original(*args, **kwargs)
            calls.extend([name] if result is not None else [])
            return result

        return call

    for name in ("expert_linear", "routed_mlp"):
        monkeypatch.setattr(backend, name, counted(name))
    model = backend.patch_jetmoe(tiny_jetmoe(seed=4))
    ids = torch.randint(0, 101, (1, 6))
    model(ids)  # training: per layer MoA map and reduce, MoE up and down
    assert calls == ["expert_linear"] * 4 * 2
    calls.clear()
    with torch.no_grad():  # inference: the MoE in one pass
        model.eval()(ids)
    assert calls == ["expert_linear", "expert_linear", "routed_mlp"] * 2


def test_patch_jetmoe_rejects_other_models():
    with pytest.raises(ValueError, match="no JetMoeMoE or JetMoeMoA"):
        backend.patch_jetmoe(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        backend.patch_jetmoe("jetmoe")


# --------------------------------------------------------------------------------------------
# The hf benchmark suite (moe-blocks bench --suite hf)


@pytest.mark.parametrize("shape", ["fine-grained", "qwen3-moe-model"])
def test_hf_bench_implementations_compute_the_same_function(shape):
    from moe_blocks.models import bench

    case = bench.Case("hf", shape, 6, "fp32", "cpu", bench.hf_shapes("cpu", tiny=True)[shape])
    expected, x = bench.build(case, "eager")
    with torch.no_grad():
        eager = expected(x)
        for impl in ("grouped_mm", "batched_mm", "moe_blocks"):
            assert bench.applies(case, impl)
            module, same_x = bench.build(case, impl)
            assert torch.equal(same_x, x)
            torch.testing.assert_close(module(x), eager, atol=1e-5, rtol=1e-5)


def test_hf_bench_skips_batched_mm_when_its_weight_copies_are_too_large():
    from moe_blocks.models import bench

    dims = bench.shapes_for("cpu")["fine-grained"]
    assert not bench.applies(
        bench.Case("hf", "fine-grained", 2048, "fp32", "cpu", dims), "batched_mm"
    )
    assert bench.applies(bench.Case("hf", "fine-grained", 8, "fp32", "cpu", dims), "batched_mm")


def test_bench_command_runs_the_hf_suite(tmp_path, capsys):
    import json

    from moe_blocks.models.cli import main

    out = tmp_path / "bench"
    args = ["bench", "--tiny", "--suite", "hf", "--shapes", "fine-grained", "--tokens", "4",
            "--dtypes", "fp32", "--passes", "fwd", "--repeats", "2", "--budget", "0.01",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "x grouped" in table
    rows = json.loads((out / "bench_hf.json").read_text())
    assert [r["impl"] for r in rows] == ["eager", "grouped_mm", "batched_mm", "moe_blocks"]
    for row in rows:
        assert row["vs_transformers"] > 0 and row["vs_grouped_mm"] > 0


@given(
    flags=st.fixed_dictionaries({name: st.booleans() for name in FLAG_NAMES}),
    own_gate=st.booleans(),
    num_experts=st.integers(1, 6),
    data=st.data(),
    features=st.integers(1, 12),
    hidden=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
    fused=st.booleans(),
)
def test_inference_takes_the_one_pass_path_with_the_kernel_calls_result(
    flags, own_gate, num_experts, data, features, hidden, seed, fused
):
    """Inference (no autograd, CPU): modules without biases or a post-expert norm run the
    torch backend's one pass over the experts; its output is the two kernel calls' (computed
    with autograd on, which takes them), to the bit but where each run is activated apart
    (``fused``, forced with a FUSE_BYTES of 0: the activation's last bit may differ), and the
    float64 oracle's."""
    torch.manual_seed(seed)
    own_gate = own_gate and flags["has_gate"]
    config = types.SimpleNamespace(_experts_implementation=backend.register())
    module = experts_class(flags, own_gate)(config, num_experts, features, hidden, torch.float32)
    top_k = data.draw(st.integers(1, num_experts))
    tokens = data.draw(st.integers(1, 6))
    top_k_index = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    x, weights = torch.randn(tokens, features), torch.rand(tokens, top_k)
    with (
        torch.no_grad(),
        watched_inference_paths(fused=fused) as (path, one_token),
    ):
        out = module(x, top_k_index, weights)
    fast = not flags["has_bias"] and not flags["has_post_expert_norm"]
    one = tokens == 1  # a decode step of one token: the calls, each one token's product
    assert path.call_count == int(fast and not one)
    assert one_token.call_count == (2 if one else 0)
    general = module(x.clone().requires_grad_(), top_k_index, weights)
    torch.testing.assert_close(out, general.detach(), atol=2e-6, rtol=2e-6)
    if one or not fused:
        assert torch.equal(out, general.detach())
    expected = oracle(module, flags, own_gate, x, top_k_index, weights)
    assert relative_error(out.double(), expected.detach()) < TOLERANCE[torch.float32]
