"""Streaming calibration: quantize a checkpoint larger than memory, block by block from disk to disk,
and resume after a crash (`quantize_checkpoint`; `hf-quant quantize` uses it).

Only what the current step needs is in memory:

1. The model is built from its config on the meta device (accelerate's `init_empty_weights`). Every tensor
   of the source is reached through accelerate's `OffloadedWeightsLoader` over the safetensors shards
   (safetensors' `safe_open`): a tensor is read from disk when it is used, never the whole model.
2. The tensors outside the decoder blocks (embeddings, ...) are loaded, block 0's inputs on the
   calibration windows captured, and those tensors released.
3. Block i's float tensors are loaded; the block is calibrated by the same code as the in-memory path
   (`calibration.blockwise.calibrate_block`, or `quantize_layer` for data-free methods); its tensors
   (the quantized layers and the block's float ones) go to `<dst>.partial/block-NNNNN.safetensors`, the
   next block's inputs to `inputs-NNNNN.pt`, and `progress.json` records the finished block; then the
   block goes back to the meta device.
4. At the end the model is a skeleton whose tensors are disk-offloaded (an accelerate `AlignDevicesHook`
   whose weights map reads the block files and the source shards), and transformers' own
   `save_pretrained` writes it, reloading offloaded tensors one output shard at a time (`max_shard_size`
   bounds that), through hf_quant's atomic save (temporary directory, model card, tokenizer, one
   rename into `dst`). `<dst>.partial` is then removed: a finished run leaves no progress behind.

Resume: re-running the same call after a crash or kill continues after the last finished block. The
progress is keyed by a hash of the source (config.json's bytes, each shard's name, size and mtime),
the QuantConfig, the model dtype, the calibration windows and the hf_quant version; a different key
refuses to resume and names what changed. Blocks are deterministic given their inputs, so a resumed
run writes the same bytes as an uninterrupted one (and as the in-memory `from_pretrained` +
`save_pretrained`, tested on tiny-llama and ref-llama).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers.utils import logging as hf_logging

from .calibration import distributed as ddp
from .calibration.blockwise import (block_at_work, calibrate_block, capture_block_inputs, check_data_parallel,
                                    compute_dtype, find_blocks, log_block, outside_blocks_error, tokenizer_for,
                                    work_device)
from .calibration.activations import SpilledInputs, Spiller
from .calibration.data import calibration_windows, describe_dataset, fingerprint as data_fingerprint
from .calibration.layer import quantize_layer
from .config import QuantConfig
from .compat import checkpoint_converters, checkpoint_key_renamer, recompute_non_persistent_buffers
from .core.devices import peak_memory_mb, release_free_memory
from .core.layers import set_module
from .runtime import experts, multimodal
from .integrations import hub
from .integrations.transformers import HfQuantQuantizer, provenance
from .io.atomic import atomic_write_text
from .io.checkpoint import corrupt, read_safetensors_header
from .methods import get_method
from .runtime import QuantLinear
from .runtime.convert import prepare_experts, replace_with_empty_quant_linears, warn_float_expert_weights
from .version import __version__

logger = logging.getLogger("hf_quant")

PARTIAL_SUFFIX = ".partial"
PROGRESS = "progress.json"
PROGRESS_FORMAT = 1
DEFAULT_MAX_SHARD_SIZE = "1GB"  # each output shard is held in memory (twice, by safetensors) while written


class SourceNotFound(OSError):
    """The source is neither a local checkpoint directory nor a Hub repo that could be fetched."""


class NoSpace(OSError):
    """The output's file system is full."""


class NoSafetensors(ValueError):
    """The source checkpoint has no safetensors weights to stream from."""


# ---------------------------------------------------------------- the source checkpoint

