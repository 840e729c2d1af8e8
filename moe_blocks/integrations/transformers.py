"""moe-blocks as an experts implementation of transformers' MoE models.

transformers (v5) runs the routed experts of its MoE families (Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V2/V3, GPT-OSS, Phi-MoE, GLM-4-MoE, ...) through one switch, ``experts_implementation``.
:func:`register` adds ``"moe_blocks"`` to it::

    from moe_blocks.integrations.transformers import register

    register()
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_blocks")
    # or, on a loaded model: model.set_experts_implementation("moe_blocks")

Every experts module then runs on :func:`moe_blocks.kernels.expert_linear` (Triton on CUDA,
the torch backend on CPU) with its own parameters, used in place: two ``expert_linear`` calls
(up, then down with the routing weights summed per token inside the op) around the module's
own activation. The layout is read from the flags transformers' ``@use_experts_implementation``
puts on each module, never guessed per model: ``has_gate`` (``gate_up_proj`` or ``up_proj``),
``is_concatenated`` (gate and up halves, or interleaved rows), ``is_transposed`` (weights
``[E, in, out]``: used through a transposed view, no copy), ``has_bias``, the module's own
``_apply_gate`` (GPT-OSS's clamped SwiGLU), ``has_post_expert_norm`` and ``_is_expert_parallel``
(expert ids >= num_experts, the other ranks' experts, contribute nothing).

JetMoe does not use that switch; :func:`patch_jetmoe` routes its MoE and MoA through the same
kernel.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..kernels import expert_linear, plan_dispatch
from ..kernels.ops import routed_mlp
from ..kernels.plan import accumulation_dtype, token_sum
from ..moe_mlp import glu

try:
    from transformers.integrations import moe as _hf_moe
except ImportError as error:
    raise ImportError(
        "moe_blocks.integrations.transformers needs transformers with the experts interface "
        "(transformers >= 5.17): pip install 'transformers>=5.17'"
    ) from error

NAME = "moe_blocks"

# Set by @use_experts_implementation on every experts module (transformers >= 5.17).
_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
_DEFAULT_APPLY_GATE = getattr(_hf_moe, "_default_apply_gate", None)


def register() -> str:
    """Add the ``"moe_blocks"`` experts implementation to transformers' ``ExpertsInterface``.

    Idempotent. Afterwards ``from_pretrained(..., experts_implementation="moe_blocks")`` and
    ``model.set_experts_implementation("moe_blocks")`` accept the name.

    Returns:
        The implementation's name, ``"moe_blocks"``.
    """
    _hf_moe.ExpertsInterface.register(NAME, experts_forward)
    return NAME


@dataclass(frozen=True)
class ExpertsLayout:
    """An experts module's parameters as ``expert_linear`` takes them, and how to run them.

    Attributes:
        up: ``[E, up_features, d]``: ``gate_up_proj`` (or ``up_proj``), a transposed view of it
            when the module stores ``[E, d, up_features]``.
        up_bias: ``[E, up_features]`` or None.
        down: ``[E, d, features]``: ``down_proj``, or a transposed view of it.
        down_bias: ``[E, d]`` or None.
        activation: rows ``[N, up_features] -> [N, features]`` (the gate, or the activation).
        post_norm: applied to each expert output row ``[N, d]`` before the routing weight, or
            None.
        expert_parallel: expert ids >= E mark assignments to other ranks' experts.
        owner: the module's class name, for error messages.
    """

    up: Tensor
    up_bias: Tensor | None
    down: Tensor
    down_bias: Tensor | None
    activation: Callable[[Tensor], Tensor]
    post_norm: Callable[[Tensor], Tensor] | None
    expert_parallel: bool
    owner: str

    @property
    def num_experts(self) -> int:
        return self.up.shape[0]


def read_layout(module: nn.Module) -> ExpertsLayout:
    """The :class:`ExpertsLayout` of a transformers experts module, from the flags that
    ``@use_experts_implementation`` set on it.

    Raises:
        ValueError / TypeError naming the module and the flag or parameter when the module is
        not an experts module this backend can run (missing flags or weights, quantized
        weights, inconsistent shapes).
    """
    owner = type(module).__name__
    missing = [flag for flag in _LAYOUT_FLAGS if not hasattr(module, flag)]
    if missing:
        raise ValueError(
            f"{owner} has no {', '.join(missing)}: moe_blocks runs experts modules decorated "
            "with transformers' @use_experts_implementation, which sets these flags "
            "(transformers >= 5.17)"
        )
    transposed = bool(module.is_transposed)
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    up = _expert_weight(module, up_name, transposed)
    down = _expert_weight(module, "down_proj", transposed)
    flag = f"is_transposed={transposed}"
    if down.shape[0] != up.shape[0] or down.shape[1] != up.shape[2]:
        raise ValueError(
            f"{owner}: {up_name} {tuple(up.shape)} and down_proj {tuple(down.shape)} (as "
            f"[E, out, in] with {flag}) do not form experts d -> features -> d"
        )
    num_experts = getattr(module, "num_experts", up.shape[0])
    if num_experts != up.shape[0]:
        raise ValueError(
            f"{owner}.num_experts is {num_experts} but {up_name} holds {up.shape[0]} experts"
        )
    up_bias = down_bias = None
    if module.has_bias:
        up_bias = _expert_bias(module, f"{up_name}_bias", up)
        down_bias = _expert_bias(module, "down_proj_bias", down)
    post_norm = None
    if getattr(module, "has_post_expert_norm", False):
        post_norm = getattr(module, "post_expert_norm", None)
        if not callable(post_norm):
            raise ValueError(f"{owner} has has_post_expert_norm=True but no post_expert_norm")
    return ExpertsLayout(
        up=up,
        up_bias=up_bias,
        down=down,
        down_bias=down_bias,
        activation=_activation(module),
        post_norm=post_norm,
        expert_parallel=bool(getattr(module, "_is_expert_parallel", False)),
        owner=owner,
    )


def _expert_weight(module: nn.Module, name: str, transposed: bool) -> Tensor:
    """``module.<name>`` as ``[E, out, in]``: itself, or its transposed view (no copy)."""
    owner = type(module).__name__
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor) or weight.dim() != 3:
        found = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(
            f"{owner}.{name} must be a 3-D expert weight tensor (the module has has_gate="
            f"{module.has_gate}, is_transposed={transposed}), got {found}"
        )
    if not weight.is_floating_point():
        raise TypeError(
            f"{owner}.{name} has dtype {weight.dtype}: moe_blocks runs float16, bfloat16, float32 "
            "or float64 experts, not quantized ones"
        )
    return weight.mT if transposed else weight


def _expert_bias(module: nn.Module, name: str, weight: Tensor) -> Tensor:
    owner = type(module).__name__
    bias = getattr(module, name, None)
    if not isinstance(bias, Tensor) or tuple(bias.shape) != tuple(weight.shape[:2]):
        found = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(
            f"{owner} has has_bias=True, so {owner}.{name} must be a tensor [E, out] = "
            f"{tuple(weight.shape[:2])}, got {found}"
        )
    return bias


def _activation(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """What maps an expert's up-projection rows to the down-projection's input: the module's
    ``_apply_gate`` (its own, or transformers' default SiLU-GLU over concatenated halves);
    for interleaved rows (``is_concatenated=False``) without a gate of the module's own, the
    activation over the even rows times the odd rows; ``act_fn`` when ``has_gate=False``."""
    if not module.has_gate:
        return module.act_fn
    own_gate = getattr(type(module), "_apply_gate", _DEFAULT_APPLY_GATE)
    if own_gate is _DEFAULT_APPLY_GATE:
        return glu(module.act_fn, interleaved=not module.is_concatenated)
    return module._apply_gate


def experts_forward(
    module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The ``"moe_blocks"`` experts implementation: what transformers calls in place of the
    experts module's forward.

    Args:
        module: the experts module (its parameters and layout flags are read, never changed).
        hidden_states: ``[T, d]`` float.
        top_k_index: ``[T, k]`` integer expert ids; ids >= num_experts belong to other
            ranks (transformers' expert parallelism) and contribute nothing.
        top_k_weights: ``[T, k]`` float routing weights.

    Returns:
        ``[T, d]`` in ``hidden_states``' dtype: ``Σ_j w[t, j] · expert_{e_tj}(x_t)``, computed
        in the expert weights' dtype (as transformers' own implementations do), the k terms
        summed in fp32.
    """
    layout = read_layout(module)
    _check_routing(layout, hidden_states, top_k_index, top_k_weights)
    x = hidden_states.to(layout.up.dtype)
    if layout.expert_parallel:
        out = _local_assignments_forward(layout, x, top_k_index, top_k_weights)
    else:
        # Ids >= E are transformers' sentinel for another rank's expert (its eager path skips
        # them, and transformers 5.17 sets no flag): they run on expert 0 with weight 0, which
        # contributes nothing to the output or any gradient, without reading ids on the host.
        off_rank = top_k_index >= layout.num_experts
        top_k_index = top_k_index.masked_fill(off_rank, 0)
        top_k_weights = top_k_weights.masked_fill(off_rank, 0)
        out = routed_forward(layout, x, top_k_index, top_k_weights)
    return out.to(hidden_states.dtype)


def _check_routing(layout: ExpertsLayout, hidden_states, top_k_index, top_k_weights) -> None:
    owner = layout.owner
    for name, value in (
        ("hidden_states", hidden_states),
        ("top_k_index", top_k_index),
        ("top_k_weights", top_k_weights),
    ):
        if not isinstance(value, Tensor):
            raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(value).__name__}")
    features = layout.up.shape[2]
    if hidden_states.dim() != 2 or hidden_states.shape[1] != features:
        raise ValueError(
            f"{owner}: hidden_states must be [T, {features}], got {tuple(hidden_states.shape)}"
        )
    if not hidden_states.is_floating_point():
        raise TypeError(f"{owner}: hidden_states must be float, got {hidden_states.dtype}")
    num_tokens = hidden_states.shape[0]
    if top_k_index.dim() != 2 or top_k_index.shape[0] != num_tokens:
        raise ValueError(
            f"{owner}: top_k_index must be [T={num_tokens}, k], got {tuple(top_k_index.shape)}"
        )
    if (
        top_k_index.is_floating_point()
        or top_k_index.is_complex()
        or top_k_index.dtype == torch.bool
    ):
        raise TypeError(f"{owner}: top_k_index must be an integer tensor, got {top_k_index.dtype}")
    # (ids >= E are other ranks' experts; on a GPU the kernel's device-side check stands)
    if top_k_index.numel() and top_k_index.is_cpu and not torch.compiler.is_compiling():
        low = int(top_k_index.min())
        if low < 0:
            raise ValueError(f"{owner}: top_k_index holds a negative expert id ({low})")
    if tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise ValueError(
            f"{owner}: top_k_weights must have top_k_index's shape {tuple(top_k_index.shape)}, "
            f"got {tuple(top_k_weights.shape)}"
        )
    if not top_k_weights.is_floating_point():
        raise TypeError(f"{owner}: top_k_weights must be float, got {top_k_weights.dtype}")


