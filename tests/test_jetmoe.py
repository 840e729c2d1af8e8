"""JetMoE assembled from the blocks, against transformers' JetMoeForCausalLM (the oracle):
checkpoints both ways, logits (fp32 and bf16, with and without padding), greedy generation,
cached decoding, parameter counts, training features, bad checkpoints and input. The logits
tests run our model on ``DEVICE`` (on a GPU: the Triton kernels) against transformers on
CPU."""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from moe_blocks import KVCache
from moe_blocks.models.jetmoe import JetMoEConfig, JetMoEForCausalLM
from moe_blocks.moe_mlp import ACTIVATIONS
from moe_blocks.router import named_routers, tokens_per_expert

from .conftest import DEVICE
from .helpers import script_module, zero_safetensors_in_place

transformers = pytest.importorskip("transformers")


@st.composite
def tiny_configs(draw):
    experts = draw(st.integers(1, 5))
    return dict(
        vocab_size=draw(st.integers(8, 120)),
        hidden_size=draw(st.sampled_from([16, 24, 32, 48])),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_local_experts=experts,
        num_experts_per_tok=draw(st.integers(1, experts)),
        num_key_value_heads=draw(st.integers(1, 3)),
        kv_channels=draw(st.sampled_from([4, 8, 16])),
        intermediate_size=draw(st.integers(4, 64)),
        tie_word_embeddings=draw(st.booleans()),
        rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        initializer_range=0.1,
    )


def hf_model(config_kwargs, seed=0):
    torch.manual_seed(seed)
    config = transformers.JetMoeConfig(**config_kwargs)
    return transformers.JetMoeForCausalLM(config).eval()


def assert_logits_close(ours, theirs, rtol):
    scale = theirs.abs().max().clamp_min(1e-6)
    assert ((ours.float() - theirs.float()).abs().max() / scale).item() <= rtol


@settings(max_examples=12)
@given(tiny_configs(), st.integers(0, 2**31 - 1))
def test_transformers_checkpoint_loads_with_the_same_logits(tmp_path_factory, config_kwargs, seed):
    reference = hf_model(config_kwargs, seed)
    directory = tmp_path_factory.mktemp("hf")
    reference.save_pretrained(directory)
    ours = JetMoEForCausalLM.from_pretrained(directory).eval().to(DEVICE)  # CUDA: Triton
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config_kwargs["vocab_size"], (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first row
    with torch.no_grad():
        assert_logits_close(ours(ids.to(DEVICE)).logits.cpu(), reference(ids).logits, 1e-4)
        ours_masked = ours(ids.to(DEVICE), attention_mask=mask.to(DEVICE)).logits.cpu()
        theirs_masked = reference(ids, attention_mask=mask).logits
    # every position, the padding ones too (their attention output is zero in both)
    assert_logits_close(ours_masked, theirs_masked, 1e-4)


@settings(max_examples=8)
@given(tiny_configs(), st.integers(0, 2**31 - 1))
def test_our_checkpoint_loads_in_transformers_with_the_same_logits(
    tmp_path_factory, config_kwargs, seed
):
    torch.manual_seed(seed)
    config = JetMoEConfig(**config_kwargs)
    ours = JetMoEForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("ours")
    ours.save_pretrained(directory)
    reference = transformers.JetMoeForCausalLM.from_pretrained(directory).eval()
    ids = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        assert_logits_close(ours(ids).logits, reference(ids).logits, 1e-4)


def test_a_loaded_model_owns_its_weights(tmp_path):
    """safetensors maps the checkpoint file: weights left as views of it would change when the
    file is rewritten in place (and a fp32 decode step took 1.66x the time, docs/benchmarks.md).
    The loaded model keeps its weights, in the stored dtype and converted."""
    kwargs = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_local_experts=3,
                  num_experts_per_tok=2, num_key_value_heads=2, kv_channels=8,
                  intermediate_size=32)  # fmt: skip
    hf_model(kwargs).save_pretrained(tmp_path)
    models = [JetMoEForCausalLM.from_pretrained(tmp_path, dtype=dtype)
              for dtype in (None, torch.float32, torch.bfloat16)]  # fmt: skip
    before = [{k: v.clone() for k, v in model.state_dict().items()} for model in models]
    zero_safetensors_in_place(tmp_path / "model.safetensors")
    assert JetMoEForCausalLM.from_pretrained(tmp_path).model.embed_tokens.weight.abs().max() == 0
    for model, weights in zip(models, before, strict=True):
        for name, value in model.state_dict().items():
            assert torch.equal(value, weights[name]), name