def _resolve_source(src: str | os.PathLike) -> Path:
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists() or os.path.isabs(os.fspath(src)) or os.fspath(src).startswith("."):
        raise ValueError(f"quantize_checkpoint: source {os.fspath(src)!r} is not a directory holding a checkpoint.")
    from huggingface_hub import snapshot_download  # a Hub repo id: its json, safetensors and tokenizer files

    try:
        return Path(snapshot_download(os.fspath(src), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                                       "*.jinja"]))
    except Exception as e:  # noqa: BLE001 (no such repo, no access, offline: one error naming the source)
        raise SourceNotFound(f"{os.fspath(src)} is not a local folder and could not be fetched from the Hub "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def source_tensors(src: Path) -> dict[str, tuple[Path, dict]]:
    """Tensor name -> (shard file, its safetensors header entry), every header checked; a shard that the
    index lists but that is missing or does not hold its tensors raises a ValueError naming it."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise corrupt(str(index), f"not a safetensors index ({e})") from None
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        missing = [s for s in sorted(by_shard) if not (src / s).is_file()]
        if missing:
            raise ValueError(f"{src}: shard {missing[0]} listed in model.safetensors.index.json is missing "
                             f"({len(missing)} of {len(by_shard)} shards missing); download the whole checkpoint again.")
    elif (src / "model.safetensors").is_file():
        by_shard = {"model.safetensors": None}  # every tensor of the one file
    else:
        raise NoSafetensors(f"{src}: no model.safetensors or model.safetensors.index.json. Streaming calibration reads "
                         "safetensors checkpoints; convert this one (from_pretrained + save_pretrained) or quantize it "
                         "in memory (from_pretrained(..., quantization_config=...)).")
    found: dict[str, tuple[Path, dict]] = {}
    for shard, names in by_shard.items():
        header = read_safetensors_header(str(src / shard))
        for name in header if names is None else names:
            if name not in header:
                raise corrupt(str(src / shard), f"model.safetensors.index.json places {name!r} here but the file does "
                              "not hold it")
            found[name] = (src / shard, header[name])
    return found


def _fingerprint(src: Path, tensors: dict[str, tuple[Path, dict]]) -> dict[str, Any]:
    """What identifies the source: config.json's hash and each shard's name, size and mtime."""
    shards = {}
    for path in sorted({p for p, _ in tensors.values()}):
        st = path.stat()
        shards[path.name] = [st.st_size, st.st_mtime_ns]
    config = (src / "config.json").read_bytes() if (src / "config.json").is_file() else b""
    return {"config_sha256": hashlib.sha256(config).hexdigest(), "shards": shards}


def _check_unchanged(src: Path, tensors: dict[str, tuple[Path, dict]], before: dict[str, Any]) -> None:
    now = _fingerprint(src, tensors)
    if now != before:
        changed = [n for n in before["shards"] if before["shards"][n] != now["shards"].get(n)]
        what = f"shard {changed[0]} (size or modification time)" if changed else "config.json"
        raise ValueError(f"{src}: the source checkpoint changed while it was being quantized ({what}); the output "
                         "would mix two versions. Let the source settle and run again (the progress is discarded).")


def _model_key(name: str, by_name: dict[str, str], prefix: str) -> str | None:
    """The checkpoint's key of the model tensor `name` (also without / with the base model prefix). by_name:
    the checkpoint's keys by the model name `from_pretrained` gives them (`_keys_by_name`)."""
    if name in by_name:
        return by_name[name]
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in by_name:
        return by_name[name[len(prefix) + 1:]]
    if prefix and f"{prefix}.{name}" in by_name:
        return by_name[f"{prefix}.{name}"]
    return None


def _keys_by_name(model: nn.Module, tensors: dict) -> dict[str, str]:
    """checkpoint key by the model's name for it, after transformers' renaming for this architecture (GPT-NeoX's
    `embed_out` loads as `lm_head`). Keys a converter merges (per-expert tensors stacked into one) are left out:
    no single key holds the model's tensor, so the blocks that need one are refused below."""
    rename = checkpoint_key_renamer(model)
    by_name = {k: k for k in tensors}
    for k in tensors:
        name, converted = rename(k)
        if converted:
            by_name.pop(k, None)
        elif name != k:
            by_name[name] = k
    return by_name


# ---------------------------------------------------------------- progress

class _Progress:
    """`<dst>.partial`: finished blocks' tensors, the next block's inputs (one file per rank), progress.json.
    Rank 0 writes the shared files; every rank writes its own inputs."""

    def __init__(self, directory: Path, key: dict[str, Any], resume: bool) -> None:
        self.dir, self.key = directory, key
        outcome: Any = None
        if ddp.is_main():
            try:
                outcome = self._open(resume)
            except ValueError as e:
                outcome = e
        outcome = ddp.broadcast_layers({"state": outcome}, {"state": 0})["state"]  # every rank: the same state
        if isinstance(outcome, Exception):
            raise outcome
        self.state = outcome

    def _open(self, resume: bool) -> dict[str, Any]:
        directory, key = self.dir, self.key
        state: dict[str, Any] = {"format": PROGRESS_FORMAT, "key": key, "next_block": 0, "report": []}
        path = directory / PROGRESS
        if directory.exists() and resume and path.is_file():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                old = None
            if not isinstance(old, dict) or old.get("format") != PROGRESS_FORMAT:
                raise ValueError(f"{directory}: unreadable progress file {PROGRESS}; delete {directory} to start over.")
            if old.get("key") != key:
                differs = [k for k in key if old.get("key", {}).get(k) != key[k]]
                raise ValueError(
                    f"{directory} holds the progress of a different run ({', '.join(differs) or 'its key'} differs: "
                    f"{_describe_key_field(differs[0] if differs else '')}). Re-run with the same source, QuantConfig, "
                    f"dtype and number of processes to resume, or delete {directory} (or pass resume=False / "
                    "--no-resume) to start over.")
            logger.info("hf_quant: resuming from %s after block %d", directory, old["next_block"])
            return old
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(state, indent=1, default=float))
        return state

    @property
    def next_block(self) -> int:
        return int(self.state["next_block"])

    def block_file(self, i: int) -> Path:
        return self.dir / f"block-{i:05d}.safetensors"

    def inputs_file(self, i: int) -> Path:
        return self.dir / (f"inputs-{i:05d}.pt" if ddp.world() == 1 else f"inputs-{i:05d}-rank{ddp.rank()}.pt")

    def finish_block(self, i: int, tensors: dict[str, torch.Tensor], entry: dict | None, inputs: Any) -> None:
        """Block i is done: its tensors (rank 0) and every rank's next inputs on disk, then progress.json says so."""
        if isinstance(inputs, SpilledInputs):  # already on disk: named for a resume, with its layout beside it
            inputs.persist(self.inputs_file(i + 1))
        elif inputs is not None:
            tmp = self.inputs_file(i + 1).with_suffix(".tmp")
            torch.save(inputs, tmp)
            os.replace(tmp, self.inputs_file(i + 1))
        if ddp.is_main():
            _save_tensors(tensors, self.block_file(i))
        ddp.barrier()
        self.state["next_block"] = i + 1
        if entry is not None:
            self.state["report"].append(entry)
        if ddp.is_main():
            self.save()
        ddp.barrier()
        self.inputs_file(i).unlink(missing_ok=True)
        self.inputs_file(i).with_suffix(".activations").unlink(missing_ok=True)

    def load_inputs(self, i: int) -> Any:
        path = self.inputs_file(i)
        if not path.is_file():
            raise ValueError(f"{self.dir}: the inputs of block {i} ({path.name}) are missing; delete {self.dir} to "
                             "start over.")
        saved = torch.load(path, weights_only=True)
        return SpilledInputs.reopen(path, saved) if isinstance(saved, dict) and "spilled" in saved else saved

    def save(self) -> None:
        atomic_write_text(self.dir / PROGRESS, json.dumps(self.state, indent=1, default=float))


