"""JetMoE's architecture: :class:`JetMoEConfig`, its presets, and its ``config.json`` in
transformers' format."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moe_blocks.kernels.checks import check_non_negative, check_positive, check_positive_int
from moe_blocks.moe_mlp import ACTIVATIONS

# transformers' JetMoeConfig defaults where they differ from ours (JetMoE-8B's, the dataclass's)
TRANSFORMERS_DEFAULTS = {"num_hidden_layers": 12, "rms_norm_eps": 1e-6}


@dataclass
class JetMoEConfig:
    """The architecture. Field names are those of transformers' ``JetMoeConfig`` (config.json).

    ``layer_rms_norm_eps``: transformers builds every layer's two RMSNorms with eps 1e-6 and
    uses ``rms_norm_eps`` only for the final norm; we do the same so that logits match.

    ``layer_rms_norm_eps`` and ``z_loss_coef`` are ours: config.json carries them so that our
    ``from_pretrained`` restores them; transformers ignores them (its per-layer eps stays 1e-6).

    ``expert_prior`` (ours, written to config.json only when true): every router has expert
    priors (``TopKRouter(expert_prior=True)``), as after ``moe-blocks extend``. Transformers'
    JetMoe has no such weights: it cannot run such a checkpoint faithfully.
    """

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    num_key_value_heads: int = 16
    kv_channels: int = 128
    intermediate_size: int = 5632
    max_position_embeddings: int = 4096
    activation_function: str = "silu"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    layer_rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    initializer_range: float = 0.01
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.1
    attention_dropout: float = 0.0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    expert_prior: bool = False

    PRESETS = {
        # JetMoE-8B as published: 8,522,237,952 parameters, 2.2B active per token.
        "jetmoe-8b": {},
        # For tests and demos: trains on a laptop CPU in minutes. initializer_range 0.02, not
        # JetMoE-8B's 0.01: at this width it learns faster (docs/jetmoe.md). Its tokens are
        # bytes, so it has no begin or end token (JetMoE-8B's ids 1 and 2 are bytes here).
        "tiny": dict(
            vocab_size=256, hidden_size=128, num_hidden_layers=4, num_local_experts=4,
            num_experts_per_tok=2, num_key_value_heads=2, kv_channels=32,
            intermediate_size=256, max_position_embeddings=512, initializer_range=0.02,
            bos_token_id=None, eos_token_id=None,
        ),
    }  # fmt: skip

    def __post_init__(self) -> None:
        for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_local_experts",
            "num_experts_per_tok", "num_key_value_heads", "kv_channels", "intermediate_size",
            "max_position_embeddings",
        ):  # fmt: skip
            check_positive_int(f"JetMoEConfig.{name}", getattr(self, name))
        for name in ("initializer_range", "aux_loss_coef", "z_loss_coef", "attention_dropout"):
            check_non_negative(f"JetMoEConfig.{name}", getattr(self, name))
        for name in ("rope_theta", "rms_norm_eps", "layer_rms_norm_eps"):
            check_positive(f"JetMoEConfig.{name}", getattr(self, name))
        if self.attention_dropout >= 1:
            raise ValueError(
                f"JetMoEConfig.attention_dropout must lie in [0, 1), got {self.attention_dropout}"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must not exceed "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.kv_channels % 2:
            raise ValueError(f"kv_channels must be even (RoPE), got {self.kv_channels}")
        if not isinstance(self.activation_function, str) or (
            self.activation_function not in ACTIVATIONS
        ):
            raise ValueError(
                f"activation_function must be one of {', '.join(ACTIVATIONS)}, "
                f"got {self.activation_function!r}"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> JetMoEConfig:
        """``"jetmoe-8b"`` (the published model) or ``"tiny"``; keywords override fields."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    # config.json in transformers' format ------------------------------------------------
    def to_hf_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        fields.pop("rope_theta")  # written as rope_parameters
        if self.activation_function == "gelu_tanh":  # ours; the same function in transformers:
            fields["activation_function"] = "gelu_pytorch_tanh"
        if not self.expert_prior:
            fields.pop("expert_prior")
        return {
            "architectures": ["JetMoeForCausalLM"],
            "model_type": "jetmoe",
            **fields,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "num_attention_heads": self.num_key_value_heads * self.num_experts_per_tok,
        }

    @classmethod
    def from_hf_dict(cls, data: dict, source: str = "config.json") -> JetMoEConfig:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: not a JSON object but {type(data).__name__}")
        if data.get("model_type") != "jetmoe":
            raise ValueError(
                f"{source}: model_type is {data.get('model_type')!r}, expected 'jetmoe'"
            )
        rope = data.get("rope_parameters") or {}
        for key, given in (("rope_parameters", rope), ("rope_scaling", data.get("rope_scaling"))):
            if given is not None and not isinstance(given, dict):
                raise ValueError(f"{source}: {key} must be a JSON object, got {given!r}")
            # transformers reads the older rope_scaling ({"type": ...}) as rope_parameters
            kind = (given or {}).get("rope_type", (given or {}).get("type", "default"))
            if kind != "default":
                raise ValueError(f"{source}: {key} of type {kind!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        # a field config.json leaves out has transformers' default there, not JetMoE-8B's
        values = {**TRANSFORMERS_DEFAULTS, **{name: data[name] for name in names if name in data}}
        values["rope_theta"] = rope.get("rope_theta", data.get("rope_theta", 10000.0))
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from error
