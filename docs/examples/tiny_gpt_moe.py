"""Drop-in proof: a small GPT written here (not part of moe-blocks), whose MLPs are replaced by
moe_blocks.MoEMLP, trained for a few steps on the bytes of a Python standard-library file.

    python docs/examples/tiny_gpt_moe.py --steps 60

The only change to the model is one line in ``Block.__init__``. The router's balance loss
reaches the gradient through MoEMLP's output; ``router_stats`` reports the expert load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moe_blocks import MoEMLP, router_stats


class Block(nn.Module):
    def __init__(self, width: int, heads: int, use_moe: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        if use_moe:  # the drop-in replacement
            self.mlp = MoEMLP(d_model=width, d_hidden=width, num_experts=4, top_k=2)
        else:
            self.mlp = nn.Sequential(
                nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab=256, width=64, heads=4, layers=2, context=64, use_moe=True):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads, use_moe) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def train(steps: int = 60, seed: int = 0, batch: int = 16, context: int = 64) -> dict:
    torch.manual_seed(seed)
    text = Path(json.__file__).read_bytes()
    data = torch.tensor(list(text), dtype=torch.long)
    model = TinyGPT(context=context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - context - 1, (batch,))
        window = torch.stack([data[s : s + context + 1] for s in starts])
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()  # the MoE balance loss rides along through MoEMLP's output
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "router_stats": router_stats(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    result = train(args.steps)
    losses = result["losses"]
    print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f} after {len(losses)} steps")
    stats = result["router_stats"]
    print(f"aux loss (sum over routers) {stats['aux_loss']:.4f}, z-loss {stats['z_loss']:.4f}")
    for name, load in stats["tokens_per_expert"].items():
        print(f"  {name}: tokens per expert {load}")


if __name__ == "__main__":
    main()
