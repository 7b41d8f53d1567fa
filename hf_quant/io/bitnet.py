"""transformers' own BitNet b1.58 checkpoints: export an hf_quant `bitnet` model in their layout, import one.

transformers loads a checkpoint whose config.json has `quantization_config` {"quant_method": "bitnet",
"linear_class": "bitlinear", "quantization_mode": "offline", "use_rms_norm": false, "modules_to_not_convert":
[...]} with its `BitLinear` layers (transformers/integrations/bitnet.py), which hold per module `NAME`:

  NAME.weight        uint8 (out/4, in)  ternary values t + 1 in {0, 1, 2}, 2 bits each, packed along the
                                        OUTPUT dimension in four blocks: byte [j, i] holds rows j, j + out/4,
                                        j + 2*out/4, j + 3*out/4 of column i, the first in the low bits
  NAME.weight_scale  float (1,)         1 / gamma (BitLinear divides its product by it)
  NAME.bias          float (out,)       optional, added after the scaling

and computes y = (x_q @ t^T) / (weight_scale * 127 / absmax(x)) + bias, x_q = round(x * 127 / absmax(x)) per
token. hf_quant's `bitnet` layer (methods/bitnet.py) holds the same ternary grid: 2-bit codes c = t + 2 packed
along the INPUT dimension (core/packing.py), gamma (the matrix's absmean) in every row of `scales`, and the
same per-token int8 activations (`int8_token`, threshold 0). So the conversion carries the codes over exactly
(only their packing changes) and the scale as its reciprocal, rounded to nearest in the scale's dtype
(computed in fp64): the two functions agree up to that one rounding and to the order of the float
multiplications (and to transformers clamping absmax(x) at 1e-5, which only a token with every |x| < 1e-5
notices). The reciprocal is not a bijection on any float format, so a scale that goes out and comes back
may differ from the original by one unit in the last place; the codes never change.

`export_bitnet(model, dir)` writes that layout (every float linear hf_quant kept listed in
`modules_to_not_convert`), loaded by plain `AutoModelForCausalLM.from_pretrained(dir)` with transformers'
BitLinear. `import_bitnet(src, dir)` reads it (and transformers' `autobitlinear` offline variant, whose
`weight_scale` is gamma itself and whose bias is added before the scaling) and writes an hf_quant
`method="bitnet"` checkpoint. Both read and write safetensors only, write all-or-nothing
(`atomic_directory`) and refuse a target directory that is not empty.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import compat
from ..config import QuantConfig
from ..core import QUANT_BUFFERS, LayerSpec, pack_codes, unpack_codes
from ..core.layers import FLOAT_LINEARS, linear_shape
from ..methods.bitnet import BITNET_SPEC
from ..runtime import QuantLinear
from ..runtime.convert import incompatibility
from .checkpoint import check_module_tensors, index_checkpoint, write_transformers_checkpoint
from .gptq import _check_targets, _HUB_PATTERNS, _model_name, _read_json, _skeleton, _state_dict_without_tied, _weight_files, write_converted

logger = logging.getLogger("hf_quant")

VALUES_PER_ITEM = 4  # ternary values per uint8 of transformers' packed weight (its bitnet.VALUES_PER_ITEM)
BITNET_LAYER_SPEC = LayerSpec(**BITNET_SPEC)  # 2-bit symmetric codes, one group per row (the scale is gamma)
_TERNARY_CODES = (1, 2, 3)  # hf_quant's codes c = t + 2 for t in {-1, 0, 1}


# --- the codec: tensors only ------------------------------------------------------------------------

def pack_ternary(values: torch.Tensor) -> torch.Tensor:
    """transformers' packing (`integrations.bitnet.pack_weights`, without its in-place `+= 1` on the input):
    uint8 values t + 1 in {0, 1, 2}, shape (out, in) with out a multiple of 4 -> uint8 (out / 4, in), row j of
    block k in bits 2k, 2k+1 of byte row j."""
    out_f = values.shape[0]
    if out_f % VALUES_PER_ITEM:
        raise ValueError(f"pack_ternary: out_features={out_f} must be a multiple of {VALUES_PER_ITEM}")
    rows = out_f // VALUES_PER_ITEM
    v = values.to(torch.uint8)
    packed = v[:rows].clone()
    for k in range(1, VALUES_PER_ITEM):
        packed |= v[k * rows:(k + 1) * rows] << (2 * k)
    return packed


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_ternary`: uint8 (rows, in) -> the 2-bit fields (4 * rows, in), uint8 in [0, 3]
    (3 is no ternary value; transformers would read it as t = 2)."""
    return torch.cat([(packed >> (2 * k)) & 3 for k in range(VALUES_PER_ITEM)], dim=0)


