"""Sharded gradients equal one process's on every mesh shape (moe_blocks.parallel.parallelize,
and the JetMoE plan built on it), on gloo in spawned CPU processes: 1-D FSDP over 2 and 4 ranks,
dp 1 x ep 2, dp 1 x ep 4 and dp 2 x ep 2, with the balance loss on and off, for JetMoE and for a
plain transformer of the user's own with MoEMLP blocks. Each rank backpropagates its own share
of a global batch; every parameter's gathered gradient, and clip_grad_norm_'s total norm, must
be those of one process on the whole batch (relative error <= 1e-5 in fp32, measured as a
norm over each tensor). Experts frozen before or after parallelising stay bit-identical
through AdamW steps with weight decay. One spawn per world size: start-up dominates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_blocks import MoEMLP, freeze_experts
from moe_blocks.models.parallel import spawn_local
from moe_blocks.models.train import TrainSettings, make_optimizer

RELATIVE = 1e-5
MESHES = {2: [(2,), (1, 2)], 4: [(4,), (1, 4), (2, 2)]}
JETMOE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=64, kv_channels=16)
BATCH, SEQ, VOCAB = 8, 16, 64


class Block(nn.Module):
    """Pre-norm causal self-attention, then an MoEMLP."""

    def __init__(self, d_model: int, num_experts: int, aux_loss_coef: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = MoEMLP(d_model, 2 * d_model, num_experts, 2, aux_loss_coef=aux_loss_coef)

    def forward(self, x):
        batch, length, d_model = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, 4, -1).unbind(2)
        heads = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                               is_causal=True)  # fmt: skip
        x = x + self.proj(heads.transpose(1, 2).reshape(batch, length, d_model))
        return x + self.mlp(self.norm2(x))


class TinyMoETransformer(nn.Module):
    """A user's own model: not JetMoE, MoEMLP blocks inside its layers."""

    def __init__(self, aux_loss_coef: float, d_model: int = 32, num_experts: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.layers = nn.ModuleList(Block(d_model, num_experts, aux_loss_coef) for _ in range(2))
        self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _loss(model, ids):
    """The training loss of one (micro-)batch: the mean over its tokens."""
    if isinstance(model, TinyMoETransformer):
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    return model(ids, labels=ids).loss


def _models(kind: str, aux_loss_coef: float):
    """Two models with the same weights: the one-process reference and the one to shard."""
    if kind == "user":
        build = lambda: TinyMoETransformer(aux_loss_coef)  # noqa: E731
    else:
        from moe_blocks.models.jetmoe import JetMoEConfig, JetMoEForCausalLM

        config = JetMoEConfig.from_preset("tiny", vocab_size=VOCAB, aux_loss_coef=aux_loss_coef,
                                          **JETMOE)  # fmt: skip
        build = lambda: JetMoEForCausalLM(config)  # noqa: E731
    torch.manual_seed(0)
    reference = build()
    model = build()
    model.load_state_dict(reference.state_dict())
    return reference, model


def _parallelize(kind: str, model, mesh):
    if kind == "user":
        from moe_blocks.parallel import parallelize

        return parallelize(model, mesh, layers=model.layers)
    from moe_blocks.models.parallel import parallelize

    return parallelize(model, mesh)


def _mesh(shape):
    from torch.distributed.device_mesh import init_device_mesh

    names = ("dp",) if len(shape) == 1 else ("dp", "ep")
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _relative_error(actual, expected) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def _check_gradients(rank: int, world_size: int) -> None:
    from moe_blocks.parallel import clip_grad_norm_

    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mine = ids.tensor_split(world_size)[rank]
    for shape in MESHES[world_size]:
        for kind in ("jetmoe", "user"):
            for aux_loss_coef in (0.01, 0.0):
                what = f"mesh {shape} {kind} aux_loss_coef={aux_loss_coef}"
                reference, model = _models(kind, aux_loss_coef)
                _parallelize(kind, model, _mesh(shape))
                _loss(reference, ids).backward()
                _loss(model, mine).backward()
                errors = {
                    name: _relative_error(param.grad.full_tensor(),
                                          reference.get_parameter(name).grad)
                    for name, param in model.named_parameters()
                }  # fmt: skip
                expected_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in reference.parameters()]
                )
                errors["clip_grad_norm_"] = _relative_error(clip_grad_norm_(model, 1e9),
                                                            expected_norm)  # fmt: skip
                wrong = {name: f"{error:.1e}" for name, error in errors.items() if error > RELATIVE}
                assert not wrong, f"{what}: relative errors {wrong}"
                # the trainer's AdamW is fused unless the experts' 2-D mesh and the others'
                # flattened one would meet in one fused step (older torch refuses that)
                fused = make_optimizer(model, TrainSettings()).param_groups[0]["fused"]
                assert fused == (len(shape) == 1), what


def _check_freezing(rank: int, world_size: int) -> None:
    """Experts 0 and 3 frozen before or after parallelising: after AdamW steps (weight decay
    0.1) their rows are bit-identical and their gradient rows zero; the other rows moved, by
    what one process training the same frozen model on the whole batch gives them."""
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    mine = ids.tensor_split(world_size)[rank]
    for shape in MESHES[world_size]:
        for kind in ("jetmoe", "user"):
            for when in ("before", "after"):
                what = f"mesh {shape} {kind} frozen {when} parallelize"
                reference, model = _models(kind, 0.01)
                initial = {k: v.clone() for k, v in reference.state_dict().items()}
                frozen_reference = freeze_experts(reference, experts=[0, 3])
                if when == "before":
                    frozen = freeze_experts(model, experts=[0, 3])
                _parallelize(kind, model, _mesh(shape))
                if when == "after":
                    frozen = freeze_experts(model, experts=[0, 3])
                optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
                              for m in (reference, model)]  # fmt: skip
                for _ in range(3):
                    for m, batch, optimizer in zip(
                        (reference, model), (ids, mine), optimizers, strict=True
                    ):
                        optimizer.zero_grad()
                        _loss(m, batch).backward()
                        optimizer.step()
                _check_frozen_rows(model, reference, initial, what)
                frozen.remove()
                frozen_reference.remove()


