"""``moe-blocks generate``: text sampled from a checkpoint's model, through the tokenizer it
was trained with (or bytes)."""

from __future__ import annotations

import torch

from .run_folder import checkpoint_folder, load_model
from .settings import TrainingError, check_seed
from .tokens import check_vocabulary, load_tokenizer


def generate_text(
    checkpoint: str,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """``prompt`` and what the model of ``checkpoint`` (a run folder or a model folder) writes
    after it: up to ``max_new_tokens`` tokens, sampled at ``temperature`` (0: greedy) from the
    ``top_k`` likeliest (None: all) with ``seed``, until the tokenizer's end token. The text is
    read and written through the checkpoint's own tokenizer (``train --tokenizer`` leaves it
    there) or as bytes for a byte-level model (vocabulary 256); a TrainingError naming the
    flag for bad input."""
    if not temperature >= 0:
        raise TrainingError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if not prompt:
        raise TrainingError("--prompt must not be empty")
    check_seed("--seed", seed)
    folder = checkpoint_folder(checkpoint)
    model = load_model(folder, "--checkpoint").eval()
    tokenizer = load_tokenizer(None, folder)
    if tokenizer is None and model.config.vocab_size != 256:
        raise TrainingError(
            f"--checkpoint {checkpoint}: vocabulary {model.config.vocab_size} and no "
            "tokenizer beside it: not a byte-level model, nor one trained with --tokenizer"
        )
    check_vocabulary(tokenizer, model.config.vocab_size, f"--checkpoint {checkpoint}")
    if tokenizer is None:
        ids = torch.tensor([list(prompt.encode())])
    else:
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    try:
        out = model.generate(
            ids,
            max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature,
            top_k=top_k,
            generator=torch.Generator().manual_seed(seed),
            # bytes: no end token (older runs' configs name byte 2); a tokenizer: its own
            eos_token_id=None if tokenizer is None else tokenizer.eos_token_id,
        )
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if tokenizer is None:
        return bytes(out[0].tolist()).decode("utf-8", errors="replace")
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
