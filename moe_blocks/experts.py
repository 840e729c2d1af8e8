"""ParallelExperts: the weights of E linear experts, applied through ``expert_linear``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .kernels import DispatchPlan, expert_linear
from .kernels.ops import check_backend_name


class ParallelExperts(nn.Module):
    """E bias-free linear maps ``in_features -> out_features`` in one parameter
    ``weight[E, out_features, in_features]`` (the ``nn.Linear`` and Hugging Face JetMoe layout).

    ``forward(x, plan, **kwargs)`` is ``expert_linear(x, self.weight, plan, **kwargs)``: see
    :func:`moe_blocks.kernels.expert_linear` for the row layouts and ``gates``.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        *,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_backend_name(backend)
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

    def reset_parameters(self) -> None:
        """Each expert initialised as ``nn.Linear`` would be: U(-1/sqrt(in), 1/sqrt(in))."""
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor, plan: DispatchPlan, **kwargs) -> Tensor:
        # Under expert parallelism the weight is a DTensor sharded over experts: this rank runs
        # its own experts, numbered locally by the plan.
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        return expert_linear(x, weight, plan, backend=self.backend, **kwargs)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in={self.in_features}, out={self.out_features}"
