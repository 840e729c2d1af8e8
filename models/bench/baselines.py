"""Every implementation a case times, built with the same random weights and input: ours,
transformers' modules, the plain ``torch._grouped_mm`` pipeline, the per-expert loop and the
dense roofline (:func:`build`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_blocks import MoA, MoEMLP
from moe_blocks.kernels import expert_linear, plan_dispatch
from moe_blocks.moe_mlp import glu

from ..jetmoe import JetMoEConfig, JetMoEDecoderLayer, from_hf_key
from .cases import HF_MODEL, HF_MODEL_LAYERS, HF_MODEL_VOCAB, HF_SUITE, KERNEL_SUITE, Case

silu_glu = glu(F.silu)  # JetMoE's expert activation: SiLU-GLU, gate first


def _grouped_rows(tokens: Tensor, expert_idx: Tensor, num_experts: int):
    """The T·k assignments of ``expert_idx[T, k]`` sorted by expert: their order (assignment
    ids), the experts' int32 end offsets, and the token rows gathered in that order."""
    flat = expert_idx.reshape(-1)
    order = flat.argsort(stable=True)
    offsets = torch.bincount(flat, minlength=num_experts).cumsum(0).to(torch.int32)
    return order, offsets, tokens[order // expert_idx.shape[1]]


def _gated_sum(out: Tensor, gates: Tensor, order: Tensor, num_tokens: int) -> Tensor:
    """Each token's gate-weighted sum ``[T, out]`` of the rows ``out`` (in ``order``)."""
    scaled = out * gates.reshape(-1)[order, None].to(out.dtype)
    return out.new_zeros(num_tokens, out.shape[1]).index_add(0, order // gates.shape[1], scaled)


def moe_blocks_linear(x: Tensor, weight: Tensor, expert_idx: Tensor, gates: Tensor) -> Tensor:
    """Ours: one :func:`~moe_blocks.expert_linear` call (its plan built here)."""
    return expert_linear(x, weight, plan_dispatch(expert_idx, weight.shape[0]), gates=gates)


def per_expert_loop(x: Tensor, weight: Tensor, expert_idx: Tensor, gates: Tensor) -> Tensor:
    """What most MoE code does: for each expert, find its tokens, matmul, scale, index_add."""
    out = x.new_zeros(x.shape[0], weight.shape[1])
    for expert in range(weight.shape[0]):
        token, slot = torch.where(expert_idx == expert)
        if token.numel():
            y = x[token] @ weight[expert].T
            out.index_add_(0, token, y * gates[token, slot, None].to(y.dtype))
    return out


def grouped_mm_linear(x: Tensor, weight: Tensor, expert_idx: Tensor, gates: Tensor) -> Tensor:
    """The plain pipeline: sort, gather, one ``torch._grouped_mm``, gate-weighted index_add."""
    order, offsets, rows = _grouped_rows(x, expert_idx, weight.shape[0])
    out = torch._grouped_mm(rows, weight.transpose(-2, -1), offs=offsets)
    return _gated_sum(out, gates, order, x.shape[0])


# The expert_linear suite's routed implementations: (x[T, in], weight[E, out, in],
# expert_idx[T, k], gates[T, k]) -> [T, out], Σ_j gates[t, j] · x[t] @ weight[expert_idx[t, j]].T
ROUTED_LINEARS = {
    "moe_blocks": moe_blocks_linear,
    "per_expert_loop": per_expert_loop,
    "grouped_mm": grouped_mm_linear,
}


class RoutedLinear(nn.Module):
    """One expert linear layer with its routing fixed, computed by ``routed_linear`` (one of
    :data:`ROUTED_LINEARS`): ``x[..., in] -> [..., out]``. The weight ``[E, out, in]`` and the
    gates ``[T, k]`` (fp32, as a router gives them) are parameters, so forward+backward computes
    the gradients of x, the weight and the gates, as training does."""

    def __init__(self, routed_linear, weight: Tensor, expert_idx: Tensor, gates: Tensor) -> None:
        super().__init__()
        self.routed_linear = routed_linear
        self.weight, self.gates = nn.Parameter(weight), nn.Parameter(gates)
        self.register_buffer("expert_idx", expert_idx)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = self.routed_linear(rows, self.weight, self.expert_idx, self.gates)
        return out.view(*x.shape[:-1], out.shape[-1])


class GroupedMMExperts(nn.Module):
    """The plain pipeline people write with ``torch._grouped_mm`` (no custom kernel)."""

    def __init__(self, router: nn.Linear, top_k: int, w_in: Tensor, w_out: Tensor, bias: Tensor):
        super().__init__()
        self.router, self.top_k = router, top_k
        self.w_in, self.w_out, self.bias = (
            nn.Parameter(w_in),
            nn.Parameter(w_out),
            nn.Parameter(bias),
        )

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.router(tokens).float()
        top_logits, expert_idx = logits.topk(self.top_k, dim=-1)
        order, offsets, rows = _grouped_rows(tokens, expert_idx, self.w_in.shape[0])
        hidden = torch._grouped_mm(rows, self.w_in.transpose(-2, -1), offs=offsets)
        out = torch._grouped_mm(
            silu_glu(hidden).contiguous(), self.w_out.transpose(-2, -1), offs=offsets
        )
        result = _gated_sum(out, top_logits.softmax(-1), order, tokens.shape[0])
        return (result + self.bias).view_as(x)


class ExpertProducts(nn.Module):
    """The floor of an MLP block computed one expert at a time (the torch backend on CPU): the
    T·k routed rows already grouped by expert (``rows_per_expert``), each expert's two products
    and SiLU-GLU; no routing, gathering, gating or sums. Forward writes the products into one
    output allocated once (``[T·k, d_model]``, grouped); with autograd it returns the sum of
    all of them instead, whose backward is that of the bench's ``ones_like`` gradient, with no
    ``T·k × d_model`` tensor made. The rows are a parameter, so forward+backward computes their
    gradient, as a block does its input's (and the memory column leaves them out); each
    expert's weights are their own parameters, so each gets its gradient directly (an indexed
    ``[E, out, in]`` parameter's backward adds a full-size gradient per expert)."""

    def __init__(self, grouped: Tensor, rows_per_expert: list[int], w_in: Tensor, w_out: Tensor):
        super().__init__()
        self.rows, self.rows_per_expert = nn.Parameter(grouped), rows_per_expert
        self.w_in, self.w_out = (
            nn.ParameterList(nn.Parameter(w.clone()) for w in weight) for weight in (w_in, w_out)
        )
        self.register_buffer("out", grouped.new_empty(grouped.shape[0], w_out.shape[1]))

    def forward(self, x: Tensor) -> Tensor:
        runs = [
            (rows, w_in, w_out, out)
            for rows, w_in, w_out, out in zip(
                self.rows.split(self.rows_per_expert), self.w_in, self.w_out,
                self.out.split(self.rows_per_expert), strict=True,
            )
            if rows.shape[0]
        ]  # fmt: skip
        if torch.is_grad_enabled():
            return sum(
                F.linear(silu_glu(F.linear(rows, w_in)), w_out).sum()
                for rows, w_in, w_out, _ in runs
            )
        for rows, w_in, w_out, out in runs:
            torch.mm(silu_glu(F.linear(rows, w_in)), w_out.t(), out=out)
        return self.out


class GLUMLP(nn.Module):
    """One GLU MLP of an expert's size, no routing: ``d_model -> 2·d_ffn -> d_ffn -> d_model``."""

    def __init__(self, d_model: int, d_ffn: int, **factory) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * d_ffn, bias=False, **factory)
        self.w_out = nn.Linear(d_ffn, d_model, bias=False, **factory)

    def forward(self, rows: Tensor) -> Tensor:
        return self.w_out(silu_glu(self.w_in(rows)))


class DenseRows(nn.Module):
    """Roofline of routed work: every token's row k times (the T·k routed rows) through one
    expert-sized ``network`` (an ``nn.Linear`` or a :class:`GLUMLP`) with no routing, a token's
    k results summed: the routed matmul FLOPs."""

    def __init__(self, network: nn.Module, top_k: int) -> None:
        super().__init__()
        self.network, self.top_k = network, top_k

    def forward(self, x: Tensor) -> Tensor:
        out = self.network(x.reshape(-1, x.shape[-1]).repeat(self.top_k, 1))
        return out.view(self.top_k, *x.shape[:-1], out.shape[-1]).sum(0)


class DenseAttention(nn.Module):
    """Roofline: causal attention with the k experts' query heads as one dense projection."""

    def __init__(self, d_model: int, top_k: int, kv_heads: int, head_dim: int, **factory) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = top_k * kv_heads, kv_heads, head_dim
        self.q = nn.Linear(d_model, self.heads * head_dim, bias=False, **factory)
        self.kv = nn.Linear(d_model, 2 * kv_heads * head_dim, bias=False, **factory)
        self.o = nn.Linear(self.heads * head_dim, d_model, bias=False, **factory)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(batch, length, 2, self.kv_heads, self.head_dim).unbind(2)
        out = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


class DenseLayer(nn.Module):
    """Roofline of a decoder layer: the dense attention and the dense MLP in sequence, with the
    residual adds (no norms, routers or biases): the layer's matmul FLOPs."""

    def __init__(self, attention: DenseAttention, mlp: DenseRows) -> None:
        super().__init__()
        self.attention, self.mlp = attention, mlp

    def forward(self, x: Tensor) -> Tensor:
        hidden = x + self.attention(x)
        return hidden + self.mlp(hidden)


def build(case: Case, impl: str) -> tuple[nn.Module, Tensor]:
    """The implementation ``impl`` of ``case`` (see :func:`applies`) and its input."""
    if case.suite == HF_SUITE:
        return _build_hf(case, impl)
    d_model, d_ffn, experts, top_k = case.dims
    device, dtype = case.device, case.torch_dtype
    factory = {"device": device, "dtype": dtype}
    torch.manual_seed(0)
    x = torch.randn(1, case.tokens, d_model, device=device, dtype=dtype)
    if case.suite == KERNEL_SUITE:
        if impl == "dense":
            return DenseRows(nn.Linear(d_model, d_ffn, bias=False, **factory), top_k), x
        expert_idx = torch.rand(case.tokens, experts, device=device).topk(top_k, dim=-1).indices
        gates = torch.rand(case.tokens, top_k, device=device).softmax(-1)
        weight = torch.randn(experts, d_ffn, d_model, **factory) * d_model**-0.5
        return RoutedLinear(ROUTED_LINEARS[impl], weight, expert_idx, gates), x
    config = case.hf_config()
    kv_heads, head_dim = config.num_key_value_heads, config.kv_channels
    if impl == "dense":
        mlp = DenseRows(GLUMLP(d_model, d_ffn, **factory), top_k)
        if case.suite == "mlp":
            return mlp, x
        attention = DenseAttention(d_model, top_k, kv_heads, head_dim, **factory)
        return (attention if case.suite == "moa" else DenseLayer(attention, mlp)), x
    reference = _reference(case, config).to(device, dtype)
    if impl == "transformers":
        return _wrap_reference(case, reference, config, x), x
    state = reference.state_dict()
    if impl == "grouped_mm":
        module = GroupedMMExperts(
            reference.router.layer, top_k, state["input_linear.weight"],
            state["output_linear.weight"],
            state["bias"],
        )  # fmt: skip
        return module, x
    if case.suite == "mlp":
        ours = MoEMLP(d_model, d_ffn, experts, top_k, **factory)
    elif case.suite == "moa":
        ours = MoA(d_model, experts, top_k, head_dim=head_dim, num_kv_heads=kv_heads, **factory)
        state = {from_hf_key(f"layer.self_attention.{k}").removeprefix("layer.self_attention."): v
                 for k, v in state.items()}  # fmt: skip
    else:
        ours = JetMoEDecoderLayer(_our_config(config), **factory)
        state = {from_hf_key(f"layer.{k}").removeprefix("layer."): v for k, v in state.items()}
    ours.load_state_dict(state)
    if impl == "expert_products":
        return _expert_products(ours, x), x
    if case.suite == "mlp":
        return ours, x
    # As transformers' block gets its position_embeddings (_wrap_reference): the tables a
    # model computes once for all its layers, outside the block's time.
    attention = ours if case.suite == "moa" else ours.self_attention
    tables = attention.rotary_tables(torch.arange(case.tokens, device=x.device))
    return _GivenRopeTables(ours, tables), x


def _expert_products(block: MoEMLP, x: Tensor) -> ExpertProducts:
    """:class:`ExpertProducts` of ``block``'s weights and its routing of ``x``."""
    tokens = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        plan = block.router(tokens).plan
    grouped = tokens[plan.sorted_indices // block.router.top_k].clone()
    weights = (block.input_linear.weight, block.output_linear.weight)
    return ExpertProducts(grouped, plan.tokens_per_expert.tolist(), *(w.detach() for w in weights))


class _GivenRopeTables(nn.Module):
    """Our MoA or decoder layer called with the RoPE tables of positions ``0..T-1``."""

    def __init__(self, block: nn.Module, tables: tuple[Tensor, Tensor]) -> None:
        super().__init__()
        self.block, self.tables = block, tables

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x, position_embeddings=self.tables)


def _reference(case: Case, config):
    from transformers.models.jetmoe import modeling_jetmoe as hf

    module = {
        "mlp": lambda: hf.JetMoeMoE(config),
        "moa": lambda: hf.JetMoeAttention(config, layer_idx=0),
        "layer": lambda: hf.JetMoeDecoderLayer(config, layer_idx=0),
    }[case.suite]()
    for param in module.parameters():
        nn.init.normal_(param, std=0.02)
    return module


def _wrap_reference(case: Case, reference, config, x: Tensor):
    if case.suite == "mlp":
        return reference
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeRotaryEmbedding

    positions = torch.arange(case.tokens, device=x.device)[None]
    cos_sin = JetMoeRotaryEmbedding(config).to(x.device)(x, positions)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = reference

        def forward(self, h):
            out = self.inner(h, attention_mask=None, position_embeddings=cos_sin)
            return out[0] if isinstance(out, tuple) else out

    return Wrapped()


def _our_config(config) -> JetMoEConfig:
    return JetMoEConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=1,
        num_local_experts=config.num_local_experts, num_experts_per_tok=config.num_experts_per_tok,
        num_key_value_heads=config.num_key_value_heads, kv_channels=config.kv_channels,
        intermediate_size=config.intermediate_size,
    )  # fmt: skip


