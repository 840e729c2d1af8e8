"""JetMoE-8B assembled from moe-blocks' MoA, MoEMLP and TopKRouter: RMSNorm, the decoder layer
and the causal LM (forward, loss, generation, initialisation, parameter counts); its checkpoints
are read and written by :mod:`.hf_checkpoint`."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_blocks import KVCache, MoA, MoEMLP, TopKRouter
from moe_blocks.kernels.checks import INTEGER_DTYPES, check_index_range, check_non_negative
from moe_blocks.moa import check_position_ids
from moe_blocks.router import check_keep_mask, inference, named_routers

from . import hf_checkpoint
from .config import JetMoEConfig


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
        position_embeddings: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``position_embeddings``: the RoPE tables of :meth:`MoA.rotary_tables`, instead of
        ``position_ids`` (a model computes them once for all its layers)."""
        x = x + self.self_attention(
            self.input_layernorm(x),
            attention_mask=attention_mask,
            kv_cache=kv_cache,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
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

    def flops_per_token(self, context: int) -> int:
        """Forward FLOPs per token: 2 per active weight used in a matmul (the embedding is a
        lookup; the LM head is a matmul even when tied), plus ``QKᵀ`` and ``AV`` over a context
        of ``context`` tokens. Training costs about 3× this."""
        check_non_negative("context", context)
        config = self.config
        # Tied: the one matrix counted is the LM head's; untied, the embedding's is a lookup.
        lookup = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
        matmul_weights = self.num_parameters(active=True) - lookup
        width = config.num_experts_per_tok * config.num_key_value_heads * config.kv_channels
        return 2 * matmul_weights + 4 * config.num_hidden_layers * context * width

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
        if labels is not None:
            self._check_labels(labels, input_ids)
        if kv_caches is not None and (
            len(kv_caches) != self.config.num_hidden_layers
            or not all(isinstance(cache, KVCache) for cache in kv_caches)
            or any(cache.length != kv_caches[0].length for cache in kv_caches)
        ):
            raise ValueError(
                f"kv_caches must hold one KVCache per layer ({self.config.num_hidden_layers}), "
                "all of one length (the tokens before these)"
            )
        if attention_mask is not None:  # checked once: an integer mask's range check (a
            # reduction and a host read, or device asserts) was run 3 times in every layer
            attention_mask = check_keep_mask(attention_mask, "attention_mask")
        hidden = self.model.embed_tokens(input_ids.long())
        batch, length = input_ids.shape
        if position_ids is None:  # every layer's cache holds the same tokens: the first's
            past = kv_caches[0].length if kv_caches is not None else 0
            position_ids = torch.arange(past, past + length, device=hidden.device)
        else:
            check_position_ids(position_ids, batch, length, hidden.device)
        # RoPE tables once for every layer (each MoA computed the same ones)
        tables = self.model.layers[0].self_attention.rotary_tables(position_ids)
        for index, layer in enumerate(self.model.layers):
            cache = kv_caches[index] if kv_caches is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(
                    layer, hidden, attention_mask, cache, None, tables, use_reentrant=False
                )
            else:
                hidden = layer(hidden, attention_mask, cache, None, tables)
        logits = self.lm_head(self.model.norm(hidden))
        if labels is None:
            return CausalLMOutput(logits=logits, kv_caches=kv_caches)
        lm_loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1).long(),
            ignore_index=-100,
        )
        routers = named_routers(self).values()
        # (in inference the routers compute no aux loss: moe_blocks.router.inference)
        aux_loss = (
            torch.zeros((), device=logits.device)
            if inference(self)
            else sum(router.last_aux_loss for router in routers)
        )
        return CausalLMOutput(
            logits=logits,
            loss=lm_loss + aux_loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            kv_caches=kv_caches,
        )

    def _check_input_ids(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in INTEGER_DTYPES:
            raise TypeError("input_ids must be an integer tensor")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        check_index_range(input_ids, self.config.vocab_size, "input_ids", "vocab_size")

    def _check_labels(self, labels: Tensor, input_ids: Tensor) -> None:
        if not isinstance(labels, Tensor) or labels.dtype not in INTEGER_DTYPES:
            got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
            raise TypeError(f"labels must be an integer tensor, got {got}")
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(labels.shape)}"
            )
        scored = labels.masked_fill(labels == -100, 0)  # -100: ignored
        check_index_range(scored, self.config.vocab_size, "labels (but -100)", "vocab_size")

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
        # Without a mask every token is real: the layers count positions from their caches and
        # run no masking ops (an all-ones mask cost 2-4% more per token, 8 layers).
        positions = None
        if attention_mask is not None:
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
            if attention_mask is not None:
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
        return hf_checkpoint.load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write ``config.json`` and ``model.safetensors`` (or shards with an index when larger
        than ``max_shard_bytes``) in the layout transformers' ``JetMoeForCausalLM`` loads."""
        hf_checkpoint.save_pretrained(self, path, max_shard_bytes=max_shard_bytes)
