"""The block-wise calibration driver (DESIGN.md, step 3).

Capture the inputs of decoder block 0 once (hidden states and the keyword arguments the blocks
need: attention mask, position embeddings/ids, no cache). Then for each block, moved to the work
device (`calibration_device`): hook its target linears, run the cached inputs through it to
accumulate each layer's Hessian H = 2/N sum x x^T, quantize the layers, and recompute the block's
outputs with the quantized block, so that the next block calibrates on the errors it will really see.

Layers that read the same input tensor (q/k/v; gate/up) share one Hessian. With `true_sequential`
the groups are quantized in forward order, each calibrated on the outputs of the quantized groups
before it (one pass over the cached inputs per group).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
import tempfile
import time
import weakref
from typing import Any

import torch
import torch.nn as nn
from transformers.utils import logging as hf_logging

from ..config import LayerSpec, QuantConfig
from ..core import offload
from ..core.devices import cpu_flags, device_count, exists, peak_memory_mb, release_free_memory
from ..core.layers import is_conv1d, linear_shape, linear_weight, map_tensors, set_module
from ..methods import BlockContext, accumulate_hessian, get_method, hessian
from ..methods.base import restore
from ..runtime import multimodal
from ..runtime.experts import projection_of
from . import distributed as ddp
from .activations import SpilledInputs, Spiller, share_repeats
from .layer import quantize_layer
from .data import CalibrationSamples, calibration_windows, model_inputs

logger = logging.getLogger("hf_quant")

# The float block's outputs on this many calibration windows (the reference pass) are kept in fp32:
# they measure the quantized block's output error (the per-block summary), and block stages work
# against them (AWQ's scale search runs on these windows).
REFERENCE_WINDOWS = 16


class _StopForward(Exception):
    pass


def find_blocks(model: nn.Module, name: str | None = None) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: `name` if given, else optimum's GPTQ block patterns
    (`transformer.h`, `model.layers`, `model.decoder.layers`, ...), else the ModuleList holding the
    config's number of layers. In a multimodal model, only the language model's blocks are searched."""
    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    language_model = multimodal.language_model_name(model)
    scope = f"{language_model}." if language_model else ""
    if name is not None:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, nn.ModuleList):
            raise ValueError(
                f"QuantConfig.block_name_to_quantize={name!r} is not an nn.ModuleList of {type(model).__name__}; "
                f"candidates: {[n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]}."
            )
        return name, module
    try:  # a public function of optimum.gptq.utils (not re-exported by optimum.gptq, no underscore)
        from optimum.gptq.utils import get_block_name_with_pattern

        found = get_block_name_with_pattern(model)
        module = model.get_submodule(found)
        if isinstance(module, nn.ModuleList) and len(module) > 0 and found.startswith(scope):
            return found, module
    except Exception:  # optimum absent or no pattern fits this model: fall back to the config's depth
        pass
    for module_name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and module_name.startswith(scope):
            return module_name, module
    raise ValueError(
        f"{type(model).__name__}: found no nn.ModuleList of {n_layers} decoder blocks"
        f"{f' in its language model {language_model}' if language_model else ''} to calibrate block by block; "
        "name it with QuantConfig(block_name_to_quantize='...')."
    )


def outside_blocks_error(model: nn.Module, config: QuantConfig, layer: str, prefix: str) -> str:
    """The message refusing a calibration method's target outside the decoder blocks `prefix`."""
    hint = "keep it in float with modules_to_not_convert, or use method='rtn'"
    outside = [m for m in multimodal.non_text_modules(model) if layer.startswith(m + ".")]
    if outside:
        hint = (f"{outside[0]} is outside the language model, which the calibration text runs through; hf_quant "
                f"keeps it in float when modules_to_not_convert is None (an explicit list replaces those defaults): "
                f"add {outside[0]!r} to modules_to_not_convert, or quantize it with method='rtn'")
    return (f"{layer}: method {config.method!r} calibrates layers inside the decoder blocks ({prefix}) only; "
            f"{hint}.")


