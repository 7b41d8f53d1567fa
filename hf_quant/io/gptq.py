"""GPTQ checkpoints: export an hf_quant model in the layout vLLM / TGI / GPTQModel load, and import one.

`export_gptq(model, dir)` writes an in-memory hf_quant model as a GPTQ checkpoint (safetensors,
config.json with a GPTQ `quantization_config`, quantize_config.json). `import_gptq(src, dir)` turns
a GPTQ checkpoint (a directory or a Hub repo) into an hf_quant one, which
`AutoModelForCausalLM.from_pretrained(dir)` then loads with hf_quant's kernels (after `import hf_quant`).
Both are lossless on the quantized layers: codes, scales, zeros and g_idx are carried over bit for
bit (tensor conversion in `gptq_codec`). Both write all-or-nothing (`atomic_directory`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from huggingface_hub import save_torch_state_dict

from .. import compat
from ..config import LayerSpec, QuantConfig
from ..core import QUANT_BUFFERS
from ..core.layers import FLOAT_LINEARS, linear_shape
from ..runtime import QuantLinear
from ..runtime.experts import refuse_unfused
from ..runtime import multimodal
from ..runtime.convert import find_targets, resolve_modules_to_not_convert
from .atomic import atomic_directory
from .checkpoint import check_module_tensors, index_checkpoint, write_json
from .gptq_codec import (GptqSettings, from_gptq, gptq_config_dict, gptq_shapes, hf_quant_config, is_natural_g_idx,
                         parse_gptq_config, to_gptq)

logger = logging.getLogger("hf_quant")

_GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
_GPTQ_DTYPES = {"qweight": (torch.int32,), "qzeros": (torch.int32,),
                "scales": (torch.float16, torch.bfloat16, torch.float32), "g_idx": (torch.int32, torch.int64)}
# Files copied from a GPTQ checkpoint besides the weights and config.json (README/quantize_config describe GPTQ).
_COPIED_FILES = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                 "merges.txt", "spiece.model", "*.tiktoken", "chat_template.*", "preprocessor_config.json")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def write_converted(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict,
                    src_dir: Path) -> Path:
    """Write a converted checkpoint atomically: the tensors, config.json, and the source's tokenizer
    and generation files (`_COPIED_FILES`)."""
    with atomic_directory(out_dir) as tmp:
        save_torch_state_dict(tensors, tmp)
        write_json(tmp / "config.json", config)
        for p in sorted(src_dir.iterdir()):
            if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in _COPIED_FILES):
                shutil.copyfile(p, tmp / p.name)
    return Path(out_dir)


def export_gptq(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype = torch.float16,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write an hf_quant model as a GPTQ checkpoint that vLLM, TGI, GPTQModel and transformers load.

    checkpoint_format: "gptq" (v1, stores zero - 1: what most engines read; refuses a zero point of 0,
    which only asymmetric grids have) or "gptq_v2" (stores the zero: GPTQModel / transformers).
    dtype: the dtype of scales and of every float tensor (float16: what GPTQ kernels expect).
    Per-module bits/group_size/sym that differ from the model's QuantConfig become GPTQModel
    `dynamic` rules naming the module exactly; float linears other than the output embeddings get
    "-:" rules, so engines that quantize every linear of a block skip them.
    """
    qc = _model_quant_config(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("export_gptq: the model has no QuantLinear layers; quantize it with hf_quant first.")
    refuse_unfused(model, "export_gptq", "a GPTQ engine (transformers + GPTQModel, vLLM, TGI)")
    for name, layer in layers.items():  # GPTQ is weight-only: a run-time activation scheme would be lost
        act = layer.scheme.activation
        if act is not None:
            params = ", ".join(f"{k}={v}" for k, v in act.params)
            raise ValueError(f"{name}: cannot export to GPTQ: this layer (method {qc.method!r}) quantizes its "
                             f"activations at run time (activation scheme {act.name!r}{f', {params}' if params else ''}"
                             "), which the GPTQ format cannot represent (its loaders run weight-only kernels). Export "
                             "it with export_bnb8 (bitsandbytes load_in_8bit) or save it in hf_quant's own format.")
        if layer.spec.bits == 1 or layer.in_scales is not None or layer.scheme.output_norm:
            raise ValueError(f"{name}: cannot export to GPTQ: a 1-bit layer (method {qc.method!r}: signs"
                             f"{', per-input-channel scales' if layer.in_scales is not None else ''}"
                             f"{', a LayerNorm on its product' if layer.scheme.output_norm else ''}), which the GPTQ "
                             "format (2, 3, 4 or 8 bits, x @ W^T) cannot represent. Save it in hf_quant's own format.")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = next((n for n, m in model.named_modules() if m is output), None)
    float_linears = [n for n, m in model.named_modules()
                     if isinstance(m, FLOAT_LINEARS) and not isinstance(m, QuantLinear) and m is not output]

    state = _state_dict_without_tied(model)
    for name, layer in layers.items():
        buffers = {b: state.pop(f"{name}.{b}", None) for b in QUANT_BUFFERS}
        gptq = to_gptq(buffers, layer.spec, layer.in_features, checkpoint_format=checkpoint_format, dtype=None,
                       name=name)  # scales are cast below with every float tensor
        state.update({f"{name}.{k}": t for k, t in gptq.items()})
    tensors = _cast_floats(state, dtype)

    from ..version import __version__

    gptq_config = gptq_config_dict(qc, {n: m.spec for n, m in layers.items()}, float_linears,
                                   lm_head=lm_head in layers, checkpoint_format=checkpoint_format,
                                   quantizer=f"hf_quant:{__version__}")
    config = model.config.to_diff_dict()
    config["quantization_config"] = gptq_config
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")  # the latter: transformers < 4.56
    with atomic_directory(out_dir) as tmp:
        save_torch_state_dict(tensors, tmp, max_shard_size=max_shard_size)
        write_json(tmp / "config.json", config)
        write_json(tmp / "quantize_config.json", gptq_config)  # GPTQModel / AutoGPTQ read this file
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def import_gptq(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """Convert a GPTQ checkpoint (local directory or Hub repo id) into an hf_quant checkpoint in `out_dir`.

    Reads safetensors only (never unpickles). The quantization_config is validated before any tensor
    is read. Every module with a `qweight` becomes a QuantLinear with the same codes, scales, zeros
    and (act-order) g_idx; every other tensor is copied unchanged. The written QuantConfig lists the
    float linears in `modules_to_not_convert` and per-module differences as exact-name `dynamic`
    rules, and is checked to select exactly the checkpoint's quantized modules.
    """
    src_dir = _resolve_source(src, revision, token)
    config = _read_json(src_dir / "config.json", f"{src}: no config.json; this is not a transformers checkpoint.")
    settings = parse_gptq_config(_source_gptq_config(src_dir, config, src))
    files = _weight_files(src_dir, src)
    entries = index_checkpoint(files)  # headers only: refuses truncated files

    skeleton = _skeleton(src_dir)
    linears = {n: m for n, m in skeleton.named_modules() if isinstance(m, FLOAT_LINEARS)}
    names = _quantized_modules(entries, linears, getattr(skeleton, "base_model_prefix", ""), settings, src)

    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    specs = _convert_modules(tensors, names, linears, settings)
    qc = hf_quant_config(settings, specs, [n for n in linears if n not in specs])
    _check_targets(skeleton, qc, specs)

    config["quantization_config"] = qc.to_dict()
    return write_converted(out_dir, tensors, config, src_dir)


# --- export helpers --------------------------------------------------------------------------------

def _model_quant_config(model: nn.Module) -> QuantConfig:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(qc, dict) and qc.get("quant_method") == "hf_quant":
        qc = QuantConfig.from_dict(qc)
    if not isinstance(qc, QuantConfig):
        raise ValueError("export_gptq: model.config.quantization_config is not an hf_quant QuantConfig; pass a model "
                         "quantized by hf_quant (or loaded from an hf_quant checkpoint).")
    return qc


def _state_dict_without_tied(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict on CPU, without the tied copies (e.g. lm_head.weight of a tied-embedding model):
    loaders re-tie them from config.json, as transformers' own save does."""
    state = model.state_dict()
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        t, s = state.get(target), state.get(source)
        if t is not None and s is not None and t.data_ptr() == s.data_ptr() and t.shape == s.shape:
            del state[target]
    return {k: v.detach().cpu() for k, v in state.items()}


def _cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float tensors cast to `dtype`; raises if a value overflows, warns if values round."""
    out, rounded = {}, []
    for key, t in state.items():
        if t.is_floating_point() and t.dtype != dtype:
            c = t.to(dtype)
            if not torch.isfinite(c).all() and torch.isfinite(t).all():
                raise ValueError(f"export_gptq: {key} overflows {dtype}; pass a wider dtype "
                                 "(e.g. dtype=torch.bfloat16).")
            if not torch.equal(c.to(t.dtype), t):
                rounded.append(key)
            t = c
        out[key] = t
    if rounded:
        logger.warning("hf_quant: export_gptq rounded %d tensor(s) to %s (e.g. %s); pass dtype=%s to keep them exact.",
                       len(rounded), dtype, rounded[0], state[rounded[0]].dtype)
    return out


# --- import helpers --------------------------------------------------------------------------------

def _read_json(path: Path, missing: str) -> dict:
    if not path.is_file():
        raise ValueError(missing)
    return json.loads(path.read_text(encoding="utf-8"))


def _resolve_source(src: str | os.PathLike, revision: str | None, token: str | bool | None) -> Path:
    path = Path(src)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"import_gptq: revision={revision!r} applies to Hub repo ids; {src} is a local directory.")
        return path
    if path.exists():
        raise ValueError(f"import_gptq: {src} is a file; pass a checkpoint directory or a Hub repo id.")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(src), revision=revision, token=token, allow_patterns=_HUB_PATTERNS))


def _source_gptq_config(src_dir: Path, config: dict, src: Any) -> dict:
    """config.json's quantization_config, else (older AutoGPTQ checkpoints) quantize_config.json."""
    qc = config.get("quantization_config")
    if qc is None and (src_dir / "quantize_config.json").is_file():
        qc = _read_json(src_dir / "quantize_config.json", "")
    if not isinstance(qc, dict):
        raise ValueError(f"{src}: config.json has no quantization_config (and there is no quantize_config.json); "
                         "this is not a GPTQ checkpoint.")
    return qc


def _weight_files(src_dir: Path, src: Any, importer: str = "import_gptq") -> list[str]:
    """The checkpoint's safetensors files (its index's shards, or every *.safetensors); never pickles."""
    index = src_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [str(src_dir / s) for s in shards]
    files = sorted(str(p) for p in src_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in src_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (it has {', '.join(pickles)})" if pickles else ""
        raise ValueError(f"{src}: no .safetensors weights{found}. {importer} reads safetensors only, because "
                         "loading .bin/.pt files would unpickle them; convert the checkpoint to safetensors first "
                         "(load it where you trust it and save_pretrained(..., safe_serialization=True)).")
    return files


def _skeleton(src_dir: Path) -> nn.Module:
    """The model built from config.json on the meta device: which linears exist, and of which type."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build the float model; the GPTQ quantizer is not involved
    with torch.device("meta"):
        return multimodal.auto_class(config).from_config(config)


def _model_name(ckpt_name: str, linears: dict[str, nn.Module], prefix: str, src: Any) -> str:
    """The model's module name for a checkpoint's module name (which may lack or carry the base prefix)."""
    for name in (ckpt_name, f"{prefix}.{ckpt_name}", ckpt_name.removeprefix(f"{prefix}.")):
        if name in linears:
            return name
    raise ValueError(f"{ckpt_name}: {src} quantizes this module, but the model built from its config.json has no "
                     "linear layer of that name; the checkpoint does not match its config.")


def _quantized_modules(entries: dict[str, dict], linears: dict[str, nn.Module], prefix: str,
                       settings: GptqSettings, src: Any) -> dict[str, str]:
    """Checkpoint name -> model name of every module with a qweight, in model order, after checking
    their tensors' shapes in the headers against the model and the config."""
    names = {c: _model_name(c, linears, prefix, src) for c in
             (k.removesuffix(".qweight") for k in entries if k.endswith(".qweight"))}
    if not names:
        raise ValueError(f"{src}: no tensor named '*.qweight'; this checkpoint holds no GPTQ-quantized module.")
    order = {n: i for i, n in enumerate(linears)}
    names = dict(sorted(names.items(), key=lambda item: order[item[1]]))  # errors name the first module
    for ckpt_name, name in names.items():
        spec = settings.spec(name)
        if spec is None:
            raise ValueError(f"{name}: the checkpoint quantizes this module but its quantization_config.dynamic "
                             "excludes it ('-:' rule); the checkpoint does not match its config.")
        in_f, out_f = linear_shape(linears[name])
        expected = {k: (shape, _GPTQ_DTYPES[k]) for k, shape in gptq_shapes(in_f, out_f, spec).items()}
        check_module_tensors(entries, ckpt_name, expected, optional=("g_idx",),
                             context=f"a {in_f}->{out_f} GPTQ layer with bits={spec.bits}, group_size={spec.group_size}")
    return names


def _convert_modules(tensors: dict[str, torch.Tensor], names: dict[str, str], linears: dict[str, nn.Module],
                     settings: GptqSettings) -> dict[str, LayerSpec]:
    """Replace each quantized module's GPTQ tensors in `tensors` by hf_quant buffers; returns model name -> spec.

    One act-order decision for the whole model (hf_quant's QuantConfig has one): if any module has a
    real act-order g_idx, every grouped module keeps its g_idx."""
    act_order = any(not is_natural_g_idx(tensors[f"{c}.g_idx"], settings.spec(n).group_size)
                    for c, n in names.items() if settings.spec(n).group_size != -1 and f"{c}.g_idx" in tensors)
    specs = {}
    for ckpt_name, name in names.items():
        module = {k: tensors.pop(f"{ckpt_name}.{k}") for k in _GPTQ_TENSORS if f"{ckpt_name}.{k}" in tensors}
        specs[name], buffers = from_gptq(module, settings.spec(name), linear_shape(linears[name])[0],
                                         checkpoint_format=settings.checkpoint_format, act_order=act_order, name=name)
        tensors.update({f"{ckpt_name}.{k}": t for k, t in buffers.items()})
    return specs


def _check_targets(skeleton: nn.Module, qc: QuantConfig, specs: dict[str, LayerSpec], importer: str = "import_gptq"
                   ) -> None:
    """Loading the written checkpoint must rebuild exactly the imported layers: check with the quantizer's own rules
    (`importer` names the function in the error)."""
    skip = resolve_modules_to_not_convert(skeleton, qc.modules_to_not_convert, compat.keep_in_fp32_modules(skeleton))
    targets = find_targets(skeleton, qc, skip)
    if targets != specs:
        diff = sorted(n for n in set(targets) | set(specs) if targets.get(n) != specs.get(n))[:5]
        raise ValueError(f"{importer}: hf_quant would load these modules differently from the checkpoint: {diff} "
                         f"(checkpoint: {[specs.get(n) for n in diff]}, hf_quant: {[targets.get(n) for n in diff]}); "
                         "e.g. a quantized tied lm_head, which hf_quant keeps in float. Please report this checkpoint.")
