#!/usr/bin/env bash
# Installs moe-blocks with its dev tools, then runs the linter, the test suite (the Triton
# backend through the Triton interpreter when there is no GPU) and the benchmark suites once
# with tiny shapes and timing disabled.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m ruff check .
python -m ruff format --check .
python -m pytest -ra tests
MOE_BLOCKS_BENCH_SIZE=tiny python -m pytest -q benches --benchmark-disable