def _first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _to(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor inside (tuples, lists, dicts) moved to `device`."""
    return map_tensors(obj, lambda t: t.to(device))


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, windows: torch.Tensor | CalibrationSamples,
                         dtype: torch.dtype | None = None, spiller: Spiller | None = None
                         ) -> list[tuple[tuple, dict]] | SpilledInputs:
    """(args, kwargs) with which `block` is called for each calibration window; their floating tensors in
    `dtype` if given (the calibration compute dtype). Arguments equal from window to window are shared. With a
    `spiller` that decides so (QuantConfig.spill_activations), the hidden states go to a file as they come."""
    captured: list[tuple[tuple, dict]] = []
    state: dict[str, Any] = {"store": None, "previous": None}  # previous: None until the first window

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        if not args:  # hidden states passed by keyword: make them the first positional argument
            if "hidden_states" not in kwargs:
                raise ValueError(f"{type(block).__name__} is called without positional arguments or "
                                 "'hidden_states'; hf_quant cannot tell which input to calibrate on.")
            args = (kwargs.pop("hidden_states"),)
        if dtype is not None:
            args, kwargs = map_tensors((args, kwargs), lambda t: t.to(dtype) if t.is_floating_point() else t)
        if state["previous"] is None and spiller is not None:  # the first window decides where they all go
            state["store"] = spiller.store(args[0])
        rest = share_repeats(state["previous"], (tuple(args[1:]), kwargs))
        state["previous"] = rest
        if state["store"] is not None:
            state["store"].rest.append(rest)
            state["store"].append_hidden(args[0])
        else:
            captured.append(((args[0],) + rest[0], rest[1]))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = offload.execution_device(model.get_input_embeddings())
    model_dtype = getattr(model, "dtype", None)
    try:
        for window in windows:  # token windows, or whole multimodal samples (`data.CalibrationSamples`)
            try:
                model(**model_inputs(window, device, model_dtype), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return state["store"] if state["store"] is not None else captured


def tokenizer_for(model: nn.Module):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model.name_or_path)
    except Exception:  # no tokenizer next to the weights: token-id datasets still work
        return None


def work_device(config: QuantConfig, model_device: torch.device) -> torch.device:
    if config.calibration_device is not None:
        device = torch.device(config.calibration_device)
        if not exists(device):
            raise ValueError(
                f"QuantConfig.calibration_device={config.calibration_device!r} but this machine has "
                f"{device_count(device) or 'no'} {device.type.upper()} device(s); use "
                "calibration_device=None (picks a GPU when there is one) or 'cpu'."
            )
        return device
    return torch.device("cuda") if torch.cuda.is_available() else model_device


_NATIVE_MATMUL_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def compute_dtype(config: QuantConfig, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype blocks compute in while calibrated (`QuantConfig.calibration_dtype`): "auto" is float32 on an
    x86 CPU without native matrix instructions for the model's 16-bit dtype (where those matmuls run at about
    half the fp32 speed), else the model's dtype."""
    if config.calibration_dtype == "float32":
        return torch.float32
    if config.calibration_dtype == "model" or device.type != "cpu" or model_dtype not in _NATIVE_MATMUL_FLAGS:
        return model_dtype
    flags = cpu_flags()
    if "avx2" not in flags:  # not an x86 CPU we can read (or a very old one): keep the model's dtype
        return model_dtype
    return model_dtype if flags & set(_NATIVE_MATMUL_FLAGS[model_dtype]) else torch.float32


@contextlib.contextmanager
def block_at_work(block: nn.Module, device: torch.device, home: torch.device, dtype: torch.dtype):
    """`block` on the work device in the compute dtype for its calibration, then back home, each float
    parameter and buffer in the dtype it had (the quantized layers' own buffers, new, are left as made)."""
    # by tensor object, not by name: a float layer the stage replaced (and that a failure puts back) leaves the block
    # but must come back home in its own dtype too (it stayed in the compute dtype: a bf16 model calibrated in fp32
    # on an AVX2 CPU got fp32 layers back after a failed calibration)
    tensors = [(t, t.dtype) for t in (*block.parameters(), *block.buffers()) if t.is_floating_point()]
    block.to(device)
    if any(d != dtype for _, d in tensors):
        block.to(dtype)
    try:
        yield
    finally:
        block.to(home)
        with torch.no_grad():
            for t, d in tensors:
                if t.dtype != d or t.device != home:
                    t.data = t.data.to(home, d)


def iter_block(block: nn.Module, device: torch.device, inputs: list[tuple[tuple, dict]], prefix: str = "",
               overrides: dict[str, torch.Tensor] | None = None, keep_graph: bool = False):
    """The block's output (on `device`) for each cached input in turn, optionally with some layers'
    weights replaced by (out, in) tensors (full names under `prefix`), through
    `torch.func.functional_call`. The one way hf_quant runs a block on cached inputs."""
    params = {}
    for name, W in (overrides or {}).items():
        local = name[len(prefix):]
        module = block.get_submodule(local)
        params[f"{local}.weight"] = (W.t() if is_conv1d(module) else W).to(module.weight.dtype)
    for args, kwargs in inputs:
        args, kwargs = _to(args, device), _to(kwargs, device)
        y = _first_output(torch.func.functional_call(block, params, args, kwargs) if params else block(*args, **kwargs))
        yield y if keep_graph else y.detach()


def run_block(default: nn.Module, device: torch.device, prefix: str, inputs: list[tuple[tuple, dict]],
              block: nn.Module | None = None, overrides: dict[str, torch.Tensor] | None = None,
              keep_graph: bool = False) -> list[torch.Tensor]:
    """All outputs of `iter_block` (the `BlockContext.run` that block stages call)."""
    return list(iter_block(default if block is None else block, device, inputs, prefix, overrides, keep_graph))


def _pass(block: nn.Module, inputs: list[tuple[tuple, dict]], device: torch.device, keep: int = 0,
          collect: bool = True, into: SpilledInputs | None = None, heads: tuple[nn.Module, ...] = ()
          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run every input; return (outputs if `collect`, first `keep` outputs as float32 copies), both
    moved back to where the inputs are stored. `into`: the outputs are written there instead (spilled).

    heads: the layers whose hooks collect a statistics pass's data (nothing collected, `collect` False). A window
    past the first `keep` then stops as soon as each head has seen it: the rest of the block computes nothing
    those hooks read (for q/k/v, all but the block's first norm). Only where the first window showed each head
    called exactly once (a layer called twice, or never, as an unrouted expert, keeps every window whole), and
    not under accelerate's hooks (an interrupted forward would skip their offload step)."""
    outs, kept = [], []
    calls = dict.fromkeys(heads, 0)
    state = {"stop": False}

    def count(module, args, output):
        calls[module] += 1
        if state["stop"] and all(n == 1 for n in calls.values()):
            raise _StopForward

    handles = [h.register_forward_hook(count) for h in calls]  # after the statistics' own hooks: they run first
    stoppable = (bool(calls) and not collect and into is None
                 and not any(hasattr(m, "_hf_hook") for m in block.modules()))
    try:
        for i, item in enumerate(inputs):  # each input read once (a spilled one from its file)
            calls.update(dict.fromkeys(calls, 0))
            state["stop"] = stoppable and i >= max(keep, 1)
            try:
                y = next(iter_block(block, device, [item]))
            except _StopForward:
                continue
            if i == 0:
                stoppable = stoppable and all(n == 1 for n in calls.values())
            store = item[0][0].device
            if into is not None:
                into.append_hidden(y)
            elif collect:
                outs.append(y.to(store))
            if i < keep:
                kept.append(y.float().to(store))
    finally:
        for h in handles:
            h.remove()
    return outs, kept


@torch.no_grad()
def input_groups(block: nn.Module, prefix: str, names: list[str], inputs: list[tuple[tuple, dict]],
                 device: torch.device) -> list[list[str]]:
    """`names` grouped by the input tensor they read, in the order the forward pass reaches them.

    One calibration window is run with hooks; layers called on the same tensor (q/k/v, gate/up)
    form one group. Layers not reached by that window come last, one per group.
    """
    seen: dict[int, list[str]] = {}
    keep_alive: list[torch.Tensor] = []  # so that ids of inputs are not reused during the pass

    def make_hook(name):
        def hook(module, args, output):
            if any(name in g for g in seen.values()):
                return
            keep_alive.append(args[0])
            seen.setdefault(id(args[0]), []).append(name)
        return hook

    handles = [block.get_submodule(n[len(prefix):]).register_forward_hook(make_hook(n)) for n in names]
    try:
        _pass(block, inputs[:1], device, collect=False)
    finally:
        for h in handles:
            h.remove()
    groups = list(seen.values())
    reached = {n for g in groups for n in g}
    return groups + [[n] for n in names if n not in reached]


@torch.no_grad()
def quantize_blockwise(model: nn.Module, config: QuantConfig, targets: dict[str, LayerSpec]) -> list[dict]:
    """Quantize `targets` block by block with `config.method`, swapping each block's layers in place.

    Returns the per-block summary (also logged at info level): layers, calibration groups, relative
    output error of the quantized block against the float block on the same inputs, each layer's
    relative reconstruction error on its calibration inputs, seconds.
    """
    method = get_method(config.method)
    options = method.options_from(config)
    if not method.calibrates(options):  # e.g. w8a8 without smoothing: data-free with these options
        return _quantize_data_free(model, config, targets, options)
    _check_dataset(config, options)
    prefix, blocks = find_blocks(model, config.block_name_to_quantize)
    outside = [n for n in targets if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(outside_blocks_error(model, config, outside[0], prefix))
    check_data_parallel(config)
    windows = ddp.my_windows(calibration_windows(config.dataset, lambda: tokenizer_for(model), config.num_samples,
                                                 config.seq_len, config.seed, model.get_input_embeddings().num_embeddings))
    device = work_device(config, offload.execution_device(blocks[0]))
    model_dtype = next((p.dtype for p in blocks[0].parameters() if p.is_floating_point()), torch.float32)
    compute = compute_dtype(config, model_dtype, device)
    if compute != model_dtype:
        logger.info("hf_quant: calibrating in %s (the model is %s; %s)", compute, model_dtype,
                    "QuantConfig.calibration_dtype" if config.calibration_dtype != "auto" else
                    f"this CPU has no native {model_dtype} matrix instructions")
    start = time.perf_counter()
    spiller = Spiller(config, len(windows))  # lives as long as the run: its temporary directory, if any
    inputs = capture_block_inputs(model, blocks[0], windows, compute, spiller)
    report = []
    undo: list[tuple[torch.Tensor, torch.Tensor]] = []  # float tensors a block stage changed in place
    onloaded: list = []  # offloaded tensors (accelerate's disk / CPU offload) loaded so far
    bar = hf_logging.tqdm(range(len(blocks)), desc=f"hf_quant: {config.method}",
                          disable=not hf_logging.is_progress_bar_enabled())
    try:
        for idx in bar:
            block = blocks[idx]
            block_start = time.perf_counter()
            home = offload.execution_device(block)
            records = offload.onload(block)  # an offloaded block: its float tensors from disk, this block only
            onloaded += records
            with block_at_work(block, device, home, compute):
                names, groups, error, layer_errors, inputs, notes = calibrate_block(
                    model, block, f"{prefix}.{idx}.", targets, config, options, inputs, device, home, undo,
                    last=idx == len(blocks) - 1, scale_dtype=model_dtype)
            if records:  # the float layers the quantized ones replaced go back to disk
                live = {id(m) for m in block.modules()}
                offload.offload_again([(m, h) for m, h in records if id(m) not in live])
                release_free_memory()
            seconds = time.perf_counter() - block_start
            report.append({"block": idx, "layers": len(names), "groups": len(groups), "output_error": error,
                           "layer_errors": layer_errors, "seconds": seconds, "notes": notes,
                           "peak_memory_mb": peak_memory_mb()})
            log_block(report[-1], len(blocks), f"{prefix}.{idx}.")
            for note in notes:
                logger.info("hf_quant:   %s", note)
    except BaseException:
        restore(undo)
        offload.offload_again([(m, h) for m, h in onloaded if not h.offload])  # offloaded again, as loaded
        raise
    logger.info("hf_quant: %s calibrated %d blocks on %s in %.1f s", config.method, len(blocks), device,
                time.perf_counter() - start)
    return report


def check_data_parallel(config: QuantConfig) -> None:
    """Several processes calibrate together methods without a block stage (their layers need nothing but the
    summed Hessians) and those whose stage sums over ranks what it compares or trains on (`data_parallel`: AWQ's
    scale search, OmniQuant's gradients); another stage (a method registered without that promise) would see
    each rank's own windows and disagree."""
    if not ddp.active():
        return
    stage = get_method(config.method).stage
    if stage is not None and not getattr(stage, "data_parallel", False):
        raise ValueError(f"QuantConfig.method={config.method!r} has a block stage ({stage.__name__}) that is not "
                         f"data-parallel (it does not set `data_parallel = True`); run it in one process (not under "
                         f"torchrun with {ddp.world()} processes).")
    per_step = getattr(config, "windows_per_step", None)
    if per_step is not None and per_step % ddp.world():
        logger.warning("hf_quant: QuantConfig.windows_per_step=%d is not a multiple of the %d processes: some of "
                       "them wait at each training step; set it to a multiple of %d for all to work (the result "
                       "is the same as in one process with the same windows_per_step).", per_step, ddp.world(),
                       ddp.world())


def _quantize_data_free(model: nn.Module, config: QuantConfig, targets: dict[str, LayerSpec], options: dict
                        ) -> list[dict]:
    """Every target from its weight alone (a method that needs no data with these options); the
    layers are swapped in once all are quantized."""
    start = time.perf_counter()
    new_layers = {name: quantize_layer(name, model.get_submodule(name), spec, config.method, **options)
                  for name, spec in targets.items()}
    for name, layer in new_layers.items():
        set_module(model, name, layer)
    logger.info("hf_quant: %s quantized %d layers in %.1f s (no calibration with these options)", config.method,
                len(targets), time.perf_counter() - start)
    return []


def _check_dataset(config: QuantConfig, options: dict) -> None:
    """Refuse an explicitly empty `dataset` (None is hf_quant's packaged text, i.e. data) before anything changes."""
    data = config.dataset
    empty = (isinstance(data, (list, tuple)) and len(data) == 0) or (hasattr(data, "column_names") and len(data) == 0)
    if empty:
        method = get_method(config.method)
        with_options = "".join(f", {k}={v!r}" for k, v in options.items())
        data_free = [k for k, v in options.items() if v is not None and not method.calibrates({**options, k: None})]
        raise ValueError(f"QuantConfig.dataset={data!r} holds no calibration data, but method={config.method!r}"
                         f"{with_options} calibrates on data. Pass texts, token-id tensors or a datasets.Dataset, "
                         "or dataset=None for hf_quant's packaged public-domain text"
                         + "".join(f", or {k}=None (no data needed)" for k in data_free) + ".")


def log_block(entry: dict, n_blocks: int, block_prefix: str) -> None:
    errors = entry["layer_errors"]
    worst = max(errors, key=errors.get, default="-")
    peak = entry.get("peak_memory_mb")
    logger.info("hf_quant: block %d/%d: %d layers in %d groups, output rel. error %.3e, worst layer %s %.3e, %.1f s, "
                "peak memory %s MiB", entry["block"] + 1, n_blocks, entry["layers"], entry["groups"],
                entry["output_error"], worst, errors.get(worst, 0.0), entry["seconds"],
                "?" if peak is None else f"{peak:.0f}")
    for name, err in errors.items():
        logger.debug("hf_quant:   %s%s rel. error %.3e", block_prefix, name, err)


def calibrate_block(model, block, block_prefix, targets, config, options, inputs, device, home, undo, last=False,
                    spill_dir=None, scale_dtype=None):
    """Quantize one block's targets (already on `device`); returns its names, groups, output error,
    the quantized block's outputs as the next block's inputs (None for the `last` block: not computed), and
    the block stage's notes. spill_dir: a directory where a large fp32 Hessian sum waits on disk while its
    layers are quantized (`_SpilledHessian`; the streaming path's bounded memory). scale_dtype: the dtype of the
    quantized layers' scales (the model's; None: each float layer's own)."""
    names = [n for n in targets if n.startswith(block_prefix)]
    groups = input_groups(block, block_prefix, names, inputs, device) if names else []
    passes = (sequential_passes(model, groups, torch.finfo(getattr(torch, config.hessian_dtype)).bits // 8)
              if config.true_sequential else [groups])
    n_ref = ddp.first_windows(REFERENCE_WINDOWS, len(inputs))  # this rank's share of the run's first windows
    float_out: list[torch.Tensor] | None = None
    layer_errors: dict[str, float] = {}
    stage_kwargs: dict[str, dict] = {}
    notes: list[str] = []
    method = get_method(config.method)
    if method.stage is not None and names:
        ctx = block_context(model, block, block_prefix, groups, targets, config, inputs, device, undo)
        float_out = ctx.reference  # the float block, before the stage changes it
        stage_kwargs = method.stage(ctx)
        notes = ctx.notes
    for pass_groups in passes:
        H, rows, handles = {}, {}, []
        for group in pass_groups:
            first = group[0]
            in_f = linear_shape(model.get_submodule(first))[0]
            H[first], rows[first] = torch.zeros(in_f, in_f, device=device, dtype=getattr(torch, config.hessian_dtype)), 0
            handles.append(model.get_submodule(first).register_forward_hook(_hessian_hook(H, rows, first)))
        try:
            _, kept = _pass(block, inputs, device, keep=n_ref if float_out is None else 0, collect=False,
                            heads=tuple(model.get_submodule(first) for first in H))
        finally:
            for h in handles:
                h.remove()
        for first in H:  # data-parallel: the sums over every rank's windows (fp64), as one process has them
            ddp.all_reduce_sum(H[first])
            rows[first] = int(ddp.all_reduce_scalars(rows[first])[0])
        float_out = kept if float_out is None else float_out
        todo = [n for group in pass_groups for n in group]
        owners = {n: ddp.owner(i) for i, n in enumerate(todo)}  # layers spread over the ranks
        for group in pass_groups:  # a group at a time: its Hessian and float layers go before the next one's work
            first = group[0]
            Hsum = _SpilledHessian.maybe(H.pop(first), spill_dir)
            originals = {n: model.get_submodule(n) for n in group}
            new = {n: _quantize_with_hessian(n, originals[n], targets[n], config,
                                             {**options, **stage_kwargs.get(n, {})}, Hsum, rows[first], scale_dtype)
                   for n in group if owners[n] == ddp.rank()}
            new = ddp.broadcast_layers(new, {n: owners[n] for n in group})
            for n in group:
                layer_errors[n.removeprefix(block_prefix)] = _weighted_error(originals[n], new[n], Hsum)
                set_module(model, n, new[n])
                originals[n].to(home)  # off the work device
            del originals, new, Hsum
            release_free_memory()
    # the quantized block's outputs: the next block's inputs (the last block's serve only its error report)
    into = inputs.follow() if isinstance(inputs, SpilledInputs) and not last else None  # spilled: straight to disk
    outs, kept = _pass(block, inputs[:n_ref] if last else inputs, device, keep=n_ref,
                       collect=not last, into=into)
    error = _relative_error(kept, float_out) if names else 0.0
    if last:
        next_inputs = None
    elif into is not None:
        next_inputs = into
    else:
        next_inputs = [((y,) + tuple(args[1:]), kwargs) for y, (args, kwargs) in zip(outs, inputs)]
    return names, groups, error, layer_errors, next_inputs, notes


EXPERT_PASS_BYTES = 2 << 30  # the Hessian sums one statistics pass over an MoE layer's experts may hold


def sequential_passes(model: nn.Module, groups: list[list[str]], hessian_bytes: int = 4
                      ) -> list[list[list[str]]]:
    """One statistics pass per group, in forward order, except that the experts of an MoE layer share passes per
    projection (`runtime.experts`): expert e's gate_up_proj reads what no other expert's layer computes, so all
    experts' gate_up_proj are quantized on the same passes, then all their down_proj (a pass per expert and
    projection would cost a forward of the block each). A pass holds at most EXPERT_PASS_BYTES of Hessian sums
    (`hessian_bytes` per element; at least one expert): DeepSeek-V3's 256 experts of width 7168 would need 52 GB."""
    passes: list[list[list[str]]] = []
    at: dict[tuple[str, str], tuple[int, int]] = {}  # (experts module, projection) -> (its open pass, bytes held)
    for group in groups:
        key = projection_of(model, group[0])
        if key is None:
            passes.append([group])
            continue
        size = hessian_bytes * linear_shape(model.get_submodule(group[0]))[0] ** 2
        if key in at and at[key][1] + size <= EXPERT_PASS_BYTES:
            passes[at[key][0]].append(group)
            at[key] = (at[key][0], at[key][1] + size)
        else:
            at[key] = (len(passes), size)
            passes.append([group])
    return passes


def block_context(model: nn.Module, block: nn.Module, block_prefix: str, groups: list[list[str]],
                  targets: dict[str, LayerSpec], config: QuantConfig, inputs: list[tuple[tuple, dict]],
                  device: torch.device, undo: list | None = None) -> BlockContext:
    """What `config.method`'s block stage works on: the float block's reference pass (outputs on the run's
    first REFERENCE_WINDOWS windows, this rank's of them, with the method's observers on each group) and a
    block runner."""
    n_ref = ddp.first_windows(REFERENCE_WINDOWS, len(inputs))
    float_out, observed = _reference_pass(model, block, inputs[:n_ref], device, groups, get_method(config.method).observe)
    return BlockContext(model, block, block_prefix, groups, targets, config, inputs, device,
                        run=functools.partial(run_block, block, device, block_prefix), reference=float_out,
                        observed=observed, undo=[] if undo is None else undo, mean=_mean, rank=ddp.rank(),
                        world=ddp.world(), all_reduce=ddp.all_reduce_sum)


def _mean(t: torch.Tensor) -> float:
    """BlockContext.mean: over every rank's elements (the sum added in fp64) when data-parallel."""
    if not ddp.active():
        return t.mean().item()
    total, count = ddp.all_reduce_scalars(t.double().sum().item(), t.numel())
    return total / max(count, 1)


def _reference_pass(model, block, windows, device, groups, observe):
    """The float block's fp32 outputs on `windows`, with `observe(values, head, x, n_windows)` called on the
    input of each group's first layer (n_windows: the windows of every rank; what they observe is summed over
    ranks)."""
    n_windows = int(ddp.all_reduce_scalars(len(windows))[0])
    observed: dict = {}
    hooks = []
    if observe is not None:
        for group in groups:
            def hook(m, args, out, head=group[0]):
                observe(observed, head, args[0], n_windows)
            hooks.append(model.get_submodule(group[0]).register_forward_hook(hook))
    try:
        _, kept = _pass(block, windows, device, keep=len(windows), collect=False)
    finally:
        for h in hooks:
            h.remove()
    if observe is not None and ddp.active():
        _sum_observed(model, groups, observed, device)
    return kept, observed


def _sum_observed(model: nn.Module, groups: list[list[str]], observed: dict, device: torch.device) -> None:
    """Each group's observed tensor summed over ranks (in fp64); a group no rank's window reached stays absent."""
    heads = [g[0] for g in groups]
    reached = ddp.all_reduce_scalars(*[float(h in observed) for h in heads])
    for head, count in zip(heads, reached):
        if not count:
            continue
        if head not in observed:  # reached on other ranks only: this rank adds zeros
            observed[head] = torch.zeros(linear_shape(model.get_submodule(head))[0], device=device)
        ddp.all_reduce_sum(observed[head])


def _hessian_hook(H: dict, rows: dict, name: str):
    def hook(module, args, output):
        rows[name] += accumulate_hessian(H[name], args[0])
    return hook


class _SpilledHessian:
    """A layer group's fp32 Hessian sum kept in a file while its layers are quantized: each use reads it back
    (`get`: a fresh tensor, released after that use), so GPTQ's own copy of the Hessian never sits beside it
    (for an 11008-wide layer, 485 MB less at the peak). Bit-identical to keeping it in memory."""

    MIN_BYTES = 32 << 20

    def __init__(self, Hsum: torch.Tensor, directory) -> None:
        fd, path = tempfile.mkstemp(suffix=".hessian", dir=directory)
        os.close(fd)
        self.path, self.shape, self.dtype = path, tuple(Hsum.shape), Hsum.dtype
        Hsum.numpy().tofile(path)
        weakref.finalize(self, os.unlink, path)  # removed once the last use is done

    @classmethod
    def maybe(cls, Hsum: torch.Tensor, directory) -> Any:
        """Hsum spilled into `directory` where that lowers the peak (a big fp32 sum on the CPU), else Hsum."""
        if (directory is None or Hsum.device.type != "cpu" or Hsum.dtype != torch.float32
                or Hsum.numel() * Hsum.element_size() < cls.MIN_BYTES):
            return Hsum
        return cls(Hsum, directory)

    def get(self) -> torch.Tensor:
        return torch.from_file(self.path, shared=False, size=math.prod(self.shape), dtype=self.dtype).view(self.shape)


def _hessian_sum(Hsum) -> torch.Tensor:
    return Hsum.get() if isinstance(Hsum, _SpilledHessian) else Hsum


def _quantize_with_hessian(name, module, spec, config, options, Hsum, rows, scale_dtype=None):
    if rows == 0:  # never reached by the calibration data (e.g. an unrouted expert)
        method = get_method(config.method)
        if method.fixed_spec is not None:  # its own grid and scheme (int8 rows): the weight alone suffices
            return quantize_layer(name, module, spec, config.method, scale_dtype=scale_dtype, **options)
        logger.warning("hf_quant: %s received no calibration inputs; quantizing it with RTN instead of %s.",
                       name, config.method)
        return quantize_layer(name, module, spec, "rtn", scale_dtype=scale_dtype, **get_method("rtn").options_from(config))
    if _takes_inplace(config.method):  # the Hessian copy (and W's float copy) are this call's own: no clones
        options = {**options, "inplace": True}
    spilled = isinstance(Hsum, _SpilledHessian)  # read back: a fresh copy, scaled in its own storage
    H = hessian(_hessian_sum(Hsum), rows, inplace=spilled)
    return quantize_layer(name, module, spec, config.method, H=H, scale_dtype=scale_dtype, **options)


def _takes_inplace(method: str) -> bool:
    return "inplace" in inspect.signature(get_method(method).quantize).parameters


ERROR_TILE = 512  # rows of W per step of `_weighted_error`
ERROR_ROWS = 1024  # at most about this many output rows enter `_weighted_error` (evenly spaced)


def _weighted_error(original: nn.Module, layer: nn.Module, Hsum: torch.Tensor) -> float:
    """The layer's relative reconstruction error on its calibration inputs, from their Hessian:
    ||(W - W_hat) X||^2 / ||W X||^2 = tr(dW H dW^T) / tr(W H W^T). It costs rows x in_features^2, as much as
    GPTQ itself, so a layer of more than ERROR_ROWS output rows is measured on every k-th row (an estimate
    of the same ratio, for the report)."""
    Hsum = _hessian_sum(Hsum).to(torch.float32)
    W = linear_weight(original).detach()
    step = -(-W.shape[0] // ERROR_ROWS)
    W = W[::step]
    W_hat = layer.dequantize()[::step]
    num = den = 0.0
    for i in range(0, W.shape[0], ERROR_TILE):  # tiles of rows: fp32 temporaries of ERROR_TILE x in_features
        w = W[i:i + ERROR_TILE].to(Hsum.device, torch.float32)
        dw = w - W_hat[i:i + ERROR_TILE].to(Hsum.device, torch.float32)
        den += ((w @ Hsum) * w).sum().item()
        num += ((dw @ Hsum) * dw).sum().item()
    return num / den if den > 0 else 0.0


def _relative_error(quantized: list[torch.Tensor], reference: list[torch.Tensor] | None) -> float:
    """||Y_q - Y||^2 / ||Y||^2 over the kept windows (of every rank)."""
    num = sum(((q - r) ** 2).sum().item() for q, r in zip(quantized, reference or []))
    den = sum((r**2).sum().item() for r in reference or [])
    num, den = ddp.all_reduce_scalars(num, den)
    return num / max(den, 1e-30) if den else 0.0