def test_loaded_model_is_in_eval_mode_as_transformers_returns_it(tmp_path):
    """With attention dropout, a model left in training mode gives other logits each call."""
    kwargs = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_local_experts=3,
                  num_experts_per_tok=2, num_key_value_heads=2, kv_channels=8,
                  intermediate_size=32, initializer_range=0.2, attention_dropout=0.5)  # fmt: skip
    hf_model(kwargs).save_pretrained(tmp_path)
    ours = JetMoEForCausalLM.from_pretrained(tmp_path)
    theirs = transformers.JetMoeForCausalLM.from_pretrained(tmp_path)
    assert not ours.training and not theirs.training
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_logits_close(ours(ids).logits, theirs(ids).logits, 1e-4)


def test_bf16_logits_as_close_to_fp32_as_transformers_bf16(tmp_path):
    """bf16 rounding (and the odd routing flip it causes) moves logits; ours must stay as close
    to the fp32 logits as transformers' own bf16 run does."""
    kwargs = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_local_experts=4,
                  num_experts_per_tok=2, num_key_value_heads=2, kv_channels=16,
                  intermediate_size=64, initializer_range=0.05)  # fmt: skip
    reference = hf_model(kwargs)
    reference.save_pretrained(tmp_path)
    ours = JetMoEForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval().to(DEVICE)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = reference(ids).logits
        theirs = reference.to(torch.bfloat16)(ids).logits.float()
        ours_logits = ours(ids.to(DEVICE)).logits.cpu()
    assert ours_logits.dtype == torch.bfloat16
    ours_error = (ours_logits.float() - exact).abs().mean()
    their_error = (theirs - exact).abs().mean()
    assert ours_error <= 1.5 * their_error + 1e-3
    assert ours_error / exact.abs().mean() < 0.02


def test_greedy_generation_matches_transformers(tmp_path):
    reference, ours = _generation_pair(tmp_path)
    prompt = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(2))
    expected = reference.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(ours.generate(prompt, max_new_tokens=12, eos_token_id=None), expected)


def test_the_generate_benchmark_compares_the_same_greedy_tokens(tmp_path):
    """benches/generate_speed.py (docs/benchmarks.md's decode table): both models load the
    same checkpoint and, in fp32, generate the same tokens; the JSON holds the printed rows."""
    module = script_module("benches/generate_speed.py")
    options = "--tiny --layers 2 --dtypes fp32 --repeats 1 --new-tokens 3 --device cpu".split()
    rows = module.main([*options, "--out", str(tmp_path)])
    assert [row["shape"] for row in rows] == ["jetmoe-8b", "fine-grained"]
    assert all(row["same_tokens"] for row in rows)
    assert all(min(row["ms_per_token"].values()) > 0 for row in rows)
    assert json.loads((tmp_path / "generate_speed.json").read_text())["rows"] == rows


def test_the_generate_benchmark_compiles_our_forward_and_keeps_its_tokens(tmp_path, capsys):
    """``--compile`` times our model with its forward compiled: in fp32 it generates eager's
    tokens, the first call's time is reported as the compile time and the table shows the
    columns."""
    module = script_module("benches/generate_speed.py")
    options = "--tiny --layers 1 --shapes fine-grained --dtypes fp32 --repeats 1 --new-tokens 3"
    (row,) = module.main([*options.split(), "--device", "cpu", "--compile"])
    assert row["compiled_same_tokens"] and row["same_tokens"]
    assert row["compile_s"] > 0 and row["ms_per_token"]["moe_blocks compiled"] > 0
    assert "| ours compiled (ms) | compile (s) |" in capsys.readouterr().out