def _describe_key_field(field: str) -> str:
    return {"source": "the source checkpoint's files or config.json", "config": "the QuantConfig",
            "dtype": "the model dtype", "data": "the calibration windows", "hf_quant": "the hf_quant version", "processes": "the number of processes",
            "compute": "the calibration compute dtype (QuantConfig.calibration_dtype, or this CPU's native bf16 support)"
            }.get(field, "the run's identity")


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- tensors on and off the meta device

def _materialize(model: nn.Module, names: list[str], loader: Any, keys: dict[str, str]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        current = model.get_parameter(name) if name in dict(model.named_parameters()) else None
        dtype = current.dtype if current is not None else None
        set_module_tensor_to_device(model, name, "cpu", value=loader[keys[name]], dtype=dtype)


def _fused_sources(model: nn.Module, by_name: dict[str, str], prefix: str, tensors: dict
                   ) -> dict[str, dict[str, Any]]:
    """For each unfused MoE experts module of the skeleton (`runtime.experts`): {full name of a fused 3-D tensor:
    where it comes from}: a checkpoint key, read(loader) -> tensor for a converter of several keys
    (`compat.checkpoint_converters`: Mixtral's per-expert `w1` / `w3` make `gate_up_proj`), or None where the
    checkpoint has neither. Names with or without the base model prefix, as `_model_key` finds keys."""
    modules = experts.unfused_experts(model)
    if not modules:
        return {}
    converters = checkpoint_converters(model, tensors)

    def converted(full: str):
        for name in (full, full.removeprefix(prefix + ".") if prefix else full, f"{prefix}.{full}"):
            if name in converters:  # the converter names its output as it names the group
                return lambda loader, build=converters[name], name=name: build(lambda k: loader[k])[name]
        return None

    out = {}
    for name, module in modules.items():
        out[name] = {}
        for full in experts.fused_names(name, module).values():
            key = _model_key(full, by_name, prefix)
            out[name][full] = key if key is not None else converted(full)
    return out


def _fill_experts(model: nn.Module, fused: dict[str, dict[str, Any]], loader: Any) -> None:
    """Fill these unfused experts modules from their fused tensors (`_fused_sources`), one tensor at a time."""
    for name, sources in fused.items():
        module = model.get_submodule(name)
        for full, source in sources.items():
            value = loader[source] if isinstance(source, str) else source(loader)
            experts.load_fused(module, full.rpartition(".")[2], value, name)


def _release(module: nn.Module) -> None:
    """Every parameter and buffer of `module` back to the meta device (shapes and dtypes kept)."""
    module.to("meta")


@contextlib.contextmanager
def _writing(where: Path, what: str):
    """A full disk while writing `what` under `where` becomes one clear error (the progress so far is kept)."""
    try:
        yield
    except Exception as e:  # OSError, or safetensors' SafetensorError carrying the OS error in its text
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or any(
            t in str(e) for t in ("No space left on device", "os error 28", "Disk quota exceeded"))
        if not full or isinstance(e, NoSpace):
            raise
        free = shutil.disk_usage(where if where.exists() else where.parent).free
        raise NoSpace(errno.ENOSPC, f"{where}: no space left while writing {what} ({free / 2**20:.0f} MiB free). Free space "
                      "or choose an output on a larger disk; the finished blocks are kept in the .partial directory "
                      "and the same command resumes after them.") from None


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _resolve_dtype(dtype: Any, hf_config: Any, tensors: dict[str, tuple[Path, dict]]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"quantize_checkpoint: dtype={dtype!r} is not a floating torch dtype; use 'auto', "
                             "'bfloat16', 'float16' or 'float32'.")
        return resolved
    named = getattr(hf_config, "dtype", None)
    if isinstance(named, torch.dtype):
        return named
    if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
        return getattr(torch, named)
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for _, entry in tensors.values():
        if entry.get("dtype") in names:
            return names[entry["dtype"]]
    return torch.float32


# ---------------------------------------------------------------- the driver

@torch.no_grad()
def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, config: QuantConfig, *, dtype: Any = "auto",
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, tokenizer: Any = True,
                        resume: bool = True, repo_id: str | None = None) -> Path:
    """Quantize the checkpoint `src` (a local directory or a Hub repo id, safetensors) into the hf_quant
    checkpoint `dst`, streaming block by block: memory holds one block's float weights, the cached
    activations and one output shard, never the whole model. Same files as
    `from_pretrained(src, quantization_config=config).save_pretrained(dst, max_shard_size=...)`.

    dtype: the model dtype ("auto": the config's, as `from_pretrained` picks it). tokenizer: True saves
    the source's tokenizer beside the weights (if it has one), a tokenizer object saves that one, None
    none. resume: continue a run that stopped (crash, kill) from `<dst>.partial`; False starts over.
    repo_id: the Hub repo the model card names (default: `dst`'s own name).
    Returns `dst`.
    """
    from accelerate import init_empty_weights
    from accelerate.hooks import AlignDevicesHook
    from accelerate.utils import OffloadedWeightsLoader
    from transformers import AutoConfig, AutoTokenizer

    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize_checkpoint: config must be an hf_quant.QuantConfig, got {type(config).__name__}")
    config = copy.copy(config)  # the caller's object is not changed (fields are reassigned, not mutated)
    dst = Path(dst)
    src_dir = _resolve_source(src)
    if dst.resolve() == src_dir.resolve():
        raise ValueError(f"quantize_checkpoint: the output {dst} is the source; write to another directory.")
    tensors = source_tensors(src_dir)
    fingerprint = _fingerprint(src_dir, tensors)
    hf_config = AutoConfig.from_pretrained(src_dir)
    hf_config._name_or_path = os.fspath(src)  # what from_pretrained(src) records (provenance, tokenizer)
    model_dtype = _resolve_dtype(dtype, hf_config, tensors)
    with init_empty_weights():
        model = multimodal.auto_class(hf_config).from_config(hf_config, dtype=model_dtype)
    recompute_non_persistent_buffers(model)  # as from_pretrained does: outside the dtype's default-dtype context
    model.eval()
    _load_generation_config(model, src_dir)
    quantizer = HfQuantQuantizer(config, pre_quantized=False)
    quantizer.preprocess_model(model=model, dtype=model_dtype, device_map=None)
    model.hf_quantizer = quantizer
    model.config.quantization_config = config  # as from_pretrained(src, quantization_config=config) records it
    # MoE experts: per-expert layers on the skeleton, filled from the fused tensors block by block (`_fill_experts`)
    targets = quantizer.targets = prepare_experts(model, config, quantizer._skip, mode="stream")
    warn_float_expert_weights(model, quantizer._skip)
    method = get_method(config.method)
    options = method.options_from(config)
    calibrates = bool(method.needs_calibration) and method.calibrates(options)
    prefix, blocks = find_blocks(model, config.block_name_to_quantize)
    outside = [n for n in targets if not n.startswith(prefix + ".")]
    if calibrates and outside:
        raise ValueError(outside_blocks_error(model, config, outside[0], prefix))
    base_prefix = getattr(model, "base_model_prefix", "")
    keys: dict[str, str] = {}
    by_name = _keys_by_name(model, tensors)
    for name in model.state_dict():
        key = _model_key(name, by_name, base_prefix)
        if key is not None:
            keys[name] = key
    fused = _fused_sources(model, by_name, base_prefix, tensors)
    loader = OffloadedWeightsLoader(index={k: {"safetensors_file": str(p), "weight_name": k}
                                           for k, (p, _) in tensors.items()})
    windows = None
    if calibrates:
        windows = calibration_windows(config.dataset, lambda: tokenizer_for(model), config.num_samples,
                                      config.seq_len, config.seed, model.get_input_embeddings().num_embeddings)
    key = {"source": _sha256_json(fingerprint), "config": _sha256_json({**config.to_dict(), "provenance": None,
                                                                               "hessian_dtype": config.hessian_dtype}),
           "dtype": str(model_dtype), "hf_quant": __version__, "processes": ddp.world(),
           "compute": str(compute_dtype(config, model_dtype, work_device(config, torch.device("cpu")))),
           "data": None if windows is None else data_fingerprint(windows)}
    if windows is not None:
        check_data_parallel(config)
        windows = ddp.my_windows(windows)  # data-parallel: this rank's share
    progress = _Progress(Path(str(dst) + PARTIAL_SUFFIX), key, resume)
    block_prefix = [f"{prefix}.{i}." for i in range(len(blocks))]
    state_names = list(model.state_dict())
    from_fused = {n for n in state_names if any(n.startswith(e + ".") for e in fused)}  # experts: `_fill_experts`
    in_block = [[n for n in state_names if n.startswith(bp) and n not in from_fused] for bp in block_prefix]
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [n for names in in_block for n in names if n not in keys]  # in the blocks, or outside (untied)
    missing += [f for sources in fused.values() for f, source in sources.items() if source is None]
    outside_missing = [n for n, _ in model.named_parameters() if not n.startswith(prefix + ".") and n not in keys
                       and n not in tied]
    if missing or outside_missing:
        where = f"({len(missing)} missing)" if missing else "outside its blocks"
        raise ValueError(f"{src_dir}: the checkpoint has no tensor {(missing or outside_missing)[0]!r} that "
                         f"{type(model).__name__} needs {where}; it is incomplete or was saved with other names. "
                         "Quantize it in memory (from_pretrained(..., quantization_config=...)), which applies "
                         "transformers' renaming.")
    outside_tensors = [n for n in state_names if not n.startswith(prefix + ".") and n in keys]
    device = work_device(config, torch.device("cpu"))
    compute = compute_dtype(config, model_dtype, device)
    start, n_blocks = progress.next_block, len(blocks)
    started = time.perf_counter()
    inputs = None
    if calibrates and start < n_blocks:
        if start == 0:
            _materialize(model, outside_tensors, loader, keys)
            model.tie_weights()
            inputs = capture_block_inputs(model, blocks[0], windows, compute,
                                          Spiller(config, len(windows), default_dir=progress.dir))
            _release_tensors(model, outside_tensors)
        else:
            inputs = progress.load_inputs(start)
    bar = hf_logging.tqdm(range(start, n_blocks), desc=f"hf_quant: {config.method} (streaming)",
                          initial=start, total=n_blocks, disable=not hf_logging.is_progress_bar_enabled())
    for i in bar:
        block, bp = blocks[i], block_prefix[i]
        t0 = time.perf_counter()
        _materialize(model, in_block[i], loader, keys)
        _fill_experts(model, {e: sources for e, sources in fused.items() if e.startswith(bp)}, loader)
        entry = None
        if calibrates:
            with block_at_work(block, device, torch.device("cpu"), compute):
                names, groups, error, layer_errors, inputs, notes = calibrate_block(
                    model, block, bp, targets, config, options, inputs, device, torch.device("cpu"), [],
                    last=i + 1 == n_blocks, spill_dir=progress.dir, scale_dtype=model_dtype)
            entry = {"block": i, "layers": len(names), "groups": len(groups), "output_error": error,
                     "layer_errors": layer_errors, "seconds": time.perf_counter() - t0, "notes": notes,
                     "peak_memory_mb": peak_memory_mb()}
        else:
            for name in [n for n in targets if n.startswith(bp)]:
                set_module(model, name, quantize_layer(name, model.get_submodule(name), targets[name], config.method,
                                                       **options))
        with _writing(progress.dir, f"block {i}"):
            progress.finish_block(i, {bp + k: v for k, v in block.state_dict().items()}, entry, inputs)
        _release(block)
        release_free_memory()
        _log_block(i, n_blocks, entry, time.perf_counter() - t0, bp)
    extra_file = progress.dir / "outside.safetensors"
    if outside and ddp.is_main() and not extra_file.is_file():  # data-free targets outside the blocks (e.g. lm_head)
        _materialize(model, [n for n in outside_tensors if any(n.startswith(t + ".") for t in outside)], loader, keys)
        for name in outside:
            set_module(model, name, quantize_layer(name, model.get_submodule(name), targets[name], config.method,
                                                   **options))
        _save_tensors({f"{t}.{k}": v for t in outside for k, v in model.get_submodule(t).state_dict().items()},
                      extra_file)
    if calibrates:
        logger.info("hf_quant: %s calibrated %d blocks (streaming) in %.1f s, peak memory %s MiB", config.method,
                    n_blocks - start, time.perf_counter() - started, _mb(peak_memory_mb()))
    if not ddp.is_main():  # one rank writes the checkpoint
        ddp.barrier()
        return dst
    _check_unchanged(src_dir, tensors, fingerprint)

    # the finished model: a meta skeleton, its tensors offloaded to the block files and the source shards
    _release(model)
    model.tie_weights()  # the meta copies share tensors again where the model ties them (saved once)
    remaining = {n: s for n, s in targets.items() if not isinstance(model.get_submodule(n), QuantLinear)}
    replace_with_empty_quant_linears(model, remaining, config)
    index: dict[str, dict] = {}
    for name in model.state_dict():
        if name.startswith(prefix + ".") or name.split(".weight")[0] in outside or any(
                name.startswith(t + ".") for t in outside):
            continue
        if name in keys:  # float tensors outside the blocks: from the source, in the model's dtype
            index[name] = {"safetensors_file": str(tensors[keys[name]][0]), "weight_name": keys[name],
                           "dtype": str(model.get_parameter(name).dtype if name in dict(model.named_parameters())
                                        else model_dtype).removeprefix("torch.")}
    files = [progress.block_file(i) for i in range(n_blocks)] + ([extra_file] if outside else [])
    for path in files:
        for name in read_safetensors_header(str(path)):
            index[name] = {"safetensors_file": str(path), "weight_name": name}
    # the hook accelerate's disk offload leaves on a module: what transformers reads offloaded tensors through
    # (every tensor is on meta already, so the hook is attached, not initialised)
    model._hf_hook = AlignDevicesHook(execution_device="cpu", offload=True, weights_map=OffloadedWeightsLoader(index=index),
                                      place_submodules=True, offload_buffers=True)
    model.hf_device_map = {"": "disk"}  # transformers' save_pretrained reloads offloaded tensors shard by shard
    quantizer.offloaded_state_dict = _save_order(model.state_dict())
    config.provenance = provenance(model, "none: data-free method" if not calibrates
                                   else describe_dataset(config.dataset, config.num_samples, config.seq_len))
    quantizer.calibration_report = list(progress.state["report"])
    hub.install(model)
    tok = tokenizer
    if tok is True:
        try:
            tok = AutoTokenizer.from_pretrained(src_dir)
        except (OSError, ValueError):
            tok = None
    _check_unchanged(src_dir, tensors, fingerprint)
    with warnings.catch_warnings():  # transformers warns that offloaded tensors are reloaded: that is the point
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        with _writing(dst.parent, "the quantized checkpoint"):
            model.save_pretrained(dst, max_shard_size=max_shard_size, tokenizer=tok,
                                  **({"repo_id": repo_id} if repo_id else {}))
    shutil.rmtree(progress.dir, ignore_errors=True)
    ddp.barrier()
    logger.info("hf_quant: wrote %s (peak memory %s MiB)", dst, _mb(peak_memory_mb()))
    return dst


