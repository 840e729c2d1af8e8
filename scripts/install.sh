#!/usr/bin/env bash
# Installs moe-blocks and its dev tools into the current Python environment.
# On a machine without torch, install the CPU wheel first (pinned, so pip takes the CPU build
# instead of resolving the open range in pyproject.toml to a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[dev]"
