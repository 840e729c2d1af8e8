"""Benchmark setup. ``MOE_BLOCKS_BENCH_SIZE=tiny`` shrinks every shape so that CI can run the
suites once with ``--benchmark-disable`` (tested, not timed)."""

import os

import torch

TINY = os.environ.get("MOE_BLOCKS_BENCH_SIZE", "") == "tiny"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
