"""`moe-blocks train --lora-rank`: PEFT's LoRA on attention and on the experts' [E, out, in]
weights, through moe-blocks' kernel; only the adapters train; the merged export loads in
transformers with the same logits, the adapters export in PEFT on transformers' JetMoe; the
gradients equal those of the explicit W + scale · B·A model."""

import copy
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from moe_blocks import experts
from moe_blocks.models.cli import main
from moe_blocks.models.jetmoe import JetMoEConfig, JetMoEForCausalLM
from moe_blocks.models.train import TrainSettings, run_folder
from moe_blocks.models.train.lora import ADAPTED, attach_lora, lora_config
from tests.conftest import VOCAB

from .helpers import script_module

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
FAST = ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-every", "3",
        "--warmup-steps", "1", "--checkpoint-every", "3", "--lr", "1e-2", "--quiet"]  # fmt: skip
TARGETS = ["attention", "experts", "attention,experts"]


def adapted_weights(model, rank: int, scale: float, factors: dict | None = None) -> dict:
    """The explicit weights of a LoRA-adapted model: every adapted W + scale · B_e·A_e, from
    PEFT's factors (A ``[E·r, in]``, rows e·r + i; B ``[out, r·E]``, columns i·E + e; an
    ``nn.Linear``'s A ``[r, in]``, B ``[out, r]``): the model's, or ``factors`` by parameter
    name; in the plain model's names."""
    factors = factors if factors is not None else dict(model.named_parameters())
    weights = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a = factors[f"{name}.lora_A.default.weight"]
        b = factors[f"{name}.lora_B.default.weight"]
        base = module.get_base_layer().weight
        if base.dim() == 2:
            delta = b @ a
        else:
            experts = base.shape[0]
            delta = b.reshape(b.shape[0], rank, experts).permute(2, 0, 1) @ a.reshape(
                experts, rank, -1
            )
        weights[f"{name}.weight"] = base + scale * delta
    return weights


def tiny_model(seed: int) -> JetMoEForCausalLM:
    torch.manual_seed(seed)
    config = JetMoEConfig.from_preset(
        "tiny", hidden_size=32, intermediate_size=24, kv_channels=8, num_hidden_layers=2
    )
    return JetMoEForCausalLM(config).double()


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_equal_the_explicit_w_plus_ba_model(targets, checkpointing, monkeypatch):
    """Loss and every adapter gradient (float64), against the plain model run with the
    explicit weights W + scale · B·A, differentiated through that product; the adapted experts
    run through moe-blocks' kernel (``expert_linear``), reading the adapted weights."""
    read = []
    kernel = experts.expert_linear
    monkeypatch.setattr(experts, "expert_linear", lambda x, weight, *a, **k: read.append(
        not isinstance(weight, torch.nn.Parameter)) or kernel(x, weight, *a, **k))  # fmt: skip
    for seed in range(3):
        model = tiny_model(seed)
        plain = copy.deepcopy(model)
        rank = 1 + seed
        settings = TrainSettings(resume_from="x", lora_rank=rank, lora_targets=targets,
                                 lora_alpha=3.0 * (seed + 1))  # fmt: skip
        attach_lora(model, lora_config(settings))
        model.gradient_checkpointing = checkpointing
        model.train()
        adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
        assert (
            len(adapters)
            == 2
            * sum(len(ADAPTED[t][1]) + len(ADAPTED[t][0]) for t in targets.split(","))
            * model.config.num_hidden_layers
        )
        with torch.no_grad():
            for param in adapters.values():
                param.normal_(0.0, 0.3)  # B too: the adapters change the model
        ids = torch.randint(0, model.config.vocab_size, (3, 11))
        read.clear()
        output = model(ids, labels=ids)
        # the kernel's products read W + scale · B·A (a tensor built each forward) for the
        # adapted experts, their Parameter for the others
        assert any(read) and all(read) == (targets == "attention,experts")
        output.loss.backward()
        scale = settings.lora_scale_alpha / rank
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in adapters.items()}
        explicit = adapted_weights(model, rank, scale, leaves)  # differentiable in the leaves
        plain.train()
        expected = torch.func.functional_call(plain, explicit, (ids,), {"labels": ids})
        expected.loss.backward()
        torch.testing.assert_close(output.loss, expected.loss, rtol=1e-12, atol=1e-12)
        for name, param in adapters.items():
            torch.testing.assert_close(param.grad, leaves[name].grad, rtol=1e-9, atol=1e-12)
        assert all(p.grad is None for n, p in model.named_parameters() if n not in adapters)


