"""What the benchmarks time: the suites, their implementations, the shapes (named after
models) and the cases (suite, shape, tokens, dtype, device) with their FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_blocks.kernels.torch_backend import grouped_mm_runs

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
IMPLEMENTATIONS = ("moe_blocks", "transformers", "grouped_mm", "expert_products", "dense")
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
EP_SIZES = (1, 2, 4)  # the ep suite's expert-parallel sizes


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

    def expert_bytes(self) -> int | None:
        """Bytes of one expert's routed weights: its linear (``expert_linear`` suite) or its
        GLU MLP, ``3·d·ffn`` (``mlp``, ``hf``); None for the suites with attention."""
        d_model, d_ffn, _, _ = self.dims
        element = torch.empty((), dtype=self.torch_dtype).element_size()
        if self.suite == KERNEL_SUITE:
            return d_model * d_ffn * element
        return 3 * d_model * d_ffn * element if self.suite in ("mlp", HF_SUITE) else None

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


def implementations(suite: str) -> tuple[str, ...]:
    """The implementations a suite times (each where :func:`applies`)."""
    if suite == HF_SUITE:
        return HF_IMPLEMENTATIONS
    return KERNEL_IMPLEMENTATIONS if suite == KERNEL_SUITE else IMPLEMENTATIONS


def applies(case: Case, impl: str) -> bool:
    """Whether ``impl`` exists for ``case``: one of its suite's implementations; the grouped_mm
    pipeline is the kernel's or an MLP and needs a dtype/device ``_grouped_mm`` runs; the
    expert products' floor is an MLP's on CPU (where the torch backend multiplies expert by
    expert; on CUDA one kernel or one ``_grouped_mm`` does all experts); the hf suite's
    ``batched_mm`` is skipped where it would gather too many weight copies."""
    if impl not in implementations(case.suite):
        return False
    if case.suite == HF_SUITE:
        return impl != "batched_mm" or _batched_mm_bytes(case) <= BATCHED_MM_BYTES
    if impl == "grouped_mm":
        return case.suite in (KERNEL_SUITE, "mlp") and grouped_mm_runs(
            case.device, case.torch_dtype
        )
    if impl == "expert_products":
        return case.suite == "mlp" and case.device == "cpu"
    return True


def case_implementations(case_list: list[Case]) -> list[tuple[Case, str]]:
    """Each case beside each of its suite's implementations that applies to it."""
    return [
        (case, impl)
        for case in case_list
        for impl in implementations(case.suite)
        if applies(case, impl)
    ]


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
