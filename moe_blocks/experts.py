"""ParallelExperts: the weights of E linear experts, applied through ``expert_linear``."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .kernels import DispatchPlan, expert_linear
from .kernels.checks import check_positive_int
from .kernels.ops import check_backend_name


class ParallelExperts(nn.Module):
    """E bias-free linear maps ``in_features -> out_features`` in one parameter
    ``weight[E, out_features, in_features]`` (the ``nn.Linear`` and Hugging Face JetMoe layout).

    ``forward(x, plan, **kwargs)`` is ``expert_linear(x, self.weight, plan, **kwargs)``: see
    :func:`moe_blocks.kernels.expert_linear` for the row layouts and ``gates``.

    ``init_method``: how :meth:`reset_parameters` initialises the weight: None (default) as
    ``nn.Linear`` would each expert; a float ``std`` for ``N(0, std²)``; or a callable that
    fills the ``[E, out, in]`` tensor in place (``functools.partial(nn.init.normal_,
    std=0.02)``, megablocks' ``init_method``). A host model's own init reaches the experts
    too: ``isinstance(module, (nn.Linear, ParallelExperts))`` and ``module.weight``.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        *,
        backend: str = "auto",
        init_method: InitMethod | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_experts", num_experts)
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"{name} must be an int >= 0, got {size!r}")
        check_backend_name(backend)
        check_init_method(init_method)
        self.init_method = init_method
        self.num_experts, self.in_features, self.out_features = (
            num_experts,
            in_features,
            out_features,
        )
        self.backend = backend
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_features, in_features, device=device, dtype=dtype)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The weight by ``init_method``; by default each expert as ``nn.Linear`` initialises
        its weight: U(-1/sqrt(in), 1/sqrt(in))."""
        if callable(self.init_method):
            self.init_method(self.weight)
        elif self.init_method is not None:
            nn.init.normal_(self.weight, 0.0, self.init_method)
        else:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
            nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor, plan: DispatchPlan, **kwargs) -> Tensor:
        return expert_linear(x, local_tensor(self.weight), plan, backend=self.backend, **kwargs)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in={self.in_features}, out={self.out_features}"


InitMethod = float | Callable[[Tensor], object]


def check_init_method(init_method: object, name: str = "init_method") -> None:
    """None, a callable, or a float std >= 0 (TypeError/ValueError naming ``name``)."""
    if init_method is None or callable(init_method):
        return
    if isinstance(init_method, bool) or not isinstance(init_method, int | float):
        raise TypeError(
            f"{name} must be a std (float), a callable filling the weight, or None; got "
            f"{type(init_method).__name__}"
        )
    if not (math.isfinite(init_method) and init_method >= 0):
        raise ValueError(f"{name} as a std must be finite and >= 0, got {init_method}")


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor``, sharing its storage: the local shard of a DTensor (for
    expert weights sharded by expert parallelism, this rank's experts, which the plan numbers
    locally), else ``tensor`` itself. A DTensor exists only once ``torch.distributed.tensor``
    is imported; importing it here would add ~0.7 s to ``import moe_blocks``."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return tensor.to_local() if dtensor and isinstance(tensor, dtensor.DTensor) else tensor
