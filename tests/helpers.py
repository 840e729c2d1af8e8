"""Shared test utilities: building inputs with chosen memory layouts and comparing results."""

import contextlib
import copy
import importlib.util
from pathlib import Path
from unittest import mock

import torch

from moe_blocks.kernels import torch_backend
from moe_blocks.testing import tolerances

LAYOUTS = ("contiguous", "transposed", "sliced")
ROOT = Path(__file__).resolve().parent.parent


def script_module(path: str):
    """The script at ``path`` (relative to the repository root, e.g. a benchmark in
    ``benches/``, which is no package) imported as a module."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tensor(shape, dtype, layout="contiguous", generator=None, scale=1.0):
    """A random tensor of ``shape`` stored contiguously, with its last two dims transposed in
    memory, or as every other column of a wider tensor."""
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        swapped = shape[:-2] + (shape[-1], shape[-2])
        base = torch.randn(swapped, generator=generator) * scale
        return base.to(dtype).transpose(-1, -2)
    if layout == "sliced":
        wide = shape[:-1] + (2 * shape[-1] + 1,)
        base = torch.randn(wide, generator=generator) * scale
        return base.to(dtype)[..., 1::2]
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def error_bound(expected, dtype, *, reduction_length=256, top_k=1, roundings=2, scale=None):
    """The elementwise bound on ``|actual - expected|`` that the error model of
    :func:`moe_blocks.testing.tolerances` allows a ``dtype`` result whose float64 reference is
    ``expected``: ``atol · scale + rtol · |expected|``, ``scale`` by default the largest expected
    magnitude (at least 1), or given (a number, or a tensor of per-element magnitudes that
    broadcasts against ``expected``)."""
    tol = tolerances(dtype, reduction_length=reduction_length, top_k=top_k, roundings=roundings)
    if scale is None:
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    return tol["atol"] * scale + tol["rtol"] * expected.abs()


def assert_matches(actual, expected, dtype, what, **model):
    """``actual`` (any dtype) against the float64 ``expected`` within :func:`error_bound`
    (``model``: its keyword arguments)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bound = error_bound(expected, dtype, **model)
    error = (actual.double() - expected).abs()
    beyond = ~(error <= bound)  # NaN counts as beyond
    if beyond.any():
        worst = (error / bound).nan_to_num(float("inf")).argmax()
        raise AssertionError(
            f"{what}: {int(beyond.sum())} of {error.numel()} elements beyond the {dtype} error "
            f"model; worst {actual.flatten()[worst].item():.6g} for {expected.flatten()[worst]:.6g}"
            f" (bound {bound.flatten()[worst]:.3g})"
        )


def assert_backends_agree(make_block, input_shape):
    """The block gives the same output and gradients (input and every parameter) on the torch
    and Triton backends, built twice from the same seed."""
    from moe_blocks import use_backend

    from .conftest import DEVICE

    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        block = make_block().to(DEVICE)
        x = torch.randn(input_shape).to(DEVICE).requires_grad_()
        with use_backend(backend):
            out = block(x)
            out.square().sum().backward()
        results[backend] = [out.detach(), x.grad] + [p.grad for p in block.parameters()]
    for ours, theirs in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def assert_autocast_matches_rounded_inputs(block, x, *, roundings, dtype=torch.bfloat16):
    """``block(x)`` under CPU autocast to ``dtype`` against the oracle of what autocast asks
    for: the block in float64 with its parameters and ``x`` rounded to ``dtype`` (what autocast
    feeds the matmuls), routed the same way (checked). The difference must stay within
    :func:`moe_blocks.testing.tolerances` for ``dtype`` and ``roundings`` roundings on the way,
    relative to the largest output."""
    reference = copy.deepcopy(block).double()
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.to(dtype))
    routes = []
    hooks = [
        module.router.register_forward_hook(lambda m, i, out: routes.append(out.expert_idx))
        for module in (block, reference)
    ]
    with torch.autocast("cpu", dtype=dtype):
        out = block(x)
    expected = reference(x.to(dtype).double())
    for hook in hooks:
        hook.remove()
    assert torch.equal(routes[0], routes[1]), "autocast changed the routing: pick another seed"
    bound = error_bound(
        expected, dtype, reduction_length=x.shape[-1], roundings=roundings,
        scale=expected.abs().max().item(),
    )  # fmt: skip
    error = (out.double() - expected).abs()
    assert bool((error <= bound).all()), (
        f"autocast error {error.max().item():.3g} beyond the model's {roundings} roundings to "
        f"{dtype} ({(error / bound).max().item():.2f} of the bound at worst)"
    )


