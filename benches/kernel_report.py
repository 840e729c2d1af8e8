"""Registers, shared memory, spills and matrix instructions of every Triton kernel variant,
compiled ahead of time for sm_80 and sm_90 on this machine (no GPU needed).

    python benches/kernel_report.py [--arch 90] [--json]
"""

import sys

from moe_blocks.kernels.aot import main

if __name__ == "__main__":
    sys.exit(main())
