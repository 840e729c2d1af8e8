"""JetMoE's two-phase recipe in `moe-blocks train`: the wsd-exp schedule and the phase-2 data
mixture (--decay-data), with an exact resume across the phase switch."""

import json
import math

import pytest
import torch

from moe_blocks.models.cli import main
from moe_blocks.models.train import TrainingError, TrainSettings, data, learning_rate, loop
from moe_blocks.models.train.data import Corpus, load_corpus, mixture_batch

FAST = ["--batch-size", "4", "--seq-len", "32", "--eval-every", "4", "--warmup-steps", "1",
        "--checkpoint-every", "4", "--quiet"]  # fmt: skip


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.01])
def test_wsd_exp_warms_up_holds_then_halves_at_a_fixed_interval_down_to_the_floor(ratio):
    peak, steps, warmup, fraction = 2e-3, 200, 20, 0.25
    settings = TrainSettings(steps=steps, lr=peak, warmup_steps=warmup, schedule="wsd-exp",
                             decay_fraction=fraction, min_lr_ratio=ratio)  # fmt: skip
    rates = [learning_rate(settings, step) for step in range(steps)]
    assert rates[:warmup] == pytest.approx([peak * (s + 1) / warmup for s in range(warmup)])
    decay_start = 150  # 200 · (1 - 0.25)
    assert rates[warmup:decay_start] == [peak] * (decay_start - warmup)
    # halving every (decay steps / log2(1 / ratio)) steps: a constant factor per step, and the
    # floor peak·ratio reached at step 200, one past the last
    half_life = (steps - decay_start) / math.log2(1 / ratio)
    expected = [peak * 0.5 ** ((s - decay_start) / half_life) for s in range(decay_start, steps)]
    assert rates[decay_start:] == pytest.approx(expected, rel=1e-12)
    assert rates[-1] > peak * ratio and rates[-1] * 0.5 ** (1 / half_life) == pytest.approx(
        peak * ratio
    )
    wsd = TrainSettings(steps=steps, lr=peak, warmup_steps=warmup, decay_fraction=fraction,
                        min_lr_ratio=ratio)  # fmt: skip
    linear = learning_rate(wsd, 175)
    assert linear == pytest.approx(peak + (peak * ratio - peak) * 0.5)  # wsd stays linear


@pytest.mark.parametrize(
    "options, message",
    [
        ({"schedule": "wsd-exp", "min_lr_ratio": 0.0}, "--min-lr-ratio, which must be above 0"),
        ({"schedule": "exp"}, "--schedule must be one of wsd, wsd-exp, cosine"),
        ({"decay_fraction": 1.5}, "--decay-fraction"),
        ({"min_lr_ratio": -0.1}, "--min-lr-ratio"),
        ({"decay_data": "a=1", "schedule": "cosine"}, "cosine has none"),
        ({"decay_data": "a"}, "'a' is not PATH=WEIGHT"),
        ({"decay_data": "a=0"}, "'a=0' is not PATH=WEIGHT"),
        ({"decay_data": "a=x"}, "'a=x' is not PATH=WEIGHT"),
        ({"decay_data": "a=1,,b=1"}, "'' is not PATH=WEIGHT"),
        ({"decay_data": "a=1,a=2"}, "names a source twice"),
    ],
)
def test_bad_schedule_and_mixture_settings_name_the_option(options, message):
    with pytest.raises(TrainingError, match=message.replace("(", r"\(")):
        TrainSettings(**options).check()


def test_decay_sources_are_shares_and_stdlib_names_the_built_in_corpus():
    settings = TrainSettings(decay_data="stdlib=3,/x/hq=1")
    assert settings.decay_sources() == [(None, 0.75), ("/x/hq", 0.25)]
    assert TrainSettings(decay_data="/a=b=2").decay_sources() == [("/a=b", 1.0)]


def _text_corpus(letter: str, size: int = 5000) -> Corpus:
    text = torch.full((size,), ord(letter), dtype=torch.uint8)
    return Corpus(text, text[:100], letter)


def test_the_mixture_draws_windows_in_its_proportions_and_is_a_function_of_the_step():
    sources = [(_text_corpus("a"), 0.5), (_text_corpus("b"), 0.3), (_text_corpus("c"), 0.2)]
    counts = torch.zeros(3)
    draws = 0
    for step in range(300):
        batch = mixture_batch(sources, step, 7, 16, 8)
        assert batch.shape == (16, 9)
        first = batch[:, 0]
        assert all((row == row[0]).all() for row in batch)  # each window from one source
        for index, letter in enumerate("abc"):
            counts[index] += (first == ord(letter)).sum()
        draws += 16
        assert torch.equal(batch, mixture_batch(sources, step, 7, 16, 8))
    shares = torch.tensor([0.5, 0.3, 0.2])
    sigma = (shares * (1 - shares) / draws).sqrt()
    assert ((counts / draws - shares).abs() < 4 * sigma).all(), counts / draws
    assert not torch.equal(mixture_batch(sources, 0, 7, 16, 8), mixture_batch(sources, 0, 8, 16, 8))