def assert_empty_batch_is_handled(block, shape):
    """``block`` (an MoEMLP or MoA on ``DEVICE``) on an input of ``shape`` with no tokens: an
    empty output of that shape, zero (not missing) gradients for every parameter, and finite
    router statistics."""
    from .conftest import DEVICE

    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    out = block(x)
    assert out.shape == shape
    out.sum().backward()
    assert x.grad.shape == shape
    for name, param in block.named_parameters():
        assert param.grad is not None and not param.grad.any(), name
    experts = block.router.num_experts
    assert block.router.last_tokens_per_expert.tolist() == [0] * experts
    assert block.router.last_aux_loss.item() == 0.0  # logged statistics stay finite


@contextlib.contextmanager
def watched_inference_paths(*, fused: bool, added: bool = False):
    """Count the calls of the torch backend's inference paths inside: ``routed_mlp`` (the one
    pass of two or more tokens) and ``one_token_gather_gemm`` (each of the two products of one
    token), yielding their two mocks; with ``fused``, ``routed_mlp`` takes its run-by-run
    branch whatever the size (a FUSE_BYTES of 0); with ``added``, every TOKEN output of more
    than one token adds its runs into the sums (an ADDED_SUMS_BYTES of 0), the inference path's
    and the kernel calls' alike."""
    from moe_blocks.kernels import torch_backend

    fuse_bytes = 0 if fused else torch_backend.FUSE_BYTES
    added_sums_bytes = 0 if added else torch_backend.ADDED_SUMS_BYTES
    with (
        mock.patch.object(torch_backend, "routed_mlp", wraps=torch_backend.routed_mlp) as path,
        mock.patch.object(
            torch_backend, "one_token_gather_gemm", wraps=torch_backend.one_token_gather_gemm
        ) as one_token,
        mock.patch.object(torch_backend, "FUSE_BYTES", fuse_bytes),
        mock.patch.object(torch_backend, "ADDED_SUMS_BYTES", added_sums_bytes),
    ):
        yield path, one_token


def padded_run(offsets, dtype, rows, row_bytes, **options):
    """A stand-in for the torch backend's ``_runs`` that forces its padded path: one padded
    ``bmm`` run wherever the padding stays within PADDED_WASTE (whatever the dtype, the expert
    count or how many of them have rows), else the usual runs."""
    most = int(offsets.diff().max()) if rows else 0
    if not rows or (offsets.shape[0] - 1) * most > torch_backend.PADDED_WASTE * rows:
        return _UNPATCHED_RUNS(offsets, dtype, rows, row_bytes, **options)
    return [(torch_backend.Padded(most), 0, rows)]


_UNPATCHED_RUNS = torch_backend._runs


def zero_safetensors_in_place(path) -> None:
    """Overwrite the tensor data of the safetensors file ``path`` with zeros in place (the same
    file, not a new one renamed over it), its header kept: what another process rewriting a
    checkpoint does to a reader that still maps the file."""
    with open(path, "r+b") as file:
        header = int.from_bytes(file.read(8), "little")
        data_start = 8 + header
        size = file.seek(0, 2)
        file.seek(data_start)
        file.write(bytes(size - data_start))
