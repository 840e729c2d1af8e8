"""The text a run trains and validates on, its batches, and the validation loss.

The default corpus is the running interpreter's own standard library (``*.py`` files read as
bytes, vocabulary 256): no download, no tokenizer. Files are sorted by path and split into
train and validation by a stable hash of the path."""

from __future__ import annotations

import hashlib
import math
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import tokens
from .settings import DEFAULT_SEQ_LEN, TrainingError, TrainSettings, check_path_given

VALIDATION_PERCENT = 5


SEPARATOR = b"\n\n"


STDLIB = Path(sysconfig.get_paths()["stdlib"])


@dataclass
class Corpus:
    """Training and validation text as token ids (uint8 bytes, or a tokenizer's int32 ids);
    ``tokens_per_byte``: the validation text's, which turns nats per token into bits per
    byte. ``files``: the resolved paths of its files; ``held_out``: those whose text is (in
    part, when split by position) validation."""

    train: torch.Tensor
    validation: torch.Tensor
    description: str
    tokens_per_byte: float = 1.0
    files: frozenset[Path] = frozenset()
    held_out: frozenset[Path] = frozenset()

    @property
    def unit(self) -> str:
        """What one id is: "bytes" or (a tokenizer's) "tokens"."""
        return "bytes" if self.train.dtype == torch.uint8 else "tokens"


def _in_validation(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode()) % 100 < VALIDATION_PERCENT


def _join(texts: list[bytes]) -> torch.Tensor:
    data = SEPARATOR.join(texts)
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )


def _text_files(root: Path) -> list[Path]:
    """Every file under the folder ``root``, sorted, but for compiled Python (``__pycache__``)
    and hidden files and folders (``.git``, ``.venv``, ...)."""
    return sorted(
        path
        for path in root.rglob("*")
        if path.is_file()
        and not any(
            part == "__pycache__" or part.startswith(".") for part in path.relative_to(root).parts
        )  # fmt: skip
    )


def load_corpus_files() -> list[Path]:
    """The running interpreter's standard-library ``*.py`` files, sorted by path."""
    root = STDLIB
    return sorted(
        path
        for path in root.rglob("*.py")
        if not {"site-packages", "__pycache__"} & set(path.relative_to(root).parts)
    )