def _eos_pair(tmp_path, **overrides):
    """A model (vocab 16) whose greedy continuations of ``prompt`` end with the config's
    eos_token_id 2 within 10 tokens, one row two tokens before the other."""
    kwargs = dict(vocab_size=16, hidden_size=64, num_hidden_layers=2, num_local_experts=4,
                  num_experts_per_tok=2, num_key_value_heads=2, kv_channels=16,
                  intermediate_size=96, initializer_range=0.2, **overrides)  # fmt: skip
    reference = hf_model(kwargs, seed=9)
    reference.save_pretrained(tmp_path)
    prompt = torch.randint(3, 16, (2, 5), generator=torch.Generator().manual_seed(9))
    return reference, JetMoEForCausalLM.from_pretrained(tmp_path).eval(), prompt


@pytest.mark.parametrize("pad_token_id", [None, 0])
def test_generation_ends_at_the_config_eos_as_transformers_does(tmp_path, pad_token_id):
    """Called plainly, both take eos_token_id from the config; a row that ended is padded with
    config.pad_token_id (the eos token when None) and generation stops once every row ended."""
    reference, ours, prompt = _eos_pair(tmp_path, pad_token_id=pad_token_id)
    expected = reference.generate(prompt, max_new_tokens=10, do_sample=False)
    assert expected.shape[1] < 15 and bool((expected == 2).any(dim=1).all())
    pad = 2 if pad_token_id is None else pad_token_id
    assert expected[1, -3:].tolist() == [2, pad, pad]  # the second row ended first
    assert torch.equal(ours.generate(prompt, 10), expected)


def test_several_eos_tokens_as_transformers_does(tmp_path):
    reference, ours, prompt = _eos_pair(tmp_path)
    expected = reference.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=[7, 1])
    assert expected.shape[1] < 15
    for eos in ([7, 1], (7, 1), torch.tensor([7, 1])):
        assert torch.equal(ours.generate(prompt, 10, eos_token_id=eos), expected)
    free = reference.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert torch.equal(ours.generate(prompt, 10, eos_token_id=None), free)
    assert free.shape[1] == 15


def test_pad_token_id_argument_as_transformers_does(tmp_path):
    """``generate(..., pad_token_id=p)`` pads the rows that ended with p, as transformers'
    (the usual call passes it), overriding the config's."""
    reference, ours, prompt = _eos_pair(tmp_path)
    expected = reference.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=5)
    assert (expected == 5).any()
    assert torch.equal(ours.generate(prompt, 10, pad_token_id=5), expected)
    with pytest.raises(ValueError, match="pad_token_id"):
        ours.generate(prompt, 10, pad_token_id=[5, 6])


def _generation_pair(tmp_path):
    """transformers' JetMoeForCausalLM and ours loaded from its checkpoint: a tiny model."""
    kwargs = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_local_experts=3,
                  num_experts_per_tok=2, num_key_value_heads=2, kv_channels=8,
                  intermediate_size=24, initializer_range=0.2)  # fmt: skip
    reference = hf_model(kwargs)
    reference.save_pretrained(tmp_path)
    return reference, JetMoEForCausalLM.from_pretrained(tmp_path).eval()


def test_eos_ends_each_sequence_as_transformers_does(tmp_path):
    """A row that emits eos_token_id is padded with it; generation stops once every row has.
    The eos token is one that greedy decoding emits in both rows of this batch."""
    reference, ours = _generation_pair(tmp_path)
    prompt = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(2))
    free = ours.generate(prompt, 8)
    eos = int(free[0, 7])
    assert (free[1, 5:] == eos).any() and not bool((free[:, 8:] == eos).all())
    expected = reference.generate(
        prompt, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=eos
    )
    assert expected.shape[1] < free.shape[1]  # both rows ended before the 8 new tokens
    assert torch.equal(ours.generate(prompt, 8, eos_token_id=eos), expected)