def _reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1 / x rounded once to x's dtype (computed in fp64)."""
    return (1.0 / x.double()).to(x.dtype)


def to_bitlinear(qweight: torch.Tensor, scales: torch.Tensor, in_features: int, name: str = "layer"
                 ) -> dict[str, torch.Tensor]:
    """hf_quant `bitnet` buffers (packed codes (out, in/4), scales (out, 1)) -> transformers BitLinear
    tensors {"weight": uint8 (out/4, in), "weight_scale": (1,) = 1 / gamma in the scales' dtype}.
    Raises naming `name` when the layer is not ternary BitNet (codes outside {1, 2, 3}, rows of different
    scales, a scale that is not finite and positive)."""
    out_f = scales.shape[0]
    if out_f % VALUES_PER_ITEM:
        raise ValueError(f"{name}: out_features={out_f} is not a multiple of {VALUES_PER_ITEM}, which transformers' "
                         "BitLinear needs (it packs 4 output rows per byte); keep this layer in float "
                         "(QuantConfig.modules_to_not_convert) to export the model.")
    codes = unpack_codes(qweight, BITNET_LAYER_SPEC.bits, in_features)
    bad = (codes < _TERNARY_CODES[0]) | (codes > _TERNARY_CODES[-1])
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} code(s) are 0 (the value -2 on the symmetric 2-bit grid); a "
                         "BitNet layer holds ternary codes {1, 2, 3} (-1, 0, +1) only. This is a 2-bit layer of another "
                         "method: quantize with QuantConfig(method='bitnet') to export to transformers' BitNet.")
    gamma = scales.reshape(-1)[:1]
    if not torch.equal(scales.reshape(-1), gamma.expand(out_f)):
        raise ValueError(f"{name}: the rows have different scales ({int(torch.unique(scales).numel())} distinct "
                         "values); transformers' BitLinear holds one scale per matrix. This is a per-row 2-bit layer, "
                         "not BitNet: quantize with QuantConfig(method='bitnet') to export to transformers' BitNet.")
    weight_scale = _reciprocal(gamma)
    if not (torch.isfinite(gamma).all() and (gamma > 0).all() and torch.isfinite(weight_scale).all()):
        raise ValueError(f"{name}: scale {float(gamma)} has no finite reciprocal in {scales.dtype} (transformers' "
                         "BitLinear stores 1 / scale); the layer is corrupt. Re-quantize it.")
    return {"weight": pack_ternary(codes - 1), "weight_scale": weight_scale.contiguous()}


def from_bitlinear(weight: torch.Tensor, weight_scale: torch.Tensor, in_features: int, out_features: int,
                   name: str = "layer", linear_class: str = "bitlinear") -> dict[str, torch.Tensor]:
    """transformers BitNet tensors -> hf_quant `bitnet` buffers {"qweight": (out, in/4) codes t + 2,
    "scales": (out, 1) gamma in weight_scale's dtype}.

    weight: uint8 (out/4, in) packed values t + 1 (both linear classes), or, for "autobitlinear", the
    unpacked ternary float weight (out, in). weight_scale: (1,), 1 / gamma for "bitlinear" (its forward
    divides), gamma for "autobitlinear" (its forward multiplies)."""
    if weight.dtype == torch.uint8:
        fields = unpack_ternary(weight)
        bad = fields > 2
        if bad.any():
            raise ValueError(f"{name}.weight: {int(bad.sum())} packed 2-bit field(s) hold 3, which is no ternary value "
                             "(transformers would read it as +2); the checkpoint is corrupt.")
        codes = fields + 1
    elif linear_class == "autobitlinear" and weight.is_floating_point():
        w = weight.float()
        if not ((w == -1) | (w == 0) | (w == 1)).all():
            raise ValueError(f"{name}.weight: float values other than -1, 0, +1; an offline AutoBitLinear checkpoint "
                             "holds ternary weights. For a float model quantize with QuantConfig(method='bitnet').")
        codes = (w + 2).to(torch.uint8)
    else:
        raise ValueError(f"{name}.weight: {weight.dtype} is not a packed BitNet weight (uint8).")
    if tuple(codes.shape) != (out_features, in_features):
        raise ValueError(f"{name}.weight: unpacks to {tuple(codes.shape)}, expected ({out_features}, {in_features}).")
    ws = weight_scale.reshape(-1)
    if ws.numel() != 1 or not ws.is_floating_point() or not torch.isfinite(ws).all() or not (ws > 0).all():
        raise ValueError(f"{name}.weight_scale: must be one finite positive float, got "
                         f"{ws.tolist() if ws.numel() <= 4 else tuple(ws.shape)}; the checkpoint is corrupt.")
    gamma = _reciprocal(ws) if linear_class == "bitlinear" else ws.clone()
    if not torch.isfinite(gamma).all():
        raise ValueError(f"{name}.weight_scale: {float(ws)} has no finite reciprocal in {ws.dtype}; the checkpoint "
                         "is corrupt.")
    return {"qweight": pack_codes(codes, BITNET_LAYER_SPEC.bits),
            "scales": gamma.reshape(1, 1).expand(out_features, 1).contiguous()}


