"""``expert_linear``: the one sparse-dispatch operation, as torch.library custom ops per backend.

Each backend (``torch``, ``triton``) provides two kernels, ``gather_gemm`` and ``weight_grad``.
Here they become custom ops ``moe_blocks::<backend>_gather_gemm`` and
``moe_blocks::<backend>_weight_grad`` with fake implementations (for ``torch.compile``) and one
autograd formula shared by both backends. The gate-weighted sum over a token's k rows is part of
the op (TOKEN output layout), and its backward needs no saved output: the gates' gradient is
``<dy_row(a) @ weight[e], x_row(a)>``, formed from the input gradient the backward computes
anyway.
"""

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import torch_backend
from .plan import DispatchPlan, RowLayout, accumulation_dtype, token_sum

BACKENDS = ("torch", "triton")
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_DTYPES = _TRITON_DTYPES + (torch.float64,)

_auto_backend: str | None = None


def _register(name: str, impl: ModuleType) -> tuple:
    @torch.library.custom_op(f"moe_blocks::{name}_gather_gemm", mutates_args=())
    def gather_gemm(
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],  # noqa: UP045 (custom_op schema inference needs Optional)
        gates: Optional[Tensor],  # noqa: UP045
        sorted_indices: Tensor,
        sorted_experts: Tensor,
        expert_offsets: Tensor,
        fan_out: int,
        x_layout: int,
        y_layout: int,
    ) -> Tensor:
        return impl.gather_gemm(
            x, weight, bias, gates, sorted_indices, sorted_experts, expert_offsets,
            fan_out, x_layout, y_layout,
        )  # fmt: skip

    @gather_gemm.register_fake
    def _(x, weight, bias, gates, sorted_indices, sorted_experts, expert_offsets, fan_out,
          x_layout, y_layout):  # fmt: skip
        rows = sorted_indices.shape[0]
        if y_layout == RowLayout.TOKEN:
            rows = rows // fan_out
        return x.new_empty(rows, weight.shape[1])

    @torch.library.custom_op(f"moe_blocks::{name}_weight_grad", mutates_args=())
    def weight_grad(
        x: Tensor,
        dy: Tensor,
        gates: Optional[Tensor],  # noqa: UP045
        sorted_indices: Tensor,
        expert_offsets: Tensor,
        num_experts: int,
        fan_out: int,
        x_layout: int,
        y_layout: int,
    ) -> Tensor:
        return impl.weight_grad(
            x, dy, gates, sorted_indices, expert_offsets, num_experts, fan_out, x_layout,
            y_layout,
        )  # fmt: skip

    @weight_grad.register_fake
    def _(x, dy, gates, sorted_indices, expert_offsets, num_experts, fan_out, x_layout, y_layout):
        return x.new_empty(num_experts, dy.shape[1], x.shape[1])

    def setup_context(ctx, inputs, output):
        ctx.fan_out, ctx.x_layout, ctx.y_layout = inputs[7:]
        ctx.save_for_backward(*inputs[:7])

    def backward(ctx, dy):
        x, weight, bias, gates, sorted_indices, sorted_experts, expert_offsets = ctx.saved_tensors
        plan = (sorted_indices, sorted_experts, expert_offsets, ctx.fan_out)
        x_layout, y_layout = ctx.x_layout, ctx.y_layout
        needs = ctx.needs_input_grad
        dy = dy.contiguous()
        dx = dw = dbias = dgates = None
        if gates is None and needs[0]:
            # dx_row(a) = dy_row(a) @ weight[e(a)]; a TOKEN x sums its k rows.
            dx = gather_gemm(dy, weight.mT, None, None, *plan, y_layout, x_layout)
        elif gates is not None and (needs[0] or needs[3]):
            dx, dgates = _gated_input_grads(gather_gemm, x, weight, gates, dy, plan, x_layout,
                                            y_layout, needs[0], needs[3])  # fmt: skip
        if needs[1]:
            # A weight stored transposed (the view .mT of an [E, in, out] tensor) gets its
            # gradient in that layout, so autograd need not copy it there: dWᵀ[e] = Σ xᵀ (g·dy),
            # the same op with the roles of the two row operands swapped.
            swap = weight.mT.is_contiguous() and not weight.is_contiguous()
            rows, cols = (
                ((dy, y_layout), (x, x_layout)) if swap else ((x, x_layout), (dy, y_layout))
            )
            dw = weight_grad(
                rows[0], cols[0], gates, sorted_indices, expert_offsets, weight.shape[0],
                ctx.fan_out, rows[1], cols[1],
            )  # fmt: skip
            dw = dw.mT if swap else dw
        if bias is not None and (needs[2] or needs[3]):
            dbias, bias_dgates = _bias_grads(bias, gates, dy, plan, y_layout)
            if dgates is not None:
                dgates = dgates + bias_dgates.to(dgates.dtype)
        return dx, dw, dbias, dgates, None, None, None, None, None, None

    gather_gemm.register_autograd(backward, setup_context=setup_context)
    ops = (
        getattr(torch.ops.moe_blocks, f"{name}_gather_gemm"),
        getattr(torch.ops.moe_blocks, f"{name}_weight_grad"),
    )

    # torch's FlopCounterMode counts an op it knows a formula for: 2 FLOPs per multiply-add,
    # one row of in × out per assignment (the gates and sums are not counted, as for addmm's
    # bias), so a block's FLOPs (on meta too) include its experts'.
    @register_flop_formula(ops[0])
    def _(x_shape, weight_shape, *args, **kwargs):
        sorted_indices_shape = args[2]
        return 2 * sorted_indices_shape[0] * weight_shape[1] * weight_shape[2]

    @register_flop_formula(ops[1])
    def _(x_shape, dy_shape, gates_shape, sorted_indices_shape, *args, **kwargs):
        return 2 * sorted_indices_shape[0] * x_shape[1] * dy_shape[1]

    return gather_gemm, weight_grad


