"""Decode speed end to end: greedy ``generate`` of our JetMoE against transformers'
``JetMoeForCausalLM`` with the same weights, milliseconds per new token.

A block's one-token forward (``moe-blocks bench --tokens 1``) times the MoE layer alone, its
weights in or out of the caches; a decode step of a whole model runs every layer's attention,
router and experts in turn with a KV cache, and the weights of the other layers pass through
the caches between two uses of a layer's. This times that: for each shape (the bench's CPU or
GPU shapes, named as in ``moe-blocks bench``) a model of ``--layers`` layers is built with
random weights (``initializer_range``), saved once and loaded by both; both generate
``--new-tokens`` tokens greedily after a prompt of ``--prompt-tokens``, timed in alternating
rounds (``time_medians_ms``), and their tokens are compared (in fp32 they must agree; in 16 bits
a near-tie may pick another token, which the table says). Two copies of one model in one
process ran up to 4.5% apart per token on a 2-core Xeon (where their weights landed in
memory): read ratios within ±0.05 as ties. ``--compile`` adds our model with its forward
compiled (``torch.compile(model.forward, dynamic=True)``, the same model object, the compile
time reported apart): one graph for the prefill and the decode steps of any cache length.

    python benches/generate_speed.py --out docs/generate --threads 2 [--compile]

writes ``generate_speed.json`` and prints a markdown table (docs/benchmarks.md has one)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_blocks.models.bench.cases import attention_dims, shapes_for
from moe_blocks.models.bench.measure import time_medians_ms
from moe_blocks.models.bench.report import provenance
from moe_blocks.models.jetmoe import JetMoEConfig, JetMoEForCausalLM

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def config_for(shape: str, layers: int, vocab: int, device: str, tiny: bool) -> JetMoEConfig:
    """A JetMoE of the bench's ``shape`` (d_model, d_ffn, experts, k) with ``layers`` layers,
    attention as the bench's (:func:`attention_dims`), no end-of-sequence token (every run
    generates the same number of tokens)."""
    d_model, d_ffn, experts, top_k = shapes_for(device, tiny)[shape]
    kv_heads, head_dim = attention_dims(d_model, top_k)
    return JetMoEConfig(
        vocab_size=vocab, hidden_size=d_model, num_hidden_layers=layers,
        num_local_experts=experts, num_experts_per_tok=top_k, num_key_value_heads=kv_heads,
        kv_channels=head_dim, intermediate_size=d_ffn, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip


def measure(config: JetMoEConfig, dtype: str, *, prompt_tokens: int, new_tokens: int,
            device: str, repeats: int, with_compiled: bool = False) -> dict:  # fmt: skip
    """Both models' milliseconds per new token (medians of ``repeats`` alternating rounds of a
    whole ``generate``, prefill included, divided by ``new_tokens``) and whether their tokens
    agree; with ``with_compiled`` also ours with its forward compiled ("moe_blocks compiled"), the
    seconds its first ``generate`` took (compiling) and whether its tokens are eager's."""
    import transformers

    torch.manual_seed(0)
    ours = JetMoEForCausalLM(config)
    ours.init_weights()
    with tempfile.TemporaryDirectory() as directory:
        ours.save_pretrained(directory)
        del ours
        ours = JetMoEForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype], device=device)
        theirs = transformers.JetMoeForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype])
    theirs = theirs.to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_tokens), device=device)
    steps = {
        "moe_blocks": lambda: ours.generate(prompt, new_tokens),
        "transformers": lambda: theirs.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        ),
    }
    if with_compiled:
        steps["moe_blocks compiled"] = _compiled(ours, lambda: ours.generate(prompt, new_tokens))
    with torch.no_grad():
        tokens, first_call_s = {}, {}
        for name, step in steps.items():
            started = time.perf_counter()
            tokens[name] = step()
            first_call_s[name] = time.perf_counter() - started
        times = time_medians_ms(steps, device, min_repeats=repeats, max_repeats=repeats)
    ms = {name: value / new_tokens for name, value in times.items()}
    compiled = {}
    if with_compiled:
        compiled = {
            "compile_s": first_call_s["moe_blocks compiled"],
            "compiled_same_tokens": torch.equal(
                tokens["moe_blocks compiled"], tokens["moe_blocks"]
            ),
        }
    return compiled | {
        "layers": config.num_hidden_layers,
        "dims": [
            config.hidden_size,
            config.intermediate_size,
            config.num_local_experts,
            config.num_experts_per_tok,
        ],  # fmt: skip
        "dtype": dtype,
        "ms_per_token": ms,
        "transformers_over_ours": ms["transformers"] / ms["moe_blocks"],
        "same_tokens": torch.equal(tokens["moe_blocks"], tokens["transformers"]),
    }


def markdown_table(rows: list[dict], compiled: bool) -> str:
    """The rows as docs/benchmarks.md's decode table (with the compiled columns if measured)."""
    columns = ["shape", "layers", "dtype", "ms per new token: ours / transformers", "ratio"]
    columns += ["same tokens"] + [
        "ours compiled (ms)",
        "compile (s)",
        "its tokens eager's",
    ] * compiled
    yes_no = {True: "yes", False: "no"}
    lines = [
        "| " + " | ".join(columns) + " |",
        "|---|---:|---|---:|---:|---|" + "---:|---:|---|" * compiled,
    ]
    for row in rows:
        ms = row["ms_per_token"]
        cells = [row["shape"], row["layers"], row["dtype"]]
        cells += [f"{ms['moe_blocks']:.2f} / {ms['transformers']:.2f}"]
        cells += [f"{row['transformers_over_ours']:.2f}", yes_no[row["same_tokens"]]]
        if compiled:
            cells += [f"{ms['moe_blocks compiled']:.2f}", f"{row['compile_s']:.0f}"]
            cells += [yes_no[row["compiled_same_tokens"]]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n" + "\n".join(lines)


def _compiled(model: JetMoEForCausalLM, run):
    """``run`` (a ``generate`` of ``model``) with ``model.forward`` compiled for the call; the
    compiled forward is made once, so later calls reuse its graphs. Compiled code of earlier
    models is dropped first: each model compiles its own graphs, and past torch's limit of
    recompilations a forward would run eager unannounced."""
    torch.compiler.reset()
    compiled_forward = torch.compile(model.forward, dynamic=True)

    def run_compiled():
        model.forward = compiled_forward
        try:
            return run()
        finally:
            del model.forward  # the class's forward again

    return run_compiled


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="jetmoe-8b,fine-grained")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--layers", type=int, default=8, help="enough that the weights of "
                        "all layers do not fit in the caches")  # fmt: skip
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--tiny", action="store_true", help="the bench's tiny shapes (tests)")
    parser.add_argument("--compile", action="store_true", help="also ours with its forward "
                        "compiled (torch.compile, dynamic shapes)")  # fmt: skip
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            if shape not in shapes_for(args.device, args.tiny) or dtype not in DTYPES:
                parser.error(f"unknown shape {shape!r} or dtype {dtype!r}")
            config = config_for(shape, args.layers, args.vocab, args.device, args.tiny)
            row = {"shape": shape} | measure(
                config, dtype, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                device=args.device, repeats=args.repeats, with_compiled=args.compile,
            )  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(markdown_table(rows, args.compile))
    if args.out:
        options = sys.argv[1:] if argv is None else argv
        command = " ".join(["python benches/generate_speed.py", *options])
        result = provenance(command, args.device) | {
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "rows": rows,
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "generate_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
