"""Peak memory and step time of fine-tuning JetMoE: full AdamW against LoRA (``moe-blocks train
--lora-rank``), with and without activation checkpointing, measured on models of JetMoE-8B's
width with few layers and extrapolated to its 24 (every part grows linearly with the layers:
the weights, the adapters and their optimizer state, the activations kept per layer or, when
recomputed, per layer boundary; one layer's recomputation is the same at any depth).

Memory is every live tensor's bytes at the step's peak: on CUDA the allocator's peak
(``torch.cuda.max_memory_allocated``); on CPU the sum over the storages alive after each
operation (a dispatch mode that follows each storage until it is freed). A step is forward,
backward and AdamW; the first step (which creates AdamW's state) runs untimed before.

    python benches/lora_memory.py --out docs/lora --threads 2

writes ``lora_memory.json`` and prints a markdown table (docs/train.md has one)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_blocks.models.bench.report import provenance
from moe_blocks.models.jetmoe import JetMoEConfig, JetMoEForCausalLM
from moe_blocks.models.train import TrainSettings, make_optimizer
from moe_blocks.models.train.lora import attach_lora, lora_config

MODES = {  # name: (LoRA, activation checkpointing)
    "full": (False, False),
    "full + checkpointing": (False, True),
    "lora": (True, False),
    "lora + checkpointing": (True, True),
}


class LiveBytes(TorchDispatchMode):
    """The bytes of all tensor storages alive, after every operation run inside it, and
    their peak: the storages of ``tensors`` (those alive before) and every operation's
    outputs, each counted once until it is freed."""

    def __init__(self, tensors) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.current = self.peak = 0
        for tensor in tensors:
            self._track(tensor)

    def _track(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.sizes:
            return
        self.sizes[key] = storage.nbytes()
        self.current += self.sizes[key]
        self.peak = max(self.peak, self.current)
        self.refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))

    def _free(self, key: int) -> None:
        self.current -= self.sizes.pop(key, 0)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            self._track(tensor)
        return out


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(config, mode: str, *, tokens: int, rank: int, dtype, device, repeats: int):
    """One row: ``config``'s model trained for a step in ``mode`` (:data:`MODES`)."""
    lora, checkpointing = MODES[mode]
    torch.manual_seed(0)
    model = JetMoEForCausalLM(config, dtype=dtype, device=device)
    settings = TrainSettings(resume_from="base", lora_rank=rank if lora else None)
    if lora:
        attach_lora(model, lora_config(settings))
    model.gradient_checkpointing = checkpointing
    model.train()
    optimizer = make_optimizer(model, settings)
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)

    def step() -> None:  # as the trainer's: the last gradients freed before the forward
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()

    step()  # AdamW's state
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    trainable = [p for p in model.parameters() if p.requires_grad]
    states = [v for s in optimizer.state.values() for v in s.values() if v.dim() > 0]
    resident = list(model.parameters()) + list(model.buffers()) + states
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        with LiveBytes(resident) as live:
            step()
        peak = live.peak
    return {
        "layers": config.num_hidden_layers,
        "mode": mode,
        "weights_bytes": _bytes(p for p in model.parameters() if not p.requires_grad)
        if lora
        else _bytes(model.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_bytes": _bytes(trainable),
        "optimizer_bytes": _bytes(states),
        "peak_bytes": peak,
        "step_s": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="1,2,3",
                        help="layer counts: the line through the first and last is extrapolated, "
                        "those between check it")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (1 sequence)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    layer_counts = [int(n) for n in args.layers.split(",")]
    rows = []
    for layers in layer_counts:
        for mode in MODES:
            config = JetMoEConfig.from_preset("jetmoe-8b", num_hidden_layers=layers)
            row = measure(config, mode, tokens=args.tokens, rank=args.rank, dtype=dtype,
                          device=args.device, repeats=args.repeats)  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    first, last = layer_counts[0], layer_counts[-1]  # the line through these two
    target = JetMoEConfig.from_preset("jetmoe-8b").num_hidden_layers
    extrapolated, linearity = {}, {}
    for mode in MODES:
        at = {r["layers"]: r for r in rows if r["mode"] == mode}
        per_layer = {k: (at[last][k] - at[first][k]) / (last - first)
                     for k in ("weights_bytes", "trainable_bytes", "optimizer_bytes",
                               "peak_bytes", "step_s")}  # fmt: skip
        extrapolated[mode] = {k: at[first][k] + (target - first) * v for k, v in
                              per_layer.items()}  # fmt: skip
        # the peaks measured between the two ends, against the line: how linear it is
        linearity[mode] = {n: at[n]["peak_bytes"] / (at[first]["peak_bytes"] + (n - first)
                                                     * per_layer["peak_bytes"]) - 1
                           for n in layer_counts[1:-1]}  # fmt: skip
    command = "python benches/lora_memory.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None
    )
    result = provenance(command, args.device) | {
        "tokens": args.tokens,
        "rank": args.rank,
        "dtype": args.dtype,
        "rows": rows,
        f"extrapolated_to_{target}_layers": extrapolated,
        "peak_off_the_line": linearity,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    gib = 2**30
    print(
        f"\n| JetMoE-8B ({target} layers), {args.tokens} tokens, {args.dtype} | base weights | "
        "adapters | gradients | AdamW state | peak (all tensors) | step |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, values in extrapolated.items():
        adapters = values["trainable_bytes"] if MODES[mode][0] else 0
        print(
            f"| {mode} | {values['weights_bytes'] / gib:.1f} GiB | {adapters / gib:.2f} GiB | "
            f"{values['trainable_bytes'] / gib:.2f} GiB | {values['optimizer_bytes'] / gib:.2f} "
            f"GiB | {values['peak_bytes'] / gib:.1f} GiB | {values['step_s']:.1f} s |"
        )


if __name__ == "__main__":
    main()
