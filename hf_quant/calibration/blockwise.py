"""The block-wise calibration driver (DESIGN.md, step 3).

Capture the inputs of decoder block 0 once (hidden states and the keyword arguments the blocks
need: attention mask, position embeddings/ids, no cache). Then for each block: hook its target
linears, run the cached inputs through it to accumulate each layer's Hessian H = 2/N sum x x^T,
quantize the layers, and recompute the block's outputs with the quantized block, so that the
next block calibrates on the errors it will really see.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn as nn
from transformers.utils import logging as hf_logging

from ..config import LayerSpec, QuantConfig
from ..nn.convert import linear_shape, set_module
from .data import calibration_windows

logger = logging.getLogger("hf_quant")


class _StopForward(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the one whose length is the config's number of layers."""
    n_layers = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise ValueError(
        f"{type(model).__name__}: found no nn.ModuleList of {n_layers} decoder blocks to calibrate block by block."
    )


def _first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, windows: torch.Tensor) -> list[tuple[tuple, dict]]:
    """(args, kwargs) with which `block` is called for each calibration window."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args, dict(kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for window in windows:
            try:
                model(input_ids=window[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _tokenizer_for(model: nn.Module):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model.name_or_path)
    except Exception:  # no tokenizer next to the weights: token-id datasets still work
        return None


@torch.no_grad()
def quantize_blockwise(model: nn.Module, config: QuantConfig, targets: dict[str, LayerSpec]) -> None:
    """Quantize `targets` block by block with `config.method`, swapping each block's layers in place."""
    from . import quantize_layer

    prefix, blocks = find_blocks(model)
    windows = calibration_windows(config.dataset, lambda: _tokenizer_for(model),
                                  config.num_samples, config.seq_len, config.seed)
    outside = [n for n in targets if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(
            f"{outside[0]}: method {config.method!r} calibrates layers inside the decoder blocks only; "
            "keep it in float with modules_to_not_convert, or use method='rtn'."
        )
    start = time.perf_counter()
    inputs = capture_block_inputs(model, blocks[0], windows)
    bar = hf_logging.tqdm(range(len(blocks)), desc=f"hf_quant: {config.method}",
                          disable=not hf_logging.is_progress_bar_enabled())
    for idx in bar:
        block = blocks[idx]
        block_start = time.perf_counter()
        names = [n for n in targets if n.startswith(f"{prefix}.{idx}.")]
        in_features = {n: linear_shape(model.get_submodule(n))[0] for n in names}
        sums = {n: torch.zeros(k, k) for n, k in in_features.items()}
        rows = dict.fromkeys(names, 0)

        def make_hook(name: str):
            def hook(module, args, output):
                x = args[0].reshape(-1, args[0].shape[-1]).float().cpu()
                sums[name].addmm_(x.t(), x)
                rows[name] += x.shape[0]
            return hook

        handles = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
        try:
            for args, kwargs in inputs:
                block(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for n in names:
            H = 2 * sums.pop(n) / max(rows[n], 1)
            layer = quantize_layer(n, model.get_submodule(n), targets[n], config.method, H=H,
                                   block_size=config.block_size, damp_percent=config.damp_percent)
            set_module(model, n, layer)
        inputs = [((_first_output(block(*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
        logger.info("hf_quant: block %d: %d layers in %.1f s", idx, len(names), time.perf_counter() - block_start)
    logger.info("hf_quant: %s calibrated %d blocks in %.1f s", config.method, len(blocks), time.perf_counter() - start)
