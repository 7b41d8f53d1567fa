"""bitsandbytes LLM.int8() checkpoints: import one as an hf_quant `llm_int8` checkpoint, export the reverse.

A checkpoint saved by transformers with `BitsAndBytesConfig(load_in_8bit=True)` stores, per quantized
linear `NAME`:

  NAME.weight         int8  (out, in)  codes CB = round(W * 127 / SCB) in [-127, 127]
  NAME.SCB            fp32  (out,)     the row absmax SCB of the (fp16-cast) float weight
  NAME.weight_format  uint8 ()         0 = "row" (the only layout bitsandbytes >= 0.45 writes or reads)

and `quantization_config` {"quant_method": "bitsandbytes", "load_in_8bit": true, "llm_int8_threshold",
"llm_int8_skip_modules", ...} in config.json. hf_quant's `llm_int8` layer holds the same grid
(`methods.llm_int8`): qweight = CB + 128 (uint8) and scales = fl32(SCB / 127) (fp32, (out, 1)), with the
`int8_token` activation scheme at the same threshold. Conversion is exact both ways:

- import: codes + 128 and SCB / 127 in fp32, which is bit for bit what `llm_int8` computes from the
  same float weight (so an imported model equals one quantized by hf_quant from the same weights);
- export: codes - 128, and SCB recovered from the scale (`scb_from_scale`): the fp32 value a with
  fl32(a / 127) == scale. Division by 127 maps fp32 one-to-one except where a / 127 lands in the next
  binade of a: for a whose significand is in [127/64, 2) (the top ~0.8% of each binade), two adjacent
  fp32 values of a give the same scale. There the fp16-representable one is taken (bitsandbytes'
  SCB is the absmax of the weight cast to fp16, so it always is one: a bitsandbytes checkpoint comes
  back bit for bit); for hf_quant layers quantized from fp32 weights neither may be, and then the one
  nearer scale * 127 is taken (the two differ by one fp32 ulp; the function changes by far less than
  the int8 rounding).

`import_bnb8(src, dst)` writes an hf_quant checkpoint (or, without `dst`, returns the loaded model);
`export_bnb8(model, dst)` writes a checkpoint that `AutoModelForCausalLM.from_pretrained(dst)` loads
with transformers + bitsandbytes as an 8-bit bitsandbytes model. Both read and write safetensors only
and write all-or-nothing (`atomic_directory`). 4-bit bitsandbytes checkpoints (`load_in_4bit`) and
layers without the int8 row grid and per-token int8 activations (e.g. a 4-bit GPTQ layer, or an 8-bit
weight-only layer) are refused, naming the module.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import LayerSpec, QuantConfig
from ..core import QUANT_BUFFERS
from ..core.layers import FLOAT_LINEARS, linear_shape
from ..runtime import QuantLinear
from ..runtime.experts import refuse_unfused
from .checkpoint import check_module_tensors, index_checkpoint, write_transformers_checkpoint
from .gptq import (_check_targets, _model_name, _weight_files, _read_json, _skeleton, _state_dict_without_tied,
                   write_converted)

logger = logging.getLogger("hf_quant")

INT8_SPEC = LayerSpec(8, -1, True)
ROW_FORMAT = 0  # bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"]
_4BIT_MARKERS = (".weight.quant_state.bitsandbytes__", ".weight.absmax", ".weight.quant_map",
                 ".weight.nested_absmax", ".weight.nested_quant_map")


# --- the scale <-> SCB relation --------------------------------------------------------------------

def scale_from_scb(scb: torch.Tensor) -> torch.Tensor:
    """hf_quant's fp32 row scales (out, 1) for bitsandbytes' SCB (out,): fl32(SCB / 127)."""
    return (scb.float() / 127.0).unsqueeze(1)


def scb_from_scale(scale: torch.Tensor, name: str = "layer") -> tuple[torch.Tensor, int]:
    """bitsandbytes' SCB (fp32, (out,)) for hf_quant row scales (out, 1) or (out,).

    Returns (SCB, the number of rows with two fp32 preimages), with fl32(SCB / 127) == scale in every
    row. Of two preimages the fp16-representable one is taken, else the one nearer scale * 127
    (module docstring). A scale that is not fl32(a / 127) of any fp32 a (not written by LLM.int8)
    gets fl32(scale * 127) and a warning: such a layer cannot be exported exactly.
    """
    s = scale.reshape(-1).float()
    c0 = s * 127.0
    cands = [c0]
    up = down = c0
    for _ in range(3):
        up, down = torch.nextafter(up, torch.full_like(up, float("inf"))), torch.nextafter(
            down, torch.full_like(down, float("-inf")))
        cands += [up, down]
    C = torch.stack(cands, dim=1)  # (out, 7)
    ok = (C / 127.0) == s.unsqueeze(1)
    n_pre = ok.sum(1)
    exact = s.double() * 127.0
    fp16 = (C.half().float() == C) & ok
    # preference: a preimage, fp16-representable, then nearest to the exact scale * 127 (exact in fp64)
    key = (~ok).double() * 4e300 + (~fp16).double() * 2e300 + (C.double() - exact.unsqueeze(1)).abs()
    best = key.argmin(1)
    scb = C.gather(1, best.unsqueeze(1)).squeeze(1)
    bad = n_pre == 0
    if bad.any():
        logger.warning("hf_quant: %s: %d row scale(s) are not absmax / 127 of any fp32 absmax (not written by "
                       "LLM.int8); exported with SCB = scale * 127, which bitsandbytes dequantizes to within one "
                       "ulp of the scale.", name, int(bad.sum()))
        scb = torch.where(bad, c0, scb)
    # zero rows (all-zero weight): SCB 0
    scb = torch.where(s == 0, torch.zeros_like(scb), scb)
    return scb, int((n_pre > 1).sum())


# --- import ----------------------------------------------------------------------------------------

def _resolve(src: str | os.PathLike, revision: str | None, token: str | bool | None) -> Path:
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"import_bnb8: {src} is a file; pass a checkpoint directory or a Hub repo id.")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(src), revision=revision, token=token,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken",
                                                  "*.jinja"]))


def _check_bnb_config(qc: Any, src: Any) -> float:
    """Validate a bitsandbytes quantization_config; returns llm_int8_threshold."""
    if not isinstance(qc, dict):
        raise ValueError(f"{src}: config.json has no quantization_config; this is not a bitsandbytes checkpoint.")
    if str(qc.get("quant_method", "")).lower() != "bitsandbytes":
        raise ValueError(f"{src}: quantization_config.quant_method={qc.get('quant_method')!r}: import_bnb8 reads "
                         "bitsandbytes 8-bit checkpoints (quant_method 'bitsandbytes', load_in_8bit) only.")
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        raise ValueError(f"{src}: quantization_config.load_in_4bit=true: this is a 4-bit bitsandbytes checkpoint "
                         "(NF4/FP4 blocks). import_bnb8 reads load_in_8bit (LLM.int8) checkpoints only; quantize the "
                         "float model with hf_quant instead.")
    if not (qc.get("load_in_8bit") or qc.get("_load_in_8bit")):
        raise ValueError(f"{src}: quantization_config.load_in_8bit is not true; import_bnb8 reads "
                         "BitsAndBytesConfig(load_in_8bit=True) checkpoints only.")
    if qc.get("llm_int8_has_fp16_weight"):
        raise ValueError(f"{src}: quantization_config.llm_int8_has_fp16_weight=true: the checkpoint holds float "
                         "weights, not int8 codes; load it as a float model and quantize it with hf_quant.")
    threshold = qc.get("llm_int8_threshold", 6.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"{src}: quantization_config.llm_int8_threshold={threshold!r} must be a number >= 0.")
    return float(threshold)


def _refuse_4bit(entries: dict[str, dict], src: Any) -> None:
    for key in entries:
        for marker in _4BIT_MARKERS:
            if marker in key:
                module = key.split(marker)[0]
                raise ValueError(f"{module}: a 4-bit bitsandbytes layer (load_in_4bit: tensor {key}) in {src}. "
                                 "import_bnb8 reads load_in_8bit (LLM.int8) layers only; quantize the float model "
                                 "with hf_quant instead.")


def convert_bnb8_checkpoint(src_dir: Path, out_dir: str | os.PathLike, src: Any = None) -> Path:
    """Write the hf_quant `llm_int8` checkpoint of the bitsandbytes 8-bit checkpoint in `src_dir`."""
    src = src if src is not None else src_dir
    config = _read_json(src_dir / "config.json", f"{src}: no config.json; this is not a transformers checkpoint.")
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        _refuse_4bit(index_checkpoint(_weight_files(src_dir, src, "import_bnb8")), src)  # name the module when there is one
    threshold = _check_bnb_config(qc, src)
    files = _weight_files(src_dir, src, "import_bnb8")
    entries = index_checkpoint(files)  # headers only: refuses truncated files
    _refuse_4bit(entries, src)

    skeleton = _skeleton(src_dir)
    linears = {n: m for n, m in skeleton.named_modules() if isinstance(m, FLOAT_LINEARS)}
    prefix = getattr(skeleton, "base_model_prefix", "")
    names = {c: _model_name(c, linears, prefix, src) for c in (k.removesuffix(".SCB") for k in entries
                                                                if k.endswith(".SCB"))}
    if not names:
        raise ValueError(f"{src}: no tensor named '*.SCB'; this checkpoint holds no bitsandbytes int8 layer.")
    for ckpt_name, name in names.items():
        in_f, out_f = linear_shape(linears[name])
        check_module_tensors(entries, ckpt_name, {"weight": ((out_f, in_f), torch.int8), "SCB": ((out_f,), torch.float32)},
                             context=f"a {in_f}->{out_f} bitsandbytes int8 layer")

    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    specs: dict[str, LayerSpec] = {}
    for ckpt_name, name in names.items():
        fmt = tensors.pop(f"{ckpt_name}.weight_format", None)
        if fmt is not None and int(fmt.reshape(-1)[0]) != ROW_FORMAT:
            raise ValueError(f"{name}: weight_format={int(fmt.reshape(-1)[0])} is a GPU tile layout of bitsandbytes "
                             "< 0.45 (only 0 = 'row' is portable); re-save the model with bitsandbytes >= 0.45.")
        codes = tensors.pop(f"{ckpt_name}.weight")
        scb = tensors.pop(f"{ckpt_name}.SCB")
        if not torch.isfinite(scb).all() or (scb < 0).any():
            raise ValueError(f"{name}.SCB: row absmax values must be finite and >= 0; the checkpoint is corrupt.")
        tensors[f"{ckpt_name}.qweight"] = (codes.to(torch.int16) + 128).to(torch.uint8)
        tensors[f"{ckpt_name}.scales"] = scale_from_scb(scb)
        specs[name] = INT8_SPEC
    hq = QuantConfig(method="llm_int8", threshold=threshold,
                     modules_to_not_convert=sorted(n for n in linears if n not in specs))
    _check_targets(skeleton, hq, specs)

    config["quantization_config"] = hq.to_dict()
    return write_converted(out_dir, tensors, config, src_dir)


def import_bnb8(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    **from_pretrained_kwargs: Any,
) -> Path | nn.Module:
    """Turn a bitsandbytes `load_in_8bit` checkpoint (a directory or Hub repo id) into hf_quant `llm_int8`.

    No requantization: codes = weight + 128, scales = SCB / 127 in fp32, threshold =
    `llm_int8_threshold`; modules bitsandbytes kept in float (`llm_int8_skip_modules`, the output
    embeddings) stay float (`modules_to_not_convert`). With `dst_dir`: writes the hf_quant checkpoint
    there (atomically) and returns its path; `AutoModelForCausalLM.from_pretrained(dst_dir)` loads it
    (after `import hf_quant`). Without: converts into a temporary directory and returns
    `AutoModelForCausalLM.from_pretrained(tmp, **from_pretrained_kwargs)` (the directory is removed).
    Refuses 4-bit (`load_in_4bit`) checkpoints, naming a 4-bit module.
    """
    src = _resolve(src_dir, revision, token)
    if dst_dir is not None:
        if from_pretrained_kwargs:
            raise TypeError(f"import_bnb8: {sorted(from_pretrained_kwargs)} apply when dst_dir is None (the model is "
                            "loaded and returned); with dst_dir the checkpoint is written.")
        return convert_bnb8_checkpoint(src, dst_dir, src_dir)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="hf_quant-bnb8-") as tmp:
        out = convert_bnb8_checkpoint(src, Path(tmp) / "model", src_dir)
        model = AutoModelForCausalLM.from_pretrained(out, **from_pretrained_kwargs)
        for t in list(model.parameters()) + list(model.buffers()):  # no storage may outlive the files it maps
            if t.device.type == "cpu" and not t.is_meta:
                t.data = t.data.clone()
        return model


# --- export ----------------------------------------------------------------------------------------

def _describe(layer: QuantLinear, method: str | None) -> str:
    s = layer.spec
    act = layer.scheme.activation_name
    return (f"{'an' if s.bits == 8 else 'a'} {s.bits}-bit{' ' + method if method else ''} layer (bits={s.bits}, group_size={s.group_size}, "
            f"sym={s.sym}{', act_order' if s.g_idx else ''}, activations: {act or 'float (weight-only)'})")


def _check_exportable(name: str, layer: QuantLinear, method: str | None) -> float:
    """The layer's threshold; raises naming the layer when bitsandbytes' Linear8bitLt cannot compute it."""
    act = layer.scheme.activation
    ok = (layer.spec.bits, layer.spec.group_size, layer.spec.sym, layer.spec.g_idx) == (8, -1, True, False)
    ok = ok and act is not None and act.name == "int8_token" and layer.scales.dtype == torch.float32
    if not ok:
        raise ValueError(f"{name}: cannot export to bitsandbytes 8-bit: it is {_describe(layer, method)}. "
                         "bitsandbytes' Linear8bitLt holds int8 rows with fp32 absmax scales and quantizes the "
                         "activations per token (hf_quant methods 'llm_int8' and 'w8a8'); keep this layer in float "
                         "(QuantConfig.modules_to_not_convert) or export with export_gptq / the native format.")
    return float(act.kwargs().get("threshold", 0.0))


def export_bnb8(
    model: nn.Module,
    dst_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write an hf_quant `llm_int8` / `w8a8` model as a bitsandbytes 8-bit checkpoint.

    `AutoModelForCausalLM.from_pretrained(dst_dir)` with transformers + bitsandbytes loads it as a
    `load_in_8bit` model computing the same function: weight = codes - 128 (int8), SCB recovered
    exactly from the scales (`scb_from_scale`), weight_format "row", llm_int8_threshold = the layers'
    threshold (one for the whole model, as bitsandbytes has one), every float linear in
    `llm_int8_skip_modules`. Refuses, naming the module, layers bitsandbytes cannot represent (any
    weight-only or non-int8 layer, e.g. 4-bit GPTQ), and models whose layers differ in threshold.
    Float tensors keep their dtype.
    """
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    method = qc.get("method") if isinstance(qc, dict) else getattr(qc, "method", None)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("export_bnb8: the model has no QuantLinear layers; quantize it with hf_quant "
                         "(method='llm_int8') first.")
    refuse_unfused(model, "export_bnb8", "transformers + bitsandbytes (load_in_8bit)")
    thresholds = {n: _check_exportable(n, m, method) for n, m in layers.items()}
    distinct = sorted(set(thresholds.values()))
    if len(distinct) > 1:
        a = next(n for n, t in thresholds.items() if t == distinct[0])
        b = next(n for n, t in thresholds.items() if t == distinct[1])
        raise ValueError(f"export_bnb8: {a} has threshold {distinct[0]} but {b} has {distinct[1]}; bitsandbytes "
                         "stores one llm_int8_threshold per model.")
    float_linears = [n for n, m in model.named_modules()
                     if isinstance(m, FLOAT_LINEARS) and not isinstance(m, QuantLinear)]

    state = _state_dict_without_tied(model)
    ambiguous = 0
    for name in layers:
        buffers = {b: state.pop(f"{name}.{b}", None) for b in QUANT_BUFFERS}
        scb, n_amb = scb_from_scale(buffers["scales"], name)
        ambiguous += n_amb
        state[f"{name}.weight"] = (buffers["qweight"].to(torch.int16) - 128).to(torch.int8).contiguous()
        state[f"{name}.SCB"] = scb.contiguous()
        state[f"{name}.weight_format"] = torch.tensor(ROW_FORMAT, dtype=torch.uint8)
    if ambiguous:
        logger.info("hf_quant: export_bnb8: %d row scale(s) had two fp32 SCB preimages (module docstring); chose "
                    "by the fp16 / nearest rule.", ambiguous)

    from transformers import BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=distinct[0],
                                    llm_int8_skip_modules=sorted(float_linears)).to_dict()
    bnb_config["quant_method"] = "bitsandbytes"
    return write_transformers_checkpoint(model, dst_dir, state, bnb_config, tokenizer, max_shard_size)


__all__ = ["export_bnb8", "import_bnb8", "scale_from_scb", "scb_from_scale"]
