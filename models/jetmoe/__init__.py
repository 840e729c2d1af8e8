"""JetMoE-8B assembled from moe-blocks' MoA, MoEMLP and TopKRouter, interchangeable with
Hugging Face JetMoe checkpoints.

- :mod:`.config`: :class:`JetMoEConfig`, its presets and its ``config.json``;
- :mod:`.model`: RMSNorm, the decoder layer, the causal LM (forward, loss, generation,
  initialisation, parameter counts);
- :mod:`.hf_checkpoint`: the key mapping, ``from_pretrained``, ``save_pretrained``;
- :mod:`.sharding`: its parallelisation plan (``moe_blocks.models.parallelize``; imported on
  first use: it needs torch.distributed's FSDP and tensor modules).
"""

from .config import JetMoEConfig
from .hf_checkpoint import from_hf_key, load_json, to_hf_key
from .model import (
    FROM_CONFIG,
    CausalLMOutput,
    JetMoEDecoderLayer,
    JetMoEForCausalLM,
    JetMoEModel,
    RMSNorm,
)

__all__ = [
    "FROM_CONFIG",
    "CausalLMOutput",
    "JetMoEConfig",
    "JetMoEDecoderLayer",
    "JetMoEForCausalLM",
    "JetMoEModel",
    "RMSNorm",
    "from_hf_key",
    "load_json",
    "to_hf_key",
]
