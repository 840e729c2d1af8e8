"""Benchmarks of the kernel and the blocks beside their baselines, shared by ``moe-blocks
bench``, the pytest-benchmark suites in ``benches/`` and ``benches/gpu_check.py``.

Every case builds each implementation with the same random weights and input and times the
same work. The block suites (``mlp``, ``moa``, ``layer``: MoEMLP, MoA, a JetMoE decoder layer)
time :data:`IMPLEMENTATIONS`:

- ``moe_blocks``: our block, on the default backend.
- ``transformers``: transformers' JetMoe module with the same weights: the per-expert loop
  most MoE code runs today.
- ``grouped_mm``: (MLP only) a plain autograd pipeline: sort, gather, ``torch._grouped_mm``,
  SiLU-GLU, ``torch._grouped_mm``, gate-weighted ``index_add``.
- ``dense``: the roofline: dense layers with the same matmul FLOPs and no routing (T·k rows
  through one dense expert-sized MLP; for attention, one dense projection as wide as the k
  experts' together; for a layer, both in sequence).

The ``expert_linear`` suite times the kernel alone as one expert linear layer with its routing
fixed (:class:`RoutedLinear`): ``x[T, d_model]`` in, each token's gate-weighted sum over its k
experts ``[T, d_ffn]`` out, one call that reads each token row k times, multiplies it by its
experts' weights and sums the k results by the gates. Implementations
(:data:`KERNEL_IMPLEMENTATIONS`): ``moe_blocks`` (one ``expert_linear`` call),
``per_expert_loop`` (for each expert ``torch.where``, ``torch.mm``, gate, ``index_add``: the
loop of transformers' MoE layers), ``grouped_mm`` (sort, gather, one ``torch._grouped_mm``,
gate-weighted ``index_add``) and ``dense`` (the T·k rows through one expert's weight).

The ``hf`` suite times transformers' own MoE code with each of its ``experts_implementation``
choices (``eager``, ``grouped_mm``, ``batched_mm``) and ours (``moe_blocks``, from
:mod:`moe_blocks.integrations.transformers`): Qwen3-MoE's sparse MoE block (router + experts)
at each expert shape, and a whole two-layer Qwen3-MoE model (shape ``qwen3-moe-model``).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from moe_blocks import MoA, MoEMLP
from moe_blocks.kernels import expert_linear, plan_dispatch
from moe_blocks.kernels.torch_backend import grouped_mm_runs

from .jetmoe import JetMoEConfig, JetMoEDecoderLayer

# Model shapes (d_model, d_ffn, experts, top_k) at full size, and scaled for a 2-core CPU.
SHAPES = {
    "jetmoe-8b": (2048, 5632, 8, 2),
    "mixtral": (4096, 14336, 8, 2),
    "fine-grained": (1024, 256, 64, 8),
    "deepseek-v3": (7168, 2048, 256, 8),
}
CPU_SHAPES = {
    "jetmoe-8b": (1024, 2816, 8, 2),
    "mixtral": (1024, 3584, 8, 2),
    "fine-grained": (1024, 256, 64, 8),
    "deepseek-v3": (896, 256, 64, 8),
}
TINY_SHAPES = {name: (32, 16, experts, k) for name, (_, _, experts, k) in CPU_SHAPES.items()}
HEAD_DIM = 128  # attention: JetMoE's head size, kv heads = d_model / (top_k * head size)
BLOCK_SUITES = ("mlp", "moa", "layer")  # our blocks beside IMPLEMENTATIONS
IMPLEMENTATIONS = ("moe_blocks", "transformers", "grouped_mm", "dense")
KERNEL_SUITE = "expert_linear"  # the kernel beside KERNEL_IMPLEMENTATIONS
KERNEL_IMPLEMENTATIONS = ("moe_blocks", "per_expert_loop", "grouped_mm", "dense")
SUITES = (KERNEL_SUITE, *BLOCK_SUITES)
HF_SUITE = "hf"  # transformers' MoE code beside HF_IMPLEMENTATIONS
HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm", "moe_blocks")
HF_MODEL = "qwen3-moe-model"  # the hf suite's whole-model case: fine-grained experts
HF_MODEL_LAYERS, HF_MODEL_VOCAB = 2, 1024
BATCHED_MM_BYTES = 2**31  # batched_mm gathers a weight copy per assignment: skip it above this
# What "x faster" divides by: each suite's per-expert loop
LOOP_BASELINES = {KERNEL_SUITE: "per_expert_loop", HF_SUITE: "eager"}  # others: "transformers"
# What the memory column holds on each device (memory_mb says how it is measured)
MEMORY_MEASURES = {"cpu": "saved_for_backward", "cuda": "peak_allocated"}


def shapes_for(device: str, tiny: bool = False) -> dict[str, tuple[int, int, int, int]]:
    if tiny:
        return TINY_SHAPES
    return SHAPES if device == "cuda" else CPU_SHAPES


def attention_dims(d_model: int, top_k: int) -> tuple[int, int]:
    """(num_kv_heads, head_dim) for an MoA of ``d_model``: heads of 128 (fewer for small
    models), ``top_k · kv_heads · head_dim = d_model`` as in JetMoE-8B."""
    head_dim = min(HEAD_DIM, max(2, d_model // (2 * top_k)))
    head_dim -= head_dim % 2
    return max(1, d_model // (top_k * head_dim)), head_dim


@dataclass
class Case:
    suite: str
    shape: str
    tokens: int
    dtype: str
    device: str
    dims: tuple[int, int, int, int]

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[self.dtype]

    def hf_config(self):
        from transformers import JetMoeConfig

        d_model, d_ffn, experts, top_k = self.dims
        kv_heads, head_dim = attention_dims(d_model, top_k)
        config = JetMoeConfig(
            vocab_size=16, hidden_size=d_model, intermediate_size=d_ffn, num_hidden_layers=1,
            num_local_experts=experts, num_experts_per_tok=top_k, num_key_value_heads=kv_heads,
            kv_channels=head_dim,
        )  # fmt: skip
        config._attn_implementation = "sdpa"
        return config

    def matmul_flops(self, backward: bool) -> float:
        """Matmul FLOPs of the routed work (forward; ×3 with backward)."""
        d_model, d_ffn, experts, top_k = self.dims
        rows = self.tokens * top_k
        mlp = 2 * rows * d_model * 3 * d_ffn
        if self.suite == KERNEL_SUITE:
            forward = 2 * rows * d_model * d_ffn
        elif self.suite == HF_SUITE:  # the experts' FLOPs (per layer of the model)
            forward = mlp * (HF_MODEL_LAYERS if self.shape == HF_MODEL else 1)
        elif self.suite == "mlp":
            forward = mlp
        else:
            kv_heads, head_dim = attention_dims(d_model, top_k)
            width = kv_heads * head_dim
            projections = 2 * rows * d_model * 2 * width + 2 * self.tokens * d_model * 2 * width
            forward = projections + self.attention_flops()
            if self.suite == "layer":
                forward += mlp
        return forward * (3 if backward else 1)

    def attention_flops(self) -> float:
        """Forward FLOPs of the causal attention itself (``QKᵀ`` and ``PV`` over the unmasked
        half) for the MoA of these dims."""
        d_model, _, _, top_k = self.dims
        kv_heads, head_dim = attention_dims(d_model, top_k)
        return 2 * 2 * top_k * kv_heads * head_dim * self.tokens * self.tokens / 2


# --------------------------------------------------------------------------------------------
# Implementations: each returns a callable module taking x [1, T, d_model]


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
        gate, up = hidden.chunk(2, dim=-1)
        out = torch._grouped_mm(
            (F.silu(gate) * up).contiguous(), self.w_out.transpose(-2, -1), offs=offsets
        )
        result = _gated_sum(out, top_logits.softmax(-1), order, tokens.shape[0])
        return (result + self.bias).view_as(x)


class GLUMLP(nn.Module):
    """One GLU MLP of an expert's size, no routing: ``d_model -> 2·d_ffn -> d_ffn -> d_model``."""

    def __init__(self, d_model: int, d_ffn: int, **factory) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * d_ffn, bias=False, **factory)
        self.w_out = nn.Linear(d_ffn, d_model, bias=False, **factory)

    def forward(self, rows: Tensor) -> Tensor:
        gate, up = self.w_in(rows).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


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


