"""ParallelExperts: the weights of E linear experts, applied through ``expert_linear``."""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor, nn

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
        return expert_linear(x, local_tensor(self.weight), plan, backend=self.backend, **kwargs)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in={self.in_features}, out={self.out_features}"


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor``, sharing its storage: the local shard of a DTensor (for
    expert weights sharded by expert parallelism, this rank's experts, which the plan numbers
    locally), else ``tensor`` itself. A DTensor exists only once ``torch.distributed.tensor``
    is imported; importing it here would add ~0.7 s to ``import moe_blocks``."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return tensor.to_local() if dtensor and isinstance(tensor, dtensor.DTensor) else tensor
