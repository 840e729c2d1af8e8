"""`moe-blocks train --tokenizer`: a transformers JetMoe checkpoint with its own tokenizer (a
tiny BPE, vocabulary 300, not 256) fine-tunes on a text folder; token files are cached and
rebuilt; bits per byte stay comparable across tokenizers; mismatches are one line."""

import json
import math

import pytest
import torch

from moe_blocks.models.cli import main
from moe_blocks.models.jetmoe import JetMoEForCausalLM
from moe_blocks.models.train import TrainSettings, data, evaluate, loop, tokens
from tests.conftest import VOCAB

transformers = pytest.importorskip("transformers")
FAST = ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-every", "3",
        "--warmup-steps", "1", "--checkpoint-every", "3", "--quiet"]  # fmt: skip


def test_a_jetmoe_checkpoint_fine_tunes_with_its_own_tokenizer(
    tmp_path, corpus, hf_checkpoint, monkeypatch, capsys
):
    seen = []
    real = data.batch_at
    monkeypatch.setattr(loop, "batch_at", lambda *args: seen.append(real(*args)) or seen[-1])
    out = tmp_path / "run"
    code = main(["train", "--resume-from", str(hf_checkpoint), "--data", str(corpus),
                 "--out", str(out), *FAST])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"tokenizer {hf_checkpoint}" in printed and "bytes per token" in printed
    ids = torch.cat([batch.flatten() for batch in seen])
    assert ids.max() < VOCAB and ids.max() >= 256  # the tokenizer's ids, not bytes
    log = json.loads((out / "log.json").read_text())
    validations = [e["val_bpb"] for e in log if "val_bpb" in e]
    assert validations[-1] < log[0]["val_bpb_before"]
    assert list(corpus.parent.glob(".corpus.tokens/*.json"))  # the token files, beside the text
    trained = JetMoEForCausalLM.from_pretrained(out / "checkpoint")
    assert trained.config.vocab_size == VOCAB
    # the checkpoint carries its tokenizer: resumed from, it tokenizes alike (not as bytes)
    carried = transformers.AutoTokenizer.from_pretrained(out / "checkpoint")
    assert carried.encode("def f(x):") == transformers.AutoTokenizer.from_pretrained(
        hf_checkpoint
    ).encode("def f(x):")
    seen.clear()
    again = tmp_path / "again"
    assert main(["train", "--resume-from", str(out), "--data", str(corpus),
                 "--out", str(again), *FAST, "--steps", "1"]) == 0  # fmt: skip
    assert max(int(batch.max()) for batch in seen) >= 256


def test_the_token_files_of_a_folder_inside_another_corpus_are_never_read_as_its_text(
    corpus, tokenizer_dir
):
    """``--decay-data`` may name a folder inside ``--data`` (or hold it): the token files
    written beside one must not become text of the other, on this run or on ``--resume``."""
    tokenizer = tokens.load_tokenizer(str(tokenizer_dir), None)
    inner = corpus / "inner"
    inner.mkdir()
    for index in range(30):
        (inner / f"i{index}.py").write_text(f"value_{index} = {index} * 3\n" * 20)
    settings = TrainSettings(data=str(corpus), seq_len=16, decay_data=f"{inner}=1")
    before = data.load_corpus(str(corpus), 16, tokenizer=tokenizer)
    data.load_decay_corpora(settings, before, tokenizer)  # writes the inner folder's tokens
    data.load_corpus(str(inner), 16, tokenizer=tokenizer)  # and those of it alone
    again = data.load_corpus(str(corpus), 16, tokenizer=tokenizer)
    assert again.description == before.description
    assert torch.equal(again.train, before.train) and torch.equal(again.validation,
                                                                  before.validation)  # fmt: skip


def test_a_tokenized_phase_2_folder_with_no_validation_file_of_its_own_loads(corpus, tokenizer_dir):
    """A folder inside --data whose files are all on --data's training side has no validation
    text: its tokens per byte come from its training text (it divided by zero)."""
    tokenizer = tokens.load_tokenizer(str(tokenizer_dir), None)
    inner = corpus / "trained"
    inner.mkdir()
    names = [f"t{i}.py" for i in range(200) if not data._in_validation(f"trained/t{i}.py")][:6]
    for name in names:
        (inner / name).write_text(f"{name} = 1\n" * 40)
    settings = TrainSettings(data=str(corpus), seq_len=16, decay_data=f"{inner}=1")
    before = data.load_corpus(str(corpus), 16, tokenizer=tokenizer)
    [(source, _)] = data.load_decay_corpora(settings, before, tokenizer)
    assert source.validation.numel() == 0 and source.train.numel() > 0
    text = sum((inner / name).stat().st_size + 2 for name in names)
    assert source.tokens_per_byte == pytest.approx(source.train.numel() / text)