def implementations(suite: str) -> tuple[str, ...]:
    """The implementations a suite times (each where :func:`applies`)."""
    if suite == HF_SUITE:
        return HF_IMPLEMENTATIONS
    return KERNEL_IMPLEMENTATIONS if suite == KERNEL_SUITE else IMPLEMENTATIONS


def applies(case: Case, impl: str) -> bool:
    """Whether ``impl`` exists for ``case``: one of its suite's implementations; the grouped_mm
    pipeline is the kernel's or an MLP and needs a dtype/device ``_grouped_mm`` runs; the hf
    suite's ``batched_mm`` is skipped where it would gather too many weight copies."""
    if impl not in implementations(case.suite):
        return False
    if case.suite == HF_SUITE:
        return impl != "batched_mm" or _batched_mm_bytes(case) <= BATCHED_MM_BYTES
    if impl == "grouped_mm":
        return case.suite in (KERNEL_SUITE, "mlp") and grouped_mm_runs(
            case.device, case.torch_dtype
        )
    return True


def case_implementations(case_list: list[Case]) -> list[tuple[Case, str]]:
    """Each case beside each of its suite's implementations that applies to it."""
    return [
        (case, impl)
        for case in case_list
        for impl in implementations(case.suite)
        if applies(case, impl)
    ]


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
        state = {k.replace("experts.", ""): v for k, v in state.items()}
    else:
        ours = JetMoEDecoderLayer(_our_config(config), **factory)
        state = {
            k.replace("self_attention.experts.", "self_attention."): v for k, v in state.items()
        }
    ours.load_state_dict(state)
    return ours, x


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