def load_corpus(
    data: str | Path | None,
    seq_len: int = DEFAULT_SEQ_LEN,
    flag: str = "--data",
    tokenizer=None,
    beside: Corpus | None = None,
) -> Corpus:
    """The text to train and validate on, each part at least one window of ``seq_len + 1``
    tokens: the standard library's Python sources (``data=None``), every file under a folder, or
    one file; as bytes, or as the ids of ``tokenizer`` (a transformers tokenizer: each file is a
    document followed by the end token; tokenized once into token files beside the text,
    :func:`tokens.cached`, rebuilt when the text or the tokenizer changes). Files are split by
    a stable hash of their path relative to the corpus's folder; when that leaves either part
    shorter than a window (one file, or a folder of few files), the text of all of them is
    split by position instead: the last 5 %, and at least a window, is validation. Text shorter
    than two windows is a :class:`TrainingError` naming ``flag``.

    ``beside``: a corpus (``--data``) whose validation text this one must never train on,
    whatever their folders (one inside the other, or a file of one in the other): its files
    are on the side they are there (all of them validation when it was split by position), only
    this corpus's other files are split by path hash, and its text is then never split by
    position: its validation may be short or empty, and a training part shorter than a window
    is a :class:`TrainingError` naming ``flag``."""
    if data is None:
        root = STDLIB
        files = load_corpus_files()
        description = f"Python {sysconfig.get_python_version()} standard library ({root})"
    else:
        check_path_given(
            flag, data, f"a text file or folder (or leave {flag} out for Python's standard library)"
        )
        root = Path(data)
        if not root.exists():
            raise TrainingError(f"{flag} {data}: no such file or folder")
        files = [root] if root.is_file() else _text_files(root)
        description = str(root)
    resolved = [path.resolve() for path in files]
    hashed = [_in_validation(path.relative_to(root).as_posix()) for path in files]
    shared = beside is not None and not beside.files.isdisjoint(resolved)
    if shared:  # the files of ``beside`` keep its sides
        hashed = [
            path in beside.held_out if path in beside.files else side
            for path, side in zip(resolved, hashed, strict=True)
        ]
    texts = [path.read_bytes() for path in files]
    parts = {
        name: [text for text, val in zip(texts, hashed, strict=True) if val == in_validation]
        for name, in_validation in (("train", False), ("validation", True))
    }
    window, by_position = seq_len + 1, False
    if tokenizer is None:
        train, validation = _join(parts["train"]), _join(parts["validation"])
        tokens_per_byte, unit = 1.0, "bytes"
    else:
        found = _tokenized(data, texts, parts, tokenizer, None if shared else window)
        train, validation, tokens_per_byte = found["train"], found["validation"], found["ratio"]
        unit = f"tokens, {1 / tokens_per_byte:.2f} bytes per token, {tokens.describe(tokenizer)}"
        by_position = found["by_position"]
    if shared and train.numel() < window:
        raise TrainingError(
            f"--seq-len {seq_len}: {flag} {data} has {train.numel():,} {unit.split(',')[0]} of "
            f"text outside the validation text of --data, fewer than a window of --seq-len + 1 "
            f"({window}); use a smaller --seq-len or more text"
        )
    if not shared and min(train.numel(), validation.numel()) < window:
        # one file, or all the files on one side
        text = _join(texts) if tokenizer is None else torch.cat([train, validation])
        if text.numel() < 2 * window:
            source = "Python's standard library" if data is None else f"{flag} {data}"
            raise TrainingError(
                f"--seq-len {seq_len}: {source} has {text.numel():,} {unit.split(',')[0]} of "
                f"text, fewer than two windows of --seq-len + 1 ({window}), one to train on and "
                "one to validate; use a smaller --seq-len or more text"
            )
        size = max(text.numel() * VALIDATION_PERCENT // 100, window)
        train, validation, by_position = text[:-size], text[-size:], True
    held_out = [path for path, val in zip(resolved, hashed, strict=True) if val or by_position]
    count = f"{len(files):,} file{'s' * (len(files) != 1)}"
    split = "split by position" if by_position else "split by path hash"
    return Corpus(
        train,
        validation,
        f"{description}: {count}, {train.numel():,} + {validation.numel():,} {unit} ({split})",
        tokens_per_byte,
        frozenset(resolved),
        frozenset(held_out),
    )


def _tokenized(data, texts: list[bytes], parts: dict, tokenizer, window: int | None) -> dict:
    """The train and validation ids of ``parts`` (by path hash; all the text by position when
    either is shorter than ``window``, never when it is None) and ``ratio``, the validation's
    tokens per byte (the whole text's when split by position, each file's separator counted as
    two bytes as in the byte corpus; the training part's where there is no validation text),
    from the token cache."""
    digest = hashlib.sha256(tokens.tokenizer_key(tokenizer).encode())
    for name in ("train", "validation"):
        digest.update(f"{name} {len(parts[name])}\n".encode())
        for text in parts[name]:
            digest.update(hashlib.sha256(text).digest())
    key = f"{digest.hexdigest()[:32]}-w{window or 0}"

    def build() -> dict:
        ids = {name: tokens.tokenize(tokenizer, parts[name]) for name in parts}
        if window is None or min(t.numel() for t in ids.values()) >= window:
            # (a phase-2 source inside --data may have no validation text: its training part's)
            side = "validation" if parts["validation"] else "train"
            size = sum(map(len, parts[side])) + len(SEPARATOR) * len(parts[side])
            return {**ids, "ratio": ids[side].numel() / max(1, size), "by_position": False}
        every = tokens.tokenize(tokenizer, texts)
        size = max(every.numel() * VALIDATION_PERCENT // 100, window)
        ratio = every.numel() / max(1, sum(map(len, texts)) + len(SEPARATOR) * len(texts))
        return {"train": every[:-size], "validation": every[-size:], "ratio": ratio,
                "by_position": True}  # fmt: skip

    return tokens.cached([tokens.cache_folder(data), tokens.USER_CACHE], key, build)


def batch_at(
    data: torch.Tensor, step: int, seed: int, batch_size: int, length: int
) -> torch.Tensor:
    """Windows ``[batch_size, length + 1]`` (int64) of the text ``data`` (token ids, at least
    ``length + 1``) for one step, a function of (seed, step) only, so a resumed run sees
    the same data order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, _window_starts(data, length), (batch_size,), generator=generator)
    return windows(data, starts, length)


def load_decay_corpora(
    settings: TrainSettings, corpus: Corpus, tokenizer=None
) -> list[tuple[Corpus, float]]:
    """The ``--decay-data`` mixture as ``(corpus, share)`` pairs (empty without it), in the
    run's ``tokenizer``; a source that names ``--data`` (or ``stdlib`` for the built-in
    corpus) is ``corpus`` itself, and any other keeps ``--data``'s files on the side of
    ``--data``'s split (:func:`load_corpus` ``beside``), so phase 2 never trains on ``--data``'s
    validation text, whichever folder holds the other."""
    if settings.decay_data is None:
        return []
    return [
        (corpus if same_path(path, settings.data)
         else load_corpus(path, settings.seq_len, "--decay-data", tokenizer, corpus), share)
        for path, share in settings.decay_sources()
    ]  # fmt: skip


def mixture_batch(
    sources: list[tuple[Corpus, float]], step: int, seed: int, batch_size: int, length: int
) -> torch.Tensor:
    """Windows ``[batch_size, length + 1]`` of the training texts of ``sources``: each window's
    source drawn with the sources' shares, then its start in that text, a function of (seed,
    step) only (another random stream than :func:`batch_at`'s), so a resumed run sees the same
    batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step + 2**40)
    shares = torch.tensor([share for _, share in sources], dtype=torch.float64)
    choice = torch.multinomial(shares, batch_size, replacement=True, generator=generator)
    batch = torch.empty(batch_size, length + 1, dtype=torch.long)
    for index, (corpus, _) in enumerate(sources):
        rows = (choice == index).nonzero().flatten()
        count = _window_starts(corpus.train, length)
        starts = torch.randint(0, count, (rows.numel(),), generator=generator)
        batch[rows] = windows(corpus.train, starts, length)
    return batch


