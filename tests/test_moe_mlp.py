"""MoEMLP: equivariance, independence of tokens, the E=1 case, gradients, the aux loss, parity
with transformers' JetMoeMoE, both backends, torch.compile, bad input."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from moe_blocks import MoEMLP

from .conftest import DEVICE
from .helpers import (
    assert_autocast_matches_rounded_inputs,
    assert_backends_agree,
    assert_empty_batch_is_handled,
    watched_inference_paths,
)


@st.composite
def mlp_cases(draw):
    experts = draw(st.integers(1, 8))
    return {
        "d_model": draw(st.integers(1, 24)),
        "d_hidden": draw(st.integers(1, 24)),
        "experts": experts,
        "top_k": draw(st.integers(1, experts)),
        "tokens": draw(st.integers(1, 24)),
        "glu": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _mlp(case, **options):
    torch.manual_seed(case["seed"])
    mlp = MoEMLP(
        case["d_model"], case["d_hidden"], case["experts"], case["top_k"], glu=case["glu"],
        **options,
    )  # fmt: skip
    with torch.no_grad():
        mlp.bias.normal_()
    return mlp, torch.randn(case["tokens"], case["d_model"])


@given(mlp_cases())
def test_permuting_tokens_permutes_outputs_and_tokens_are_independent(case):
    mlp, x = _mlp(case)
    out = mlp(x)
    perm = torch.randperm(case["tokens"])
    torch.testing.assert_close(mlp(x[perm]), out[perm])
    for token in range(min(3, case["tokens"])):
        torch.testing.assert_close(mlp(x[token : token + 1])[0], out[token])
    batched = mlp(x.view(1, case["tokens"], 1, case["d_model"]))
    torch.testing.assert_close(batched.view_as(out), out)


def test_one_expert_is_a_plain_glu_mlp():
    torch.manual_seed(0)
    mlp = MoEMLP(16, 24, 1, 1)
    x = torch.randn(3, 5, 16)
    w_in, w_out = mlp.input_linear.weight[0], mlp.output_linear.weight[0]
    gate, up = (x @ w_in.T).chunk(2, dim=-1)
    expected = (F.silu(gate) * up) @ w_out.T + mlp.bias
    torch.testing.assert_close(mlp(x), expected)


def test_gradients_reach_router_and_every_used_expert():
    torch.manual_seed(0)
    mlp = MoEMLP(16, 8, 6, 2)
    x = torch.randn(40, 16, requires_grad=True)
    mlp(x).square().sum().backward()
    used = mlp.router.last_tokens_per_expert > 0
    assert used.sum() >= 2
    for weight in (mlp.input_linear.weight, mlp.output_linear.weight):
        per_expert = weight.grad.flatten(1).abs().sum(1)
        assert bool((per_expert[used] > 0).all())
        assert bool((per_expert[~used] == 0).all())
    assert mlp.router.layer.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_aux_loss_reaches_the_router_through_the_returned_tensor_alone():
    torch.manual_seed(0)
    x = torch.randn(30, 12)
    grads = {}
    for coef in (0.0, 0.5):
        torch.manual_seed(1)
        mlp = MoEMLP(12, 8, 4, 2, aux_loss_coef=coef)
        mlp(x).sum().backward()
        grads[coef] = mlp.router.layer.weight.grad.clone()
        aux = mlp.router(x).aux_loss
        (aux_grad,) = torch.autograd.grad(aux, mlp.router.layer.weight)
        assert mlp.router.last_aux_loss.item() == pytest.approx(aux.item())
        unweighted = mlp.router.last_balance_loss + 0.1 * mlp.router.last_z_loss
        assert aux.item() == pytest.approx(coef * unweighted.item())  # weighted by coef
    torch.testing.assert_close(grads[0.5], grads[0.0] + aux_grad)
    assert not torch.allclose(grads[0.5], grads[0.0])


JETMOE_CASES = [
    dict(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    dict(hidden_size=24, intermediate_size=20, num_local_experts=8, num_experts_per_tok=3),
    dict(hidden_size=16, intermediate_size=8, num_local_experts=1, num_experts_per_tok=1),
    dict(hidden_size=40, intermediate_size=16, num_local_experts=5, num_experts_per_tok=5),
]


@pytest.mark.parametrize("case", JETMOE_CASES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_transformers_jetmoe_moe(case, backend):
    from transformers import JetMoeConfig
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeMoE

    torch.manual_seed(0)
    config = JetMoeConfig(vocab_size=10, num_hidden_layers=1, kv_channels=8, **case)
    reference = JetMoeMoE(config)
    for param in reference.parameters():
        torch.nn.init.normal_(param, std=0.2)
    ours = MoEMLP(
        case["hidden_size"],
        case["intermediate_size"],
        case["num_local_experts"],
        case["num_experts_per_tok"],
        backend=backend,
        aux_loss_coef=0.0,
    )  # fmt: skip  (transformers' module has no aux loss in its gradient)
    ours.load_state_dict(reference.state_dict())
    reference, ours = reference.to(DEVICE), ours.to(DEVICE)
    x = torch.randn(2, 7, case["hidden_size"]).to(DEVICE).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, expected = ours(x), reference(x_ref)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    ref_params = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, ref_params[name].grad, atol=1e-5, rtol=1e-5)


def test_backends_agree_on_outputs_and_gradients():
    assert_backends_agree(lambda: MoEMLP(20, 12, 5, 2), (2, 9, 20))


def test_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(8, 8, 4, 5)
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(8, 8, 4, 0)
    with pytest.raises(ValueError, match="d_hidden"):
        MoEMLP(8, 0, 4, 2)
    with pytest.raises(ValueError, match="activation"):
        MoEMLP(8, 8, 4, 2, activation="swish2")
    with pytest.raises(ValueError, match="d_model"):
        MoEMLP(8, 8, 4, 2)(torch.randn(3, 7))


def test_runs_under_autocast_with_fp32_weights():
    """bf16 autocast against the float64 block on bf16-rounded weights and input. The model
    allows three bf16 roundings of the output's scale (the hidden rows, the GLU, the gated sum;
    less than one was seen): 1.2 %, where a uniform 15 % error used to pass."""
    torch.manual_seed(0)
    mlp = MoEMLP(16, 8, 4, 2)
    with torch.no_grad():
        mlp.bias.normal_()
    x = torch.randn(2, 5, 16)
    assert_autocast_matches_rounded_inputs(mlp, x, roundings=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp(x)
    out.float().sum().backward()
    assert mlp.input_linear.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(backend, shape):
    torch.manual_seed(0)
    assert_empty_batch_is_handled(MoEMLP(16, 8, 4, 2, backend=backend).to(DEVICE), shape)


@given(
    mlp_cases(),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    st.sampled_from(["silu", "gelu", "relu"]),
    st.booleans(),
    st.booleans(),
)
def test_inference_takes_one_pass_over_the_experts_and_equals_the_kernel_calls(
    case, dtype, activation, fused, added
):
    """Inference on CPU (eval, no autograd: generate, evaluation, a decode step) takes the
    torch backend's one pass over the experts; it computes what the two expert_linear calls
    compute, and both are the float64 reference rounded: the same bits, but where each run is
    activated apart (``fused``: hidden rows above FUSE_BYTES, forced here with a threshold of
    0), whose activation's last bit may differ. ``added``: gated sums above ADDED_SUMS_BYTES
    (forced), added expert by expert in both."""
    mlp, x = _mlp(case, activation=activation, backend="torch")
    mlp = mlp.to(dtype).eval()
    x = x.to(dtype)
    one = x.shape[0] == 1  # a decode step of one token: the two calls, each one token's
    with watched_inference_paths(fused=fused, added=added) as (path, one_token):
        with torch.no_grad():
            fast = mlp(x)
        assert (path.call_count, one_token.call_count) == ((0, 2) if one else (1, 0))
        general = mlp(x.clone().requires_grad_()).detach()  # autograd: the kernel calls
        assert (path.call_count, one_token.call_count) == ((0, 4) if one else (1, 0))
    tolerance = {torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    last_bit = {torch.bfloat16: 1e-2, torch.float32: 2e-6, torch.float64: 1e-14}[dtype]
    if one or not fused:
        assert torch.equal(fast, general)
    torch.testing.assert_close(fast, general, atol=last_bit, rtol=last_bit)
    route = mlp.router(x.clone())
    w_in, w_out = mlp.input_linear.weight.double(), mlp.output_linear.weight.double()
    for token in range(x.shape[0]):
        expected = mlp.bias.double().clone()
        for slot, expert in enumerate(route.expert_idx[token].tolist()):
            product = (x[token : token + 1].double() @ w_in[expert].T).to(dtype).double()
            hidden = mlp._activate(product).to(dtype).double()
            expected += route.gates[token, slot].double() * (hidden @ w_out[expert].T)[0]
        torch.testing.assert_close(fast[token].double(), expected, atol=tolerance,
                                   rtol=tolerance)  # fmt: skip


def test_each_product_of_the_one_pass_takes_the_runs_of_its_kernel_call():
    """The one pass computes each of its two products in the runs the kernel call of that
    product takes: a call chooses one ``_grouped_mm`` or a product per expert by the width of
    its own weight's rows (GATHER_ONCE_BYTES), so with a GLU the hidden layer's rows (2·d_hidden
    wide) and the output product's (d_hidden) choose differently (forced here with a threshold
    between the two), and the one pass must follow each call, not one choice for both."""
    from unittest import mock

    from moe_blocks.kernels import torch_backend

    torch.manual_seed(0)
    d_model, d_hidden, experts, tokens = 8, 64, 20, 40
    mlp = MoEMLP(d_model, d_hidden, experts, 2, glu=True, backend="torch").eval()
    x = torch.randn(tokens, d_model)
    taken, original = [], torch_backend._runs

    def recorded(*args, **kwargs):
        taken.append(original(*args, **kwargs))
        return taken[-1]

    narrow_rows = 2 * tokens * d_hidden * 4  # all of the output product's rows, fp32
    with (
        mock.patch.object(torch_backend, "GATHER_ONCE_BYTES", narrow_rows),
        mock.patch.object(torch_backend, "_runs", side_effect=recorded),
        mock.patch.object(torch_backend, "_avx2_cpu", lambda: False),  # (else both per expert)
    ):
        with torch.no_grad():
            fast = mlp(x)
        one_pass, taken[:] = list(taken), []
        general = mlp(x.clone().requires_grad_()).detach()  # autograd: the kernel calls
    first, second = taken
    assert second == [(None, 0, 2 * tokens)] and all(isinstance(e, int) for e, _, _ in first)
    assert one_pass == taken
    assert torch.equal(fast, general)


def test_a_wrapped_experts_module_runs_through_its_own_forward_in_decode_too():
    """PEFT's LoRA on expert parameters (``target_parameters``) replaces ``input_linear`` by a
    wrapper module (its ``ParamWrapper``) whose forward adds the adapter; a decode step must
    call it, not read the wrapped weight around it."""
    from torch import nn

    class Wrapper(nn.Module):  # what such a wrapper does: a changed weight, its own forward
        def __init__(self, base):
            super().__init__()
            self.base_layer = base
            self.delta = nn.Parameter(torch.randn_like(base.weight))

        @property
        def weight(self):  # PEFT's wrapper shows the base layer's weight
            return self.base_layer.weight

        def forward(self, x, plan, **kwargs):
            from moe_blocks import expert_linear

            weight = self.base_layer.weight + self.delta
            return expert_linear(x, weight, plan, **kwargs)

    torch.manual_seed(0)
    mlp = MoEMLP(16, 8, 4, 2).eval()
    x = torch.randn(1, 16)
    changed = MoEMLP(16, 8, 4, 2).eval()
    changed.load_state_dict(mlp.state_dict())
    mlp.input_linear = Wrapper(mlp.input_linear)
    with torch.no_grad():
        changed.input_linear.weight += mlp.input_linear.delta
        torch.testing.assert_close(mlp(x), changed(x))


@pytest.mark.parametrize("case", ["training", "grad", "autocast", "hook"])
def test_the_one_pass_is_left_to_the_kernel_where_it_does_not_apply(case):
    from unittest import mock

    from moe_blocks.kernels import torch_backend

    torch.manual_seed(0)
    mlp = MoEMLP(16, 8, 4, 2).eval()
    x = torch.randn(3, 16)
    seen = []
    if case == "training":
        mlp.train()
    if case == "hook":  # FSDP2 unshards expert weights in such a hook
        mlp.input_linear.register_forward_pre_hook(lambda module, args: seen.append(module))
    expected = mlp(x.clone().requires_grad_()).detach()
    seen.clear()
    with (
        mock.patch.object(torch_backend, "routed_mlp", wraps=torch_backend.routed_mlp) as path,
        torch.set_grad_enabled(case == "grad"),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"),
    ):
        out = mlp(x)
    assert path.call_count == (1 if case == "training" else 0)  # training under no_grad: a step
    assert seen == ([mlp.input_linear] if case == "hook" else [])
    if case != "autocast":
        torch.testing.assert_close(out.detach(), expected, atol=2e-6, rtol=2e-6)
