"""MoA: Mixture of Attention heads (ModuleFormer, JetMoE), with RoPE and a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import InitMethod, ParallelExperts, check_init_method
from .kernels.checks import (
    INTEGER_DTYPES,
    check_non_negative,
    check_positive,
    check_positive_int,
)
from .losses import check_aux_loss_mode, route_aux_loss
from .modular import ModularBlock
from .router import TopKRouter, check_input_dtype, check_keep_mask


def rotary_cos_sin(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """RoPE tables for integer ``positions[...]``: cos and sin of shape ``[..., head_dim]``
    (frequencies repeated over the two halves, the rotate-half convention), computed in fp32."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def check_position_ids(
    position_ids: object, batch: int | None, length: int | None, device=None
) -> Tensor:
    """``position_ids`` after checking it: an integer tensor, ``[B, T]`` or ``[T]`` where
    ``batch`` and ``length`` are given, on ``device`` where given; TypeError/ValueError
    naming it."""
    if not isinstance(position_ids, Tensor) or position_ids.dtype not in INTEGER_DTYPES:
        raise TypeError(f"position_ids must be an integer tensor, got {position_ids!r:.80}")
    if length is not None and tuple(position_ids.shape) not in ((batch, length), (length,)):
        raise ValueError(
            f"position_ids must be [B, T] = {(batch, length)} or [T] = ({length},), got "
            f"{tuple(position_ids.shape)}"
        )
    if device is not None and position_ids.device != torch.device(device):
        raise ValueError(f"position_ids must be on {device}, got {position_ids.device}")
    return position_ids


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE: ``x·cos + rotate_half(x)·sin`` (cos, sin broadcast against x)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class KVCache:
    """Keys and values of one MoA layer, ``[B, T_cached, num_kv_heads, head_dim]`` each (RoPE
    applied), grown as tokens are decoded. Pass the same object to every forward call of one
    sequence batch."""

    def __init__(self) -> None:
        self.key: Tensor | None = None
        self.value: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.key is None else self.key.shape[1]

    def check(self, batch: int, kv_heads: int, head_dim: int) -> None:
        """ValueError naming ``kv_cache`` when the cache holds another batch size or other heads
        than keys of ``batch`` sequences and ``kv_heads`` heads of ``head_dim`` (a cache filled
        by another batch, or by a block with other KV heads)."""
        if self.key is not None:
            cached = (self.key.shape[0], *self.key.shape[2:])
            given = (batch, kv_heads, head_dim)
            if cached != given:
                raise ValueError(
                    "kv_cache holds keys of batch size {}, {} KV heads of {} features; this "
                    "forward has batch size {}, {} KV heads of {} (use one KVCache per layer "
                    "and sequence batch)".format(*cached, *given)
                )

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``key``/``value`` ``[B, T_new, kv, hd]`` (:meth:`check`: they must fit); return
        everything cached."""
        self.check(key.shape[0], *key.shape[2:])
        if self.key is None:
            self.key, self.value = key, value
        else:
            self.key = torch.cat((self.key, key), dim=1)
            self.value = torch.cat((self.value, value), dim=1)
        return self.key, self.value


class MoA(ModularBlock, nn.Module):
    """Mixture of Attention heads: ``forward(x[B, T, d_model]) -> [B, T, d_model]``.

    Each of ``num_experts`` attention experts owns a query projection (``num_kv_heads`` heads
    of ``head_dim``) and an output projection; each token uses ``top_k`` of them, so it has
    ``top_k · num_kv_heads`` query heads. Keys and values come from one shared projection
    ``kv_proj`` (keys first, then values) and are tiled across the k slots: query head
    ``j·num_kv_heads + i`` (slot j) attends with KV head ``i``, as JetMoE does. RoPE (rotate
    half) on queries and keys, causal attention through ``F.scaled_dot_product_attention`` with
    scale ``1/sqrt(head_dim)``, an optional padding mask, a :class:`KVCache` for decoding. The
    k expert outputs are combined with the router's gates, then a shared ``bias`` is added.

    Args:
        d_model: model width. num_experts, top_k: E and k.
        head_dim: per-head size (even, for RoPE); default ``d_model // (top_k · num_kv_heads)``,
            which then must divide exactly.
        num_kv_heads: KV heads (= query heads per expert).
        rope_theta: RoPE base (10000). attention_dropout: dropout on attention weights in
            training. bias: the shared output bias (JetMoE has one).
        backend: the kernel backend.
        aux_loss: ``"attach"`` (default) or ``"collect"``, as for :class:`MoEMLP`.
        init_method, output_init_method: how the expert query and output projections are
            initialised, as for :class:`MoEMLP`.
        **router_options: passed to :class:`TopKRouter`.

    Parameters are named as in the JetMoE checkpoint: ``router.layer.weight``,
    ``input_linear.weight [E, kv·hd, d]``, ``output_linear.weight [E, d, kv·hd]``, ``bias``,
    ``kv_proj.weight [2·kv·hd, d]``.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        head_dim: int | None = None,
        num_kv_heads: int = 1,
        *,
        rope_theta: float = 10000.0,
        attention_dropout: float = 0.0,
        bias: bool = True,
        backend: str = "auto",
        aux_loss: str = "attach",
        init_method: InitMethod | None = None,
        output_init_method: InitMethod | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **router_options,
    ) -> None:
        super().__init__()
        check_aux_loss_mode(aux_loss)
        self.aux_loss_mode, self._aux_loss_record = aux_loss, None
        factory = {"device": device, "dtype": dtype}
        self.router = TopKRouter(d_model, num_experts, top_k, **router_options, **factory)
        check_positive_int("num_kv_heads", num_kv_heads)
        if head_dim is None:
            heads = top_k * num_kv_heads
            if d_model % heads:
                raise ValueError(
                    f"d_model ({d_model}) must be divisible by top_k * num_kv_heads ({heads}) "
                    "when head_dim is not given"
                )
            head_dim = d_model // heads
        check_positive_int("head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        self.d_model, self.top_k, self.head_dim, self.num_kv_heads = (
            d_model,
            top_k,
            head_dim,
            num_kv_heads,
        )
        check_positive("rope_theta", rope_theta)  # (0: NaN RoPE tables, then NaN attention)
        check_non_negative("attention_dropout", attention_dropout)
        if attention_dropout >= 1:
            raise ValueError(f"attention_dropout must lie in [0, 1), got {attention_dropout}")
        self.rope_theta, self.attention_dropout = rope_theta, attention_dropout
        projection = num_kv_heads * head_dim
        self.input_linear = ParallelExperts(
            num_experts, d_model, projection, backend=backend, init_method=init_method, **factory
        )
        output_init_method = init_method if output_init_method is None else output_init_method
        check_init_method(output_init_method, "output_init_method")
        self.output_linear = ParallelExperts(
            num_experts, projection, d_model, backend=backend, init_method=output_init_method,
            **factory,
        )  # fmt: skip
        self.kv_proj = nn.Linear(d_model, 2 * projection, bias=False, **factory)
        self.bias = nn.Parameter(torch.zeros(d_model, **factory)) if bias else None

    def reset_parameters(self) -> None:
        """Re-initialise the whole block: router, experts and ``kv_proj`` (as ``nn.Linear``),
        bias 0 (e.g. after building on the meta device and ``to_empty``)."""
        for module in self.children():
            module.reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        position_ids: Tensor | None = None,
        token_mask: Tensor | None = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Args:
        x: ``[B, T, d_model]``, the block's dtype (any floating dtype under autocast).
        attention_mask: ``[B, T_past + T]``, bool or integer: True/1 for real tokens,
            False/0 for padding (keys that no query may attend to). Float (additive) masks are
            rejected. A padding query that sees no key at all gets a zero attention output
            (as transformers' SDPA path gives), so the block returns its bias there.
        kv_cache: keys and values of the earlier tokens; updated in place.
        position_ids: ``[B, T]`` or ``[T]`` integer RoPE positions; default
            ``T_past + arange(T)``.
        token_mask: ``[B, T]`` bool (or 0/1), True for the real tokens among ``x``'s: padding
            counts in no statistic of the router (as for :class:`MoEMLP`). Default: the last
            ``T`` columns of ``attention_mask`` when it is given, else every token.
        position_embeddings: the fp32 RoPE tables ``(cos, sin)`` of :meth:`rotary_tables`
            for these tokens' positions, ``[B, T, head_dim]``, ``[1, T, head_dim]`` or
            ``[T, head_dim]``, instead of ``position_ids``: a model computes them once for all
            its layers (as transformers passes ``position_embeddings``), where each layer
            would compute the same tables again.
        """
        check_input_dtype(x, self.kv_proj.weight.dtype)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, T, d_model={self.d_model}], got {tuple(x.shape)}")
        batch, length, _ = x.shape
        if kv_cache is not None and not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a KVCache or None, got {type(kv_cache).__name__}")
        kv_heads, head_dim, top_k = self.num_kv_heads, self.head_dim, self.top_k
        past = 0
        if kv_cache is not None:  # (checked before the router counts anything)
            kv_cache.check(batch, kv_heads, head_dim)
            past = kv_cache.length

        if attention_mask is not None:
            attention_mask = check_keep_mask(
                attention_mask, "attention_mask", (batch, past + length)
            )
        if token_mask is not None:
            token_mask = check_keep_mask(token_mask, "token_mask", (batch, length))
        elif attention_mask is not None:
            token_mask = attention_mask[:, past:]
        if position_embeddings is None:  # (checked before the router counts anything)
            if position_ids is None:
                position_ids = torch.arange(past, past + length, device=x.device)
            else:
                check_position_ids(position_ids, batch, length, x.device)
            cos, sin = self.rotary_tables(position_ids)
        elif position_ids is not None:
            raise ValueError("give position_ids or position_embeddings, not both")
        else:
            cos, sin = self._checked_tables(position_embeddings, batch, length, x.device)
        tokens = x.reshape(-1, self.d_model)
        route = self.router(tokens, None if token_mask is None else token_mask.reshape(-1))
        query = self.input_linear(tokens, route.plan)  # [B*T*k, kv*hd], assignment order
        query = query.view(batch, length, top_k, kv_heads, head_dim)
        key, value = self.kv_proj(x).view(batch, length, 2, kv_heads, head_dim).unbind(2)
        cos, sin = (t.to(query.dtype).expand(batch, length, head_dim) for t in (cos, sin))
        query = apply_rotary(query, cos[:, :, None, None], sin[:, :, None, None])
        key = apply_rotary(key, cos[:, :, None], sin[:, :, None])
        if kv_cache is not None:
            key, value = kv_cache.update(key, value)

        # Heads ordered (kv head i, slot j) so that SDPA's grouped-query attention, which gives
        # query head h the KV head h // top_k, pairs slot j's head i with KV head i.
        query = query.permute(0, 3, 2, 1, 4).reshape(batch, kv_heads * top_k, length, head_dim)
        mask, sees_a_key = self._mask(attention_mask, batch, length, past + length, x.device)
        attended = F.scaled_dot_product_attention(
            query,
            key.transpose(1, 2),
            value.transpose(1, 2),
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=mask is None and not past,  # T queries over the same T keys
            scale=head_dim**-0.5,
            enable_gqa=top_k > 1,
        )
        if sees_a_key is not None:
            attended = attended.masked_fill(~sees_a_key, 0.0)
        attended = attended.view(batch, kv_heads, top_k, length, head_dim).permute(0, 3, 2, 1, 4)
        attended = attended.reshape(batch * length * top_k, kv_heads * head_dim)
        # The aux loss rides on the gates (see MoEMLP.forward).
        gates = route_aux_loss(self, route.gates, route.aux_loss)
        out = self.output_linear(attended, route.plan, gates=gates)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)  # the autocast dtype stays, as nn.Linear's
        return out.view(batch, length, self.d_model)

    def rotary_tables(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The fp32 RoPE tables ``(cos, sin)`` ``[..., head_dim]`` of this block's ``head_dim``
        and ``rope_theta`` for integer ``position_ids`` ``[B, T]`` or ``[T]``: what
        :meth:`forward` takes as ``position_embeddings`` (every MoA of a model with the same
        head size and base can share them)."""
        check_position_ids(position_ids, None, None)
        return rotary_cos_sin(position_ids, self.head_dim, self.rope_theta, torch.float32)

    def _checked_tables(self, tables, batch: int, length: int, device) -> tuple[Tensor, Tensor]:
        """``position_embeddings`` after checking it: two fp32 tensors on ``device`` of shape
        ``[B, T, head_dim]``, ``[1, T, head_dim]`` or ``[T, head_dim]`` (:meth:`rotary_tables`
        of ``[B, T]`` or ``[T]`` positions); TypeError/ValueError naming it."""
        if not (isinstance(tables, tuple | list) and len(tables) == 2):
            raise TypeError(
                "position_embeddings must be (cos, sin) from MoA.rotary_tables, got "
                + (
                    f"{len(tables)} tables"
                    if isinstance(tables, tuple | list)
                    else type(tables).__name__
                )
            )
        shapes = ((batch, length, self.head_dim), (1, length, self.head_dim))
        shapes += ((length, self.head_dim),)
        for table in tables:
            if not isinstance(table, Tensor) or table.dtype != torch.float32:
                got = table.dtype if isinstance(table, Tensor) else type(table).__name__
                raise TypeError(
                    f"position_embeddings must be fp32 tables from MoA.rotary_tables, got {got}"
                )
            if tuple(table.shape) not in shapes:
                raise ValueError(
                    f"position_embeddings must be [B, T, head_dim] = {shapes[0]}, "
                    f"[1, T, head_dim] or [T, head_dim] = {shapes[2]} tables, got "
                    f"{tuple(table.shape)}"
                )
            if table.device != device:
                raise ValueError(
                    f"position_embeddings must be on x's device {device}, got {table.device}"
                )
        return tables[0], tables[1]

    @staticmethod
    def _mask(
        attention_mask: Tensor | None, batch: int, length: int, total: int, device
    ) -> tuple[Tensor | None, Tensor | None]:
        """Boolean ``[B, 1, T, T_total]`` mask (True = attend), or None where no key is masked
        beyond causality (plain causal over the same T keys, or one query, which sees every key:
        a decode step); and, with ``attention_mask``, ``[B, 1, T, 1]``: True where the query
        sees some key. A row that sees none is opened to every key, which keeps SDPA free of
        NaN; the caller zeroes its output."""
        if attention_mask is None and (total == length or length == 1):
            return None, None
        past = total - length
        query_pos = torch.arange(past, total, device=device)[:, None]
        causal = torch.arange(total, device=device)[None, :] <= query_pos  # [T, T_total]
        mask = causal[None].expand(batch, length, total)
        if attention_mask is None:
            return mask[:, None], None
        mask = mask & attention_mask.to(device)[:, None, :]
        sees_a_key = mask.any(-1, keepdim=True)
        return (mask | ~sees_a_key)[:, None], sees_a_key[:, None]
