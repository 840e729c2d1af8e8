"""LoRA fine-tuning (``--lora-rank``) with PEFT: adapters on the attention (the MoA experts'
query and output projections, ``[E, out, in]``, and ``kv_proj``) and on the MLP experts'
``[E, out, in]`` weights, which keep running through moe-blocks' kernel (PEFT's
``target_parameters`` adds ``scale · B·A`` to the weight the kernel reads); the adapters'
files in PEFT's format with transformers' JetMoe names, and the merged model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..jetmoe import from_hf_key, to_hf_key
from .settings import TrainingError, TrainSettings, message_lines

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's names for an adapter's files
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER = "default"  # the one adapter's name inside the model
_PREFIX = "base_model.model."  # PEFT's key prefix in an adapter file (PeftModel wraps the model)

# each of --lora-targets (settings.LORA_TARGETS): the modules (nn.Linear) and [E, out, in]
# expert weights it adapts
ADAPTED = {
    "attention": (
        ["kv_proj"],
        ["self_attention.input_linear.weight", "self_attention.output_linear.weight"],
    ),
    "experts": ([], ["mlp.input_linear.weight", "mlp.output_linear.weight"]),
}


def _peft():
    try:
        import peft
    except ImportError:
        raise TrainingError(
            "--lora-rank needs PEFT: pip install 'moe-blocks[lora]' (or pip install peft)"
        ) from None
    return peft


def _hf_name(name: str) -> str:
    """A parameter name's suffix as transformers' JetMoe spells it (MoA's experts)."""
    return to_hf_key(f".{name}")[1:]


def lora_config(settings: TrainSettings):
    """The PEFT ``LoraConfig`` of a run, in this model's names (:func:`save_adapters` writes
    it in transformers')."""
    modules, parameters = [], []
    for target in settings.lora_target_names:
        modules += ADAPTED[target][0]
        parameters += ADAPTED[target][1]
    return _peft().LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_scale_alpha,
        lora_dropout=0.0,  # PEFT's adapters of a weight (target_parameters) have none
        target_modules=modules,
        target_parameters=parameters,
        base_model_name_or_path=settings.resume_from,
    )


def attach_lora(model, config, *, seed: int = 0):
    """Freeze ``model`` and add LoRA adapters of the PEFT ``config`` in place (B = 0: the
    model's outputs are unchanged; A drawn from ``seed``, the global generator left as it
    was), kept in fp32 whatever the model's dtype (in bf16, AdamW's small late updates would
    round away: PeftModel upcasts them too); returns PEFT's ``LoraModel`` around it (for
    :func:`merged_model`). Only the adapters require gradients."""
    peft = _peft()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lora = peft.tuners.lora.LoraModel(model, config, _ADAPTER)
    peft.tuners.tuners_utils.cast_adapter_dtype(model, _ADAPTER, autocast_adapter_dtype=True)
    return lora


def _adapter_state(model) -> dict:
    """``model``'s adapter weights keyed as PEFT keys them, by this model's module names (no
    embedding layers: none are adapted)."""
    return _peft().get_peft_model_state_dict(
        model, adapter_name=_ADAPTER, save_embedding_layers=False
    )


def describe_lora(model, settings: TrainSettings) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (
        f"lora:   rank {settings.lora_rank}, alpha {settings.lora_scale_alpha:g}, on "
        f"{' and '.join(settings.lora_target_names)}: {trainable:,} trainable parameters "
        f"({100 * trainable / total:.2f} % of {total:,}); exports the "
        f"{'adapters' if settings.lora_export == 'adapters' else 'merged model'} to model/"
    )


def save_adapters(model, config, folder: Path) -> None:
    """The adapters of ``model`` (made by :func:`attach_lora` with ``config``) as PEFT saves
    them, in transformers' JetMoe names: ``PeftModel.from_pretrained(JetMoeForCausalLM...,
    folder)`` loads them."""
    peft = _peft()
    state = _adapter_state(model)
    tensors = {_PREFIX + to_hf_key(key): value.detach().cpu().contiguous() for key, value in
               state.items()}  # fmt: skip
    saved = peft.LoraConfig(**config.to_dict())
    saved.target_parameters = [_hf_name(name) for name in config.target_parameters]
    saved.save_pretrained(folder)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_adapter_config(folder: Path):
    """The PEFT ``LoraConfig`` of the adapters in ``folder``, in this model's names; a
    TrainingError naming the file when it is not one."""
    path = folder / ADAPTER_CONFIG
    peft = _peft()
    try:
        config = peft.LoraConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as error:
        reason = message_lines(error)[0]
        raise TrainingError(f"{path}: not a LoRA adapter's config ({reason})") from None
    config.target_parameters = [from_hf_key(f".{name}")[1:] for name in
                                config.target_parameters or []]  # fmt: skip
    return config


def load_adapters(model, folder: Path) -> None:
    """Load the adapter weights that :func:`save_adapters` wrote into ``folder`` into
    ``model`` (adapters attached by :func:`attach_lora` with the same config); a TrainingError
    naming the file when they are missing or do not fit."""
    path = folder / ADAPTER_WEIGHTS
    try:
        stored = load_file(str(path))
    except (OSError, SafetensorError) as error:
        reason = message_lines(error)[0]
        raise TrainingError(f"{path}: cannot read the adapters ({reason})") from None
    expected = _adapter_state(model)
    state = {from_hf_key(key.removeprefix(_PREFIX)): value for key, value in stored.items()}
    if state.keys() != expected.keys() or any(
        state[key].shape != expected[key].shape for key in expected
    ):
        raise TrainingError(f"{path}: these adapters are not of this model and LoRA config")
    _peft().set_peft_model_state_dict(model, state, adapter_name=_ADAPTER)


def merged_model(lora):
    """The model of ``lora`` (:func:`attach_lora`) with its adapters added into the weights
    and removed (in place): a plain model whose outputs equal the adapted one's."""
    with torch.no_grad():
        return lora.merge_and_unload()