def test_one_token_decode_sees_the_adapters():
    """The single-token fast path of the experts must not read the base weight around the
    adapters: a decode step equals the explicit merged model's."""
    model = tiny_model(7)
    plain = copy.deepcopy(model).eval()
    settings = TrainSettings(resume_from="x", lora_rank=2)
    attach_lora(model, lora_config(settings))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.3)
    model.eval()
    explicit = adapted_weights(model, 2, settings.lora_scale_alpha / 2)
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.inference_mode():
        for length in (1, 5):
            got = model(prompt[:, :length]).logits
            want = torch.func.functional_call(plain, explicit, (prompt[:, :length],)).logits
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        generated = model.generate(prompt, max_new_tokens=4)
        plain.load_state_dict(explicit, strict=False)
        assert torch.equal(generated, plain.generate(prompt, max_new_tokens=4))


def run(tmp_path, hf_checkpoint, corpus, *extra, name="run"):
    out = tmp_path / name
    arguments = ["train", "--resume-from", str(hf_checkpoint), "--data", str(corpus),
                 "--out", str(out), "--lora-rank", "4", *FAST, *extra]  # fmt: skip
    assert main(arguments) == 0
    return out


def test_lora_run_trains_only_adapters_and_its_merged_export_matches_in_transformers(
    tmp_path, corpus, hf_checkpoint, capsys
):
    out = run(tmp_path, hf_checkpoint, corpus)
    printed = capsys.readouterr().out
    assert "lora:   rank 4, alpha 8, on attention and experts" in printed
    checkpoint = out / "checkpoint"
    assert not (checkpoint / "config.json").exists()  # adapters, not a copy of the base
    adapters = load_file(str(checkpoint / "adapter_model.safetensors"))
    optimizer = load_file(str(checkpoint / "optimizer.safetensors"))
    assert optimizer and all(".lora_A." in k or ".lora_B." in k for k in optimizer)
    assert len(optimizer) == 3 * len(adapters)  # step, exp_avg, exp_avg_sq of each adapter
    assert (out / "model" / "tokenizer.json").is_file()
    assert json.loads((out / "model" / "export.json").read_text()) == {"step": 6}
    base = JetMoEForCausalLM.from_pretrained(hf_checkpoint)
    merged = JetMoEForCausalLM.from_pretrained(out / "model")
    assert merged.config.vocab_size == VOCAB
    # only the adapted weights moved, each by scale · B·A of the saved adapters
    config = lora_config(TrainSettings(resume_from="x", lora_rank=4))
    lora_base = copy.deepcopy(base)
    attach_lora(lora_base, config)
    from moe_blocks.models.train.lora import load_adapters

    load_adapters(lora_base, checkpoint)
    explicit = adapted_weights(lora_base, 4, 2.0)
    base_state, merged_state = base.state_dict(), merged.state_dict()
    assert explicit.keys() < base_state.keys()
    for key, value in merged_state.items():
        if key in explicit:
            torch.testing.assert_close(value, explicit[key], rtol=1e-5, atol=1e-6)
            assert not torch.equal(value, base_state[key])
        else:
            assert torch.equal(value, base_state[key]), key
    # transformers reads the merged export: the same logits as the adapted model here
    hf = transformers.JetMoeForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ours = lora_base.eval()(ids).logits
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours, base.eval()(ids).logits, atol=1e-3)