def _gated_input_grads(
    gather_gemm, x, weight, gates, dy, plan, x_layout, y_layout, need_x, need_gates
):
    """dx and dgates (each None unless needed) of ``y_a = gates[a] · x_row(a) @ weight[e(a)].T``,
    from ``u_a = dy_row(a) @ weight[e(a)]``: ``dx_row(a) = gates[a] · u_a`` and ``dgates[a] =
    <u_a, x_row(a)>`` (the caller adds the bias term), so no forward output is saved."""
    sorted_indices, fan_out = plan[0], plan[3]
    u_layout = RowLayout.ASSIGNMENT if x_layout == RowLayout.TOKEN else x_layout
    u = gather_gemm(dy, weight.mT, None, None, *plan, y_layout, u_layout)
    per_row = fan_out if x_layout == RowLayout.TOKEN else 1  # rows of u per row of x
    u_by_x_row = u.view(x.shape[0], per_row, u.shape[1])
    dx = dgates = None
    if need_gates:
        dots = torch.linalg.vecdot(u_by_x_row, x[:, None, :]).view(-1)
        dgates = _to_assignment_order(dots, u_layout, sorted_indices).to(gates.dtype)
    if need_x and x_layout == RowLayout.TOKEN:
        dx = token_sum(u, per_row, gates).to(u.dtype)
    elif need_x:
        gates_of_u = gates[sorted_indices] if u_layout == RowLayout.GROUPED else gates
        scale = gates_of_u[:, None].to(u.dtype)  # same dtypes: the fast elementwise kernels
        # In place unless a double backward recorded u (vecdot saved it for its own backward).
        dx = u * scale if torch.is_grad_enabled() else u.mul_(scale)
    return dx, dgates


def _bias_grads(bias, gates, dy, plan, y_layout) -> tuple[Tensor, Tensor | None]:
    """dbias[e] = Σ_a g_a · dy_row(a) over the assignments of e, and (with gates) the bias part
    of dgates[a] = <dy_row(a), bias[e(a)]>."""
    sorted_indices, sorted_experts, _, fan_out = plan
    wide = accumulation_dtype(dy.dtype)
    dy_grouped = torch_backend.to_grouped(dy, y_layout, sorted_indices, fan_out).to(wide)
    bias_dgates = None
    if gates is not None:
        bias_rows = bias.index_select(0, sorted_experts).to(wide)
        bias_dots = (dy_grouped * bias_rows).sum(1)
        bias_dgates = _to_assignment_order(bias_dots, RowLayout.GROUPED, sorted_indices)
        dy_grouped = dy_grouped * gates[sorted_indices, None].to(wide)
    dbias = dy_grouped.new_zeros(bias.shape).index_add_(0, sorted_experts, dy_grouped)
    return dbias.to(bias.dtype), bias_dgates