def _release_tensors(model: nn.Module, names: list[str]) -> None:
    """These parameters / buffers of `model` back to the meta device (e.g. the embeddings once block 0's
    inputs are captured)."""
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        set_module_tensor_to_device(model, name, "meta")


def _load_generation_config(model: nn.Module, src: Path) -> None:
    """The generation config as from_pretrained gives it: generation_config.json, else one made from config.json."""
    from transformers import GenerationConfig

    if not model.can_generate():
        return
    try:
        model.generation_config = GenerationConfig.from_pretrained(src, _from_auto=True)
    except OSError:
        model.generation_config = GenerationConfig.from_pretrained(src, config_file_name="config.json",
                                                                   _from_auto=True, _from_model_config=True)


def _save_order(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict in the order save_pretrained writes a model loaded by from_pretrained (its weight-conversion
    revert sorts names naturally); that order decides which tensors share an output shard."""
    try:
        from transformers.core_model_loading import dot_natural_key
    except ImportError:  # a transformers without the conversion engine: module order, as it saves
        return state_dict
    return dict(sorted(state_dict.items(), key=lambda kv: dot_natural_key(kv[0])))


def _mb(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def _log_block(i: int, n: int, entry: dict | None, seconds: float, block_prefix: str) -> None:
    if entry is None:
        logger.info("hf_quant: block %d/%d quantized in %.1f s, peak memory %s MiB", i + 1, n, seconds,
                    _mb(peak_memory_mb()))
    else:
        log_block(entry, n, block_prefix)