# --------------------------------------------------------------------------------------------
# Measuring


def step_function(module: nn.Module, x: Tensor, backward: bool):
    """The callable that one timing repetition runs."""
    if not backward:

        def forward_only():
            with torch.no_grad():
                return module(x)

        return forward_only
    x = x.detach().requires_grad_()

    def forward_backward():
        for param in module.parameters():
            param.grad = None
        x.grad = None
        out = module(x)
        out.backward(torch.ones_like(out))
        return out

    return forward_backward


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_medians_ms(
    steps: dict, device: str, *, min_repeats: int = 3, max_repeats: int = 50, budget_s: float = 1.5
) -> dict[str, float]:
    """Median milliseconds of each callable in ``steps``, timed in rounds that run every one
    of them once, so a slow spell on a shared machine slows them all alike and their ratios
    hold. At least ``min_repeats`` rounds, then more while within ``budget_s`` per callable."""
    for fn in steps.values():
        fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    started, rounds = time.perf_counter(), 0
    while rounds < min_repeats or (
        rounds < max_repeats and time.perf_counter() - started < budget_s * len(steps)
    ):
        for name, fn in steps.items():
            begin = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - begin) * 1e3)
        rounds += 1
    return {name: statistics.median(values) for name, values in times.items()}


def memory_mb(module: nn.Module, x: Tensor, device: str) -> float:
    """MiB of one forward+backward, measured as :data:`MEMORY_MEASURES` names it per device.

    CUDA, ``peak_allocated``: ``torch.cuda.max_memory_allocated()`` during the step minus
    ``torch.cuda.memory_allocated()`` before it, with no gradients held then: the peak of
    everything the step allocates (activations, what autograd saves, temporaries, the
    gradients) above the input and the weights.

    CPU, ``saved_for_backward``: the bytes of the distinct storages autograd saves for backward
    in the step, the weights' excluded (the input's included where saved). Not a peak: it leaves
    out temporaries and the gradients (the CPU allocator keeps no peak statistics)."""
    step = step_function(module, x, backward=True)
    for param in module.parameters():  # a previous step's gradients are not the step's memory
        param.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    seen: dict[int, int] = {}

    def pack(tensor: Tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(size for ptr, size in seen.items() if ptr not in parameters) / 2**20


@dataclass
class Result:
    """One implementation's timing of a case, or (``error``) why it has none."""

    suite: str
    shape: str
    tokens: int
    dtype: str
    device: str
    impl: str
    backward: bool
    median_ms: float | None
    tflops: float | None
    memory_mb: float | None  # forward+backward only; what it is: memory_measure
    vs_dense: float | None = None
    # times faster than the suite's per-expert loop (LOOP_BASELINES): transformers' JetMoe
    # module, in the hf suite transformers' eager experts, in expert_linear per_expert_loop
    vs_transformers: float | None = None
    vs_grouped_mm: float | None = None  # (hf suite only)
    error: str | None = None

    @property
    def memory_measure(self) -> str:
        """What ``memory_mb`` holds on this device (:func:`memory_mb`)."""
        return MEMORY_MEASURES[self.device]


def run_case(
    case: Case,
    backward: bool,
    impls: tuple[str, ...] | None = None,
    measure_memory: bool = True,
    **timing,
) -> list[Result]:
    """Time every implementation of ``case`` that applies (of ``impls``, by default its
    suite's: :func:`implementations`). On CPU they are built together and timed in alternating
    rounds (shared CPUs drift by 10-20 % within minutes; the ratios are what the tables report).
    On a GPU one at a time: the full-size weights of all of them may not fit together
    (DeepSeek-V3's experts are 22 GB per implementation in bf16).

    An implementation that raises (out of memory, say) gets a result with its ``error`` and no
    timing; the others are still timed (on CPU, then one at a time)."""
    impls = implementations(case.suite) if impls is None else impls
    applicable = [impl for impl in impls if applies(case, impl)]
    pending = [applicable] if case.device == "cpu" else [[impl] for impl in applicable]
    results = []
    while pending:
        group = pending.pop(0)
        try:
            results += _measure(case, backward, group, measure_memory, timing)
        except Exception as error:
            if len(group) > 1:  # time them one at a time to find the one that fails
                pending[:0] = [[impl] for impl in group]
            else:
                message = f"{type(error).__name__}: {error}"[:2000]
                failed = (group[0], backward, None, None, None)
                results.append(Result(*_case_fields(case), *failed, error=message))
    times = {r.impl: r.median_ms for r in results if r.error is None}
    for r in results:
        if r.error is not None:
            continue
        if "dense" in times:
            r.vs_dense = r.median_ms / times["dense"]
        baseline = LOOP_BASELINES.get(case.suite, "transformers")
        if baseline in times:
            r.vs_transformers = times[baseline] / r.median_ms
        if case.suite == HF_SUITE and "grouped_mm" in times:
            r.vs_grouped_mm = times["grouped_mm"] / r.median_ms
    return results


def _case_fields(case: Case) -> tuple:
    return case.suite, case.shape, case.tokens, case.dtype, case.device


def _measure(
    case: Case, backward: bool, impls: list[str], measure_memory: bool, timing: dict
) -> list[Result]:
    """Build ``impls`` together and time them in alternating rounds."""
    built = {impl: build(case, impl) for impl in impls}
    steps = {impl: step_function(module, x, backward) for impl, (module, x) in built.items()}
    elapsed = time_medians_ms(steps, case.device, **timing)
    results = []
    for impl, (module, x) in built.items():
        memory = memory_mb(module, x, case.device) if backward and measure_memory else None
        tflops = case.matmul_flops(backward) / (elapsed[impl] / 1e3) / 1e12
        results.append(Result(*_case_fields(case), impl, backward, elapsed[impl], tflops, memory))
    return results


def run_suite(
    suite: str,
    shapes: list[str],
    tokens: list[int],
    dtypes: list[str],
    device: str,
    *,
    tiny: bool = False,
    passes=(False, True),
    **timing,
) -> list[Result]:
    if suite not in (*SUITES, HF_SUITE):
        raise ValueError(f"suite must be one of {(*SUITES, HF_SUITE)}, got {suite!r}")
    table = hf_shapes(device, tiny) if suite == HF_SUITE else shapes_for(device, tiny)
    results = []
    for case in cases(suite, shapes, tokens, dtypes, device, table):
        for backward in passes:
            results.append(run_case(case, backward, **timing))
    return [r for group in results for r in group]


def cases(
    suite: str, shapes: list[str], tokens: list[int], dtypes: list[str], device: str, table: dict
) -> list[Case]:
    """Every (shape, token count, dtype) case of ``suite``, the shapes looked up in
    ``table`` (an unknown one is a ValueError before anything runs)."""
    for shape in shapes:
        if shape not in table:
            raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(table)}")
    return [
        Case(suite, shape, count, dtype, device, table[shape])
        for shape in shapes
        for count in tokens
        for dtype in dtypes
    ]