@pytest.fixture
def two_corpora(tmp_path):
    phase1, quality = tmp_path / "phase1.txt", tmp_path / "quality"
    phase1.write_text("def f(x):\n    return x + 1\n" * 200)
    quality.mkdir()
    (quality / "good.py").write_text("class Point:\n    '''A point.'''\n    x: int = 0\n" * 150)
    return phase1, quality


def _spy(monkeypatch, interrupt_at=None):
    """Record the steps whose batch comes from the mixture; raise KeyboardInterrupt at the
    mixture step ``interrupt_at`` (the run saves and stops there, as on Ctrl-C)."""
    steps = []
    real = data.mixture_batch  # the function itself, not an earlier spy

    def spy(sources, step, *args):
        if step == interrupt_at:
            raise KeyboardInterrupt
        steps.append(step)
        return real(sources, step, *args)

    monkeypatch.setattr(loop, "mixture_batch", spy)
    return steps


def test_phase_two_draws_the_mixture_and_resumes_exactly_across_the_switch(
    tmp_path, two_corpora, monkeypatch, capsys
):
    phase1, quality = two_corpora
    mixture = f"{phase1}=0.6,{quality}=0.4"
    recipe = ["--data", str(phase1), "--steps", "8", "--schedule", "wsd-exp",
              "--decay-fraction", "0.5", "--decay-data", mixture, *FAST]  # fmt: skip
    straight = tmp_path / "straight"
    mixed = _spy(monkeypatch)
    assert main(["train", *recipe, "--out", str(straight)]) == 0
    assert mixed == [4, 5, 6, 7]  # decay start 8 · (1 - 0.5)
    assert "decay:  from step 5 on, batches drawn from 60% " in capsys.readouterr().out
    split = tmp_path / "split"
    _spy(monkeypatch, interrupt_at=6)  # stopped inside phase 2, after the switch
    assert main(["train", *recipe, "--out", str(split)]) == 130
    assert json.loads((split / "checkpoint" / "trainer_state.json").read_text())["step"] == 6
    resumed = _spy(monkeypatch)
    assert main(["train", "--out", str(split), "--resume", "--quiet"]) == 0
    assert resumed == [6, 7]
    logs = [json.loads((run / "log.json").read_text()) for run in (straight, split)]
    assert [e["lm_loss"] for e in logs[0]] == [e["lm_loss"] for e in logs[1]]
    assert [e["lr"] for e in logs[0]] == [e["lr"] for e in logs[1]]
    rates = [e["lr"] for e in logs[0]]
    assert rates[4] == 3e-3 and rates[5] == pytest.approx(3e-3 * 0.1**0.25)  # exponential


def test_a_resume_may_not_change_the_mixture(tmp_path, two_corpora, capsys):
    phase1, quality = two_corpora
    out = tmp_path / "run"
    assert main(["train", "--data", str(phase1), "--steps", "4", *FAST, "--out", str(out),
                 "--decay-data", f"{quality}=1"]) == 0  # fmt: skip
    capsys.readouterr()
    code = main(["train", "--out", str(out), "--resume", "--steps", "6",
                 "--decay-data", f"{phase1}=1"])  # fmt: skip
    assert code == 2
    assert "--decay-data" in capsys.readouterr().err


def test_a_missing_mixture_source_is_one_line_before_any_step(tmp_path, two_corpora, capsys):
    phase1, _ = two_corpora
    out = tmp_path / "run"
    code = main(["train", "--data", str(phase1), "--steps", "4", *FAST, "--out", str(out),
                 "--decay-data", f"{tmp_path / 'nothing'}=1"])  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--decay-data" in error and "no such file" in error
    assert not (out / "checkpoint").exists()


def test_the_built_in_corpus_loads_under_its_own_flag_name():
    with pytest.raises(TrainingError, match="--decay-data /nonexistent"):
        load_corpus("/nonexistent", 32, "--decay-data")


