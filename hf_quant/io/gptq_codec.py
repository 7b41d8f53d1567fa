"""Conversion between hf_quant's layer tensors and the GPTQ checkpoint layout (pure functions, no I/O).

The GPTQ layout (AutoGPTQ / GPTQModel `checkpoint_format` "gptq" and "gptq_v2", read by vLLM, TGI,
GPTQModel and transformers), per quantized module:

  qweight  int32  (in * bits / 32, out)        codes packed along the input dim
  qzeros   int32  (n_groups, out * bits / 32)  zero points packed along the output dim:
                                               zero - 1 in "gptq" (v1), zero itself in "gptq_v2"
  scales   float  (n_groups, out)
  g_idx    int32  (in,)                        group of each input channel (always present)
  W[i, j] = scales[g_idx[i], j] * (q[i, j] - zero[g_idx[i], j])

Both layouts store codes as little-endian bit streams: each of our (out, in * bits / 8) byte rows
is the stream of one output channel; each GPTQ column is the same stream cut into int32 words
(for 3 bits, 32 codes spill across 3 words, which is exactly that stream). So conversion is a
transpose plus a regrouping of bytes into words, bit for bit.

v1 cannot store a zero point of 0 (zero - 1 = -1 does not fit in `bits` bits): export refuses it.
On import, v1 stores are read as loaders do, zero = stored + 1, which may be 2**bits (a group whose
zero was 0 when it was written): hf_quant's uint8 zeros and kernels compute (q - zero) * scale for
any zero up to 255, so that is kept exactly, except for 8 bits where 256 does not fit (refused).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import QuantConfig
from ..core import SUPPORTED_BITS, LayerSpec, check_values, pack_codes, unpack_codes
from ..core.patterns import SafePattern

GPTQ_BITS = tuple(b for b in SUPPORTED_BITS if b >= 2)  # the GPTQ layout has no 1-bit (sign) codes

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_BYTE_SHIFTS = torch.tensor([0, 8, 16, 24], dtype=torch.int64)


# --- bit streams <-> int32 words -------------------------------------------------------------------

def bytes_to_words(stream: torch.Tensor) -> torch.Tensor:
    """uint8 (rows, 4n) little-endian byte streams -> int32 (rows, n) words (endianness-independent)."""
    b = stream.reshape(stream.shape[0], -1, 4).to(torch.int64)
    w = (b << _BYTE_SHIFTS.to(b.device)).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `bytes_to_words`: int32 (rows, n) -> uint8 (rows, 4n)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    return ((w.unsqueeze(-1) >> _BYTE_SHIFTS.to(w.device)) & 0xFF).to(torch.uint8).reshape(words.shape[0], -1)


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (rows, n), n * bits % 32 == 0 -> int32 (rows, n * bits / 32) little-endian streams."""
    n = codes.shape[1]
    padded = torch.nn.functional.pad(codes, (0, -n % 8))  # pack_codes works on whole bytes of 8 codes
    return bytes_to_words(pack_codes(padded, bits)[:, : n * bits // 8])


def _unpack_words(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `_pack_words`: int32 (rows, n * bits / 32) -> uint8 codes (rows, n)."""
    stream = words_to_bytes(words)
    padded = torch.nn.functional.pad(stream, (0, (-n % 8) * bits // 8))
    return unpack_codes(padded, bits, n + (-n % 8))[:, :n]


# --- one module ------------------------------------------------------------------------------------

def natural_g_idx(in_features: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """GPTQ's g_idx without act-order: channel i is in group i // group_size (all 0 for group_size=-1)."""
    gs = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32, device=device) // gs


def gptq_shapes(in_features: int, out_features: int, spec: LayerSpec) -> dict[str, tuple[int, ...]]:
    """Shapes of a module's GPTQ tensors (qweight, qzeros, scales, g_idx)."""
    n_groups = spec.groups(in_features)
    return {"qweight": (in_features * spec.bits // 32, out_features),
            "qzeros": (n_groups, out_features * spec.bits // 32),
            "scales": (n_groups, out_features), "g_idx": (in_features,)}


def gptq_incompatibility(in_features: int, out_features: int, bits: int) -> str | None:
    """Why a layer cannot be stored in GPTQ's int32 packing, or None."""
    for what, n in (("in_features", in_features), ("out_features", out_features)):
        if n * bits % 32:
            return f"{what}={n} * bits={bits} is not a multiple of 32, which GPTQ's int32 packing needs"
    return None


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r} is not a GPTQ format hf_quant converts; "
                         f"use one of {list(CHECKPOINT_FORMATS)}.")


def to_gptq(
    buffers: Mapping[str, torch.Tensor | None],
    spec: LayerSpec,
    in_features: int,
    *,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype | None = torch.float16,
    name: str = "layer",
) -> dict[str, torch.Tensor]:
    """One QuantLinear's buffers (qweight, scales, qzeros, g_idx; see layout.py) -> GPTQ tensors.

    `dtype` is the scales' dtype in the checkpoint (None: keep). Raises ValueError naming `name` when
    the layer's shape or zero points cannot be stored in `checkpoint_format`.
    """
    _check_format(checkpoint_format)
    qweight, scales = buffers["qweight"], buffers["scales"]
    out_features = qweight.shape[0]
    why = gptq_incompatibility(in_features, out_features, spec.bits)
    if why:
        raise ValueError(f"{name}: cannot export to GPTQ: {why}. Keep this layer in float "
                         "(QuantConfig.modules_to_not_convert) or quantize it with other bits.")
    zero = buffers.get("qzeros")
    zero = torch.full_like(scales, spec.sym_zero, dtype=torch.int32) if zero is None else zero.to(torch.int32)
    stored = zero - 1 if checkpoint_format == "gptq" else zero
    bad = (stored < 0) | (stored > spec.maxq)
    if bad.any():
        fix = ("Export with checkpoint_format='gptq_v2' (read by GPTQModel and transformers), or quantize with "
               "sym=True." if checkpoint_format == "gptq" else "Export with checkpoint_format='gptq'.")
        raise ValueError(f"{name}: {int(bad.sum())} group(s) have zero points ({sorted(set(zero[bad].tolist()))[:4]}) "
                         f"that checkpoint_format={checkpoint_format!r} cannot store in {spec.bits} bits "
                         f"(it stores {'zero - 1' if checkpoint_format == 'gptq' else 'zero'}). {fix}")
    g_idx = buffers.get("g_idx")
    g_idx = natural_g_idx(in_features, spec.group_size, qweight.device) if g_idx is None else g_idx.to(torch.int32)
    return {
        "qweight": bytes_to_words(qweight.contiguous()).t().contiguous(),
        "qzeros": _pack_words(stored.t().to(torch.uint8), spec.bits),
        "scales": scales.t().contiguous().to(dtype or scales.dtype),
        "g_idx": g_idx,
    }


def is_natural_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """True if `g_idx` is i // group_size: the groups are contiguous and the layer needs no g_idx."""
    return torch.equal(g_idx.long(), natural_g_idx(g_idx.numel(), group_size, g_idx.device).long())


def from_gptq(
    tensors: Mapping[str, torch.Tensor],
    spec: LayerSpec,
    in_features: int,
    *,
    checkpoint_format: str = "gptq",
    act_order: bool | None = None,
    name: str = "layer",
) -> tuple[LayerSpec, dict[str, torch.Tensor]]:
    """One module's GPTQ tensors -> (its LayerSpec, QuantLinear buffers qweight/scales[/qzeros][/g_idx]).

    `spec` gives bits, group_size and sym. `act_order`: keep the g_idx (True), require it to be the
    natural one and drop it (False), or keep it only when it is not natural (None). With sym, every
    zero point must be 2**(bits-1).
    """
    _check_format(checkpoint_format)
    out_features = tensors["qweight"].shape[1]
    why = gptq_incompatibility(in_features, out_features, spec.bits)
    if why:
        raise ValueError(f"{name}: not a valid GPTQ module: {why}.")
    expected = gptq_shapes(in_features, out_features, spec)
    for key, shape in expected.items():
        t = tensors.get(key)
        if key == "g_idx" and t is None:
            continue
        if t is None or tuple(t.shape) != shape:
            got = "missing" if t is None else f"{t.dtype}{list(t.shape)}"
            raise ValueError(f"{name}.{key}: is {got}, expected {list(shape)} for bits={spec.bits}, "
                             f"group_size={spec.group_size}, in_features={in_features}. The checkpoint does not "
                             "match its quantization_config (bits/group_size/dynamic).")
    zero = _unpack_words(tensors["qzeros"], spec.bits, out_features).to(torch.int32)
    zero = zero + 1 if checkpoint_format == "gptq" else zero
    if spec.sym and (zero != spec.sym_zero).any():
        raise ValueError(f"{name}: the quantization_config says sym=True but this module has zero points other "
                         f"than {spec.sym_zero}; set \"sym\": false in the checkpoint's quantization_config "
                         "to import its stored zero points.")
    if zero.max() > 255:
        raise ValueError(f"{name}: a v1 ('gptq') zero point of {int(zero.max())} (stored 255, read back +1) does "
                         "not fit hf_quant's uint8 zeros; this 8-bit checkpoint cannot be imported.")
    buffers = {"qweight": words_to_bytes(tensors["qweight"].t().contiguous()),
               "scales": tensors["scales"].t().contiguous()}
    if not spec.sym:
        buffers["qzeros"] = zero.t().to(torch.uint8).contiguous()
    g_idx = tensors.get("g_idx")
    g_idx = natural_g_idx(in_features, spec.group_size) if g_idx is None else g_idx.to(torch.int32)
    natural = is_natural_g_idx(g_idx, spec.group_size)
    keep = (not natural) if act_order is None else act_order
    if spec.group_size == -1 or not keep:
        if not natural:
            raise ValueError(f"{name}.g_idx: is not i // group_size although this layer "
                             f"({'group_size=-1' if spec.group_size == -1 else 'no act-order'}) needs no g_idx; "
                             "the checkpoint does not match its quantization_config.")
        keep = False
    else:
        n_groups = spec.groups(in_features)
        g = g_idx.long()
        if g.min() < 0 or g.max() >= n_groups or (torch.bincount(g, minlength=n_groups) != spec.group_size).any():
            raise ValueError(f"{name}.g_idx: hf_quant layers need exactly group_size={spec.group_size} input "
                             f"channels in each of the {n_groups} groups; this g_idx does not have that, so the "
                             "module cannot be imported.")
        buffers["g_idx"] = g_idx
    check_values(buffers["scales"], buffers.get("qzeros"), spec, name)
    return LayerSpec(spec.bits, spec.group_size, spec.sym, g_idx=keep), buffers


# --- configs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GptqSettings:
    """A validated GPTQ quantization_config (config.json / quantize_config.json)."""

    bits: int
    group_size: int
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    damp_percent: float = 0.01
    checkpoint_format: str = "gptq"
    lm_head: bool = False
    dynamic: dict[str, dict[str, Any]] = field(default_factory=dict)

    def _pattern(self, rule: str) -> SafePattern:
        cache = self.__dict__.setdefault("_patterns", {})  # frozen dataclass: a cache outside its fields
        if rule not in cache:
            cache[rule] = SafePattern(rule.removeprefix("-:").removeprefix("+:"),
                                      f"quantization_config.dynamic[{rule!r}]")
        return cache[rule]

    def spec(self, module_name: str) -> LayerSpec | None:
        """Base settings after GPTQModel's `dynamic` rules (re.match, first match wins); None = "-:" (float)."""
        fields = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        for pattern, overrides in self.dynamic.items():
            if pattern.startswith("-:"):
                if self._pattern(pattern).match(module_name):
                    return None
            elif self._pattern(pattern).match(module_name):
                fields.update({k: v for k, v in overrides.items() if k in fields})
                break
        return LayerSpec(**fields)


def _gptq_group_size(value: Any, field: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not (ok and (value == -1 or (value >= 16 and value & (value - 1) == 0))):
        raise ValueError(f"GPTQ quantization_config.{field}={value!r}: hf_quant layers support group_size -1 or a "
                         "power of two >= 16; this checkpoint cannot be imported.")


def parse_gptq_config(qc: Mapping[str, Any]) -> GptqSettings:
    """Validate a GPTQ quantization_config; ValueError names the field and the fix."""
    method = str(qc.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise ValueError(f"quantization_config.quant_method={qc.get('quant_method')!r}: import_gptq reads GPTQ "
                         "checkpoints (quant_method 'gptq') only. Load this model with the library that wrote it.")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if qc.get("is_marlin_format") or fmt not in CHECKPOINT_FORMATS:
        fmt = "marlin" if qc.get("is_marlin_format") else fmt
        raise ValueError(f"quantization_config.checkpoint_format={fmt!r}: import_gptq reads checkpoint_format "
                         f"{list(CHECKPOINT_FORMATS)} only; re-save the model in the 'gptq' format with GPTQModel "
                         "(kernel layouts such as marlin/bitblas are not portable).")
    if qc.get("pack_dtype", "int32") != "int32":
        raise ValueError(f"quantization_config.pack_dtype={qc['pack_dtype']!r}: import_gptq reads int32 packing "
                         "only; re-save the model with pack_dtype='int32'.")
    bits = qc.get("bits")
    if isinstance(bits, bool) or bits not in GPTQ_BITS:
        raise ValueError(f"quantization_config.bits={bits!r}: hf_quant supports {list(GPTQ_BITS)} bits.")
    _gptq_group_size(qc.get("group_size", 128), "group_size")
    dynamic = qc.get("dynamic") or {}
    if not isinstance(dynamic, dict) or not all(isinstance(v, dict) for v in dynamic.values()):
        raise ValueError("quantization_config.dynamic must map regex strings to dicts of overrides.")
    for pattern, overrides in dynamic.items():
        SafePattern(pattern.removeprefix("-:").removeprefix("+:"), f"quantization_config.dynamic[{pattern!r}]")
        if "bits" in overrides and (isinstance(overrides["bits"], bool) or overrides["bits"] not in GPTQ_BITS):
            raise ValueError(f"quantization_config.dynamic[{pattern!r}].bits={overrides['bits']!r}: hf_quant "
                             f"supports {list(GPTQ_BITS)} bits.")
        if "group_size" in overrides:
            _gptq_group_size(overrides["group_size"], f"dynamic[{pattern!r}].group_size")
        if not isinstance(overrides.get("sym", True), bool):
            raise ValueError(f"quantization_config.dynamic[{pattern!r}].sym={overrides['sym']!r} must be true "
                             "or false.")
    for key in ("sym", "desc_act", "static_groups", "true_sequential", "lm_head"):
        if key in qc and not isinstance(qc[key], bool):
            raise ValueError(f"quantization_config.{key}={qc[key]!r} must be true or false.")
    damp = qc.get("damp_percent", 0.01)
    damp = damp if isinstance(damp, (int, float)) and not isinstance(damp, bool) and 0 < damp < 1 else 0.01
    return GptqSettings(bits=bits, group_size=qc.get("group_size", 128), sym=qc.get("sym", True),
                        desc_act=qc.get("desc_act", False), static_groups=qc.get("static_groups", False),
                        true_sequential=qc.get("true_sequential", True), damp_percent=float(damp),
                        checkpoint_format=fmt, lm_head=qc.get("lm_head", False), dynamic=dict(dynamic))


def exact_name_rule(name: str) -> str:
    """A dynamic-rule regex matching exactly the module `name` (under re.match and re.search)."""
    return "^" + re.escape(name) + "$"


def gptq_config_dict(
    qc: QuantConfig,
    specs: Mapping[str, LayerSpec],
    float_linears: list[str],
    *,
    lm_head: bool,
    checkpoint_format: str,
    quantizer: str,
) -> dict[str, Any]:
    """The GPTQ quantization_config for a model with these quantized layers (`specs`): modules whose
    bits/group_size/sym differ from `qc`'s get exact-name "+:" rules, `float_linears` "-:" rules."""
    _check_format(checkpoint_format)
    dynamic: dict[str, dict[str, Any]] = {}
    for name, s in specs.items():
        if (s.bits, s.group_size, s.sym) != (qc.bits, qc.group_size, qc.sym):
            dynamic["+:" + exact_name_rule(name)] = {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}
    dynamic.update({"-:" + exact_name_rule(name): {} for name in float_linears})
    config = {"quant_method": "gptq", "bits": qc.bits, "group_size": qc.group_size,
              "desc_act": any(s.g_idx for s in specs.values()), "sym": qc.sym, "checkpoint_format": checkpoint_format,
              "pack_dtype": "int32", "damp_percent": qc.damp_percent, "true_sequential": qc.true_sequential,
              "static_groups": qc.static_groups, "lm_head": lm_head, "meta": {"quantizer": [quantizer]}}
    if dynamic:
        config["dynamic"] = dynamic
    return config


def hf_quant_config(settings: GptqSettings, specs: Mapping[str, LayerSpec], float_linears: list[str]) -> QuantConfig:
    """The hf_quant QuantConfig under which exactly the layers in `specs` are quantized with those specs:
    every other linear in `modules_to_not_convert`, per-module differences as exact-name `dynamic` rules,
    act-order (stored g_idx) when any layer keeps a g_idx."""
    base = (settings.bits, settings.group_size, settings.sym)
    dynamic = {"+:" + exact_name_rule(name): {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}
               for name, s in specs.items() if (s.bits, s.group_size, s.sym) != base}
    has_g_idx = any(s.g_idx for s in specs.values())
    desc_act = settings.desc_act or has_g_idx
    return QuantConfig(method="gptq", bits=settings.bits, group_size=settings.group_size, sym=settings.sym,
                       desc_act=desc_act, static_groups=desc_act and not has_g_idx,
                       damp_percent=settings.damp_percent, true_sequential=settings.true_sequential,
                       modules_to_not_convert=sorted(float_linears), dynamic=dynamic or None)