def _hf_config(case: Case):
    from transformers import AutoConfig

    d_model, d_ffn, experts, top_k = case.dims
    heads = max(1, d_model // 64)
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=HF_MODEL_VOCAB, hidden_size=d_model,
        num_hidden_layers=HF_MODEL_LAYERS, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=d_model // heads, intermediate_size=d_ffn, moe_intermediate_size=d_ffn,
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


class _LogitsOf(nn.Module):
    """A causal LM as a module from input embeddings ``[B, T, d]`` to logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds: Tensor) -> Tensor:
        return self.model(inputs_embeds=inputs_embeds).logits


def _build_hf(case: Case, impl: str) -> tuple[nn.Module, Tensor]:
    """transformers' Qwen3-MoE sparse MoE block (or, for :data:`HF_MODEL`, the whole model)
    running its experts through ``impl``, with the same random weights for every ``impl``."""
    from transformers import Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from moe_blocks.integrations.transformers import register

    register()
    device, dtype = case.device, case.torch_dtype
    torch.manual_seed(0)
    x = torch.randn(1, case.tokens, case.dims[0], device=device, dtype=dtype)
    config = _hf_config(case)
    config._experts_implementation = impl
    if case.shape == HF_MODEL:
        module = _LogitsOf(Qwen3MoeForCausalLM(config).eval())
    else:
        module = Qwen3MoeSparseMoeBlock(config)
        for param in module.parameters():  # transformers initialises them in the model only
            nn.init.normal_(param, std=0.02)
    return module.to(device, dtype), x
