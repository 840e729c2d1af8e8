"""The ``moe-blocks`` command line (also ``python -m moe_blocks``).

Subcommands:
    demo    route random tokens through a SiLU-GLU expert MLP built from two expert_linear
            calls, check it against the float64 reference, and time it on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .kernels import expert_linear, plan_dispatch, resolve_backend


def _glu_experts(x, w_in, w_out, plan, gates):
    hidden = expert_linear(x, w_in, plan, grouped_out=True)
    gate, up = hidden.chunk(2, dim=-1)
    return expert_linear(F.silu(gate) * up, w_out, plan, grouped_in=True, gates=gates)


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def demo(args: argparse.Namespace) -> int:
    from .testing import reference_expert_linear

    for name in ("tokens", "d_model", "d_ffn", "experts", "top_k", "repeats"):
        if getattr(args, name) < 1:
            print(
                f"moe-blocks demo: --{name.replace('_', '-')} must be at least 1", file=sys.stderr
            )
            return 2
    if args.top_k > args.experts:
        print("moe-blocks demo: --top-k must not exceed --experts", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    tokens, d_model, d_ffn = args.tokens, args.d_model, args.d_ffn
    experts, top_k = args.experts, args.top_k
    router = torch.randn(d_model, experts)
    x = torch.randn(tokens, d_model)
    logits = x @ router
    top_logits, expert_idx = logits.topk(top_k, dim=-1)
    gates = top_logits.softmax(-1)
    plan = plan_dispatch(expert_idx, experts)
    w_in = torch.randn(experts, 2 * d_ffn, d_model) * d_model**-0.5
    w_out = torch.randn(experts, d_model, d_ffn) * d_ffn**-0.5
    print(
        f"moe-blocks demo: {tokens} tokens, d_model {d_model}, {experts} experts of "
        f"ffn {d_ffn}, top-{top_k}, backend {resolve_backend('auto', x.device)}"
    )
    print(f"tokens per expert: {plan.tokens_per_expert.tolist()}")

    out = _glu_experts(x, w_in, w_out, plan, gates)
    hidden = reference_expert_linear(x, w_in, expert_idx)
    gate, up = hidden.chunk(2, dim=-1)
    expected = reference_expert_linear(F.silu(gate) * up, w_out, expert_idx, gates=gates)
    error = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    print(f"max relative error against the float64 reference: {error:.2e}")

    params = [t.requires_grad_() for t in (x, w_in, w_out)]
    fwd = _median_ms(lambda: _glu_experts(x, w_in, w_out, plan, gates), args.repeats)

    def fwd_bwd():
        for p in params:
            p.grad = None
        _glu_experts(x, w_in, w_out, plan, gates).sum().backward()

    both = _median_ms(fwd_bwd, args.repeats)
    flops = 2 * tokens * top_k * d_model * d_ffn * 3
    print(
        f"forward {fwd:.1f} ms ({flops / fwd / 1e6:.1f} GFLOP/s), "
        f"forward+backward {both:.1f} ms (median of {args.repeats}, fp32)"
    )
    return 0 if error < 1e-4 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-blocks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="a short demo of the expert kernel")
    demo_parser.add_argument("--tokens", type=int, default=512)
    demo_parser.add_argument("--d-model", type=int, default=512)
    demo_parser.add_argument("--d-ffn", type=int, default=704)
    demo_parser.add_argument("--experts", type=int, default=8)
    demo_parser.add_argument("--top-k", type=int, default=2)
    demo_parser.add_argument("--repeats", type=int, default=5)
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.set_defaults(handler=demo)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
