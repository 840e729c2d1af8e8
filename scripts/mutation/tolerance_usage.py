"""How much of the allowed error the property tests of expert_linear actually use.

    python scripts/mutation/tolerance_usage.py --backend torch --examples 400

Draws problems as tests/test_expert_linear.py does (every flag combination in turn), runs the
same comparison, and prints per result and dtype the largest ``|error| / bound`` seen, where
the bound is the error model of ``moe_blocks.testing.tolerances`` that the tests apply. A value
near 1 means the tests are tight (and could turn flaky); a value near 0 that a precision
regression of several roundings would still pass. The Triton backend runs through the
interpreter (slow: about a second per example on 2 cores).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("torch", "triton"), default="torch")
    parser.add_argument("--examples", type=int, default=200, help="problems drawn in all")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    sys.path.insert(0, str(ROOT))
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests import test_expert_linear as cases
    from tests.helpers import error_bound

    sizes = cases.TORCH_PROBLEMS if args.backend == "torch" else cases.TRITON_PROBLEMS
    worst: dict[tuple[str, str], float] = defaultdict(float)
    combinations = itertools.cycle(param.values[0] for param in cases.COMBINATIONS)

    @settings(max_examples=args.examples, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(data=st.data())
    def measure(data):
        problem = data.draw(cases.problems(next(combinations), **sizes))
        for name, result, reference, dtype, model in cases.results_and_references(
            problem, args.backend
        ):
            if reference.numel():
                error = (result.double() - reference).abs()
                used = (error / error_bound(reference, dtype, **model)).max().item()
                key = (name, str(dtype).removeprefix("torch."))
                worst[key] = max(worst[key], used)

    measure()
    print(f"{args.backend}, {args.examples} examples: largest |error| / bound")
    for (name, dtype), used in sorted(worst.items()):
        print(f"  {name:<12} {dtype:<9} {used:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
