"""Router losses, and the mechanism that lets a block's auxiliary loss reach the gradient
without the caller's help.

All losses take fp32 router ``logits[N, E]`` (and ``expert_idx[N, k]`` where counts matter) and
return a scalar tensor differentiable in the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

BALANCE_LOSSES = ("switch", "mutual_information", "none")


def _zero_loss(logits: Tensor) -> Tensor:
    """0.0 for an empty batch, still attached to ``logits``' graph."""
    return logits.float().sum() * 0.0


def load_balancing_loss(logits: Tensor, expert_idx: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer / GShard balance loss ``E · Σ_e f_e · P_e``.

    ``f_e`` is the fraction of the N·k assignments routed to expert e (not differentiable),
    ``P_e`` the mean softmax probability of e over the N tokens. It is exactly 1.0 when both are
    uniform and grows as routing concentrates. An empty batch gives 0.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    probs = torch.softmax(logits.float(), dim=-1)
    counts = torch.zeros(num_experts, device=logits.device, dtype=torch.float32)
    counts.scatter_add_(
        0, expert_idx.reshape(-1), torch.ones_like(expert_idx.reshape(-1), dtype=torch.float32)
    )
    fraction = counts / expert_idx.numel()
    return num_experts * (fraction * probs.mean(0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_n(logsumexp(logits_n)²)``: keeps router logits small."""
    if logits.shape[0] == 0:
        return _zero_loss(logits)
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def mutual_information_loss(logits: Tensor) -> Tensor:
    """ModuleFormer's loss: the negative mutual information between tokens and experts,
    ``-(H(mean_n p_n) - mean_n H(p_n))`` with ``p_n = softmax(logits_n)``.

    Minimising it makes each token's choice confident (low conditional entropy) while the
    experts stay used evenly over the batch (high marginal entropy). It lies in
    ``[-log E, 0]``; ``-log E`` is reached by confident, perfectly balanced routing.
    """
    if logits.shape[0] == 0:
        return _zero_loss(logits)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    conditional_entropy = -(probs * log_probs).sum(-1).mean()
    marginal = probs.mean(0)
    marginal_entropy = -(
        marginal * torch.log(marginal.clamp_min(torch.finfo(marginal.dtype).tiny))
    ).sum()
    return conditional_entropy - marginal_entropy


class _AddAuxLossGradient(torch.autograd.Function):
    """Identity on ``output``; in backward, also sends gradient 1 into ``aux_loss``."""

    @staticmethod
    def forward(ctx, output: Tensor, aux_loss: Tensor) -> Tensor:
        ctx.aux_shape = aux_loss.shape
        ctx.aux_dtype = aux_loss.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        aux_grad = torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_output.device)
        return grad_output, aux_grad


def attach_aux_loss(output: Tensor, aux_loss: Tensor) -> Tensor:
    """Return ``output`` unchanged, such that backpropagating through it also backpropagates
    ``aux_loss`` (as if it were added to the caller's loss), the way Megatron-LM attaches MoE
    losses. Nothing is attached when gradients are off or ``aux_loss`` needs none.

    The aux loss enters with weight 1 per backward pass, whatever the caller does to its own
    loss: with a loss scaler (fp16 ``GradScaler``) or gradient accumulation over n
    micro-batches, scale the blocks' ``aux_loss_coef`` to match (×S, or ÷n)."""
    if not (torch.is_grad_enabled() and aux_loss.requires_grad):
        return output
    return _AddAuxLossGradient.apply(output, aux_loss)