def test_batched_left_padded_generation_matches_transformers(tmp_path):
    reference, ours = _generation_pair(tmp_path)
    ids = torch.randint(1, 50, (3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    for row, pad in ((1, 2), (2, 4)):
        ids[row, :pad], mask[row, :pad] = 0, 0
    expected = reference.generate(
        ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
        eos_token_id=None,
    )  # fmt: skip
    assert torch.equal(ours.generate(ids, 8, attention_mask=mask), expected)


def test_cached_decoding_matches_the_full_forward():
    torch.manual_seed(0)
    model = JetMoEForCausalLM(JetMoEConfig.from_preset("tiny", num_hidden_layers=2)).eval()
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        caches = [KVCache() for _ in range(2)]
        pieces = [model(ids[:, :4], kv_caches=caches).logits]
        for t in range(4, 10):
            pieces.append(model(ids[:, t : t + 1], kv_caches=caches).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)


def test_the_model_computes_the_rope_tables_once_per_forward_for_all_layers(monkeypatch):
    """The model computes the RoPE tables once per forward (also per decode step) from the
    positions, given or counted from the caches, and every layer's MoA takes them: the logits
    are those of each MoA computing its own tables from those positions."""
    from moe_blocks import MoA

    torch.manual_seed(0)
    model = JetMoEForCausalLM(JetMoEConfig.from_preset("tiny", num_hidden_layers=3)).eval()
    ids, positions = torch.randint(0, 256, (2, 6)), torch.randint(0, 64, (2, 6))
    calls, real_tables, real_forward = [], MoA.rotary_tables, MoA.forward

    def counted(self, position_ids):
        calls.append(position_ids)
        return real_tables(self, position_ids)

    def own_tables(self, x, **kwargs):  # what each MoA computed before the model did it once
        kwargs.update(position_embeddings=None, position_ids=calls[-1])
        return real_forward(self, x, **kwargs)

    def five_forwards():
        calls.clear()
        caches = [KVCache() for _ in range(3)]
        with torch.no_grad():
            return [
                model(ids, position_ids=positions).logits,
                model(ids).logits,
                model(ids[:, :1], kv_caches=caches).logits,
                model(ids[:, 1:5], kv_caches=caches).logits,  # the caches hold one token
                model(ids[:, 5:], kv_caches=caches).logits,  # a decode step of one
            ]

    monkeypatch.setattr(MoA, "rotary_tables", counted)
    shared = five_forwards()
    expected_positions = [positions, torch.arange(6), torch.arange(1), torch.arange(1, 5)]
    expected_positions.append(torch.arange(5, 6))
    assert len(calls) == len(expected_positions)
    for got, want in zip(calls, expected_positions, strict=True):
        assert torch.equal(got, want)
    monkeypatch.setattr(MoA, "forward", own_tables)
    for ours, each_layer in zip(shared, five_forwards(), strict=True):
        assert torch.equal(ours, each_layer)


def test_bad_kv_caches_and_positions_are_refused_naming_the_argument():
    model = JetMoEForCausalLM(JetMoEConfig.from_preset("tiny", num_hidden_layers=2)).eval()
    ids = torch.randint(0, 256, (1, 3))
    filled = [KVCache(), KVCache()]
    model(ids, kv_caches=filled)
    with pytest.raises(ValueError, match="kv_caches"):
        model(ids, kv_caches=[filled[0], KVCache()])  # 3 tokens cached against none
    with pytest.raises(ValueError, match="kv_caches"):
        model(ids, kv_caches=[None, None])
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(3, device="meta"))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(4))