def test_a_mixture_folder_inside_data_never_trains_on_its_validation_files(tmp_path):
    root = tmp_path / "corpus"
    (root / "good").mkdir(parents=True)
    for index in range(300):
        (root / ("good" if index % 2 else "") / f"f{index}.py").write_text(f"x = {index}\n" * 30)
    settings = TrainSettings(data=str(root), seq_len=16, decay_data=f"{root / 'good'}=1")
    corpus = load_corpus(str(root), 16)
    [(good, share)] = data.load_decay_corpora(settings, corpus)
    assert share == 1.0
    # every file of good/ is on the side of the split that --data gives it
    files = sorted((root / "good").iterdir())
    held_out = [f for f in files if data._in_validation(f.relative_to(root).as_posix())]
    assert held_out
    train_text = bytes(good.train.tolist())
    for path in files:
        assert (path.read_bytes() in train_text) == (path not in held_out), path


@pytest.mark.parametrize(
    "layout",
    ["decay inside data", "data inside decay", "data a file in decay", "data split by position"],
)
def test_phase_2_never_trains_on_the_validation_text_of_data_whichever_holds_the_other(
    tmp_path, layout
):
    """Whatever the folders, no text of ``--data``'s validation part is in a phase-2 source's
    training part: a source's files that are ``--data``'s keep ``--data``'s side."""
    root = tmp_path / "corpus"
    inner = root / "inner"
    inner.mkdir(parents=True)
    for index in range(200):
        folder = inner if index % 3 == 0 else root
        (folder / f"f{index}.py").write_text(f"unique_{index}_ = {index}; " * 25)
    data_path, decay_path = {
        "decay inside data": (root, inner),
        "data inside decay": (inner, root),
        "data a file in decay": (inner / "f3.py", root),
        "data split by position": (inner / "f3.py", inner),
    }[layout]
    settings = TrainSettings(data=str(data_path), seq_len=16, decay_data=f"{decay_path}=1")
    corpus = load_corpus(str(data_path), 16)
    [(source, _)] = data.load_decay_corpora(settings, corpus)
    held_out = bytes(corpus.validation.tolist()).split(data.SEPARATOR)
    assert held_out and all(held_out)
    trained = bytes(source.train.tolist())
    assert not [text for text in held_out if text in trained]
    if data_path.is_dir():  # split by path: --data's training files in the source stay
        texts = {path.read_bytes() for path in decay_path.rglob("*.py")}
        kept = texts & set(bytes(corpus.train.tolist()).split(data.SEPARATOR))
        assert kept and all(text in trained for text in kept)


def test_the_decay_start_takes_numpy_fractions_and_refuses_a_bool():
    import numpy as np

    assert TrainSettings(steps=10, decay_fraction=np.float64(0.7)).decay_start == 3
    with pytest.raises(TrainingError, match="--decay-fraction"):
        TrainSettings(decay_fraction=True).check()


def test_a_phase_2_source_of_nothing_but_validation_text_of_data_is_refused(tmp_path):
    root = tmp_path / "corpus"
    (root / "inner").mkdir(parents=True)
    for index in range(100):
        (root / f"f{index}.py").write_text(f"x_{index} = {index}\n" * 30)
    held = next(f"inner/v{i}.py" for i in range(1000) if data._in_validation(f"inner/v{i}.py"))
    (root / held).write_text("held_out = 1\n" * 50)
    settings = TrainSettings(data=str(root), seq_len=16, decay_data=f"{root / 'inner'}=1")
    with pytest.raises(TrainingError, match="--decay-data.*validation"):
        data.load_decay_corpora(settings, load_corpus(str(root), 16))


@pytest.mark.parametrize("steps", [10, 100, 600, 1000, 2300])
def test_the_decay_starts_at_the_step_the_fraction_names_in_decimal(steps):
    """``steps · (1 - fraction)`` as written: 10 · (1 - 0.7) is step 3 (floats give
    3.0000000000000004, which would start the decay and the mixture a step late)."""
    for hundredths in range(101):
        fraction = hundredths / 100
        settings = TrainSettings(steps=steps, decay_fraction=fraction)
        exact = steps - steps * hundredths // 100 if steps * hundredths % 100 == 0 else None
        if exact is not None:
            assert settings.decay_start == exact, fraction


def test_a_folder_corpus_leaves_out_compiled_python_and_hidden_files(tmp_path):
    root = tmp_path / "corpus"
    texts = {"a.py": b"a.py " * 20, "sub/b.txt": b"sub/b.txt " * 20}
    hidden = ["__pycache__/a.cpython-311.pyc", ".git/HEAD", "sub/.hidden", "sub/__pycache__/b.pyc"]
    for name, content in texts.items() | {name: b"\x00BINARY" for name in hidden}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    corpus = load_corpus(str(root), 8)
    text = bytes(torch.cat([corpus.train, corpus.validation]).tolist())
    assert b"a.py" in text and b"sub/b.txt" in text
    assert b"BINARY" not in text and "2 files" in corpus.description