# --- export ----------------------------------------------------------------------------------------

def _check_empty_target(path: str | os.PathLike, fn: str) -> None:
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        what = "a file" if not p.is_dir() else "a directory that is not empty"
        raise ValueError(f"{fn}: {p} is {what}; pass a new or empty directory (nothing is overwritten).")


def _check_exportable(name: str, layer: QuantLinear) -> None:
    s, act = layer.spec, layer.scheme.activation
    problems = []
    if (s.bits, s.group_size, s.sym, s.gguf) != (2, -1, True, None) or s.g_idx or s.in_scale:
        problems.append(f"its grid is bits={s.bits}, group_size={s.group_size}, sym={s.sym}"
                        f"{', gguf=' + s.gguf if s.gguf else ''}{', act_order' if s.g_idx else ''}"
                        f"{', in_scales' if s.in_scale else ''}, not BitNet's ternary bits=2, group_size=-1, sym=True")
    if layer.scheme.output_norm:
        problems.append("it normalises its product (OneBit's output_norm)")
    if act is None or act.name != "int8_token" or float(act.kwargs().get("threshold", 0.0)) != 0.0:
        got = "float (weight-only)" if act is None else f"{act.name} {dict(act.params)}"
        problems.append(f"its activations are {got}, not per-token int8 (int8_token, threshold 0)")
    if layer.from_conv1d:
        problems.append("it stands for a transformers Conv1D, which transformers' BitNet quantizer never replaces")
    if problems:
        raise ValueError(f"{name}: cannot export to transformers' BitNet (BitLinear): {'; '.join(problems)}. Only "
                         "layers quantized with QuantConfig(method='bitnet') export; quantize the float model that "
                         "way, or keep this layer in float (QuantConfig.modules_to_not_convert).")


def _check_transformers_converts(model: nn.Module, layers: set[str], skip: list[str]) -> None:
    """transformers' BitNet quantizer, given `skip`, must replace exactly `layers` (its own matching rule)."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # another transformers release: its rule cannot be checked here
        return
    skip = skip + (compat.keep_in_fp32_modules(model) or [])
    converted = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and should_convert_module(n, skip)}
    wrong = sorted(converted ^ layers)
    if wrong:
        n = wrong[0]
        why = ("quantized here but transformers would keep it in float (the model keeps it in fp32)" if n in layers
               else "kept in float here but transformers would replace it by a BitLinear")
        raise ValueError(f"{n}: {why}; export_bitnet cannot write a checkpoint transformers loads the same way.")


def export_bitnet(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write an hf_quant BitNet model (`QuantConfig(method="bitnet")`) as a transformers BitNet checkpoint.

    Plain `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads it with transformers' own
    BitNet quantizer (`BitLinear` layers, linear_class "bitlinear", quantization_mode "offline") and computes
    the same function: the ternary codes are carried over exactly, weight_scale = 1 / gamma (module
    docstring). Every float linear of the model is listed in `modules_to_not_convert`; float tensors keep
    their dtype. Refuses, naming the module, any QuantLinear that is not ternary BitNet (another bit
    width or grid, codes outside {-1, 0, 1}, rows of different scales, no per-token int8 activations),
    out_features not a multiple of 4, and an `out_dir` that exists and is not empty. Writes all-or-nothing.
    """
    _check_empty_target(out_dir, "export_bitnet")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("export_bitnet: the model has no QuantLinear layers; quantize it with "
                         "hf_quant.QuantConfig(method='bitnet') first (a model prepared for quantization-aware "
                         "training: freeze it with hf_quant.training.convert).")
    for name, layer in layers.items():
        _check_exportable(name, layer)
    float_linears = sorted(n for n, m in model.named_modules()
                           if isinstance(m, FLOAT_LINEARS) and not isinstance(m, QuantLinear))
    _check_transformers_converts(model, set(layers), float_linears)

    state = _state_dict_without_tied(model)
    for name, layer in layers.items():
        buffers = {b: state.pop(f"{name}.{b}", None) for b in QUANT_BUFFERS}
        state.update({f"{name}.{k}": t for k, t in
                      to_bitlinear(buffers["qweight"], buffers["scales"], layer.in_features, name).items()})

    from transformers import BitNetQuantConfig

    qc = BitNetQuantConfig(modules_to_not_convert=float_linears, linear_class="bitlinear",
                           quantization_mode="offline", use_rms_norm=False).to_dict()
    qc["quant_method"] = "bitnet"
    return write_transformers_checkpoint(model, out_dir, state, qc, tokenizer, max_shard_size)


