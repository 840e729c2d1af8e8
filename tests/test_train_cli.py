"""`moe-blocks train / generate / info` end to end on tiny settings."""

import json
import subprocess
import sys

import pytest
import torch

from moe_blocks.models import train as train_module
from moe_blocks.models.cli import main
from moe_blocks.models.jetmoe import JetMoEForCausalLM

FAST = ["--steps", "8", "--batch-size", "4", "--seq-len", "32", "--eval-every", "4",
        "--warmup-steps", "1", "--checkpoint-every", "4", "--quiet"]  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    """A small folder of Python files (a slice of the standard library's own sources)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    sources = sorted(train_module.load_corpus_files())[:40]
    for index, source in enumerate(sources):
        (folder / f"{index:02d}_{source.name}").write_bytes(source.read_bytes()[:4000])
    return folder


def run(args):
    return main(["train", *args])


def test_training_writes_checkpoint_log_and_plot_and_learns(tmp_path, corpus):
    out = tmp_path / "run"
    assert run(["--data", str(corpus), "--out", str(out), *FAST]) == 0
    for name in ("log.json", "training.png", "checkpoint/model.safetensors",
                 "checkpoint/config.json", "checkpoint/optimizer.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = json.loads((out / "log.json").read_text())
    steps = [entry for entry in log if "lm_loss" in entry]
    assert len(steps) == 8
    assert {"loss", "aux_loss", "lr", "tokens_per_s", "tokens_per_expert"} <= set(steps[0])
    validation = [entry["val_bpb"] for entry in log if "val_bpb" in entry]
    assert validation[-1] < validation[0]
    assert steps[-1]["lm_loss"] < steps[0]["lm_loss"]


def test_checkpoint_loads_in_transformers(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    assert run(["--data", str(corpus), "--out", str(out), "--steps", "2", *FAST[2:]]) == 0
    ours = JetMoEForCausalLM.from_pretrained(out / "checkpoint").eval()
    theirs = transformers.JetMoeForCausalLM.from_pretrained(out / "checkpoint").eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_resume_continues_exactly_and_runs_are_deterministic(tmp_path, corpus):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(["--data", str(corpus), "--out", str(straight), *FAST]) == 0
    half = ["--steps", "4", *FAST[2:]]
    assert run(["--data", str(corpus), "--out", str(split), *half]) == 0
    assert run(["--data", str(corpus), "--out", str(split), "--resume", *FAST]) == 0
    losses = [
        [e["lm_loss"] for e in json.loads((d / "log.json").read_text()) if "lm_loss" in e]
        for d in (straight, split)
    ]
    assert losses[0] == losses[1]
    again = tmp_path / "again"
    assert run(["--data", str(corpus), "--out", str(again), *FAST]) == 0
    assert json.loads((again / "log.json").read_text())[1]["lm_loss"] == losses[0][0]


def test_ctrl_c_saves_a_checkpoint(tmp_path, corpus, monkeypatch):
    real_batch = train_module.batch_at

    def interrupt_at_step_3(data, step, *args):
        if step == 3:
            raise KeyboardInterrupt
        return real_batch(data, step, *args)

    monkeypatch.setattr(train_module, "batch_at", interrupt_at_step_3)
    out = tmp_path / "run"
    assert run(["--data", str(corpus), "--out", str(out), *FAST]) == 130
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3
    monkeypatch.setattr(train_module, "batch_at", real_batch)
    assert run(["--data", str(corpus), "--out", str(out), "--resume", *FAST]) == 0


def test_generate_samples_text(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert run(["--data", str(corpus), "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out / "checkpoint"), "--prompt", "import ",
                 "--max-new-tokens", "20"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert text.startswith("import ") and len(text.encode()) >= 20


def test_info_prints_the_published_size(capsys):
    assert main(["info", "jetmoe-8b"]) == 0
    assert "8,522,237,952" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "/nonexistent/corpus"], "no such file"),
        (["train", "--preset", "jetmoe-1t"], "unknown preset"),
        (["train", "--batch-size", "0"], "--batch-size"),
        (["generate", "--checkpoint", "/nonexistent"], "--checkpoint"),
        (["bench", "--tiny", "--shapes", "gpt-5"], "unknown shape"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_empty_data_and_foreign_checkpoints(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "blank.txt").write_text("")
    assert main(["train", "--data", str(tmp_path / "blank.txt")]) == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "checkpoint").mkdir()
    (foreign / "checkpoint" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["train", "--out", str(foreign), "--resume"]) == 2
    assert main(["generate", "--checkpoint", str(foreign / "checkpoint")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and not any("Traceback" in line for line in errors)


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "moe_blocks", "info", "tiny"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and "parameters" in result.stdout


def test_default_corpus_is_the_stdlib_split_by_path_hash():
    files = train_module.load_corpus_files()
    assert files == sorted(files) and len(files) > 100
    corpus = train_module.load_corpus(None)
    share = corpus.validation.numel() / (corpus.train.numel() + corpus.validation.numel())
    assert 0.01 < share < 0.15
    assert torch.equal(train_module.load_corpus(None).validation, corpus.validation)
