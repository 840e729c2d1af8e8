"""JetMoE-8B assembled from moe-blocks' MoA, MoEMLP and TopKRouter, interchangeable with
Hugging Face JetMoe checkpoints.

Read top to bottom: the config and its presets, RMSNorm, the decoder layer, the model (forward,
loss, generation, initialisation, parameter counts), then checkpoint interop (the key mapping,
from_pretrained, save_pretrained).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_blocks import KVCache, MoA, MoEMLP, TopKRouter
from moe_blocks.kernels.checks import INTEGER_DTYPES, check_index_range, check_positive_int
from moe_blocks.moe_mlp import ACTIVATIONS
from moe_blocks.router import named_routers

# --------------------------------------------------------------------------------------------
# Configuration


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
        ):  # fmt: skip
            check_positive_int(f"JetMoEConfig.{name}", getattr(self, name))
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
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: rope_parameters must be a JSON object, got {rope!r}")
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope_type {rope['rope_type']!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {name: data[name] for name in names if name in data}
        values["rope_theta"] = rope.get("rope_theta", data.get("rope_theta", 10000.0))
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from error


# --------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """``weight · x / sqrt(mean(x²) + eps)``, normalised in fp32, cast back before the weight
    (as transformers' JetMoe does)."""

    def __init__(self, size: int, eps: float, **factory) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, **factory))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class JetMoEDecoderLayer(nn.Module):
    """Pre-norm residual block: ``x + MoA(norm(x))``, then ``x + MoEMLP(norm(x))``."""

    def __init__(self, config: JetMoEConfig, **factory) -> None:
        super().__init__()
        router = {
            "aux_loss_coef": config.aux_loss_coef,
            "z_loss_weight": config.z_loss_coef,
            "expert_prior": config.expert_prior,
        }
        self.input_layernorm = RMSNorm(config.hidden_size, config.layer_rms_norm_eps, **factory)
        self.self_attention = MoA(
            config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
            head_dim=config.kv_channels, num_kv_heads=config.num_key_value_heads,
            rope_theta=config.rope_theta, attention_dropout=config.attention_dropout,
            **router, **factory,
        )  # fmt: skip
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.layer_rms_norm_eps, **factory
        )
        self.mlp = MoEMLP(
            config.hidden_size, config.intermediate_size, config.num_local_experts,
            config.num_experts_per_tok, activation=config.activation_function,
            **router, **factory,
        )  # fmt: skip

    def forward(
        self,
        x: Tensor,
        attention_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        x = x + self.self_attention(
            self.input_layernorm(x),
            attention_mask=attention_mask,
            kv_cache=kv_cache,
            position_ids=position_ids,
        )
        # padding counts in no router statistic (MoA takes it from attention_mask itself)
        token_mask = None if attention_mask is None else attention_mask[:, -x.shape[1] :]
        return x + self.mlp(self.post_attention_layernorm(x), token_mask=token_mask)


class JetMoEModel(nn.Module):
    """Embeddings, decoder layers, final norm (transformers' ``model.*``)."""

    def __init__(self, config: JetMoEConfig, **factory) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **factory)
        self.layers = nn.ModuleList(
            JetMoEDecoderLayer(config, **factory) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)


@dataclass
class CausalLMOutput:
    """logits ``[B, T, vocab]``. With labels: ``loss`` = ``lm_loss`` + ``aux_loss`` (the value;
    the aux part reaches the gradient through the blocks, once per backward pass, times
    :func:`moe_blocks.aux_loss_scale` when the loop scales its loss), ``lm_loss`` the mean
    cross-entropy of next-token prediction, ``aux_loss`` = ``aux_loss_coef`` · Σ over the MoA and
    MoE routers of every layer of (Switch loss + ``z_loss_coef`` · z-loss), detached."""

    logits: Tensor
    loss: Tensor | None = None
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    kv_caches: list[KVCache] | None = None


# --------------------------------------------------------------------------------------------
# The model


class _FromConfig:
    """``generate``'s default for ``eos_token_id`` and ``pad_token_id``: the model config's
    value (an explicit None means "no such token")."""

    def __repr__(self) -> str:
        return "FROM_CONFIG"


FROM_CONFIG = _FromConfig()