def format_table(results: list[Result]) -> str:
    """One row per result; "x dense": time over the dense roofline's; "x faster": times faster
    than the suite's per-expert loop (:data:`LOOP_BASELINES`); "saved MB" (CPU) or "peak MB"
    (CUDA): :func:`memory_mb`; "x grouped" (hf suite): times faster than its grouped_mm."""
    grouped = any(r.vs_grouped_mm is not None for r in results)
    devices = sorted({r.device for r in results}) or ["cpu"]
    memory = "/".join(MEMORY_MEASURES[device].split("_")[0] for device in devices) + " MB"
    header = (
        f"{'suite':<14}{'shape':<16}{'tokens':>7} {'dtype':<5}{'pass':<9}{'impl':<16}"
        f"{'ms':>10}{'TFLOP/s':>9}{'x dense':>9}{'x faster':>10}{memory:>10}"
        + (f"{'x grouped':>11}" if grouped else "")
    )
    lines = [header, "-" * len(header)]
    for r in results:
        passes = "fwd+bwd" if r.backward else "fwd"
        case = f"{r.suite:<14}{r.shape:<16}{r.tokens:>7} {r.dtype:<5}{passes:<9}{r.impl:<16}"
        if r.error is not None:
            lines.append(f"{case}  error: {r.error.splitlines()[0][:120]}")
            continue
        lines.append(
            f"{case}{r.median_ms:>10.2f}{r.tflops:>9.3f}{_opt(r.vs_dense, 9, 2)}"
            f"{_opt(r.vs_transformers, 10, 2)}{_opt(r.memory_mb, 10, 1)}"
            + (_opt(r.vs_grouped_mm, 11, 2) if grouped else "")
        )
    return "\n".join(lines)