# --- import ----------------------------------------------------------------------------------------

def _resolve(src: str | os.PathLike, revision: str | None, token: str | bool | None) -> Path:
    path = Path(src)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"import_bitnet: revision={revision!r} applies to Hub repo ids; {src} is a local "
                             "directory.")
        return path
    if path.exists():
        raise ValueError(f"import_bitnet: {src} is a file; pass a checkpoint directory or a Hub repo id.")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(src), revision=revision, token=token, allow_patterns=_HUB_PATTERNS))


def _check_bitnet_config(qc: Any, src: Any) -> str:
    """Validate transformers' BitNet quantization_config; returns its linear_class."""
    if not isinstance(qc, dict):
        raise ValueError(f"{src}: config.json has no quantization_config; this is not a transformers BitNet "
                         "checkpoint (for a float model, quantize with hf_quant.QuantConfig(method='bitnet')).")
    if str(qc.get("quant_method", "")).lower() != "bitnet":
        raise ValueError(f"{src}: quantization_config.quant_method={qc.get('quant_method')!r}: import_bitnet reads "
                         "transformers BitNet checkpoints (quant_method 'bitnet') only.")
    linear_class = qc.get("linear_class", "bitlinear")
    mode = qc.get("quantization_mode", "offline")
    if linear_class not in ("bitlinear", "autobitlinear"):
        raise ValueError(f"{src}: quantization_config.linear_class={linear_class!r}; transformers knows 'bitlinear' "
                         "and 'autobitlinear'.")
    if linear_class == "autobitlinear" and mode != "offline":
        raise ValueError(f"{src}: linear_class='autobitlinear' with quantization_mode={mode!r}: this checkpoint holds "
                         "the float weights (transformers ternarizes them at every forward), not ternary codes. Load "
                         "it as a float model and quantize with hf_quant.QuantConfig(method='bitnet') instead.")
    if qc.get("use_rms_norm"):
        raise ValueError(f"{src}: quantization_config.use_rms_norm=true: transformers applies an RMSNorm to each "
                         "BitNet layer's input before quantizing it, which hf_quant's BitNet layer does not have; "
                         "import_bitnet cannot keep the function. Only use_rms_norm=false checkpoints import.")
    return linear_class


