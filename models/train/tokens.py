"""What a run's text becomes: bytes (vocabulary 256, the built-in presets' default) or the ids
of a transformers tokenizer, tokenized once into memory-mapped token files that are reused
while neither the text nor the tokenizer changes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .settings import TrainingError, message_lines

BYTES = "bytes"  # --tokenizer bytes: each byte is a token
# A transformers checkpoint's tokenizer and generation files (what AutoTokenizer reads).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "generation_config.json",
)  # fmt: skip
USER_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moe-blocks" / "tokens"
)


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a transformers tokenizer (its files, as ``save_pretrained``
    writes them)."""
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(spec: str | None, checkpoint: Path | None):
    """The tokenizer a run uses, or None for bytes: ``spec`` "bytes", a folder (a transformers
    tokenizer), or None: the tokenizer of ``checkpoint`` (``--resume-from``) when it has one,
    else bytes. A TrainingError naming ``--tokenizer`` when it cannot be loaded or has no end
    token (which separates documents)."""
    if spec == BYTES:
        return None
    folder = Path(spec) if spec is not None else checkpoint
    if folder is None or (spec is None and not has_tokenizer(folder)):
        return None
    flag = "--tokenizer" if spec is not None else "the tokenizer beside the model in"
    if not folder.is_dir() or not has_tokenizer(folder):
        raise TrainingError(f"{flag} {folder}: no transformers tokenizer there (tokenizer.json "
                            "or tokenizer_config.json); or give --tokenizer bytes")  # fmt: skip
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # transformers raises many kinds for a broken tokenizer
        reason = message_lines(error)[0]
        raise TrainingError(f"{flag} {folder}: cannot load it ({reason})") from None
    if tokenizer.eos_token_id is None:
        raise TrainingError(
            f"{flag} {folder}: the tokenizer has no end token (eos_token), which separates "
            "documents"
        )
    tokenizer.name_or_path = str(folder)
    return tokenizer


def copy_tokenizer_files(source: str | None, folder: Path) -> None:
    """Copy the tokenizer files of the folder ``source`` (a run's resolved ``--tokenizer``;
    nothing for bytes) into ``folder``, so a checkpoint carries the tokenizer it was trained
    with (``--resume-from`` it, transformers' ``AutoTokenizer``)."""
    if source is None or source == BYTES:
        return
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, folder / name)


def vocabulary(tokenizer) -> int:
    """How many token ids the text can hold: 256 for bytes, else the tokenizer's length."""
    return 256 if tokenizer is None else len(tokenizer)


def check_vocabulary(tokenizer, vocab_size: int, where: str) -> None:
    """A TrainingError, before any step, when the model (``where``, ``vocab_size`` ids) cannot
    embed every id of the text."""
    needed = vocabulary(tokenizer)
    if vocab_size >= needed:
        return
    if tokenizer is None:
        raise TrainingError(
            f"{where}: the model's vocabulary has {vocab_size} tokens, fewer than the 256 byte "
            "values that --tokenizer bytes feeds it; give --tokenizer DIR (the model's own)"
        )
    raise TrainingError(
        f"{where}: the model's vocabulary has {vocab_size} tokens, but --tokenizer "
        f"{tokenizer.name_or_path} has {needed}: not the model's tokenizer"
    )


def describe(tokenizer) -> str:
    return "bytes" if tokenizer is None else f"tokenizer {tokenizer.name_or_path}"


def tokenizer_key(tokenizer) -> str:
    """A digest of what the tokenizer does (its whole pipeline for a fast tokenizer, else its
    vocabulary and class) and of its end token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(
        sorted(tokenizer.get_vocab().items()))  # fmt: skip
    identity = f"{type(tokenizer).__name__}\n{tokenizer.eos_token_id}\n{spec}"
    return hashlib.sha256(identity.encode()).hexdigest()


def tokenize(tokenizer, documents: list[bytes]) -> torch.Tensor:
    """The ids ``[N]`` (int32) of ``documents`` (UTF-8 text; undecodable bytes replaced), each
    followed by the end token."""
    texts = [document.decode("utf-8", errors="replace") for document in documents]
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
        ids += row
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int32)


def cache_folder(data: str | Path | None) -> Path:
    """Where a corpus's token files go: beside it in a hidden folder (``.<file or
    folder>.tokens``, which no corpus reads as text: a folder corpus leaves hidden files out,
    and another corpus may hold this one), or the user's cache (``~/.cache/moe-blocks/tokens``)
    for the built-in corpus."""
    if data is None:
        return USER_CACHE
    path = Path(data).resolve()
    return path.parent / f".{path.name}.tokens"


def cached(folders: list[Path], key: str, build: Callable[[], dict]) -> dict:
    """``build()``'s tensors (1-D int32) and numbers, from the token files named ``key`` in the
    first of ``folders`` that has them (memory-mapped, not read into memory); else built and
    written (atomically) to the first folder that can be written, then mapped from there."""
    for folder in folders:
        meta = folder / f"{key}.json"
        if meta.is_file():
            try:
                return _mapped(folder, key, json.loads(meta.read_text()))
            except (OSError, ValueError, RuntimeError):
                pass  # damaged: built again below
    built = build()
    tensors = {name: value for name, value in built.items() if isinstance(value, torch.Tensor)}
    numbers = {name: value for name, value in built.items() if name not in tensors}
    record = {"tensors": {name: t.numel() for name, t in tensors.items()}, **numbers}
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name, tensor in tensors.items():
                _write(folder / f"{key}.{name}.i32", tensor.numpy().tobytes())
            _write(folder / f"{key}.json", json.dumps(record).encode())
            return _mapped(folder, key, record)
        except OSError:
            continue  # not writable here: the next folder
    return built


def _mapped(folder: Path, key: str, record: dict) -> dict:
    out = dict(record)
    for name, count in out.pop("tensors").items():
        path = folder / f"{key}.{name}.i32"
        if path.stat().st_size != 4 * count:
            raise ValueError(f"{path}: wrong size")
        out[name] = (
            torch.from_file(str(path), shared=False, size=count, dtype=torch.int32)
            if count else torch.empty(0, dtype=torch.int32)
        )  # fmt: skip
    return out


def _write(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:
        handle.write(data)
    os.replace(handle.name, path)
