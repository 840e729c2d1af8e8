"""JetMoE's parallelisation plan on torch.distributed, beside the model as torchtitan keeps
each model's ``parallelize``.

The plan follows torchtitan's for MoE models. On a 2-D mesh ``("dp", "ep")`` of ``dp × ep``
ranks, every rank is data-parallel (its own batch), and:

- each layer's MoE MLP gets :class:`moe_blocks.parallel.ExpertParallel` over ``"ep"``: rank
  ``(d, e)`` holds experts ``[e·E/ep, (e+1)·E/ep)`` and exchanges tokens with the other ranks of
  its EP group;
- FSDP2 (``fully_shard``) shards those experts further over ``"dp"`` (what remains), and every
  other parameter (embedding, norms, MoA, routers, biases) over all ``dp × ep`` ranks, per
  decoder layer and for the whole model;
- gradients are averaged over all ranks: expert gradients, which already hold the sum over
  the EP group's tokens, are divided by ``dp × ep`` rather than by ``dp``.

MoA layers stay data-parallel (sharded by FSDP, not expert-parallel): their expert weights are
small. A 1-D mesh means pure FSDP over all its ranks.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

from moe_blocks.parallel import parallelize as parallelize_model

from .model import JetMoEForCausalLM


def parallelize(
    model: JetMoEForCausalLM, mesh: DeviceMesh, *, balance: str = "global"
) -> JetMoEForCausalLM:
    """Shard ``model`` in place over ``mesh`` and return it: :func:`moe_blocks.parallel.parallelize`
    with each decoder layer a unit of its own (see the module docstring).

    Args:
        model: a :class:`JetMoEForCausalLM` with the same weights on every rank (on CPU or the
            mesh's device; FSDP moves its shards to the mesh's device).
        mesh: a 1-D mesh (pure FSDP over its ranks) or a 2-D mesh named ``("dp", "ep")``;
            ``num_local_experts`` must be divisible by its ``ep`` size.
        balance: ``"global"`` (default): every router's balance statistics (MoA and MoE) count
            the tokens of all ranks, so losses and gradients are those of one process on the
            global batch; ``"local"``: each rank's own micro-batch.

    Parameters become DTensors; the state-dict keys stay those of the unsharded model. Each
    rank then runs the model on its own batch, and the gradients after ``backward`` are those
    of the mean of all ranks' losses (equal batch sizes assumed, as for the loss).
    """
    if not isinstance(model, JetMoEForCausalLM):
        raise TypeError(f"model must be a JetMoEForCausalLM, got {type(model).__name__}")
    return parallelize_model(model, mesh, layers=model.model.layers, balance=balance)