def test_generating_without_a_mask_is_generating_with_an_all_ones_mask():
    """Without a mask (and no pad token to infer one from) every token is real: generate then
    gives the layers no mask at all, which must change nothing against a mask of ones: the
    tokens, greedy and sampled, and what the routers counted."""
    model = JetMoEForCausalLM(JetMoEConfig.from_preset("tiny", num_hidden_layers=2))
    model.init_weights()
    model.eval()
    prompt = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    for sample in (False, True):
        runs = []
        for mask in (None, torch.ones_like(prompt)):
            generator = torch.Generator().manual_seed(4)
            tokens = model.generate(prompt, 6, do_sample=sample, attention_mask=mask,
                                    eos_token_id=None, generator=generator)  # fmt: skip
            runs.append((tokens, tokens_per_expert(model)))
        assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_sampling_is_seeded_and_respects_top_k():
    torch.manual_seed(0)
    model = JetMoEForCausalLM(JetMoEConfig.from_preset("tiny", num_hidden_layers=1)).eval()
    prompt = torch.randint(0, 256, (2, 3))
    runs = [
        model.generate(prompt, 6, do_sample=True, top_k=1,
                       generator=torch.Generator().manual_seed(seed))
        for seed in (0, 1)
    ]  # fmt: skip
    assert torch.equal(runs[0], runs[1])  # top_k=1 sampling is greedy
    assert torch.equal(runs[0], model.generate(prompt, 6))
    sampled = [
        model.generate(prompt, 6, do_sample=True, top_p=0.9,
                       generator=torch.Generator().manual_seed(seed))
        for seed in (7, 7, 8)
    ]  # fmt: skip
    assert torch.equal(sampled[0], sampled[1])  # the generator decides
    assert not torch.equal(sampled[0], sampled[2])


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.7])
def test_top_p_samples_only_from_the_nucleus(top_p):
    """Each sampled token lies in the smallest set of most probable tokens whose probability
    reaches top_p (probabilities from the full forward of the sequence, at temperature 0.7).
    top_p=1e-6 keeps only the most probable token: sampling is then greedy decoding."""
    torch.manual_seed(0)
    model = JetMoEForCausalLM(JetMoEConfig.from_preset("tiny", num_hidden_layers=1)).eval()
    prompt = torch.randint(0, 256, (2, 3))
    new_tokens, temperature = 6, 0.7
    for seed in range(4):
        sequence = model.generate(
            prompt, new_tokens, do_sample=True, top_p=top_p, temperature=temperature,
            generator=torch.Generator().manual_seed(seed), eos_token_id=None,
        )  # fmt: skip
        with torch.no_grad():
            logits = model(sequence).logits[:, 2:-1].double() / temperature
        probs = logits.softmax(-1)
        chosen = sequence[:, 3:]
        # mass of the tokens strictly more probable than the chosen one: below top_p in the
        # nucleus (a small margin for fp32 against float64 at the boundary)
        chosen_prob = probs.gather(-1, chosen[..., None])
        ahead = (probs * (probs > chosen_prob)).sum(-1)
        assert bool((ahead < top_p + 1e-5).all()), f"seed {seed}: sampled outside the nucleus"
        if top_p == 1e-6:
            assert torch.equal(sequence, model.generate(prompt, new_tokens, eos_token_id=None))


def test_published_size_on_meta():
    with torch.device("meta"):
        model = JetMoEForCausalLM(JetMoEConfig.from_preset("jetmoe-8b"))
    assert model.num_parameters() == 8_522_237_952
    assert model.num_parameters(active=True) == 2_331_445_248
    config = JetMoEConfig.from_preset("jetmoe-8b")
    assert (config.num_hidden_layers, config.hidden_size, config.num_local_experts) == (24, 2048, 8)
    assert (config.num_key_value_heads, config.kv_channels, config.intermediate_size) == (
        16,
        128,
        5632,
    )


def test_meta_build_then_materialise_initialises_like_jetmoe():
    config = JetMoEConfig.from_preset("tiny", hidden_size=256, intermediate_size=512)
    with torch.device("meta"):
        model = JetMoEForCausalLM(config)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    experts = model.model.layers[0].mlp.input_linear.weight
    assert experts.std().item() == pytest.approx(config.initializer_range, rel=0.05)
    assert bool((model.model.layers[0].input_layernorm.weight == 1).all())
    assert bool((model.model.layers[0].mlp.bias == 0).all())
    ids = torch.randint(0, 256, (1, 5))
    assert torch.isfinite(model(ids).logits).all()


def test_loss_is_shifted_cross_entropy_plus_router_losses():
    torch.manual_seed(0)
    model = JetMoEForCausalLM(JetMoEConfig.from_preset("tiny", num_hidden_layers=2))
    ids = torch.randint(0, 256, (2, 8))
    labels = ids.clone()
    labels[0, 5:] = -100
    out = model(ids, labels=labels)
    expected_lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, expected_lm)
    routers = list(named_routers(model).values())
    assert len(routers) == 4  # MoA and MoE in each of 2 layers
    per_router = [r.last_balance_loss + model.config.z_loss_coef * r.last_z_loss for r in routers]
    torch.testing.assert_close(out.aux_loss, model.config.aux_loss_coef * sum(per_router))
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)


