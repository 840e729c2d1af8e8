"""`moe-blocks train / generate / info` end to end on tiny settings."""

import json
import re
import shutil
import subprocess
import sys
import zlib

import pytest
import torch

import moe_blocks
from moe_blocks.models import train as train_module
from moe_blocks.models.cli import main
from moe_blocks.models.jetmoe import JetMoEConfig, JetMoEForCausalLM
from moe_blocks.models.train import continual, loop
from moe_blocks.models.train import data as data_module
from moe_blocks.router import router_stats

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


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a training step starts (errors must come before any training)."""

    def fail(*args):
        raise AssertionError("training started")

    monkeypatch.setattr(loop, "batch_at", fail)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(args):
    return main(["train", *args])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_training_writes_checkpoint_log_and_plot_and_learns(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert run(["--data", str(corpus), "--out", str(out), *FAST]) == 0
    summary = capsys.readouterr().out
    model = JetMoEForCausalLM.from_pretrained(out / "checkpoint")
    for fact in (str(corpus), "preset tiny", f"{model.num_parameters():,} parameters",
                 "8 steps", str(out)):  # fmt: skip
        assert fact in summary, fact
    for name in ("log.json", "training.png", "checkpoint/model.safetensors",
                 "checkpoint/config.json", "checkpoint/optimizer.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # "A JSON log of every step": one entry per step, each with its losses; the validation
    # before the first step is in that step's entry.
    steps = json.loads((out / "log.json").read_text())
    assert [entry["step"] for entry in steps] == list(range(1, 9))
    fields = {"loss", "lm_loss", "aux_loss", "lr", "tokens_per_s", "tokens_per_expert"}
    assert all(fields <= set(entry) for entry in steps)
    assert "val_bpb_before" in steps[0] and all("val_bpb_before" not in e for e in steps[1:])
    # Every token goes to top_k experts of each router: the counts of one step add up to that.
    # Keyed by the names router_stats gives the same routers.
    config = JetMoEConfig.from_preset("tiny")
    names = list(router_stats(JetMoEForCausalLM(config))["tokens_per_expert"])
    assert len(names) == 2 * config.num_hidden_layers
    for entry in steps:
        assert list(entry["tokens_per_expert"]) == names
        for counts in entry["tokens_per_expert"].values():
            assert len(counts) == config.num_local_experts
            assert sum(counts) == 4 * (32 + 1) * config.num_experts_per_tok
    validation = [entry["val_bpb"] for entry in steps if "val_bpb" in entry]
    assert validation[-1] < steps[0]["val_bpb_before"]
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


def test_resume_continues_exactly_and_runs_are_deterministic(tmp_path, corpus, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(["--data", str(corpus), "--out", str(straight), *FAST]) == 0
    half = ["--steps", "4", *FAST[2:]]
    assert run(["--data", str(corpus), "--out", str(split), *half]) == 0
    capsys.readouterr()
    assert run(["--data", str(corpus), "--out", str(split), "--resume", *FAST]) == 0
    printed = capsys.readouterr()
    assert "4 steps more (4 -> 8)" in printed.out
    assert "schedule" not in printed.err  # steps 1-4 had the rates an 8-step run gives them
    losses = [
        [e["lm_loss"] for e in json.loads((d / "log.json").read_text())] for d in (straight, split)
    ]
    assert losses[0] == losses[1]
    again = tmp_path / "again"
    assert run(["--data", str(corpus), "--out", str(again), *FAST]) == 0
    assert json.loads((again / "log.json").read_text())[0]["lm_loss"] == losses[0][0]


def test_resume_takes_the_options_not_given_from_the_checkpoint(
    tmp_path, corpus, capsys, monkeypatch
):
    """--resume alone continues a run made with other than default settings, from any working
    folder; a given option that changes the data or the model is refused, --data compared as
    a resolved path."""
    straight, split, elsewhere = tmp_path / "straight", tmp_path / "split", tmp_path / "else"
    monkeypatch.chdir(tmp_path)
    options = ["--data", corpus.name, *FAST[2:], "--seed", "3"]  # --data relative to tmp_path
    assert run([*options, "--out", str(straight), "--steps", "8"]) == 0
    assert run([*options, "--out", str(split), "--steps", "4"]) == 0
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    # Only --steps given: FAST's --batch-size 4, --seq-len 32 and --warmup-steps 1, --seed 3
    # and --data (saved as an absolute path) are the checkpoint's.
    assert run(["--out", str(split), "--resume", "--steps", "8"]) == 0
    assert "4 steps more (4 -> 8) of 4 x 32 bytes" in capsys.readouterr().out
    logs = [json.loads((folder / "log.json").read_text()) for folder in (straight, split)]
    assert [e["loss"] for e in logs[0]] == [e["loss"] for e in logs[1]]
    for flag, value in (("--seq-len", "64"), ("--seed", "4"), ("--data", corpus.name)):
        assert run(["--out", str(split), "--resume", "--steps", "9", flag, value]) == 2
        err = one_line_error(capsys)
        assert f"{flag} " in err and "differs from the checkpoint's" in err, err
    assert run(["--out", str(split), "--resume", "--steps", "9", "--data", "../corpus"]) == 0


def test_resume_from_a_checkpoint_with_a_relative_data_path_knows_its_own_corpus(
    tmp_path, corpus, capsys, monkeypatch
):
    """A checkpoint written before --data was saved absolute holds the path as given; compared
    as a resolved path, the run's own corpus is not validated again as the "old" one."""
    monkeypatch.chdir(tmp_path)
    base, new = tmp_path / "base", tmp_path / "new"
    assert run(["--data", corpus.name, "--out", str(base), *FAST[2:], "--steps", "1"]) == 0
    state_file = base / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["settings"]["data"] = corpus.name  # as it was saved before
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    options = ["--data", str(corpus), "--resume-from", str(base), "--out", str(new)]
    assert run([*options, *FAST[2:], "--steps", "1"]) == 0
    assert "old:" not in capsys.readouterr().out
    assert "old_val_bpb_before" not in json.loads((new / "log.json").read_text())[0]


