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
    from transformers.utils import logging as hf_logging

    batches = windows.split(batch_size)
    for batch in hf_logging.tqdm(batches, desc="hf_quant: perplexity", disable=not hf_logging.is_progress_bar_enabled()):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def quantized_size_on_disk(model: torch.nn.Module, checkpoint_dir: str) -> tuple[int, int]:
    """(bytes the quantized layers take in `checkpoint_dir`'s safetensors, bytes the same layers'
    weights take in bf16). Bias is left out of both: it is stored in float either way."""
    from pathlib import Path

    from .core import packed_bytes
    from .io.checkpoint import index_checkpoint
    from .runtime import QuantLinear

    entries = index_checkpoint(sorted(str(p) for p in Path(checkpoint_dir).glob("*.safetensors")))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    packed = packed_bytes(entries, set(layers))
    bf16 = sum(2 * m.in_features * m.out_features for m in layers.values())
    return packed, bf16
