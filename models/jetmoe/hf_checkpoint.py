"""Hugging Face JetMoe checkpoints: the key mapping between our state_dict and transformers',
reading (``model.safetensors`` or an index with shards; nothing unpickled) and writing them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import JetMoEConfig

_MOA_EXPERT_PARTS = ("router.", "input_linear.", "output_linear.", "bias")


def to_hf_key(name: str) -> str:
    """Our state_dict key -> transformers': MoA's expert weights live under ``experts``."""
    head, sep, tail = name.partition(".self_attention.")
    if sep and tail.startswith(_MOA_EXPERT_PARTS):
        return f"{head}.self_attention.experts.{tail}"
    return name


def from_hf_key(name: str) -> str:
    return name.replace(".self_attention.experts.", ".self_attention.")


_INDEX = "model.safetensors.index.json"


def load_json(file: Path):
    """The JSON value in ``file``; ``ValueError`` naming the file when it is not UTF-8 JSON
    (``FileNotFoundError``/``OSError`` pass through)."""
    try:
        return json.loads(file.read_text())
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{file}: not valid JSON ({error})") from error


def load_pretrained(
    cls: type[nn.Module], path: str | Path, *, dtype: torch.dtype | None = None,
    device: str = "cpu",
) -> nn.Module:  # fmt: skip
    """``cls`` (:class:`~.model.JetMoEForCausalLM`) with the weights of the checkpoint folder
    ``path`` (see ``JetMoEForCausalLM.from_pretrained``): built on ``meta``, every stored
    tensor checked against the model's names, shapes and float dtypes, then assigned."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a checkpoint directory")
    config = JetMoEConfig.from_hf_dict(load_json(config_path), str(config_path))
    with torch.device("meta"):
        model = cls(config, dtype=dtype)
    expected = {to_hf_key(name): param for name, param in model.state_dict(keep_vars=True).items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state = {}
    for file, keys in _checkpoint_files(path).items():
        try:
            handle = safe_open(str(file), framework="pt", device=device)
        except SafetensorError as error:
            raise ValueError(f"{file}: not a readable safetensors file ({error})") from error
        with handle:
            stored = set(handle.keys())
            for key in keys or stored:
                if key not in stored:
                    raise ValueError(
                        f"{file.name}: lacks {key!r}, which {_INDEX} places in this file"
                    )
                if key not in expected:
                    if key == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # a tied copy, as transformers sometimes writes
                    raise ValueError(f"{file.name}: unexpected key {key!r}")
                tensor = handle.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[key].shape):
                    raise ValueError(
                        f"{file.name}: {key!r} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(expected[key].shape)}"
                    )
                if not tensor.is_floating_point():
                    raise ValueError(
                        f"{file.name}: {key!r} has dtype {tensor.dtype}, expected a "
                        "floating-point dtype"
                    )
                # safetensors maps the file: a CPU tensor it returns is a copy-on-write view of
                # the file's pages, which change when the file is rewritten in place and which
                # slowed a fp32 decode step 1.66x (8 layers of JetMoE's CPU bench shape, 4 KB
                # file pages against the process's own memory): such a tensor is copied out
                owned = tensor.device.type != "cpu"
                state[from_hf_key(key)] = tensor.to(dtype or tensor.dtype, copy=not owned)
    missing = sorted(set(expected) - {to_hf_key(k) for k in state})
    if missing:
        files = ", ".join(file.name for file in _checkpoint_files(path))
        raise ValueError(
            f"{path}: its weight files ({files}) lack {len(missing)} weights, e.g. {missing[:3]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    _materialize_buffers(model, device)
    return model.eval()


def save_pretrained(model: nn.Module, path: str | Path, *, max_shard_bytes: int) -> None:
    """``model``'s ``config.json`` and weights in transformers' layout (see
    ``JetMoEForCausalLM.save_pretrained``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {to_hf_key(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    dtype = next(iter(state.values())).dtype
    config = model.config.to_hf_dict() | {"dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / _INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _checkpoint_files(path: Path) -> dict[Path, list[str] | None]:
    """The safetensors files of a checkpoint, each with its keys (None: all of them)."""
    single = path / "model.safetensors"
    index = path / _INDEX
    if single.is_file():
        return {single: None}
    if index.is_file():
        data = load_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        files_named = isinstance(weight_map, dict) and all(
            isinstance(file, str) for file in weight_map.values()
        )
        if not files_named:
            raise ValueError(f"{index}: not a safetensors index (no weight_map of file names)")
        files: dict[Path, list[str]] = {}
        for key, file in weight_map.items():
            files.setdefault(path / file, []).append(key)
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{file} (listed in {index.name}) not found")
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(f"{path}: only safetensors checkpoints are read (never pickles)")
    raise FileNotFoundError(f"{path}: neither model.safetensors nor {index.name} found")


def _materialize_buffers(model: nn.Module, device: str) -> None:
    """Give the router statistics buffers (not in checkpoints) real storage after a meta
    build."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.device.type == "meta":
                module._buffers[name] = torch.zeros_like(buffer, device=device)