def _to_assignment_order(values: Tensor, layout: int, sorted_indices: Tensor) -> Tensor:
    """Per-assignment values given in ``layout`` order (GROUPED or ASSIGNMENT)."""
    if layout != RowLayout.GROUPED:
        return values
    return torch_backend.to_assignment_order(values, sorted_indices)


def _triton_impl() -> ModuleType:
    from . import triton_backend

    return triton_backend


_IMPLS = {"torch": torch_backend} | ({"triton": _triton_impl()} if TRITON_AVAILABLE else {})
_OPS = {name: _register(name, impl) for name, impl in _IMPLS.items()}


@torch.library.custom_op("moe_blocks::gather_scores", mutates_args=())
def _gather_scores(scores: Tensor, expert_idx: Tensor) -> Tensor:
    return scores.gather(1, expert_idx)


@_gather_scores.register_fake
def _(scores, expert_idx):
    return scores.new_empty(expert_idx.shape)


@torch.library.custom_op("moe_blocks::scatter_scores", mutates_args=())
def _scatter_scores(grad: Tensor, expert_idx: Tensor, num_experts: int) -> Tensor:
    return grad.new_zeros(grad.shape[0], num_experts).scatter_add_(1, expert_idx, grad)


@_scatter_scores.register_fake
def _(grad, expert_idx, num_experts):
    return grad.new_empty(grad.shape[0], num_experts)


def _gather_scores_setup(ctx, inputs, output):
    scores, expert_idx = inputs
    ctx.num_experts = scores.shape[1]
    ctx.save_for_backward(expert_idx)


def _gather_scores_backward(ctx, grad):
    (expert_idx,) = ctx.saved_tensors
    return _scatter_scores(grad.contiguous(), expert_idx, ctx.num_experts), None


_gather_scores.register_autograd(_gather_scores_backward, setup_context=_gather_scores_setup)


def gather_scores(scores: Tensor, expert_idx: Tensor) -> Tensor:
    """``scores.gather(1, expert_idx)``: each token's scores of its chosen experts
    (``[T, E]``, ``[T, k]`` int64 -> ``[T, k]``), differentiable in ``scores``.

    An opaque custom op on purpose: torch 2.13's Inductor (CPU) fused the gather's backward
    scatter into the kernel that adds it to the router's other logit gradients (the aux losses)
    and read the buffer before the scatter wrote it: the router got no gate gradient under
    ``torch.compile``. Behind the op the scatter is one call Inductor cannot fuse."""
    _check_tensor("scores", scores)
    _check_tensor("expert_idx", expert_idx)
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 2-D float tensor [T, E], got {scores.dtype} "
                         f"{tuple(scores.shape)}")  # fmt: skip
    if expert_idx.dtype != torch.int64 or expert_idx.dim() != 2:
        raise ValueError(f"expert_idx must be a 2-D int64 tensor [T, k], got {expert_idx.dtype} "
                         f"{tuple(expert_idx.shape)}")  # fmt: skip
    if expert_idx.shape[0] != scores.shape[0]:
        raise ValueError(f"expert_idx has {expert_idx.shape[0]} rows but scores has "
                         f"{scores.shape[0]}")  # fmt: skip
    if no_autograd(scores):
        return scores.gather(1, expert_idx)
    return _gather_scores(scores, expert_idx)  # out-of-range indices: gather's own error


def check_backend_name(name: str) -> None:
    """Raise ValueError unless ``name`` is "auto" or one of :data:`BACKENDS`."""
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, ``backend="auto"`` means ``name`` ("torch", "triton" or "auto")."""
    global _auto_backend
    check_backend_name(name)
    previous = _auto_backend
    _auto_backend = None if name == "auto" else name
    try:
        yield
    finally:
        _auto_backend = previous


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that ``backend`` means for tensors on ``device``."""
    check_backend_name(backend)
    if backend == "auto":
        backend = _auto_backend or (
            "triton" if device.type == "cuda" and TRITON_AVAILABLE else "torch"
        )
    if backend == "triton":
        if not TRITON_AVAILABLE:
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if device.type != "cuda" and not _triton_impl().INTERPRET:
            raise ValueError(
                f"backend='triton' runs on CUDA tensors; got tensors on {device}. For CPU tensors "
                "set TRITON_INTERPRET=1 before importing moe_blocks, or use backend='torch'"
            )
    return backend