def test_a_resume_that_changes_past_learning_rates_says_so(tmp_path, corpus, capsys):
    """The default warmup (min(30, --steps)) and WSD's decay start (0.8 --steps) move with
    --steps: resumed to more steps, the run differs from a straight one, and stderr says so."""
    out = tmp_path / "run"
    no_warmup_flag = [arg for arg in FAST if arg not in ("--warmup-steps", "1")]
    assert run(["--data", str(corpus), "--out", str(out), *no_warmup_flag, "--steps", "4"]) == 0
    capsys.readouterr()
    assert run(["--out", str(out), "--resume", "--steps", "5"]) == 0
    note = capsys.readouterr().err
    assert "learning-rate schedule changed (wsd, lr 0.003, warmup 4 of 4 steps -> wsd, " in note
    assert "warmup 5 of 5 steps): steps 1-4 were trained at other rates" in note
    log = json.loads((out / "log.json").read_text())
    settings = train_module.TrainSettings(steps=5)
    assert log[-1]["lr"] == train_module.learning_rate(settings, 4)  # the new schedule


def test_a_format_2_checkpoint_resumes_with_its_log_converted(tmp_path, corpus):
    """Format 2 logged the validation before the first step as an entry ``{"step": 0,
    "val_bpb": ...}``; resumed, it becomes the first step's ``val_bpb_before``."""
    out = tmp_path / "run"
    two = ["--data", str(corpus), "--out", str(out), *FAST[2:]]
    assert run([*two, "--steps", "2"]) == 0
    checkpoint = out / "checkpoint"
    log = json.loads((checkpoint / "log.json").read_text())
    before = log[0].pop("val_bpb_before")
    (checkpoint / "log.json").write_text(json.dumps([{"step": 0, "val_bpb": before}, *log]))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(
        json.dumps({**state, "format": "moe-blocks-train/2"})
    )
    assert run([*two, "--steps", "3", "--resume"]) == 0
    log = json.loads((out / "log.json").read_text())
    assert [entry["step"] for entry in log] == [1, 2, 3]
    assert log[0]["val_bpb_before"] == before and all("loss" in entry for entry in log)


def test_ctrl_c_saves_a_checkpoint(tmp_path, corpus, monkeypatch):
    real_batch = train_module.batch_at

    def interrupt_at_step_3(data, step, *args):
        if step == 3:
            raise KeyboardInterrupt
        return real_batch(data, step, *args)

    monkeypatch.setattr(loop, "batch_at", interrupt_at_step_3)
    out = tmp_path / "run"
    assert run(["--data", str(corpus), "--out", str(out), *FAST]) == 130
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3
    monkeypatch.setattr(loop, "batch_at", real_batch)
    assert run(["--out", str(out), "--resume", "--quiet"]) == 0  # the checkpoint's settings
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 8