def test_model_runs_under_autocast_as_close_to_fp32_as_transformers(tmp_path):
    """bf16 autocast moves the logits from the fp32 ones; ours no more than transformers' own
    autocast run of the same checkpoint does (a uniform 15 % error used to pass)."""
    reference, ours = _generation_pair(tmp_path)
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = reference(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = reference(ids).logits.float()
            ours_logits = ours(ids).logits
    assert ours_logits.dtype == torch.bfloat16
    ours_error = (ours_logits.float() - exact).abs().mean()
    their_error = (theirs - exact).abs().mean()
    assert ours_error <= 1.5 * their_error + 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours.train()(ids, labels=ids)
    out.loss.backward()
    assert ours.model.layers[0].mlp.input_linear.weight.grad.any()


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = JetMoEForCausalLM(
            JetMoEConfig.from_preset("tiny", num_hidden_layers=2), gradient_checkpointing=flag
        )
        ids = torch.randint(0, 256, (2, 8))
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for without, with_ in zip(*grads, strict=True):
        torch.testing.assert_close(with_, without)


@pytest.mark.slow
def test_a_layer_compiles_without_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = JetMoEForCausalLM(JetMoEConfig.from_preset("tiny", num_hidden_layers=1))
    layer = model.model.layers[0]
    x = torch.randn(2, 6, 128)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


def test_bf16_training_step_runs_and_learns():
    torch.manual_seed(0)
    model = JetMoEForCausalLM(
        JetMoEConfig.from_preset("tiny", num_hidden_layers=1), dtype=torch.bfloat16
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 256, (4, 16))
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_our_only_config_fields_survive_a_save(tmp_path):
    """layer_rms_norm_eps and z_loss_coef reach config.json and come back; transformers still
    loads the checkpoint (it ignores them), with the same logits at its per-layer eps."""
    config = JetMoEConfig.from_preset("tiny", num_hidden_layers=1, z_loss_coef=0.7)
    JetMoEForCausalLM(config).save_pretrained(tmp_path / "z")
    reloaded = JetMoEForCausalLM.from_pretrained(tmp_path / "z")
    assert reloaded.config == config
    reference = transformers.JetMoeForCausalLM.from_pretrained(tmp_path / "z").eval()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_logits_close(reloaded(ids).logits, reference(ids).logits, 1e-4)
    model = JetMoEForCausalLM(JetMoEConfig.from_preset("tiny", layer_rms_norm_eps=0.5)).eval()
    model.save_pretrained(tmp_path / "eps")
    reloaded = JetMoEForCausalLM.from_pretrained(tmp_path / "eps")
    assert reloaded.config.layer_rms_norm_eps == 0.5
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


HF_ACTIVATIONS = ["gelu", "gelu_python", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_new",
                  "gelu_fast", "gelu_accurate", "silu", "swish", "relu", "tanh"]  # fmt: skip


@pytest.mark.parametrize("name", HF_ACTIVATIONS)
def test_transformers_activation_names_load_as_the_same_function(tmp_path, name):
    """A checkpoint naming one of transformers' activations loads with the same logits (every
    weight random, biases and norms too, so the activation's whole range is used)."""
    from transformers.activations import ACT2FN

    x = torch.linspace(-8, 8, 2001)
    torch.testing.assert_close(ACTIVATIONS[name](x), ACT2FN[name](x))
    kwargs = dict(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_local_experts=3,
                  num_experts_per_tok=2, num_key_value_heads=2, kv_channels=8,
                  intermediate_size=24, activation_function=name)  # fmt: skip
    reference = hf_model(kwargs)
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0, 0.3)
    reference.save_pretrained(tmp_path)
    ours = JetMoEForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_logits_close(ours(ids).logits, reference(ids).logits, 1e-4)


def test_gelu_tanh_is_saved_under_its_transformers_name(tmp_path):
    config = JetMoEConfig.from_preset("tiny", num_hidden_layers=1, activation_function="gelu_tanh")
    model = JetMoEForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["activation_function"]
    assert saved == "gelu_pytorch_tanh"
    reference = transformers.JetMoeForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_logits_close(model(ids).logits, reference(ids).logits, 1e-4)
    with pytest.raises(ValueError, match="activation_function.*quick_gelu"):
        JetMoEConfig(activation_function="quick_gelu")


def _saved(tmp_path):
    torch.manual_seed(0)
    model = JetMoEForCausalLM(JetMoEConfig.from_preset("tiny", num_hidden_layers=1))
    model.save_pretrained(tmp_path)
    return model


