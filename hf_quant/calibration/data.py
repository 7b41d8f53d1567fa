"""Calibration data: whatever the user passes, turned into `num_samples` token windows of `seq_len`."""

from __future__ import annotations

from importlib import resources
from typing import Any, Callable

import torch


def default_calibration_text() -> str:
    """Public-domain text packaged with hf_quant (see data/README.md); no hub download."""
    return resources.files("hf_quant").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def _token_stream(dataset: Any, get_tokenizer: Callable[[], Any]) -> torch.Tensor:
    if dataset is None:
        dataset = [default_calibration_text()]
    if hasattr(dataset, "column_names"):  # a datasets.Dataset
        column = "input_ids" if "input_ids" in dataset.column_names else "text"
        dataset = list(dataset[column])
    if not isinstance(dataset, (list, tuple)) or not dataset:
        raise ValueError("QuantConfig.dataset must be a non-empty list of strings, token-id tensors or dicts "
                         "with 'input_ids', a datasets.Dataset, or None for the packaged text.")
    pieces, tokenizer, loaded = [], None, False
    for item in dataset:
        if isinstance(item, dict):
            if "input_ids" not in item:
                raise ValueError(f"QuantConfig.dataset: a dict item has no 'input_ids' (keys: {sorted(item)[:5]}); "
                                 "pass dicts with 'input_ids', strings or token-id tensors.")
            item = item["input_ids"]
        if isinstance(item, str):
            if not loaded:  # the tokenizer is loaded once, and only when text is met
                tokenizer, loaded = get_tokenizer(), True
            if tokenizer is None:
                raise ValueError("QuantConfig.dataset holds strings but no tokenizer could be loaded for the model; "
                                 "pass token ids instead.")
            item = tokenizer(item, return_tensors="pt").input_ids
        pieces.append(torch.as_tensor(item, dtype=torch.long).reshape(-1))
    return torch.cat(pieces)


def calibration_windows(
    dataset: Any, get_tokenizer: Callable[[], Any], num_samples: int, seq_len: int, seed: int,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """(num_samples, seq_len) token windows drawn without overlap, reproducibly from `seed`.

    `get_tokenizer()` is called only if the data holds text; it may return None (no tokenizer).
    Token ids must lie in [0, vocab_size).
    """
    ids = _token_stream(dataset, get_tokenizer)
    if vocab_size is not None and ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"QuantConfig.dataset: token id {bad} is outside the model's vocabulary [0, {vocab_size}); "
                         "tokenize the calibration data with this model's tokenizer.")
    n_windows = ids.numel() // seq_len
    if n_windows < num_samples:
        raise ValueError(
            f"calibration data has {ids.numel()} tokens, but num_samples={num_samples} x seq_len={seq_len} "
            f"needs at least {num_samples * seq_len}. Pass more text, or lower num_samples / seq_len."
        )
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    g = torch.Generator().manual_seed(seed)
    return windows[torch.randperm(n_windows, generator=g)[:num_samples].sort().values]


def describe_dataset(dataset: Any, num_samples: int, seq_len: int) -> str:
    """One line saying what calibration data was used, for the model card."""
    if dataset is None:
        source = ("hf_quant's packaged public-domain text (Project Gutenberg books and Tiny Shakespeare, "
                  "see hf_quant/data/README.md)")
    elif hasattr(dataset, "column_names"):
        name = getattr(getattr(dataset, "info", None), "dataset_name", None) or getattr(
            getattr(dataset, "info", None), "builder_name", None)
        source = f"a datasets.Dataset{f' ({name})' if name else ''} of {len(dataset)} rows"
    elif isinstance(dataset, (list, tuple)) and dataset and all(isinstance(x, str) for x in dataset):
        source = f"{len(dataset)} user-supplied text(s)"
    else:
        source = f"{len(dataset)} user-supplied token sequence(s)"
    return f"{source}; {num_samples} windows of {seq_len} tokens"
