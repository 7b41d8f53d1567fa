"""Calibration data: whatever the user passes, turned into `num_samples` token windows of `seq_len`, or, for a
multimodal model's processor outputs (dicts with `pixel_values` and the like), `num_samples` whole samples."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from importlib import resources
from typing import Any, Callable

import numpy as np
import torch

TEXT_KEYS = frozenset({"input_ids", "attention_mask"})  # a dict with only these is text: cut into windows


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
        if isinstance(item, Mapping):  # a dict, or a tokenizer's BatchEncoding
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
    Token ids must lie in [0, vocab_size). Whole samples (`is_sample_dataset`: a multimodal processor's outputs)
    are not cut into windows: `num_samples` of them, chosen reproducibly from `seed`, as a CalibrationSamples.
    """
    if is_sample_dataset(dataset):
        return _samples(list(dataset), num_samples, seed, vocab_size)
    ids = _token_stream(dataset, get_tokenizer)
    bad = _out_of_vocab(ids, vocab_size)
    if bad is not None:
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


def _out_of_vocab(ids: torch.Tensor, vocab_size: int | None) -> int | None:
    """A token id of `ids` outside [0, vocab_size) (the smallest if one is negative, else the largest), or None."""
    if vocab_size is None or not ids.numel() or (ids.min() >= 0 and ids.max() < vocab_size):
        return None
    return int(ids.min()) if ids.min() < 0 else int(ids.max())


class CalibrationSamples(list):
    """Whole calibration samples (multimodal processor outputs): each item is the keyword arguments of one forward
    call of the model, batch size 1, its tensors on the CPU. What `calibration_windows` returns for such data, in
    place of a (num_samples, seq_len) tensor of token windows."""


def _is_sample(item: Any) -> bool:
    """A dict with input_ids and more keys than input_ids and attention_mask (a processor's `pixel_values`,
    `image_grid_thw`, `token_type_ids`, ...)."""
    return isinstance(item, Mapping) and "input_ids" in item and not set(item) <= TEXT_KEYS


def is_sample_dataset(dataset: Any) -> bool:
    """True if `dataset` holds whole samples: a list with an item that is one (`_is_sample`)."""
    return isinstance(dataset, (list, tuple)) and any(_is_sample(item) for item in dataset)


def _as_tensor(value: Any) -> Any:
    if isinstance(value, np.ndarray) or (isinstance(value, (list, tuple)) and value
                                         and all(isinstance(v, (int, float)) for v in value)):
        return torch.as_tensor(value)
    return value


def _samples(dataset: list, num_samples: int, seed: int, vocab_size: int | None) -> CalibrationSamples:
    keys = sorted(next(set(item) for item in dataset if _is_sample(item)))
    samples = []
    for i, item in enumerate(dataset):
        if not isinstance(item, Mapping):
            raise ValueError(f"QuantConfig.dataset mixes whole samples (dicts with {keys}) with other items (item {i} "
                             f"is a {type(item).__name__}); pass every sample as a dict of model inputs, e.g. "
                             "processor(images=..., text=..., return_tensors='pt').")
        if "input_ids" not in item:
            raise ValueError(f"QuantConfig.dataset: sample {i} has no 'input_ids' (keys: {sorted(item)}); pass the "
                             "processor's whole output.")
        sample = {k: _as_tensor(v) for k, v in item.items()}
        for k in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
            v = sample.get(k)
            if isinstance(v, torch.Tensor) and v.dim() == 1:
                sample[k] = v[None]
        ids = sample["input_ids"] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"QuantConfig.dataset: sample {i} has input_ids of shape {tuple(ids.shape)}; each sample "
                             "is one sequence, shape (1, length) or (length,): process one prompt per sample.")
        mask = sample.get("attention_mask")
        if isinstance(mask, torch.Tensor) and not bool(mask.all()):
            raise ValueError(f"QuantConfig.dataset: sample {i} is padded (its attention_mask has zeros); pass each "
                             "sample unpadded (padding=False), so that no padding token enters the statistics.")
        bad = _out_of_vocab(ids, vocab_size)
        if bad is not None:
            raise ValueError(f"QuantConfig.dataset: sample {i} has token id {bad}, outside the model's vocabulary "
                             f"[0, {vocab_size}); process the calibration data with this model's processor.")
        samples.append(sample)
    if len(samples) < num_samples:
        raise ValueError(f"QuantConfig.dataset has {len(samples)} samples, but num_samples={num_samples} asks for "
                         f"more; pass more samples, or set num_samples={len(samples)}.")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(samples), generator=g)[:num_samples].sort().values
    return CalibrationSamples(samples[int(j)] for j in chosen)


def fingerprint(windows: torch.Tensor | CalibrationSamples) -> str:
    """sha256 of the calibration data as the model sees it (the streaming quantizer's resume key)."""
    if isinstance(windows, torch.Tensor):
        return hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    h = hashlib.sha256()
    for sample in windows:
        for k in sorted(sample):
            v = sample[k]
            h.update(k.encode())
            if isinstance(v, torch.Tensor):
                h.update(f"{tuple(v.shape)}{v.dtype}".encode())
                h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(v).encode())
    return h.hexdigest()


def model_inputs(window: torch.Tensor | dict, device: torch.device, dtype: torch.dtype | None) -> dict:
    """The keyword arguments of the model's forward for one calibration window (token ids) or sample (a
    processor's output: its floating tensors, pixel values, in the model's dtype), on `device`."""
    if isinstance(window, torch.Tensor):
        return {"input_ids": window[None].to(device)}
    out = {}
    for k, v in window.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype) if v.is_floating_point() and dtype is not None else v.to(device)
        out[k] = v
    return out


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
    elif is_sample_dataset(dataset):
        keys = sorted(set().union(*(set(x) for x in dataset if isinstance(x, Mapping))))
        return (f"{len(dataset)} user-supplied multimodal sample(s) ({', '.join(keys)}); {num_samples} of them, each "
                "whole")
    else:
        source = f"{len(dataset)} user-supplied token sequence(s)"
    return f"{source}; {num_samples} windows of {seq_len} tokens"
