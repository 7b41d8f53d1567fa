"""Evaluation helpers: perplexity on plain text, and the bundled held-out text."""

from __future__ import annotations

import math
from importlib import resources

import torch


def bundled_text() -> str:
    """Held-out text shipped with the package (last 3% of each corpus book; see data/README.md)."""
    return resources.files("hf_quant").joinpath("data/heldout.txt").read_text(encoding="utf-8")


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str | None = None,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 8,
) -> float:
    """exp(mean next-token NLL) over non-overlapping `seq_len`-token windows of `text`.

    `text=None` uses the bundled held-out text. Each window is scored independently (no context
    carried across windows), the usual protocol of the quantization papers.
    """
    if text is None:
        text = bundled_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"perplexity: text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)