def test_sharded_checkpoints_round_trip(tmp_path):
    model = _saved(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = JetMoEForCausalLM.from_pretrained(tmp_path / "sharded")
    ids = torch.randint(0, 256, (1, 6))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    reference = transformers.JetMoeForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    with torch.no_grad():
        assert_logits_close(model(ids).logits, reference(ids).logits, 1e-4)


def test_bad_checkpoints_name_the_file_and_key(tmp_path):
    _saved(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    with pytest.raises(FileNotFoundError, match="config.json"):
        JetMoEForCausalLM.from_pretrained(tmp_path / "nowhere")

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        JetMoEForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))

    key = "model.layers.0.mlp.input_linear.weight"
    save_file({**state, key: state[key][:, :-1].contiguous()}, str(weights))
    with pytest.raises(ValueError, match=r"model\.safetensors.*input_linear.*shape"):
        JetMoEForCausalLM.from_pretrained(tmp_path)

    save_file({k: v for k, v in state.items() if k != key}, str(weights))
    with pytest.raises(ValueError, match=r"model\.safetensors.*lack.*input_linear"):
        JetMoEForCausalLM.from_pretrained(tmp_path)

    save_file({**state, "model.layers.0.extra.weight": state[key].clone()}, str(weights))
    with pytest.raises(ValueError, match="extra"):
        JetMoEForCausalLM.from_pretrained(tmp_path)

    save_file({**state, "model.norm.weight": state["model.norm.weight"].long()}, str(weights))
    with pytest.raises(ValueError, match=r"model\.safetensors.*model\.norm\.weight.*int64"):
        JetMoEForCausalLM.from_pretrained(tmp_path)

    save_file(state, str(weights))
    whole = weights.read_bytes()
    for broken in (whole[: len(whole) // 2], b"not a safetensors file"):
        weights.write_bytes(broken)
        with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors"):
            JetMoEForCausalLM.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: not a JSON object"):
        JetMoEForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))

    weights.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors"):
        JetMoEForCausalLM.from_pretrained(tmp_path)


def test_an_index_key_missing_from_its_shard_is_named(tmp_path):
    model = _saved(tmp_path / "one")
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    key = "model.norm.weight"
    shard = tmp_path / index["weight_map"][key]
    save_file({k: v for k, v in load_file(str(shard)).items() if k != key}, str(shard))
    with pytest.raises(ValueError, match=rf"{shard.name}: lacks 'model\.norm\.weight'"):
        JetMoEForCausalLM.from_pretrained(tmp_path)


def test_generate_command_reports_a_broken_checkpoint_in_one_line(tmp_path, capsys):
    from moe_blocks.models.cli import main

    _saved(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    assert main(["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "2"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors: not a readable safetensors" in err


def test_bad_input_ids():
    model = JetMoEForCausalLM(JetMoEConfig.from_preset("tiny", num_hidden_layers=1))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="preset"):
        JetMoEConfig.from_preset("jetmoe-70b")
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.tensor([[1, 2]]), 3, do_sample=True, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.tensor([[1, 2]]), 3, do_sample=True, top_p=1.5)
    for eos, error in (([], ValueError), (256, ValueError), ([2, 2.0], TypeError),
                       (True, TypeError), (torch.tensor([[2]]), TypeError)):  # fmt: skip
        with pytest.raises(error, match="eos_token_id"):
            model.generate(torch.tensor([[1, 2]]), 3, eos_token_id=eos)
    for count, error in ((-1, ValueError), (3.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="max_new_tokens"):
            model.generate(torch.tensor([[1, 2]]), count)
    narrow = torch.tensor([[0, 255, 7]], dtype=torch.uint8)  # vocab 256 must not wrap to 0
    torch.testing.assert_close(model(narrow).logits, model(narrow.long()).logits)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        JetMoEConfig(num_local_experts=2, num_experts_per_tok=3)


def test_bad_labels_are_refused_naming_them_and_any_integer_dtype_scores_alike():
    torch.manual_seed(0)
    model = JetMoEForCausalLM(JetMoEConfig.from_preset("tiny", num_hidden_layers=1))
    ids = torch.randint(0, 256, (2, 6))
    for bad in (torch.full((2, 6), 256), torch.full((2, 6), -5)):
        with pytest.raises(ValueError, match="labels.*vocab_size"):
            model(ids, labels=bad)
    with pytest.raises(TypeError, match="labels"):
        model(ids, labels=ids.float())
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :-1])
    labels = ids.clone()
    labels[:, 3:] = -100
    expected = model(ids, labels=labels).lm_loss
    for dtype in (torch.int32, torch.int16):  # what input_ids accepts, labels too
        torch.testing.assert_close(model(ids.to(dtype), labels=labels.to(dtype)).lm_loss, expected)