def same_path(theirs: str | None, ours: str | None) -> bool:
    """Whether two ``--data`` (or ``--resume-from``) values name the same files: both None (the
    standard library) or the same path once resolved (a checkpoint written before paths were
    saved absolute holds a relative one)."""
    if theirs is None or ours is None:
        return theirs is ours
    return Path(theirs).resolve() == Path(ours).resolve()


def _window_starts(data: torch.Tensor, length: int) -> int:
    """How many windows of ``length + 1`` bytes fit."""
    return data.numel() - length


def windows(data: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    return data[starts[:, None] + torch.arange(length + 1)].long()


def validation_starts(corpus: Corpus, settings: TrainSettings) -> list[torch.Tensor]:
    """Start offsets of the validation windows, ``eval_batches`` batches of ``batch_size``,
    spread evenly over the validation text."""
    count = settings.eval_batches * settings.batch_size
    last_start = _window_starts(corpus.validation, settings.seq_len) - 1
    return list(torch.linspace(0, last_start, count).long().split(settings.batch_size))


@torch.no_grad()
def evaluate(
    model, corpus: Corpus, settings: TrainSettings, *, sharded: bool = False, device=None
) -> float:
    """Validation loss in bits per byte on fixed windows spread over the validation text
    (bits per token times the corpus's tokens per byte).
    ``sharded``: each rank of the initialised process group scores its share of every batch
    and the sums are all-reduced (collective: every rank must call it)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)  # summed loss (nats), scored bytes
    for chunk in validation_starts(corpus, settings):
        window = windows(corpus.validation, chunk.tensor_split(world)[rank], settings.seq_len)
        window = window.to(device)
        logits = model(window[:, :-1]).logits
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), window[:, 1:].reshape(-1), reduction="sum"
        )
        total += torch.stack([loss.double().cpu(), torch.tensor(float(window[:, 1:].numel()))])
    if sharded:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item() / math.log(2) * corpus.tokens_per_byte