def routed_forward(layout: ExpertsLayout, x: Tensor, expert_idx: Tensor, weights: Tensor) -> Tensor:
    """``out[t] = Σ_j weights[t, j] · post_norm(down(activation(up(x[t]))))`` through expert
    ``expert_idx[t, j]``: ``x [T, d]`` in the weights' dtype, ``expert_idx``/``weights``
    ``[T, k]`` -> ``[T, d]`` (x's dtype, or fp32 with a post-expert norm)."""
    plan = plan_dispatch(expert_idx, layout.num_experts)
    plain = layout.up_bias is None and layout.down_bias is None and layout.post_norm is None
    if plain and layout.up.shape[1] in (layout.down.shape[2], 2 * layout.down.shape[2]):
        out = routed_mlp(x, layout.up, layout.down, plan, weights, layout.activation)
        if out is not None:  # inference on CPU: one pass over the experts, faster
            return out
    hidden = expert_linear(x, layout.up, plan, bias=layout.up_bias, grouped_out=True)
    hidden = layout.activation(hidden)
    if hidden.shape[-1] != layout.down.shape[2]:
        raise ValueError(
            f"{layout.owner}: the gate/activation gives {hidden.shape[-1]} features per row but "
            f"down_proj takes {layout.down.shape[2]}"
        )
    if layout.post_norm is None:
        return expert_linear(
            hidden, layout.down, plan, bias=layout.down_bias, grouped_in=True, gates=weights
        )
    rows = expert_linear(hidden, layout.down, plan, bias=layout.down_bias, grouped_in=True)
    rows = layout.post_norm(rows)  # [T*k, d], assignment order
    return token_sum(rows, expert_idx.shape[1], weights)