def convert_bitnet_checkpoint(src_dir: Path, out_dir: str | os.PathLike, src: Any = None) -> Path:
    """Write the hf_quant `bitnet` checkpoint of the transformers BitNet checkpoint in `src_dir`."""
    src = src if src is not None else src_dir
    config = _read_json(src_dir / "config.json", f"{src}: no config.json; this is not a transformers checkpoint.")
    linear_class = _check_bitnet_config(config.get("quantization_config"), src)
    files = _weight_files(src_dir, src, "import_bitnet")
    entries = index_checkpoint(files)  # headers only: refuses truncated files

    skeleton = _skeleton(src_dir)
    linears = {n: m for n, m in skeleton.named_modules() if isinstance(m, FLOAT_LINEARS)}
    prefix = getattr(skeleton, "base_model_prefix", "")
    names = {c: _model_name(c, linears, prefix, src)
             for c in (k.removesuffix(".weight_scale") for k in entries if k.endswith(".weight_scale"))}
    if not names:
        raise ValueError(f"{src}: no tensor named '*.weight_scale'; this checkpoint holds no BitNet layer.")
    for key, entry in entries.items():  # a packed weight without its scale: the checkpoint is incomplete
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and entry.get("dtype") == "U8" and module not in names:
            raise ValueError(f"{module}: a packed uint8 weight without a weight_scale in {src}; the checkpoint is "
                             "incomplete. Re-save it with transformers.")
    order = {n: i for i, n in enumerate(linears)}
    names = dict(sorted(names.items(), key=lambda item: order[item[1]]))  # errors name the first module
    for ckpt_name, name in names.items():
        in_f, out_f = linear_shape(linears[name])
        why = incompatibility(in_f, BITNET_LAYER_SPEC)
        if why is not None:
            raise ValueError(f"{name}: cannot import: {why} (hf_quant's 2-bit codes pack 4 per byte along the input).")
        packed = entries.get(f"{ckpt_name}.weight", {}).get("dtype") == "U8"
        if packed and out_f % VALUES_PER_ITEM:
            raise ValueError(f"{name}: out_features={out_f} is not a multiple of {VALUES_PER_ITEM}; the packed weight "
                             "cannot hold it.")
        weight = ((out_f // VALUES_PER_ITEM, in_f), torch.uint8) if packed or linear_class == "bitlinear" \
            else ((out_f, in_f), None)
        check_module_tensors(entries, ckpt_name, {"weight": weight, "weight_scale": ((1,), None),
                                                  "bias": ((out_f,), None)}, optional=("bias",),
                             context=f"a {in_f}->{out_f} BitNet {linear_class} layer")

    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    specs: dict[str, LayerSpec] = {}
    rescaled_bias = []
    for ckpt_name, name in names.items():
        in_f, out_f = linear_shape(linears[name])
        ws = tensors.pop(f"{ckpt_name}.weight_scale")
        tensors.update({f"{ckpt_name}.{k}": t for k, t in from_bitlinear(
            tensors.pop(f"{ckpt_name}.weight"), ws, in_f, out_f, name, linear_class).items()})
        bias = tensors.get(f"{ckpt_name}.bias")
        if linear_class == "autobitlinear" and bias is not None:  # (x_q @ t^T + b) * gamma
            tensors[f"{ckpt_name}.bias"] = (bias.double() * ws.double().reshape(())).to(bias.dtype)
            rescaled_bias.append(name)
        specs[name] = BITNET_LAYER_SPEC
    if rescaled_bias:
        logger.info("hf_quant: import_bitnet: %d AutoBitLinear bias(es) multiplied by the layer's scale (AutoBitLinear "
                    "scales its bias with the product; hf_quant adds it after), rounded to their dtype.",
                    len(rescaled_bias))
    hq = QuantConfig(method="bitnet", modules_to_not_convert=sorted(n for n in linears if n not in specs))
    _check_targets(skeleton, hq, specs, "import_bitnet")

    config["quantization_config"] = hq.to_dict()
    return write_converted(out_dir, tensors, config, src_dir)


def import_bitnet(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """Turn a transformers BitNet checkpoint (a directory or Hub repo id) into an hf_quant `bitnet` checkpoint.

    Reads linear_class "bitlinear" (packed uint8 weight, weight_scale = 1 / gamma) and "autobitlinear"
    with quantization_mode "offline" (weight_scale = gamma; its bias, which it scales with the product,
    multiplied by gamma). The ternary codes are carried over exactly; every linear without a
    weight_scale stays float (`modules_to_not_convert`). After `import hf_quant`,
    `AutoModelForCausalLM.from_pretrained(out_dir)` loads the result with hf_quant's int8 kernels. Refuses
    use_rms_norm=true (hf_quant's layer has no input RMSNorm), autobitlinear "online" checkpoints (float
    weights: quantize them with QuantConfig(method="bitnet")), a missing or foreign quantization_config,
    corrupt tensors (naming the module), and an `out_dir` that exists and is not empty. Writes
    all-or-nothing; tokenizer and generation files are copied.
    """
    _check_empty_target(out_dir, "import_bitnet")
    src = _resolve(src_dir, revision, token)
    return convert_bitnet_checkpoint(src, out_dir, src_dir)


__all__ = ["export_bitnet", "from_bitlinear", "import_bitnet", "pack_ternary", "to_bitlinear", "unpack_ternary"]
