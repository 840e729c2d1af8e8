"""``expert_linear``: the one sparse-dispatch operation, as torch.library custom ops per backend.

Each backend (``torch``, ``triton``) provides two kernels, ``gather_gemm`` and ``weight_grad``.
Here they become custom ops ``moe_blocks::<backend>_gather_gemm`` and
``moe_blocks::<backend>_weight_grad`` with fake implementations (for ``torch.compile``) and one
autograd formula shared by both backends. The gate-weighted sum over the k slots is a plain
``bmm`` around the op, so autograd handles the gates.
"""

import contextlib
import importlib.util
from collections.abc import Iterator
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from . import torch_backend
from .plan import DispatchPlan, RowLayout

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
        sorted_indices: Tensor,
        sorted_experts: Tensor,
        expert_offsets: Tensor,
        fan_out: int,
        x_layout: int,
        y_layout: int,
    ) -> Tensor:
        return impl.gather_gemm(
            x, weight, bias, sorted_indices, sorted_experts, expert_offsets,
            fan_out, x_layout, y_layout,
        )  # fmt: skip

    @gather_gemm.register_fake
    def _(x, weight, bias, sorted_indices, sorted_experts, expert_offsets, fan_out, x_layout,
          y_layout):  # fmt: skip
        return x.new_empty(sorted_indices.shape[0], weight.shape[1])

    @torch.library.custom_op(f"moe_blocks::{name}_weight_grad", mutates_args=())
    def weight_grad(
        x: Tensor,
        dy: Tensor,
        sorted_indices: Tensor,
        expert_offsets: Tensor,
        num_experts: int,
        fan_out: int,
        x_layout: int,
        y_layout: int,
    ) -> Tensor:
        return impl.weight_grad(
            x, dy, sorted_indices, expert_offsets, num_experts, fan_out, x_layout, y_layout
        )

    @weight_grad.register_fake
    def _(x, dy, sorted_indices, expert_offsets, num_experts, fan_out, x_layout, y_layout):
        return x.new_empty(num_experts, dy.shape[1], x.shape[1])

    def setup_context(ctx, inputs, output):
        x, weight, bias, sorted_indices, sorted_experts, expert_offsets = inputs[:6]
        ctx.fan_out, ctx.x_layout, ctx.y_layout = inputs[6:]
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, sorted_indices, sorted_experts, expert_offsets)

    def backward(ctx, dy):
        x, weight, sorted_indices, sorted_experts, expert_offsets = ctx.saved_tensors
        fan_out, x_layout, y_layout = ctx.fan_out, ctx.x_layout, ctx.y_layout
        dy = dy.contiguous()
        if impl.COPIES_ROWS_TO_GROUPED and y_layout != RowLayout.GROUPED:
            dy = torch_backend.to_grouped(dy, y_layout, sorted_indices, fan_out)
            y_layout = RowLayout.GROUPED
        dx = dw = dbias = None
        if ctx.needs_input_grad[0]:
            # dx_row(i) = dy_row(i) @ weight[e(i)]; a token read k times sums its k rows.
            fanned = x_layout == RowLayout.TOKEN
            dx = gather_gemm(
                dy, weight.transpose(1, 2), None, sorted_indices, sorted_experts, expert_offsets,
                fan_out, y_layout, RowLayout.ASSIGNMENT if fanned else x_layout,
            )  # fmt: skip
            if fanned:
                dx = dx.view(x.shape[0], fan_out, x.shape[1]).sum(1)
        if ctx.needs_input_grad[1]:
            dw = weight_grad(
                x, dy, sorted_indices, expert_offsets, weight.shape[0], fan_out,
                x_layout, y_layout,
            )  # fmt: skip
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dy_grouped = torch_backend.to_grouped(dy, y_layout, sorted_indices, fan_out)
            dbias = (
                dy.new_zeros(weight.shape[:2], dtype=torch.float32)
                .index_add_(0, sorted_experts, dy_grouped.float())
                .to(weight.dtype)
            )
        return dx, dw, dbias, None, None, None, None, None, None

    gather_gemm.register_autograd(backward, setup_context=setup_context)
    return gather_gemm, weight_grad


def _triton_impl() -> ModuleType:
    from . import triton_backend

    return triton_backend


_OPS = {"torch": _register("torch", torch_backend)}
if TRITON_AVAILABLE:
    _OPS["triton"] = _register("triton", _triton_impl())


def _check_backend_name(name: str) -> None:
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, ``backend="auto"`` means ``name`` ("torch", "triton" or "auto")."""
    global _auto_backend
    _check_backend_name(name)
    previous = _auto_backend
    _auto_backend = None if name == "auto" else name
    try:
        yield
    finally:
        _auto_backend = previous


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that ``backend`` means for tensors on ``device``."""
    _check_backend_name(backend)
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
    allowed_rows = {num_tokens * top_k} if grouped_in else {num_tokens, num_tokens * top_k}
    if x.shape[0] not in allowed_rows:
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
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        # Like a matmul under autocast: floating inputs run in the autocast dtype.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (
            t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
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
    y_layout = RowLayout.GROUPED if grouped_out else RowLayout.ASSIGNMENT
    gather_gemm = _OPS[name][0]
    with torch.autocast(device_type, enabled=False):
        y = gather_gemm(
            x, weight, bias, plan.sorted_indices, plan.sorted_experts, plan.expert_offsets,
            plan.top_k, int(x_layout), int(y_layout),
        )  # fmt: skip
    if gates is None:
        return y
    slots = y.view(plan.num_tokens, plan.top_k, y.shape[1])
    return torch.bmm(gates.to(y.dtype).unsqueeze(1), slots).squeeze(1)