def _check_frozen_rows(model, reference, initial: dict, what: str) -> None:
    from moe_blocks import expert_blocks

    expert_tensors = set()
    for name in expert_blocks(reference):
        prefix = f"{name}." if name else ""
        for tensor in ("input_linear.weight", "output_linear.weight", "router.layer.weight"):
            expert_tensors.add(prefix + tensor)
    params = dict(model.named_parameters())
    for name in sorted(expert_tensors):
        param = params[name]
        weights, grad = param.full_tensor(), param.grad.full_tensor()
        assert torch.equal(weights[[0, 3]], initial[name][[0, 3]]), f"{what}: {name} moved"
        assert not grad[[0, 3]].any(), f"{what}: {name} frozen rows have a gradient"
        assert not torch.equal(weights[[1, 2]], initial[name][[1, 2]]), f"{what}: {name} still"
        expected = reference.get_parameter(name)
        torch.testing.assert_close(weights, expected.detach(), atol=1e-4, rtol=2e-5, msg=what)


def _check_errors(world_size: int) -> None:
    """Wrappings that cannot work get an error naming the fix, not torch's."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_blocks import ExpertParallel
    from moe_blocks.models import parallelize as parallelize_jetmoe
    from moe_blocks.parallel import parallelize

    ep_mesh = _mesh((1, world_size))
    _, model = _models("user", 0.01)
    parallelize(model, ep_mesh)
    with pytest.raises(ValueError, match="already sharded.*parallelize once, on the plain"):
        parallelize(model, ep_mesh)
    _, model = _models("user", 0.01)
    fully_shard(model, mesh=_mesh((world_size,)))
    with pytest.raises(ValueError, match="already sharded.*ExpertParallel to the plain block"):
        parallelize_module(model.layers[0].mlp, ep_mesh["ep"], ExpertParallel())
    _, model = _models("user", 0.01)
    with pytest.raises(ValueError, match="layers must hold submodules"):
        parallelize(model, ep_mesh, layers=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="balance"):
        parallelize(model, ep_mesh, balance="per-rank")
    from torch.distributed.device_mesh import init_device_mesh

    misnamed = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("ep", "dp"))
    with pytest.raises(ValueError, match="names"):
        parallelize(model, misnamed)
    reference, _ = _models("jetmoe", 0.01)
    with pytest.raises(TypeError, match="JetMoEForCausalLM"):
        parallelize_jetmoe(reference.model, ep_mesh)


def _check_hand_wrapped_freezing(rank: int, world_size: int) -> None:
    """Experts frozen before a user's own wrapping: ExpertParallel alone (the frozen rows of
    the first gradients are zero straight after backward: ExpertParallel hooks the tensors it
    makes), and ExpertParallel over "ep", then fully_shard of the experts over "dp" (their
    gradient divided by the world size, as parallelize sets it) and of the model over both
    (clip_grad_norm_ zeroes the first gradients' frozen rows, which fully_shard's new tensors
    kept: its total is the one-process norm of the frozen model)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_blocks import ExpertParallel
    from moe_blocks.parallel import clip_grad_norm_

    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    mine = ids.tensor_split(world_size)[rank]
    mesh = _mesh((1, world_size))
    for wrapping in ("ExpertParallel", "ExpertParallel + fully_shard"):
        reference, model = _models("user", 0.01)
        initial = {k: v.clone() for k, v in reference.state_dict().items()}
        frozen_reference = freeze_experts(reference, experts=[0, 3])
        frozen = freeze_experts(model, experts=[0, 3])
        for layer in model.layers:
            parallelize_module(layer.mlp, mesh["ep"], ExpertParallel())
            if wrapping != "ExpertParallel":
                experts = [layer.mlp.input_linear, layer.mlp.output_linear]
                fully_shard(experts, mesh=mesh["dp"])[0].set_gradient_divide_factor(world_size)
        if wrapping != "ExpertParallel":
            fully_shard(model, mesh=mesh._flatten("dp_ep"))
        _loss(reference, ids).backward()
        _loss(model, mine).backward()
        if wrapping == "ExpertParallel":
            for layer in model.layers:
                for experts in (layer.mlp.input_linear, layer.mlp.output_linear):
                    grad = experts.weight.grad.full_tensor()
                    assert not grad[[0, 3]].any() and grad[[1, 2]].any(), wrapping
            continue
        expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
        error = _relative_error(clip_grad_norm_(model, 1e9), expected)
        assert error <= RELATIVE, f"{wrapping}: clip_grad_norm_ relative error {error:.1e}"
        optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
                      for m in (reference, model)]  # fmt: skip
        for optimizer in optimizers:
            optimizer.step()
        _check_frozen_rows(model, reference, initial, wrapping)
        frozen.remove()
        frozen_reference.remove()


def _grid(rank: int, world_size: int) -> None:
    _check_gradients(rank, world_size)
    _check_freezing(rank, world_size)
    if world_size == 2:
        _check_errors(world_size)
        _check_hand_wrapped_freezing(rank, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_gradients_and_freezing_equal_one_process_on_every_mesh(world_size):
    spawn_local(_grid, world_size)