@pytest.mark.parametrize(
    "field, value",
    [("rms_norm_eps", -1.0), ("rms_norm_eps", 0.0), ("layer_rms_norm_eps", float("nan")),
     ("rope_theta", 0.0), ("rope_theta", -5.0), ("initializer_range", -0.02),
     ("attention_dropout", 1.5), ("attention_dropout", -0.1), ("aux_loss_coef", float("inf")),
     ("z_loss_coef", -1.0), ("max_position_embeddings", 0)],
)  # fmt: skip
def test_a_config_out_of_range_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        JetMoEConfig.from_preset("tiny", **{field: value})


def test_a_config_json_without_a_field_reads_as_transformers_reads_it(tmp_path):
    """A field config.json leaves out takes transformers' default (its JetMoeConfig's), not
    ours (JetMoE-8B's): the same model as transformers builds from the file."""
    transformers = pytest.importorskip("transformers")
    full = JetMoEConfig.from_preset("tiny").to_hf_dict()
    shared = [name for name in full if hasattr(transformers.JetMoeConfig(), name)]
    for name in shared:
        if name in ("model_type", "architectures", "num_attention_heads", "rope_parameters"):
            continue
        data = {key: value for key, value in full.items() if key != name}
        theirs = getattr(transformers.JetMoeConfig(**data), name)
        assert getattr(JetMoEConfig.from_hf_dict(data), name) == theirs, name


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("kind", ["type", "rope_type"])
def test_a_scaled_rope_in_config_json_is_refused_not_ignored(key, kind):
    """transformers reads the older ``rope_scaling`` too; a scaled RoPE we do not compute must
    be an error, not a silently different model."""
    data = JetMoEConfig.from_preset("tiny").to_hf_dict()
    data[key] = {kind: "linear", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match=rf"config\.json: {key}.*linear"):
        JetMoEConfig.from_hf_dict(data)
    data[key] = {kind: "default", "rope_theta": 10000.0}
    JetMoEConfig.from_hf_dict(data)  # the default RoPE is ours


def test_byte_models_generate_exactly_the_bytes_asked_for(tmp_path, monkeypatch, capsys):
    """Bytes have no end token: the tiny preset names none, and ``moe-blocks generate`` writes
    ``--max-new-tokens`` bytes even from a checkpoint whose config names byte 2 as its end
    token (runs trained before the preset said so), here with a model that always picks it."""
    from moe_blocks.models.cli import main

    assert JetMoEConfig.from_preset("tiny").eos_token_id is None
    config = JetMoEConfig.from_preset("tiny", num_hidden_layers=1, eos_token_id=2)
    JetMoEForCausalLM(config).save_pretrained(tmp_path)
    forward = JetMoEForCausalLM.forward

    def always_byte_2(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits[..., 2] = 1e4
        return out

    monkeypatch.setattr(JetMoEForCausalLM, "forward", always_byte_2)
    args = ["generate", "--checkpoint", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "9",
            "--temperature", "0"]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out == "ab" + "\x02" * 9 + "\n"


def test_flops_per_token_do_not_count_the_embedding_lookup():
    """An untied model has one matrix more than a tied one, but it is the embedding's, a
    lookup: both do the same matmul work per token (the old count of `info` gave the untied
    one 2·vocab·d more). A negative context is refused by name."""
    tied = JetMoEConfig.from_preset("tiny")
    untied = JetMoEConfig.from_preset("tiny", tie_word_embeddings=False)
    with torch.device("meta"):
        models = [JetMoEForCausalLM(config) for config in (tied, untied)]
    embedding = tied.vocab_size * tied.hidden_size
    assert models[1].num_parameters() == models[0].num_parameters() + embedding
    for context in (0, 100):
        assert models[0].flops_per_token(context) == models[1].flops_per_token(context)
    with pytest.raises(ValueError, match="context"):
        models[0].flops_per_token(-1)
