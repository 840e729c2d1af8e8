#!/usr/bin/env bash
# Trains the tiny preset for 20 steps (balance loss on) in one process and under torchrun as
# FSDP over 2 ranks, dp 1 x ep 2 and dp 2 x ep 2, then prints how far each sharded run's losses
# lie from the one-process run's, step by step (docs/parallel.md). Not in CI: ~1 min on 2 cores.
#   bash scripts/parallel_agreement.sh [OUT]   (default OUT: runs/agreement, replaced)
set -euo pipefail
out=${1:-runs/agreement}
rm -rf "$out"
mkdir -p "$out"
common=(--steps 20 --batch-size 16 --seq-len 128 --eval-every 100 --quiet --threads 1)
moe-blocks train "${common[@]}" --out "$out/one" >"$out/one.txt" 2>&1
torchrun --nproc-per-node 2 -m moe_blocks train "${common[@]}" --ep 1 --out "$out/fsdp2" >"$out/fsdp2.txt" 2>&1
torchrun --nproc-per-node 2 -m moe_blocks train "${common[@]}" --ep 2 --out "$out/dp1ep2" >"$out/dp1ep2.txt" 2>&1
torchrun --nproc-per-node 4 -m moe_blocks train "${common[@]}" --ep 2 --out "$out/dp2ep2" >"$out/dp2ep2.txt" 2>&1
python - "$out" <<'PY'
import json
import sys

out = sys.argv[1]
one = [entry["loss"] for entry in json.load(open(f"{out}/one/log.json"))]
for run in ("fsdp2", "dp1ep2", "dp2ep2"):
    losses = [entry["loss"] for entry in json.load(open(f"{out}/{run}/log.json"))]
    relative = [abs(a - b) / abs(b) for a, b in zip(losses, one, strict=True)]
    worst = max(range(len(relative)), key=relative.__getitem__)
    print(f"{run}: max relative loss difference {relative[worst]:.1e} (step {worst + 1}), "
          f"step {len(one)}: {losses[-1]:.6f} vs {one[-1]:.6f}")
PY