@pytest.mark.parametrize("steps", [1, 3])
def test_ctrl_c_during_a_validation_after_a_step_keeps_that_step(
    steps, tmp_path, corpus, capsys, monkeypatch
):
    """A step that finished is logged and saved even when Ctrl-C interrupts the validation
    after it (with --steps 1 the log was [] and the summary raised IndexError)."""
    real_validate, calls = loop.validate, []

    def interrupt_the_last(*args, **options):
        calls.append(args)
        if len(calls) == steps + 1:  # the one after step --steps (the first is before step 1)
            raise KeyboardInterrupt
        return real_validate(*args, **options)

    monkeypatch.setattr(loop, "validate", interrupt_the_last)
    out = tmp_path / "run"
    options = ["--data", str(corpus), "--out", str(out), *FAST[2:], "--eval-every", "1"]
    assert run([*options, "--steps", str(steps)]) == 130
    printed = capsys.readouterr()
    assert "validation: " in printed.out
    assert "--resume" not in printed.err  # all steps are done: nothing to resume
    log = json.loads((out / "log.json").read_text())
    assert [entry["step"] for entry in log] == list(range(1, steps + 1))
    assert "val_bpb" not in log[-1] and "val_bpb_before" in log[0]
    assert json.loads((out / "checkpoint" / "log.json").read_text()) == log
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == steps


@pytest.mark.parametrize("where", ["load_corpus", "evaluate"])  # evaluate: before step 1
def test_ctrl_c_before_the_first_step_is_one_line_and_130(
    where, tmp_path, corpus, capsys, monkeypatch
):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(continual if where == "evaluate" else loop, where, interrupt)
    out = tmp_path / "run"
    try:
        status = run(["--data", str(corpus), "--out", str(out), *FAST])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped main")
    assert status == 130
    assert "interrupted" in one_line_error(capsys)
    assert not (out / "checkpoint").exists()  # no step, nothing saved: a new run may start there
    monkeypatch.undo()
    assert run(["--data", str(corpus), "--out", str(out), *FAST[2:], "--steps", "1"]) == 0