def test_token_files_are_reused_and_rebuilt_when_the_text_or_tokenizer_changes(
    corpus, tokenizer_dir, monkeypatch
):
    tokenizer = tokens.load_tokenizer(str(tokenizer_dir), None)
    first = data.load_corpus(str(corpus), 32, tokenizer=tokenizer)
    calls = []
    real = tokens.tokenize
    monkeypatch.setattr(tokens, "tokenize", lambda *args: calls.append(1) or real(*args))
    again = data.load_corpus(str(corpus), 32, tokenizer=tokenizer)
    assert calls == [] and torch.equal(again.train, first.train)
    assert torch.equal(again.validation, first.validation)
    eos = tokenizer.eos_token_id
    documents = sorted(corpus.iterdir())
    assert int((first.train == eos).sum() + (first.validation == eos).sum()) == len(documents)
    (corpus / "m00.py").write_text("x = 1\n" * 50)  # the text changed: tokenized again
    changed = data.load_corpus(str(corpus), 32, tokenizer=tokenizer)
    assert calls and not torch.equal(
        torch.cat([changed.train, changed.validation]), torch.cat([first.train, first.validation])
    )
    calls.clear()
    data.load_corpus(str(corpus), 32, tokenizer=None)  # bytes: no tokenizer at all
    assert calls == []


def test_bits_per_byte_are_bits_per_token_times_tokens_per_byte(corpus, tokenizer_dir):
    tokenizer = tokens.load_tokenizer(str(tokenizer_dir), None)
    corpus_ids = data.load_corpus(str(corpus), 32, tokenizer=tokenizer)
    validation_files = [p for p in sorted(corpus.iterdir())
                        if data._in_validation(p.relative_to(corpus).as_posix())]  # fmt: skip
    assert validation_files  # the hash split holds here
    size = sum(len(p.read_bytes()) + len(data.SEPARATOR) for p in validation_files)
    assert corpus_ids.tokens_per_byte == pytest.approx(corpus_ids.validation.numel() / size)
    torch.manual_seed(0)
    config = transformers.JetMoeConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, intermediate_size=32,
        kv_channels=8, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
    )  # fmt: skip
    model = transformers.JetMoeForCausalLM(config)
    settings = TrainSettings(batch_size=2, seq_len=32, eval_batches=2)
    bpb = evaluate(model, corpus_ids, settings)
    nats = []
    with torch.no_grad():
        for starts in data.validation_starts(corpus_ids, settings):
            window = data.windows(corpus_ids.validation, starts, 32)
            logits = model(window[:, :-1]).logits
            nats.append(torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), window[:, 1:].flatten(), reduction="sum").item())  # fmt: skip
    expected = sum(nats) / (2 * 2 * 32) / math.log(2) * corpus_ids.tokens_per_byte
    assert bpb == pytest.approx(expected, rel=1e-5)


def test_a_vocabulary_that_cannot_hold_the_ids_is_one_line_before_any_step(
    tmp_path, corpus, hf_checkpoint, tokenizer_dir, monkeypatch, capsys
):
    monkeypatch.setattr(loop, "batch_at", lambda *args: pytest.fail("training started"))
    small = tmp_path / "small"
    config = transformers.JetMoeConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1,
                                       intermediate_size=32, kv_channels=8, num_key_value_heads=2,
                                       num_local_experts=2, num_experts_per_tok=1)  # fmt: skip
    transformers.JetMoeForCausalLM(config).save_pretrained(small)
    capsys.readouterr()
    cases = [
        (["--resume-from", str(small)], "fewer than the 256 byte values"),  # bytes, vocab 200
        (["--resume-from", str(small), "--tokenizer", str(tokenizer_dir)], "has 300"),
        (
            ["--resume-from", str(hf_checkpoint), "--tokenizer", str(tmp_path)],
            "no transformers tokenizer",
        ),
    ]
    for index, (arguments, message) in enumerate(cases):
        out = tmp_path / f"run{index}"
        assert main(["train", *arguments, "--data", str(corpus), "--out", str(out), *FAST]) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and message in error, error
        assert not (out / "checkpoint").exists()


def test_a_preset_trained_with_a_tokenizer_gets_its_vocabulary(tmp_path, corpus, tokenizer_dir):
    out = tmp_path / "run"
    code = main(["train", "--tokenizer", str(tokenizer_dir), "--data", str(corpus),
                 "--out", str(out), *FAST, "--steps", "2"])  # fmt: skip
    assert code == 0
    assert JetMoEForCausalLM.from_pretrained(out / "checkpoint").config.vocab_size == VOCAB
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--quiet"]) == 0


def test_generate_speaks_through_the_checkpoints_tokenizer(tmp_path, corpus, tokenizer_dir, capsys):
    out = tmp_path / "run"
    assert main(["train", "--tokenizer", str(tokenizer_dir), "--data", str(corpus),
                 "--out", str(out), *FAST, "--steps", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    prompt = "def function_3(value):"
    code = main(["generate", "--checkpoint", str(out), "--prompt", prompt,
                 "--max-new-tokens", "6", "--temperature", "0"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model = JetMoEForCausalLM.from_pretrained(out / "checkpoint").eval()
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    logits_path = ids
    with torch.no_grad():  # greedy by hand, stopping at the end token
        for _ in range(6):
            following = model(logits_path).logits[0, -1].argmax()
            logits_path = torch.cat([logits_path, following.view(1, 1)], dim=1)
            if following == tokenizer.eos_token_id:
                break
    expected = tokenizer.decode(logits_path[0].tolist(), skip_special_tokens=True)
    assert printed == expected + "\n"