class JetMoEForCausalLM(nn.Module):
    """JetMoE decoder-only language model built from :class:`MoA`, :class:`MoEMLP` and
    :class:`TopKRouter`; ``state_dict`` keys are transformers' except that ``MoA``'s expert
    weights sit directly under ``self_attention`` (transformers: ``self_attention.experts``).
    """

    def __init__(
        self,
        config: JetMoEConfig,
        *,
        gradient_checkpointing: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = gradient_checkpointing
        factory = {"device": device, "dtype": dtype}
        self.model = JetMoEModel(config, **factory)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    # initialisation ---------------------------------------------------------------------
    def tie_weights(self) -> None:
        """With ``tie_word_embeddings``, make the LM head share the embedding matrix (again:
        ``to_empty`` and loading replace parameters)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """JetMoE's initialisation: every projection, expert and embedding ~ N(0,
        initializer_range), norms 1, biases 0, expert priors 1. After building on ``meta``, call
        ``model.to_empty(device=...)`` and then this."""
        self.tie_weights()
        std = self.config.initializer_range
        for name, param in self.named_parameters():
            if name.endswith(("layernorm.weight", "expert_prior")) or name == "model.norm.weight":
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, std)
        for module in self.modules():
            if isinstance(module, TopKRouter):
                for buffer in module.buffers():
                    buffer.zero_()

    # parameter counts -------------------------------------------------------------------
    def num_parameters(self, *, active: bool = False) -> int:
        """All parameters (tied embeddings once); with ``active``, those one token uses: the
        shared ones plus ``top_k / num_experts`` of the expert weights."""
        total = 0
        experts = self.config.num_local_experts
        for name, param in self.named_parameters():
            count = param.numel()
            if active and name.endswith(("input_linear.weight", "output_linear.weight")):
                count = count // experts * self.config.num_experts_per_tok
            total += count
        return total

    # forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        kv_caches: list[KVCache] | None = None,
        position_ids: Tensor | None = None,
    ) -> CausalLMOutput:
        """Args:
        input_ids: ``[B, T]`` token ids in ``[0, vocab_size)``.
        attention_mask: ``[B, T_past + T]``, 1 for real tokens, 0 for padding.
        labels: ``[B, T]``; position t is scored on predicting ``labels[:, t+1]`` from the
            logits at t (shifted inside, as transformers does); -100 is ignored.
        kv_caches: one :class:`KVCache` per layer for incremental decoding (updated in place).
        position_ids: RoPE positions ``[B, T]``; default ``T_past + arange(T)``.
        """
        self._check_input_ids(input_ids)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(labels.shape)}"
            )
        if kv_caches is not None and len(kv_caches) != self.config.num_hidden_layers:
            raise ValueError(
                f"kv_caches must hold one KVCache per layer ({self.config.num_hidden_layers})"
            )
        hidden = self.model.embed_tokens(input_ids.long())
        for index, layer in enumerate(self.model.layers):
            cache = kv_caches[index] if kv_caches is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(
                    layer, hidden, attention_mask, cache, position_ids, use_reentrant=False
                )
            else:
                hidden = layer(hidden, attention_mask, cache, position_ids)
        logits = self.lm_head(self.model.norm(hidden))
        if labels is None:
            return CausalLMOutput(logits=logits, kv_caches=kv_caches)
        lm_loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
        aux_loss = sum(router.last_aux_loss for router in self.routers())
        return CausalLMOutput(
            logits=logits,
            loss=lm_loss + aux_loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            kv_caches=kv_caches,
        )

    def routers(self) -> list[TopKRouter]:
        """Every router (MoA's and MoE's, layer by layer), as :func:`moe_blocks.router_stats`
        names them."""
        return list(named_routers(self).values())

    def _check_input_ids(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in INTEGER_DTYPES:
            raise TypeError("input_ids must be an integer tensor")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        check_index_range(input_ids, self.config.vocab_size, "input_ids", "vocab_size")

    # generation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int = 32,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        attention_mask: Tensor | None = None,
        eos_token_id: int | Sequence[int] | Tensor | None = FROM_CONFIG,
        pad_token_id: int | None = FROM_CONFIG,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Greedy (default) or sampled continuation with a KV cache per layer.

        Returns ``[B, T + new]``: the prompt followed by the new tokens. ``eos_token_id`` (one
        id, several, or an integer tensor of them; default ``config.eos_token_id``; None: no end
        token) ends a sequence: after it, the sequence is padded with ``pad_token_id`` (default
        ``config.pad_token_id``), or with the (first) end token when that is None, and
        generation stops once every sequence has ended (as transformers' ``generate`` does).
        With ``attention_mask`` (left padding), positions count real tokens only; without one,
        prompt tokens equal to the pad token (if it is no end token) are padding, as in
        transformers.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be positive when sampling, got {temperature}")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        self._check_input_ids(input_ids)
        eos_ids = self._token_ids_or_config("eos_token_id", eos_token_id)
        pad_ids = self._token_ids_or_config("pad_token_id", pad_token_id)
        if len(pad_ids) > 1:
            raise ValueError(f"pad_token_id must be one token id, got {pad_token_id!r}")
        if eos_ids:
            eos = torch.tensor(eos_ids, device=input_ids.device)
            pad_id = (pad_ids or eos_ids)[0]
        caches = [KVCache() for _ in self.model.layers]
        if attention_mask is None and pad_ids and not set(pad_ids) & set(eos_ids):
            # As transformers: without a mask, prompt tokens equal to the pad token are padding
            # (unless the pad token is also an end token).
            attention_mask = input_ids != pad_ids[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(torch.long)
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        sequence, step_ids = input_ids, input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = (
                self(step_ids, attention_mask, kv_caches=caches, position_ids=positions)
                .logits[:, -1]
                .float()
            )
            next_ids = self._pick(logits, do_sample, temperature, top_k, top_p, generator)
            if eos_ids:
                next_ids = next_ids.masked_fill(finished, pad_id)
                finished |= torch.isin(next_ids, eos)
            sequence = torch.cat((sequence, next_ids[:, None]), dim=1)
            step_ids = next_ids[:, None]
            attention_mask = torch.cat((attention_mask, torch.ones_like(step_ids)), dim=1)
            positions = positions[:, -1:] + 1
            if eos_ids and bool(finished.all()):
                break
        return sequence

    def _token_ids_or_config(self, name: str, value) -> list[int]:
        """:meth:`_token_ids` of ``value``, or of the config's ``name`` for FROM_CONFIG."""
        if value is FROM_CONFIG:
            return self._token_ids(f"config.{name}", getattr(self.config, name))
        return self._token_ids(name, value)

    def _token_ids(self, name: str, value) -> list[int]:
        """``value`` (None, a token id, a sequence of them or an integer tensor) as a list of
        ids, each checked to lie in the vocabulary."""
        if value is None:
            return []
        if isinstance(value, Tensor):
            value = value.tolist()
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise ValueError(f"{name} must not be empty (None: no such token)")
        for item in items:
            if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                raise TypeError(
                    f"{name} must be a token id, a sequence of them or an integer tensor, "
                    f"got {value!r}"
                )
            if not 0 <= item < self.config.vocab_size:
                raise ValueError(
                    f"{name} {item} lies outside the vocabulary [0, {self.config.vocab_size})"
                )
        return [int(item) for item in items]

    @staticmethod
    def _pick(logits, do_sample, temperature, top_k, top_p, generator) -> Tensor:
        if not do_sample:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None:
            sorted_logits, order = logits.sort(-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the first past top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)

    # checkpoints ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu"
    ) -> JetMoEForCausalLM:
        """Load a Hugging Face JetMoe checkpoint directory: ``config.json`` and
        ``model.safetensors`` or ``model.safetensors.index.json`` with its shards. Nothing is
        unpickled. Weights keep their stored dtype unless ``dtype`` is given. The model is
        returned in eval mode (dropout off), as transformers returns it: call ``.train()`` to
        fine-tune."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a checkpoint directory")
        config = JetMoEConfig.from_hf_dict(load_json(config_path), str(config_path))
        with torch.device("meta"):
            model = cls(config, dtype=dtype)
        expected = {
            to_hf_key(name): param for name, param in model.state_dict(keep_vars=True).items()
        }
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
                    state[from_hf_key(key)] = tensor.to(dtype) if dtype is not None else tensor
        missing = sorted(set(expected) - {to_hf_key(k) for k in state})
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        _materialize_buffers(model, device)
        return model.eval()

    def save_pretrained(self, path: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write ``config.json`` and ``model.safetensors`` (or shards with an index when larger
        than ``max_shard_bytes``) in the layout transformers' ``JetMoeForCausalLM`` loads."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {to_hf_key(k): v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        dtype = next(iter(state.values())).dtype
        config = self.config.to_hf_dict() | {"dtype": str(dtype).removeprefix("torch.")}
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


# --------------------------------------------------------------------------------------------
# Checkpoint key mapping

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


__all__ = [
    "FROM_CONFIG",
    "CausalLMOutput",
    "JetMoEConfig",
    "JetMoEDecoderLayer",
    "JetMoEForCausalLM",
    "JetMoEModel",
    "RMSNorm",
    "from_hf_key",
    "to_hf_key",
]