def _local_assignments_forward(
    layout: ExpertsLayout, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """Expert parallelism: only the assignments to this rank's experts (ids < E) run, one row
    each (k = 1), and are summed per token. Reads their count on the host (a synchronisation
    on CUDA)."""
    top_k = top_k_index.shape[1]
    kept = (top_k_index < layout.num_experts).reshape(-1).nonzero().squeeze(1)
    tokens = torch.div(kept, top_k, rounding_mode="floor")
    rows = routed_forward(
        layout,
        x.index_select(0, tokens),
        top_k_index.reshape(-1)[kept, None],
        top_k_weights.reshape(-1)[kept, None],
    )
    wide = accumulation_dtype(rows.dtype)
    out = rows.new_zeros(x.shape[0], rows.shape[1], dtype=wide)
    return out.index_add(0, tokens, rows.to(wide))


# --------------------------------------------------------------------------------------------
# JetMoe (its own experts classes, outside the experts interface)


def patch_jetmoe(model: nn.Module) -> nn.Module:
    """Route every JetMoe MoE (``JetMoeMoE.forward``) and MoA (``JetMoeMoA.map``/``reduce``) of
    a transformers JetMoe ``model`` through ``expert_linear``, with the model's own weights.

    The routing is JetMoe's (fp32 logits, top-k, softmax over the k picked logits) from the
    logits its own router module returns, so hooks on the router see its output as unpatched
    (transformers records ``router_logits`` for the aux loss that way); the logits are the same
    as unpatched up to float rounding. The modules are patched in place (their methods, not
    their parameters); patching twice is harmless.

    Args:
        model: a module containing transformers' ``JetMoeMoE``/``JetMoeMoA`` modules (e.g.
            ``JetMoeForCausalLM``).

    Returns:
        ``model``.
    """
    from transformers.models.jetmoe import modeling_jetmoe as jetmoe

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    patched = 0
    for module in model.modules():
        if isinstance(module, jetmoe.JetMoeMoE):
            module.forward = types.MethodType(_jetmoe_mlp_forward, module)
        elif isinstance(module, jetmoe.JetMoeMoA):
            module.map = types.MethodType(_jetmoe_attention_map, module)
            module.reduce = types.MethodType(_jetmoe_attention_reduce, module)
        else:
            continue
        patched += 1
    if not patched:
        raise ValueError(
            f"model ({type(model).__name__}) has no JetMoeMoE or JetMoeMoA module to patch"
        )
    return model


def _jetmoe_route(router: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """JetMoeTopKGating's decision for ``tokens [T, d]``: fp32 logits ``[T, E]``, expert ids and
    gates ``[T, k]`` in token order (softmax over the k picked logits, in the tokens' dtype).
    The logits are the router module's own output (its last), so its hooks run."""
    logits = router(tokens)[-1]
    top_logits, expert_idx = logits.topk(router.top_k, dim=1)
    return logits, expert_idx, top_logits.softmax(dim=1).type_as(tokens)


def _jetmoe_mlp_forward(self, layer_input: Tensor) -> Tensor:
    tokens = layer_input.reshape(-1, layer_input.shape[-1])
    _, expert_idx, gates = _jetmoe_route(self.router, tokens)
    layout = ExpertsLayout(
        up=self.input_linear.weight,
        up_bias=None,
        down=self.output_linear.weight,
        down_bias=None,
        activation=glu(self.activation, interleaved=False),
        post_norm=None,
        expert_parallel=False,
        owner=type(self).__name__,
    )
    out = routed_forward(layout, tokens, expert_idx, gates)
    return out.view(layer_input.shape) + self.bias


def _jetmoe_attention_map(self, layer_input: Tensor):
    batch, length, features = layer_input.shape
    tokens = layer_input.reshape(-1, features)
    logits, expert_idx, gates = _jetmoe_route(self.router, tokens)
    plan = plan_dispatch(expert_idx, self.num_experts)
    queries = expert_linear(tokens, self.input_linear.weight, plan)  # [T*k, heads], by slot
    return queries.view(batch, length, self.top_k, -1), logits, (plan, gates)


def _jetmoe_attention_reduce(self, layer_input: Tensor, topo_info) -> Tensor:
    plan, gates = topo_info
    batch, length, _, width = layer_input.shape
    rows = layer_input.reshape(-1, width)  # assignment order: token t's slot j at t*k + j
    out = expert_linear(rows, self.output_linear.weight, plan, gates=gates)
    return out.view(batch, length, -1) + self.bias


# --------------------------------------------------------------------------------------------
# Upcycling a dense transformers model into its family's MoE class

# Dense model_type -> the MoE model_type whose classes take its weights.
UPCYCLE_FAMILIES = {
    "llama": "mixtral",
    "mistral": "mixtral",
    "qwen2": "qwen2_moe",
    "qwen3": "qwen3_moe",
}
# Dense config fields that the MoE class cannot represent, with the value it implies.
_IMPLIED = {"mixtral": {"attention_bias": False, "mlp_bias": False}, "qwen2_moe": {},
            "qwen3_moe": {}}  # fmt: skip
# The families that apply their ``sliding_window`` to every layer (Llama to none; the others
# to the layers their ``layer_types`` marks "sliding_attention").
_WINDOW_EVERY_LAYER = ("mistral", "mixtral", "qwen3_moe")
_NOT_COPIED = ("architectures", "model_type", "transformers_version", "_name_or_path", "dtype",
               "pretraining_tp", "intermediate_size")  # fmt: skip


def upcycle_config(config, *, num_experts: int, top_k: int, expert_hidden: int):
    """The MoE config for a dense ``config`` (Llama/Mistral -> Mixtral, Qwen2 -> Qwen2-MoE,
    Qwen3 -> Qwen3-MoE): the dense fields as they are, every layer an MoE layer with
    ``num_experts`` experts of width ``expert_hidden``, ``top_k`` of them per token, gates
    renormalised to sum to 1, no router jitter."""
    from transformers import AutoConfig

    model_type = getattr(config, "model_type", None)
    if model_type not in UPCYCLE_FAMILIES:
        raise ValueError(
            f"model: upcycling supports the dense families {sorted(UPCYCLE_FAMILIES)}, got "
            f"model_type {model_type!r}"
        )
    target = UPCYCLE_FAMILIES[model_type]
    fields = config.to_dict()
    for name, implied in _IMPLIED[target].items():
        if fields.get(name, implied) != implied:
            raise ValueError(
                f"model: {model_type} with {name}={fields[name]!r} has no {target} equivalent "
                f"({target} has {name}={implied!r})"
            )
    windows = _attention_windows(config)
    dense_hidden = config.intermediate_size
    fields = {key: value for key, value in fields.items() if key not in _NOT_COPIED}
    if target in _WINDOW_EVERY_LAYER:
        if len(set(windows)) > 1:
            raise ValueError(
                f"model: {model_type} with a sliding window on some layers only (layer_types "
                f"{config.layer_types}) has no {target} equivalent ({target} applies its "
                f"sliding_window to every layer)"
            )
        fields["sliding_window"] = windows[0]
        if target == "qwen3_moe":
            fields["use_sliding_window"] = windows[0] is not None
    fields["dtype"] = config.dtype
    if target == "mixtral":
        fields |= dict(intermediate_size=expert_hidden, num_local_experts=num_experts,
                       router_jitter_noise=0.0)  # fmt: skip
    else:
        fields |= dict(moe_intermediate_size=expert_hidden, num_experts=num_experts,
                       norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                       intermediate_size=dense_hidden)  # fmt: skip
    if target == "qwen2_moe":
        fields |= dict(shared_expert_intermediate_size=dense_hidden, qkv_bias=True)
    fields["num_experts_per_tok"] = top_k
    moe_config = AutoConfig.for_model(target, **fields)
    if _attention_windows(moe_config) != windows:
        raise ValueError(
            f"model: {model_type}'s attention windows per layer {windows} have no {target} "
            f"equivalent ({target} would use {_attention_windows(moe_config)})"
        )
    return moe_config


def _attention_windows(config) -> list[int | None]:
    """The sliding window of each layer's attention in a model of ``config`` (Llama, Mistral,
    Mixtral, Qwen2(-MoE), Qwen3(-MoE)), None for full attention."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "llama":
        return [None] * config.num_hidden_layers
    if config.model_type in _WINDOW_EVERY_LAYER:
        return [window] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in config.layer_types]


def upcycle(
    model: nn.Module, *, num_experts: int, top_k: int, method: str = "copy", **options
) -> nn.Module:
    """A transformers MoE model upcycled from the dense causal LM ``model``: a
    ``LlamaForCausalLM`` or ``MistralForCausalLM`` becomes a ``MixtralForCausalLM``, a
    ``Qwen2ForCausalLM`` a ``Qwen2MoeForCausalLM``, a ``Qwen3ForCausalLM`` a
    ``Qwen3MoeForCausalLM`` (transformers' own classes; every layer an MoE layer).

    Embeddings, attention, norms and the LM head are copied unchanged; each layer's MLP becomes
    its experts and router by ``method`` (:mod:`moe_blocks.upcycling`: ``"copy"``, ``"drop"``,
    ``"granular"``, with ``options`` such as ``router_std``, ``noise_std``, ``drop_ratio``,
    ``granularity``, ``seed``). The gates are renormalised to sum to 1 (``norm_topk_prob``;
    Mixtral always does), so with ``"copy"`` (and ``"granular"``) the MoE model's logits are
    the dense model's. Qwen2-MoE's shared expert is a copy of the dense MLP with a zero
    ``shared_expert_gate`` (sigmoid 0 = 1/2) and the routed experts' output weights are halved:
    each layer computes ½·routed + ½·shared = the dense MLP. ``model`` is not modified; the
    new model is on its device, in its dtype, in eval mode if ``model`` was. Calls
    :func:`register`, so ``experts_implementation="moe_blocks"`` is accepted afterwards."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from ..upcycling import UpcycleOptions, check_seed, upcycle_weights

    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
    config = model.config
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not type(model).__name__.endswith("ForCausalLM") or layers is None:
        raise ValueError(
            f"model must be a dense causal LM (e.g. LlamaForCausalLM), got {type(model).__name__}"
        )
    seed = options.pop("seed", None)
    check_seed(seed)
    register()
    chosen = UpcycleOptions(method=method, **options).checked(
        config.intermediate_size, num_experts, top_k
    )
    moe_config = upcycle_config(
        config, num_experts=num_experts, top_k=top_k,
        expert_hidden=config.intermediate_size // (chosen.granularity or 1),
    )  # fmt: skip
    parameter = next(model.parameters())
    with no_init_weights(), torch.device(parameter.device):
        moe = AutoModelForCausalLM.from_config(moe_config, dtype=parameter.dtype)
    moe_state = moe.state_dict()
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if ".mlp." in name:
                continue
            if name not in moe_state or moe_state[name].shape != value.shape:
                raise ValueError(f"model: {name} has no place in {type(moe).__name__}")
            moe_state[name].copy_(value)
        shared = moe_config.model_type == "qwen2_moe"
        for index, (dense_layer, moe_layer) in enumerate(
            zip(layers, moe.model.layers, strict=True)
        ):
            dense_mlp, block = dense_layer.mlp, moe_layer.mlp
            linears = (dense_mlp.gate_proj, dense_mlp.up_proj, dense_mlp.down_proj)
            if any(linear.bias is not None for linear in linears):
                raise ValueError(f"model: layer {index}'s MLP has biases; its MoE class has none")
            weights = upcycle_weights(
                *(linear.weight for linear in linears), num_experts=num_experts, top_k=top_k,
                method=method, seed=None if seed is None else seed + index, **options,
            )  # fmt: skip
            layout = read_layout(block.experts)
            up = weights.w_in
            if not block.experts.is_concatenated:  # gate and up rows interleaved
                up = torch.stack(up.chunk(2, dim=1), dim=2).flatten(1, 2)
            layout.up.copy_(up)
            layout.down.copy_(weights.w_out * (0.5 if shared else 1.0))
            block.gate.weight.copy_(weights.router)
            if shared:
                for name, linear in zip(
                    ("gate_proj", "up_proj", "down_proj"), linears, strict=True
                ):
                    getattr(block.shared_expert, name).weight.copy_(linear.weight)
                block.shared_expert_gate.weight.zero_()
    moe.train(model.training)
    return moe
