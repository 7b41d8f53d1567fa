"""Checkpoint files: checks run before any weight is read (all-or-nothing writes live in `atomic.py`).

The checks read only the JSON headers: a truncated file, a pickle checkpoint, or a quantized module
whose tensors are missing or mis-shaped fails here with a message naming the file or module,
instead of surfacing later as randomly initialised layers.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from .atomic import WEIGHT_FILE_PATTERNS, atomic_directory, atomic_write_text  # noqa: F401  (moved to .atomic)

_ST_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "F16": torch.float16,
              "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _describe(path: str) -> str:
    """The file as errors name it: symlinks are reported as symlinks, with their target."""
    return f"{path} (a symlink to {os.path.realpath(path)})" if os.path.islink(path) else str(path)


def corrupt(path: str, what: str) -> ValueError:
    """The one error for a malformed checkpoint file."""
    return ValueError(f"corrupt checkpoint {_describe(path)}: {what}. Re-download or re-save it.")


MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


def read_safetensors_header(path: str) -> dict[str, dict]:
    """Tensor entries of a safetensors file's header, each checked for shape, dtype and offsets inside
    the file; any malformed structure raises `corrupt checkpoint <file>: <what>`."""
    if not os.path.isfile(path):
        raise corrupt(path, "not a regular file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise corrupt(path, f"truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size or n > MAX_HEADER_BYTES:
            raise corrupt(path, f"truncated safetensors file (header says {n} header bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise corrupt(path, f"the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt(path, f"the safetensors header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    end = 0
    for key, entry in header.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                    for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets) and offsets[0] <= offsets[1]
        if not ok:
            raise corrupt(path, f"header entry {key!r} is malformed (needs dtype, shape and two data_offsets)")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise corrupt(path, f"truncated safetensors file: tensors need {8 + n + end} bytes, the file has {size}")
    return header


def check_shard_paths(files: Iterable[str]) -> None:
    """Refuse shard paths that leave the checkpoint directory (an index naming `../other/x.safetensors`).
    Paths are compared as written, not resolved: a Hub cache's snapshot files are symlinks into its blobs."""
    files = [str(f) for f in files]
    if not files:
        return
    roots = {os.path.dirname(os.path.abspath(f)) for f in files if ".." not in Path(f).parts}
    for f in files:
        if ".." in Path(f).parts or os.path.dirname(os.path.abspath(os.path.normpath(f))) not in roots:
            raise ValueError(f"corrupt checkpoint {f}: the shard index points outside the checkpoint directory; "
                             "refusing to read it.")


def index_checkpoint(files: Iterable[str]) -> dict[str, dict]:
    """Merged header entries of all shards; refuses anything that is not safetensors."""
    entries: dict[str, dict] = {}
    files = list(files)
    check_shard_paths(files)
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise ValueError(
                f"{path}: hf_quant loads quantized checkpoints from safetensors only (it never unpickles). "
                "Re-save the model with save_pretrained(..., safe_serialization=True)."
            )
        entries.update(read_safetensors_header(str(path)))
    return entries


def _dtype_names(dtypes: tuple[torch.dtype, ...] | None) -> str:
    if dtypes is None:
        return "float"
    names = {v: k for k, v in _ST_DTYPES.items()}
    return "/".join(names.get(d, str(d)) for d in dtypes)


def check_module_tensors(
    entries: dict[str, dict],
    module_name: str,
    expected: dict[str, tuple[tuple[int, ...], torch.dtype | tuple[torch.dtype, ...] | None]],
    prefixes: Iterable[str] = ("",),
    *,
    optional: Iterable[str] = (),
    context: str = "this module's quantization settings",
) -> str:
    """Raise if `module_name`'s tensors are absent or mis-shaped in the checkpoint headers `entries`.

    expected: tensor name -> (shape, dtype), where dtype is one dtype, a tuple of accepted dtypes,
    or None for any float dtype. Tensors in `optional` may be absent. Returns the key prefix under
    which the module's tensors were found (one of `prefixes` + module_name).
    """
    candidates = [p + module_name for p in prefixes]
    first = next(iter(expected))
    key_prefix = next((c for c in candidates if f"{c}.{first}" in entries), candidates[0])
    for tensor_name, (shape, dtype) in expected.items():
        key = f"{key_prefix}.{tensor_name}"
        entry = entries.get(key)
        if entry is None:
            if tensor_name in optional:
                continue
            raise ValueError(
                f"{module_name}: the checkpoint has no '{tensor_name}' tensor ({key}) although its "
                "quantization_config quantizes this module. The checkpoint is incomplete or does not match "
                "its quantization_config; re-save it with the library that wrote it."
            )
        dtypes = None if dtype is None else dtype if isinstance(dtype, tuple) else (dtype,)
        got_shape = tuple(entry["shape"])
        got_dtype = _ST_DTYPES.get(entry["dtype"])
        dtype_ok = (got_dtype is not None and got_dtype.is_floating_point) if dtypes is None else got_dtype in dtypes
        if got_shape != shape or not dtype_ok:
            raise ValueError(
                f"{module_name}: checkpoint tensor '{tensor_name}' is {entry['dtype']}{list(got_shape)}, "
                f"expected {_dtype_names(dtypes)}{list(shape)} for {context}. "
                "The checkpoint does not match its quantization_config."
            )
    return key_prefix


def write_json(path: str | os.PathLike, data: dict) -> None:
    """config.json style: indented, sorted keys, trailing newline."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_transformers_checkpoint(model, out_dir: str | os.PathLike, state: dict, quantization_config: dict,
                                  tokenizer=None, max_shard_size: int | str = "5GB") -> Path:
    """Write `state` as a checkpoint transformers loads by itself: safetensors shards, the model's config with
    `quantization_config` (another library's, e.g. bitsandbytes' or transformers' BitNet), the generation config
    and the tokenizer, all or nothing (`atomic_directory`)."""
    from huggingface_hub import save_torch_state_dict

    config = model.config.to_diff_dict()
    config["quantization_config"] = quantization_config
    with atomic_directory(out_dir) as tmp:
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
        write_json(tmp / "config.json", config)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