def test_the_adapters_export_loads_with_peft_on_transformers_jetmoe(
    tmp_path, corpus, hf_checkpoint, capsys
):
    from peft import PeftModel

    out = run(tmp_path, hf_checkpoint, corpus, "--lora-export", "adapters",
              "--lora-targets", "experts", "--lora-alpha", "6")  # fmt: skip
    exported = out / "model"
    assert not (exported / "config.json").exists()
    saved = json.loads((exported / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 6
    assert saved["base_model_name_or_path"] == str(hf_checkpoint)
    base = transformers.JetMoeForCausalLM.from_pretrained(hf_checkpoint).eval()
    with torch.no_grad():
        ids = torch.randint(0, VOCAB, (2, 24))
        before = base(ids).logits
        hf = PeftModel.from_pretrained(base, exported).eval()
        ours = run_folder.load_model(run_folder.checkpoint_folder(out), "x").eval()
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(before, ours(ids).logits, atol=1e-3)
    capsys.readouterr()  # generate reads the adapters export with its base and tokenizer
    prompt = "def function_3("
    code = main(["generate", "--checkpoint", str(out), "--prompt", prompt,
                 "--max-new-tokens", "4", "--temperature", "0"])  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        greedy = hf.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
    expected = tokenizer.decode(greedy[0].tolist(), skip_special_tokens=True)
    assert code == 0 and capsys.readouterr().out == expected + "\n"


def test_a_resumed_lora_run_equals_a_straight_one(tmp_path, corpus, hf_checkpoint):
    constant = ["--decay-fraction", "0"]  # the first 3 steps' rates do not depend on --steps
    straight = run(tmp_path, hf_checkpoint, corpus, *constant, name="straight")
    halves = run(tmp_path, hf_checkpoint, corpus, *constant, "--steps", "3", name="halves")
    assert json.loads((halves / "model" / "export.json").read_text()) == {"step": 3}
    assert main(["train", "--out", str(halves), "--resume", "--steps", "6", "--quiet"]) == 0
    first = load_file(str(straight / "checkpoint" / "adapter_model.safetensors"))
    second = load_file(str(halves / "checkpoint" / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    logs = [json.loads((folder / "log.json").read_text()) for folder in (straight, halves)]
    assert [e["loss"] for e in logs[0]] == [e["loss"] for e in logs[1]]
    assert json.loads((halves / "model" / "export.json").read_text()) == {"step": 6}


def test_activation_checkpointing_trains_alike(tmp_path, corpus, hf_checkpoint):
    plain = run(tmp_path, hf_checkpoint, corpus, "--steps", "3", name="plain")
    recomputed = run(tmp_path, hf_checkpoint, corpus, "--steps", "3",
                     "--activation-checkpointing", name="recomputed")  # fmt: skip
    logs = [json.loads((folder / "log.json").read_text()) for folder in (plain, recomputed)]
    assert [e["loss"] for e in logs[0]] == pytest.approx([e["loss"] for e in logs[1]], rel=1e-6)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--lora-rank", "4"], "--lora-rank fine-tunes a trained model"),
        (["--lora-alpha", "4"], "--lora-alpha needs --lora-rank"),
        (["--lora-export", "adapters"], "--lora-export needs --lora-rank"),
        (["FROM", "--lora-rank", "0"], "--lora-rank must be a positive integer"),
        (["FROM", "--lora-rank", "2", "--lora-targets", "mlp"], "--lora-targets must name"),
        (["FROM", "--lora-rank", "2", "--lora-targets", "experts,experts"], "each once"),
        (["FROM", "--lora-rank", "2", "--lora-targets", ""], "--lora-targets must name"),
        (
            ["FROM", "--lora-rank", "2", "--lora-alpha", "-1"],
            "--lora-alpha must be a positive number",
        ),
        (["FROM", "--lora-rank", "2", "--ep", "2"], "--lora-rank trains in one process"),
        (["FROM", "--lora-rank", "2", "--train-new-experts-only"], "exclude each other"),
    ],
)
def test_bad_lora_options_are_one_line_before_any_step(
    tmp_path, hf_checkpoint, arguments, message, capsys
):
    arguments = [a if a != "FROM" else "--resume-from" for a in arguments]
    if "--resume-from" in arguments:
        arguments.insert(arguments.index("--resume-from") + 1, str(hf_checkpoint))
    out = tmp_path / "run"
    assert main(["train", *arguments, "--out", str(out), *FAST]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and message in error, error
    assert not (out / "checkpoint").exists()


def test_resuming_with_another_rank_is_refused_and_peft_missing_is_one_line(
    tmp_path, corpus, hf_checkpoint, capsys, monkeypatch
):
    out = run(tmp_path, hf_checkpoint, corpus, "--steps", "2")
    capsys.readouterr()
    code = main(["train", "--out", str(out), "--resume", "--steps", "4", "--lora-rank", "8"])
    error = capsys.readouterr().err
    assert code == 2 and "--lora-rank 8 differs from the checkpoint's (4)" in error
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    code = main(["train", "--resume-from", str(hf_checkpoint), "--out", str(tmp_path / "no"),
                 "--lora-rank", "2", *FAST])  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0 and "pip install 'moe-blocks[lora]'" in error


def test_a_lost_export_is_rebuilt_by_resuming_at_the_same_step(tmp_path, corpus, hf_checkpoint):
    """A kill between the last checkpoint and the export leaves model/ behind (or absent):
    readers are warned, and ``--resume --steps STEP`` writes it from the checkpoint."""
    out = run(tmp_path, hf_checkpoint, corpus, "--steps", "2")
    expected = load_file(str(out / "model" / "model.safetensors"))
    shutil.rmtree(out / "model")
    assert main(["train", "--out", str(out), "--resume", "--steps", "2", "--quiet"]) == 0
    rebuilt = load_file(str(out / "model" / "model.safetensors"))
    assert rebuilt.keys() == expected.keys()
    assert all(torch.equal(rebuilt[key], expected[key]) for key in expected)
    (out / "model" / "export.json").write_text('{"step": 1}\n')
    with pytest.warns(UserWarning, match="holds the weights of step 1"):
        assert run_folder.checkpoint_folder(out) == out / "model"


def test_a_damaged_adapter_config_is_one_line(tmp_path, corpus, hf_checkpoint, capsys):
    out = run(tmp_path, hf_checkpoint, corpus, "--steps", "1", "--lora-export", "adapters")
    (out / "model" / "adapter_config.json").write_text("{not json")
    capsys.readouterr()
    code = main(["generate", "--checkpoint", str(out), "--prompt", "def ", "--max-new-tokens", "2"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0 and "adapter_config.json" in error, error


def test_live_bytes_counts_each_storage_once_until_it_is_freed():
    live_bytes = script_module("benches/lora_memory.py").LiveBytes
    before = torch.zeros(1000)  # 4000 bytes, alive before
    with live_bytes([before, before[:10]]) as live:
        a = torch.ones(2000)  # + 8000
        b = a * 2  # + 8000: the peak, 20000
        view = b[:5]  # a view: no new storage
        del a, b, view
        c = torch.ones(500)  # + 2000 after 16000 were freed
    assert (live.peak, live.current) == (20000, 6000)
    assert c.numel() == 500


def test_the_memory_benchmark_orders_the_modes_as_the_arithmetic_says():
    """benches/lora_memory.py on a small JetMoE: each peak holds at least the weights (and
    adapters), the gradients of what trains and AdamW's state; LoRA trains a small share;
    recomputing layers lowers LoRA's peak (the adapted weights of every layer are not kept)."""
    module = script_module("benches/lora_memory.py")
    config = JetMoEConfig.from_preset("tiny", num_hidden_layers=4, intermediate_size=512)
    rows = {mode: module.measure(config, mode, tokens=64, rank=2, dtype=torch.float32,
                                 device="cpu", repeats=1) for mode in module.MODES}  # fmt: skip
    for mode, row in rows.items():  # (weights_bytes: the base model's, trained or frozen)
        adapters = row["trainable_bytes"] if mode.startswith("lora") else 0
        floor = row["weights_bytes"] + adapters + row["trainable_bytes"] + row["optimizer_bytes"]
        assert row["peak_bytes"] >= floor, mode
        assert row["optimizer_bytes"] == 2 * row["trainable_bytes"], mode
    assert rows["lora"]["trainable_bytes"] < rows["full"]["trainable_bytes"] / 10
    assert rows["lora + checkpointing"]["peak_bytes"] < rows["lora"]["peak_bytes"]


def test_adapters_of_a_bf16_model_train_in_fp32():
    """A bf16 checkpoint's adapters (and so their AdamW state) are fp32: in bf16 most of a
    fine-tuning rate's small updates would round away."""
    from moe_blocks.models.train import make_optimizer

    model = tiny_model(3).to(torch.bfloat16)
    settings = TrainSettings(resume_from="x", lora_rank=4, lr=2e-5)
    attach_lora(model, lora_config(settings))
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    optimizer = make_optimizer(model, settings)
    before = {n: p.detach().clone() for n, p in adapters.items()}
    for _ in range(2):  # B moves at step 1, then A gets gradients
        ids = torch.randint(0, model.config.vocab_size, (2, 9))
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = settings.lr
        optimizer.step()
    moved = [(adapters[n] != before[n]).float().mean().item() for n in adapters if "lora_A" in n]
    assert min(moved) > 0.9  # (bf16 adapters: about a tenth of A's entries moved)


def test_another_models_adapters_are_one_line(tmp_path, corpus, hf_checkpoint, capsys):
    out = run(tmp_path, hf_checkpoint, corpus, "--steps", "1", "--lora-export", "adapters")
    config_file = out / "model" / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved.update(target_modules=["q_proj", "v_proj"], target_parameters=[])  # a Llama's
    config_file.write_text(json.dumps(saved))
    capsys.readouterr()
    code = main(["generate", "--checkpoint", str(out), "--prompt", "def ", "--max-new-tokens", "2"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0 and "do not fit their base model" in error, error


def test_a_lora_run_on_a_named_device_equals_the_default(tmp_path, corpus, hf_checkpoint):
    """One process on a named device (the GPU when there is one: ``train`` picks it) takes the
    path that moves the model, the batches, the validation and the restored AdamW state there;
    on the CPU it must train exactly as the default."""
    from dataclasses import replace

    from moe_blocks.models.train import OneProcess, run_training

    default = run(tmp_path, hf_checkpoint, corpus, "--decay-fraction", "0", name="default")
    settings = replace(
        run_folder.load_trainer_state(default / "checkpoint").settings,
        out=str(tmp_path / "named"), steps=3,
    )  # fmt: skip
    options = {"overwrite": False, "progress": False}
    run_training(settings, OneProcess("cpu"), resume=False, **options)
    run_training(replace(settings, steps=6), OneProcess("cpu"), resume=True, **options)
    logs = [
        json.loads((folder / "log.json").read_text()) for folder in (default, tmp_path / "named")
    ]
    assert [e["loss"] for e in logs[0]] == [e["loss"] for e in logs[1]]