def _opt(value: float | None, width: int, digits: int) -> str:
    return " " * width if value is None else f"{value:>{width}.{digits}f}"


def plot(results: list[Result], path) -> None:
    """Throughput against tokens, one line per implementation, a panel per (suite, shape,
    dtype, pass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.suite, r.shape, r.dtype, r.backward) for r in results})
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax, (suite, shape, dtype, backward) in zip(axes.flat, panels, strict=False):
        for impl in dict.fromkeys(r.impl for r in results):
            points = sorted(
                (r.tokens, r.tflops)
                for r in results
                if r.error is None
                and (r.suite, r.shape, r.dtype, r.backward, r.impl)
                == (suite, shape, dtype, backward, impl)
            )
            if points:
                ax.plot(*zip(*points, strict=True), "o-", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{suite} {shape} {dtype} {'fwd+bwd' if backward else 'fwd'}", fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def to_json(results: list[Result]) -> list[dict]:
    """The results as dicts: their fields and ``memory_measure``."""
    return [asdict(r) | {"memory_measure": r.memory_measure} for r in results]


# --------------------------------------------------------------------------------------------
# transformers' experts implementations: ``moe-blocks bench --suite hf``


def hf_shapes(device: str, tiny: bool = False) -> dict[str, tuple[int, int, int, int]]:
    """The hf suite's shapes: every expert shape, and :data:`HF_MODEL` (the fine-grained one
    in a whole model)."""
    table = shapes_for(device, tiny)
    return {**table, HF_MODEL: table["fine-grained"]}


def _batched_mm_bytes(case: Case) -> int:
    """The expert weights ``batched_mm`` gathers in a forward: one copy per assignment and
    projection, ``T·k·3·d·ffn`` elements per layer."""
    d_model, d_ffn, _, top_k = case.dims
    layers = HF_MODEL_LAYERS if case.shape == HF_MODEL else 1
    element = torch.empty((), dtype=case.torch_dtype).element_size()
    return case.tokens * top_k * 3 * d_model * d_ffn * element * layers


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


# --------------------------------------------------------------------------------------------
# Expert parallelism: ``moe-blocks bench --suite ep``

EP_SIZES = (1, 2, 4)


@dataclass
class EPResult:
    """MoEMLP forward+backward on ``tokens`` global tokens split over ``ep`` processes, each
    with ``threads`` torch threads (``ep`` 0: the plain block in one process, no exchange).

    ``median_ms``: median over rounds of the slowest rank's step. ``exchange_share``: the share
    of the step a rank spends launching and waiting for the exchanges (mean over ranks; on
    CUDA with the device synchronised around each). ``forward_bytes``/``backward_bytes``: the
    token rows that go through ``all_to_all_single`` in one step, summed over ranks (the ``E``
    counts and the balance all-reduce left out), beside ``expected_bytes`` =
    ``2·T·k·d_model·bytes``; ``crossing_bytes``: the part of both that leaves its rank."""

    shape: str
    tokens: int
    dtype: str
    device: str
    ep: int
    threads: int
    median_ms: float
    exchange_share: float | None = None
    forward_bytes: int | None = None
    backward_bytes: int | None = None
    expected_bytes: int | None = None
    crossing_bytes: int | None = None


def run_ep(
    shapes: list[str],
    tokens: list[int],
    dtypes: list[str],
    device: str,
    *,
    tiny: bool = False,
    eps: tuple[int, ...] = EP_SIZES,
    max_repeats: int = 20,
    budget_s: float = 2.0,
) -> list[EPResult]:
    """For each shape, token count and dtype: the plain MoEMLP in this process, then
    ``ExpertParallel`` at each size in ``eps`` in as many spawned processes (gloo on CPU, the
    threads of this process shared among them; NCCL on CUDA, one GPU each, sizes above the
    GPU count skipped), the same global tokens split evenly."""
    from .parallel import spawn_local

    if any(count % size for count in tokens for size in eps):
        raise ValueError(f"--tokens must be divisible by every EP size {eps}, got {tokens}")
    threads = torch.get_num_threads()
    sizes = [s for s in eps if device == "cpu" or s <= torch.cuda.device_count()]
    timing = {"max_repeats": max_repeats, "budget_s": budget_s}
    results = []
    for case in cases("mlp", shapes, tokens, dtypes, device, shapes_for(device, tiny)):
        module, x = _ep_block(case, device)
        step = step_function(module, x, backward=True)
        plain = time_medians_ms({"plain": step}, device, **timing)["plain"]
        results.append(EPResult(case.shape, case.tokens, case.dtype, device, 0, threads, plain))
        del module, x, step
        for size in sizes:
            queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
            backend = "nccl" if device == "cuda" else "gloo"
            spawn_local(_ep_worker, size, case, max(1, threads // size), timing, queue,
                        backend=backend)  # fmt: skip
            results.append(EPResult(**queue.get()))
    return results


def _ep_block(case: Case, device: str) -> tuple[MoEMLP, Tensor]:
    """The MoEMLP of ``case`` (JetMoE's initialisation, seeded) and the global input
    ``[1, T, d_model]``: the same on every rank and in the plain run."""
    d_model, d_ffn, experts, top_k = case.dims
    torch.manual_seed(0)
    module = MoEMLP(d_model, d_ffn, experts, top_k, device=device, dtype=case.torch_dtype)
    x = torch.randn(1, case.tokens, d_model, device=device, dtype=case.torch_dtype)
    return module, x


def _ep_worker(rank: int, size: int, case: Case, threads: int, timing: dict, queue) -> None:
    result = measure_ep(case, threads, **timing)
    if rank == 0:
        queue.put(asdict(result))


def measure_ep(case: Case, threads: int, *, max_repeats: int, budget_s: float) -> EPResult:
    """On every rank of the default process group (the EP group): time ``case``'s MoEMLP
    forward+backward under ``ExpertParallel`` with the global tokens split evenly, then meter
    the exchanges (:class:`ExchangeMeter`). Collective; every rank returns the same
    :class:`EPResult`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_blocks import ExpertParallel

    rank, size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(threads)
    device = f"cuda:{rank}" if case.device == "cuda" else "cpu"
    if case.device == "cuda":
        torch.cuda.set_device(device)
    module, x = _ep_block(case, device)
    parallelize_module(module, init_device_mesh(case.device, (size,)), ExpertParallel())
    mine = x.tensor_split(size, dim=1)[rank]
    step = step_function(module, mine, backward=True)
    step()

    def timed() -> float:
        dist.barrier()
        begin = time.perf_counter()
        step()
        _sync(case.device)
        return time.perf_counter() - begin

    first = torch.tensor([timed()])
    dist.all_reduce(first, op=dist.ReduceOp.MAX)  # every rank runs the same number of rounds
    rounds = max(3, min(max_repeats, int(budget_s / first.item())))
    slowest = torch.tensor([timed() for _ in range(rounds)])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    share, sent = _meter_exchanges(step, case, rank)
    totals = torch.tensor([share, *sent], dtype=torch.float64)
    dist.all_reduce(totals)
    d_model, _, _, top_k = case.dims
    element = torch.empty((), dtype=case.torch_dtype).element_size()
    return EPResult(
        case.shape, case.tokens, case.dtype, case.device, size, threads,
        median_ms=slowest.median().item() * 1e3, exchange_share=totals[0].item() / size,
        forward_bytes=int(totals[1]), backward_bytes=int(totals[2]),
        expected_bytes=2 * case.tokens * top_k * d_model * element,
        crossing_bytes=int(totals[3]),
    )  # fmt: skip


class ExchangeMeter(TorchDispatchMode):
    """While active: the seconds spent in the functional collectives (launch and wait, the
    device synchronised around each), and the bytes of the token rows that this rank passes to
    ``all_to_all_single`` in forward and in backward, and of those that leave it for another
    rank (read from the op's input and split sizes; ``rank`` is this rank in the op's group)."""

    def __init__(self, rank: int, device: str) -> None:
        super().__init__()
        self.rank, self.device = rank, device
        self.seconds = 0.0
        self.forward_bytes = self.backward_bytes = self.crossing_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "_c10d_functional":
            return func(*args, **(kwargs or {}))
        _sync(self.device)
        begin = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        _sync(self.device)
        self.seconds += time.perf_counter() - begin
        rows = args[0]
        if func is torch.ops._c10d_functional.all_to_all_single.default and rows.dim() == 2:
            nbytes = rows.numel() * rows.element_size()
            if torch._C._current_autograd_node() is None:
                self.forward_bytes += nbytes
            else:
                self.backward_bytes += nbytes
            sent = sum(n for peer, n in enumerate(args[2]) if peer != self.rank)
            self.crossing_bytes += sent * rows.shape[1] * rows.element_size()
        return out


def _meter_exchanges(step, case: Case, rank: int) -> tuple[float, list[float]]:
    """Run two steps under an :class:`ExchangeMeter`: the share of their time spent in the
    exchanges, and per step the bytes forward, backward and leaving this rank."""
    import torch.distributed as dist

    meter = ExchangeMeter(rank, case.device)
    dist.barrier()
    begin = time.perf_counter()
    with meter:
        step()
        step()
    _sync(case.device)
    elapsed = time.perf_counter() - begin
    sent = [meter.forward_bytes / 2, meter.backward_bytes / 2, meter.crossing_bytes / 2]
    return meter.seconds / elapsed, sent


def format_ep_table(results: list[EPResult]) -> str:
    header = (
        f"{'shape':<14}{'tokens':>7} {'dtype':<6}{'device':<7}{'ep':>3}{'threads':>8}"
        f"{'ms':>10}{'exch %':>8}{'fwd MB':>9}{'bwd MB':>9}{'2TkdB MB':>10}{'cross MB':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        volumes = (r.forward_bytes, r.backward_bytes, r.expected_bytes, r.crossing_bytes)
        megabytes = [None if v is None else v / 2**20 for v in volumes]
        share = None if r.exchange_share is None else 100 * r.exchange_share
        lines.append(
            f"{r.shape:<14}{r.tokens:>7} {r.dtype:<6}{r.device:<7}"
            f"{'-' if r.ep == 0 else r.ep:>3}{r.threads:>8}{r.median_ms:>10.2f}{_opt(share, 8, 1)}"
            + "".join(_opt(v, w, 2) for v, w in zip(megabytes, (9, 9, 10, 10), strict=True))
        )
    return "\n".join(lines)