def _check_tensor(name: str, value, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_inputs(x, weight, plan, bias, gates, grouped_in, grouped_out, backend) -> None:
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    _check_tensor("bias", bias, optional=True)
    _check_tensor("gates", gates, optional=True)
    if not isinstance(plan, DispatchPlan):
        raise TypeError(
            f"plan must be a DispatchPlan from plan_dispatch, got {type(plan).__name__}"
        )
    for flag_name, flag in (("grouped_in", grouped_in), ("grouped_out", grouped_out)):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name} must be a bool, got {type(flag).__name__}")
    dtypes = _TRITON_DTYPES if backend == "triton" else _TORCH_DTYPES
    if x.dtype not in dtypes:
        raise TypeError(f"x must have dtype in {dtypes} for backend={backend!r}, got {x.dtype}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != x.dtype:
            raise TypeError(f"{name} dtype {tensor.dtype} differs from x dtype {x.dtype}")
    if gates is not None and not gates.dtype.is_floating_point:
        raise TypeError(f"gates must be a floating-point tensor, got {gates.dtype}")
    for name, tensor in (("weight", weight), ("bias", bias), ("gates", gates)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    if plan.device != x.device:
        raise ValueError(f"plan was built on {plan.device} but x is on {x.device}")

    num_tokens, top_k, num_experts = plan.num_tokens, plan.top_k, plan.num_experts
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, in], got shape {tuple(x.shape)}")
    if weight.dim() != 3:
        raise ValueError(f"weight must be 3-D [E, out, in], got shape {tuple(weight.shape)}")
    if weight.shape[0] != num_experts:
        raise ValueError(
            f"weight has {weight.shape[0]} experts but the plan has num_experts={num_experts}"
        )
    if weight.shape[2] != x.shape[1]:
        raise ValueError(
            f"weight in-features {weight.shape[2]} differ from x features {x.shape[1]}"
        )
    rows = x.shape[0]  # compared one by one: a set would make symbolic sizes concrete
    if rows != num_tokens * top_k and (grouped_in or rows != num_tokens):
        layout = "T*k (grouped_in=True)" if grouped_in else "T or T*k"
        raise ValueError(
            f"x has {x.shape[0]} rows; the plan (T={num_tokens}, k={top_k}) needs {layout} rows"
        )
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]):
        raise ValueError(
            f"bias must have shape [E, out] = {tuple(weight.shape[:2])}, got {tuple(bias.shape)}"
        )
    if gates is not None:
        if grouped_out:
            raise ValueError("gates cannot be combined with grouped_out=True")
        if tuple(gates.shape) != (num_tokens, top_k):
            raise ValueError(
                f"gates must have shape [T, k] = {(num_tokens, top_k)}, got {tuple(gates.shape)}"
            )


def no_autograd(*tensors: Tensor | None) -> bool:
    """Whether a call needs neither autograd nor the op's registration: no gradient will flow
    (grad mode off, or no input requires one), eager (not traced by ``torch.compile``) and on
    real storage (not ``meta``). Then the ops' implementations are called directly (the custom
    op's dispatch cost 50-200 us per call on CPU, a tenth of a decode step's MoE layer), and
    the router's fp32 gate skips its autograd Function. Not while a dispatch mode watches
    the ops (``FlopCounterMode``): it sees and counts the ops, not a ``_grouped_mm`` inside."""
    if torch.compiler.is_compiling() or tensors[0].device.type == "meta":
        return False
    if torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled()
    return not grad or not any(t is not None and t.requires_grad for t in tensors)


AUTOCAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what autocast casts