def test_generate_samples_text_from_the_run_or_checkpoint_folder(
    tmp_path, corpus, capsys, restore_threads
):
    out = tmp_path / "run"
    assert run(["--data", str(corpus), "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    # A torchrun run's folder: shards in checkpoint/, the Hugging Face export in model/.
    sharded = tmp_path / "sharded"
    shutil.copytree(out / "checkpoint", sharded / "model")
    (sharded / "checkpoint").mkdir()
    (sharded / "checkpoint" / ".metadata").touch()
    samples = []
    for folder in (out, out / "checkpoint", sharded):
        assert main(["generate", "--checkpoint", str(folder), "--prompt", "import ",
                     "--max-new-tokens", "20", "--threads", "1"]) == 0  # fmt: skip
        samples.append(capsys.readouterr().out)
        assert torch.get_num_threads() == 1
    assert samples[0] == samples[1] == samples[2]
    assert samples[0].startswith("import ") and len(samples[0].encode()) >= 20
    for flag, bad in (("--temperature", "-0.5"), ("--threads", "0"), ("--seed", str(2**70))):
        assert main(["generate", "--checkpoint", str(out), flag, bad]) == 2
        assert flag in one_line_error(capsys)


def test_out_naming_a_file_fails_before_training(tmp_path, corpus, capsys, no_training):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    for out in (existing, existing / "run"):
        assert run(["--data", str(corpus), "--out", str(out), *FAST]) == 2
        assert "--out" in one_line_error(capsys)
    assert existing.read_text() == "keep me"


def test_an_existing_run_is_kept_unless_resumed_or_overwritten(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    two = ["--data", str(corpus), "--out", str(out), "--steps", "2", *FAST[2:]]
    assert run(two) == 0
    files = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    capsys.readouterr()
    refusals = [
        ([], ("--resume", "--overwrite")),
        (["--resume", "--overwrite"], ("--resume", "--overwrite")),
        (["--resume"], ("--steps", "step 2")),  # the checkpoint is already at step 2
    ]
    for flags, named in refusals:
        assert run([*two, *flags]) == 2, flags
        err = one_line_error(capsys)
        assert all(name in err for name in named), err
    assert files == {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    # What a torchrun run would have left there (shards, its export) goes with --overwrite:
    # --resume would otherwise read the stale shards.
    (out / "checkpoint" / ".metadata").touch()
    (out / "model").mkdir()
    three = ["--data", str(corpus), "--out", str(out), "--steps", "3", *FAST[2:]]
    assert run([*three, "--overwrite"]) == 0
    log = json.loads((out / "log.json").read_text())
    assert [entry["step"] for entry in log] == [1, 2, 3]
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    assert not (out / "checkpoint" / ".metadata").exists() and not (out / "model").exists()
    # Nor may --overwrite delete the model a run starts from.
    assert run([*three, "--overwrite", "--resume-from", str(out)]) == 2
    assert "--resume-from" in one_line_error(capsys)
    assert (out / "checkpoint" / "config.json").exists()


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--warmup-steps", "9"], "--warmup-steps"),  # FAST trains 8 steps
        (["--threads", "0"], "--threads"),
        (["--threads", "-2"], "--threads"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--seed", "1733500000000000000"], "--seed"),  # a nanosecond timestamp
        (["--seed", str(-(2**63))], "--seed"),
    ],
)
def test_bad_training_settings_fail_before_training(
    args, flag, tmp_path, corpus, capsys, no_training
):
    out = tmp_path / "run"
    assert run(["--data", str(corpus), "--out", str(out), *FAST, *args]) == 2
    assert flag in one_line_error(capsys)
    assert not out.exists()


def test_a_run_shorter_than_the_default_warmup_needs_no_warmup_flag(tmp_path, corpus):
    """The default warmup (30 steps) shortens to --steps; a warmup given explicitly is not
    shortened (above: refused beyond --steps)."""
    out = tmp_path / "run"
    short = [arg for arg in FAST if arg not in ("--warmup-steps", "1")]
    assert run(["--data", str(corpus), "--out", str(out), *short, "--steps", "3"]) == 0
    log = json.loads((out / "log.json").read_text())
    assert [entry["lr"] for entry in log] == [
        train_module.learning_rate(train_module.TrainSettings(steps=3, warmup_steps=3), step)
        for step in range(3)
    ]


@pytest.mark.parametrize("size, seq_len", [(20, 32), (100, 64)])
def test_text_shorter_than_two_windows_is_an_error(size, seq_len, tmp_path, capsys, no_training):
    # One window of --seq-len + 1 bytes to train on and one to validate: 100 < 2 x 65.
    text = tmp_path / "short.txt"
    text.write_bytes((b"0123456789" * 100)[:size])
    out = tmp_path / "run"
    assert run(["--data", str(text), "--out", str(out), *FAST, "--seq-len", str(seq_len)]) == 2
    err = one_line_error(capsys)
    assert "--seq-len" in err and f"{size} bytes" in err


@pytest.mark.parametrize(
    "files",
    [
        {"a.py": 3000},  # crc32("a.py") % 100 = 2: the path hash puts all of it in validation
        {"b.txt": 3000},  # 46: all of it in training
        {"a.py": 20, "b.txt": 3000},  # validation shorter than a window (33 bytes)
        {"one.txt": 600},  # one file: its last 5 % (30 bytes) is shorter than a window
    ],
    ids=["all-validation", "no-validation", "short-validation", "one-file"],
)
def test_any_text_of_two_windows_trains_split_by_position(files, tmp_path, capsys):
    """When the path-hash split leaves a part shorter than a window, the text is split by
    position: the last 5 %, and at least one window, validates."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name, size in files.items():
        (folder / name).write_bytes((b"def f(x):\n    return x\n" * 200)[:size])
    data = folder / "one.txt" if "one.txt" in files else folder
    assert run(["--data", str(data), "--out", str(tmp_path / "run"), *FAST, "--steps", "1"]) == 0
    assert "split by position" in capsys.readouterr().out
    corpus = train_module.load_corpus(str(data), 32)  # FAST's --seq-len
    text = data_module._join([p.read_bytes() for p in sorted(folder.iterdir())])
    assert torch.equal(torch.cat([corpus.train, corpus.validation]), text)
    assert corpus.validation.numel() == max(text.numel() // 20, 33)


def test_help_shows_the_documented_defaults(capsys):
    documented = {"train": {"--steps": "600", "--batch-size": "16", "--seq-len": "128",
                            "--preset": "tiny", "--out": "runs/tiny"},
                  "generate": {"--temperature": "0.8", "--checkpoint": "runs/tiny"}}  # fmt: skip
    for command, defaults in documented.items():
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        options = text[text.index("options:") :]
        for flag, value in defaults.items():
            # The option's help runs up to the next "--flag METAVAR".
            help_text = re.search(rf" {flag} [A-Z_]+ (.*?)(?= --[a-z-]+ [A-Z_]+ |$)", options)
            assert f"(default: {value})" in help_text.group(1), flag


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"moe-blocks {moe_blocks.__version__}"


def test_info_prints_the_published_size(capsys):
    assert main(["info", "jetmoe-8b"]) == 0
    assert "8,522,237,952" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "/nonexistent/corpus"], "no such file"),
        (["train", "--preset", "jetmoe-1t"], "--preset: unknown preset 'jetmoe-1t'"),
        (["train", "--batch-size", "0"], "--batch-size"),
        (["generate", "--checkpoint", "/nonexistent"], "--checkpoint"),
        (["bench", "--tiny", "--shapes", "gpt-5"], "unknown shape"),
        (["bench", "--tiny", "--repeats", "0"], "--repeats"),
        (["bench", "--tiny", "--budget", "-1"], "--budget"),
        (["bench", "--tiny", "--budget", "nan"], "--budget"),
        (["info", "tiny", "--context", "-5"], "--context"),
        (["extend", "/nonexistent", "--add", "2", "--out", ""], "--out"),
        (["prune", "/nonexistent", "--keep-fraction", "0.5", "--out", ""], "--out"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message, tmp_path, capsys):
    if args[0] == "train":
        args = [*args, "--out", str(tmp_path / "run")]
    assert main(args) == 2
    assert message in one_line_error(capsys)


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_an_out_that_is_a_file_is_said_so(resume, tmp_path, capsys):
    """With --resume too (it said the file's checkpoint/ held no checkpoint)."""
    out = tmp_path / "a-file"
    out.write_text("mine\n")
    assert main(["train", "--out", str(out), *resume, "--quiet"]) == 2
    assert f"--out {out} is a file, not a folder" in one_line_error(capsys)
    assert out.read_text() == "mine\n"


@pytest.mark.parametrize("flag", ["--data", "--out", "--resume-from"])
def test_an_empty_path_is_an_error_not_the_current_folder(
    flag, tmp_path, corpus, capsys, monkeypatch, no_training
):
    monkeypatch.chdir(corpus)  # Path("") is the current folder, here one with text to train on
    paths = {"--data": str(corpus), "--out": str(tmp_path / "run"), flag: ""}
    assert run([arg for pair in paths.items() for arg in pair] + FAST) == 2
    assert f"{flag} is empty" in one_line_error(capsys)
    assert not (tmp_path / "run").exists() and not (corpus / "checkpoint").exists()


def test_empty_data_and_foreign_checkpoints(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "blank.txt").write_text("")
    assert main(["train", "--data", str(tmp_path / "blank.txt"), "--out", str(tmp_path / "o")]) == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "checkpoint").mkdir()
    (foreign / "checkpoint" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["train", "--out", str(foreign), "--resume"]) == 2
    assert main(["generate", "--checkpoint", str(foreign / "checkpoint")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and not any("Traceback" in line for line in errors)


def test_resume_from_a_damaged_checkpoint_is_one_line(tmp_path, corpus, capsys, monkeypatch):
    """Issue 5: 'a checkpoint that is not ours: a clear one-line error and a non-zero exit, no
    traceback', for each file of the checkpoint."""
    from safetensors.torch import save_file

    good = tmp_path / "good"
    assert run(["--data", str(corpus), "--out", str(good), *FAST[2:], "--steps", "1"]) == 0
    capsys.readouterr()

    def state_without_settings(path):
        path.write_text(json.dumps({"format": train_module.CHECKPOINT_FORMAT, "step": 1}))

    damages = [
        ("model.safetensors", lambda path: save_file({"foo": torch.zeros(2)}, str(path))),
        ("optimizer.safetensors", lambda path: path.unlink()),
        ("optimizer.safetensors", lambda path: path.write_bytes(b"garbage")),
        ("optimizer.safetensors", lambda path: save_file({"a::exp_avg": torch.ones(2)}, str(path))),
        ("log.json", lambda path: path.unlink()),
        ("log.json", lambda path: path.write_text("{not json")),
        ("trainer_state.json", state_without_settings),
    ]
    monkeypatch.setattr(loop, "batch_at", None)  # no step may start
    for index, (name, damage) in enumerate(damages):
        out = tmp_path / f"damaged{index}"
        shutil.copytree(good, out)
        damage(out / "checkpoint" / name)
        assert run(["--data", str(corpus), "--out", str(out), "--resume", *FAST]) == 2, index
        error = one_line_error(capsys)
        assert name in error and "restore the checkpoint folder" in error, (index, error)
        assert "start over with --overwrite" in error, (index, error)


def test_damaged_json_of_a_checkpoint_is_one_line_naming_the_file(
    tmp_path, corpus, capsys, monkeypatch
):
    """Every JSON file a run reads back (trainer_state.json, log.json, extension.json), damaged
    in content or type, is a one-line error naming it and exit 2 before any step."""
    good = tmp_path / "good"
    assert run(["--data", str(corpus), "--out", str(good), *FAST[2:], "--steps", "1"]) == 0
    capsys.readouterr()

    def edit(change):
        def damage(path):
            value = json.loads(path.read_text())
            change(value)
            path.write_text(json.dumps(value))

        return damage

    def write(value):
        return lambda path: path.write_text(json.dumps(value))

    routers = json.loads((good / "log.json").read_text())[0]["tokens_per_expert"]
    extension = {"format": train_module.EXTENSION_FORMAT, "base_experts": 4, "added": 1}
    damages = [
        ("trainer_state.json", lambda path: path.write_bytes(b"\xff\xfe{")),  # not UTF-8
        ("trainer_state.json", write([1])),
        ("trainer_state.json", edit(lambda state: state["settings"].update(data=5))),
        ("trainer_state.json", edit(lambda state: state["settings"].update(steps="8"))),
        ("trainer_state.json", edit(lambda state: state["settings"].update(batch_size=0))),
        ("log.json", lambda path: path.write_bytes(b"\xff")),
        ("log.json", edit(lambda log: log[0].pop("lm_loss"))),
        ("log.json", edit(lambda log: log[0].update(val_bpb="low"))),
        ("log.json", edit(lambda log: log[0]["tokens_per_expert"].pop(next(iter(routers))))),
        ("extension.json", write([1])),
        ("extension.json", write({**extension, "added": None})),
        ("extension.json", write({**extension, "previous_data": 5})),
    ]
    monkeypatch.setattr(loop, "batch_at", None)  # no step may start
    for index, (name, damage) in enumerate(damages):
        out = tmp_path / f"damaged{index}"
        shutil.copytree(good, out)
        damage(out / "checkpoint" / name)
        if name == "extension.json":  # read by --resume-from, beside the checkpoint
            args = ["--resume-from", str(out), "--out", str(tmp_path / f"new{index}")]
        else:
            args = ["--out", str(out), "--resume", "--steps", "2"]
        assert run(["--data", str(corpus), *args]) == 2, index
        error = one_line_error(capsys)
        assert f"checkpoint/{name}" in error, index
        if name != "extension.json":  # what --resume reads: what to do about it
            assert "restore the checkpoint folder" in error, (index, error)


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "moe_blocks", "info", "tiny"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and "parameters" in result.stdout


def test_default_corpus_is_the_stdlib_split_by_path_hash():
    root = train_module.STDLIB
    files = train_module.load_corpus_files()
    assert files == sorted(files) and len(files) > 100
    corpus = train_module.load_corpus(None)
    share = corpus.validation.numel() / (corpus.train.numel() + corpus.validation.numel())
    assert 0.01 < share < 0.15 and "split by path hash" in corpus.description
    # docs/train.md: a file validates when crc32(relative path) % 100 < 5.
    hashed = [p for p in files if zlib.crc32(p.relative_to(root).as_posix().encode()) % 100 < 5]
    validation = data_module._join([p.read_bytes() for p in hashed])
    assert torch.equal(corpus.validation, validation)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_bench_on_cuda_without_cuda_is_one_line(capsys):
    assert main(["bench", "--tiny", "--device", "cuda"]) == 2
    assert "--device cuda" in one_line_error(capsys)


def test_bench_lists_may_have_spaces(tmp_path, capsys):
    """``--shapes "jetmoe-8b, fine-grained"`` names two shapes (spaces after commas)."""
    args = ["bench", "--tiny", "--shapes", "jetmoe-8b, fine-grained", "--tokens", "4",
            "--dtypes", "fp32, bf16", "--passes", "fwd", "--repeats", "1", "--budget", "0.01",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((tmp_path / "bench_mlp.json").read_text())
    assert {(r["shape"], r["dtype"]) for r in rows} == {
        (shape, dtype) for shape in ("jetmoe-8b", "fine-grained") for dtype in ("fp32", "bf16")
    }