def _autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)``, or nothing for a device type without
    autocast (``meta``: shape inference and FLOP counting run there)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocasting(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (False where it does not exist,
    as on the meta device)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def routed_mlp(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    plan: DispatchPlan,
    gates: Tensor,
    activate: Callable[[Tensor], Tensor],
    backend: str = "auto",
) -> Tensor | None:
    """Every token's routed MLP ``Σ_j gates[t, j] · w_out[e_j] @ activate(w_in[e_j] @ x[t])``
    (``x [T, in]``, weights ``[E, out, in]``, ``plan`` of that routing, ``gates [T, k]``) in
    one pass over the experts (:func:`torch_backend.routed_mlp`: each expert's products and
    activation together), where that path applies: inference (no autograd, no autocast) on
    the torch backend on CPU. The two :func:`expert_linear` calls' result but for the last bit
    of the activation; for one token (:func:`torch_backend.one_token_mlp`, a decode step with a
    batch of one) their bits. None elsewhere (the caller makes the two calls)."""
    if (
        x.shape[0] != plan.num_tokens
        or x.device.type != "cpu"
        or resolve_backend(backend, x.device) != "torch"
        or autocasting(x.device.type)
        or not no_autograd(x, w_in, w_out, gates)
    ):
        return None
    if plan.num_tokens == 1:  # a decode step of one token: the calls' one-token paths
        slots, experts = plan.one_token_order()
        return torch_backend.one_token_mlp(x, w_in, w_out, activate, gates, slots, experts)
    return torch_backend.routed_mlp(
        x, w_in, w_out, activate, gates, plan.sorted_indices, plan.expert_offsets,
        plan.expert_idx.shape[1],
    )  # fmt: skip


def expert_linear(
    x: Tensor,
    weight: Tensor,
    plan: DispatchPlan,
    *,
    bias: Tensor | None = None,
    gates: Tensor | None = None,
    grouped_in: bool = False,
    grouped_out: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Apply each assignment's expert: ``y[a] = x_row(a) @ weight[e(a)].T + bias[e(a)]``.

    Args:
        x: ``[T, in]`` (row ``a // k`` feeds assignment ``a``), ``[T*k, in]`` (row ``a``), or,
            with ``grouped_in``, ``[T*k, in]`` whose row ``i`` feeds ``plan.sorted_indices[i]``.
            float16, bfloat16 or float32 (float64 too on the torch backend).
        weight: ``[E, out, in]``, x's dtype. bias: ``[E, out]`` or None.
        plan: from :func:`plan_dispatch` for the same routing.
        gates: ``[T, k]`` or None. With gates the result is ``out[t] = Σ_j gates[t, j] y[t*k+j]``
            of shape ``[T, out]``; not allowed with ``grouped_out``.
        grouped_out: without gates, return rows in grouped order instead of assignment order.
        backend: "triton", "torch" or "auto" (triton for CUDA tensors, torch otherwise; see
            :func:`use_backend`).

    Returns:
        ``[T*k, out]`` (assignment or grouped order) or ``[T, out]`` with gates; x's dtype, or
        the autocast dtype inside ``torch.autocast``. Differentiable in x, weight, bias, gates.
    """
    name = resolve_backend(backend, x.device) if isinstance(x, Tensor) else backend
    autocast = isinstance(x, Tensor) and autocasting(x.device.type)
    if autocast:
        # Like a matmul under autocast: floating inputs but float64 run in the autocast dtype.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (
            t.to(dtype) if isinstance(t, Tensor) and t.dtype in AUTOCAST_DTYPES else t
            for t in (x, weight, bias)
        )
    _check_inputs(x, weight, plan, bias, gates, grouped_in, grouped_out, name)
    device_type = x.device.type

    if grouped_in:
        x_layout = RowLayout.GROUPED
    elif x.shape[0] == plan.num_assignments:
        x_layout = RowLayout.ASSIGNMENT
    else:
        x_layout = RowLayout.TOKEN
    if gates is not None:
        y_layout = RowLayout.TOKEN
    else:
        y_layout = RowLayout.GROUPED if grouped_out else RowLayout.ASSIGNMENT
    gather_gemm = _OPS[name][0]
    direct = no_autograd(x, weight, bias, gates)
    if direct:  # the same function, without the op's dispatch
        gather_gemm = _IMPLS[name].gather_gemm
    flat_gates = None if gates is None else gates.contiguous().view(-1)
    with _autocast_off(device_type) if autocast else contextlib.nullcontext():
        if direct and name == "torch" and device_type == "cpu" and plan.num_tokens == 1:
            # a decode step of one token: the torch backend's one-token path, its order read
            # on the host, so the plan's grouping is never computed (MoA's two calls a step)
            slots, experts = plan.one_token_order()
            return torch_backend.one_token_gather_gemm(
                x, weight, bias, flat_gates, slots, experts, x_layout, y_layout
            )
        return gather_gemm(
            x, weight, bias, flat_gates, plan.sorted_indices, plan.sorted_experts,
            plan.expert_offsets, plan.top_k, int(x_layout), int(y_layout),
        )  # fmt: skip
