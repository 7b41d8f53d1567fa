"""`QuantConfig`: the user's quantization intent, validated eagerly and JSON round-trippable.

The same object travels in `config.json` as `quantization_config`, so loading a checkpoint
re-validates it (and refuses one written by a newer, incompatible hf_quant).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .core import SUPPORTED_BITS, LayerSpec
from .core import gguf as gguf_types
from .core.patterns import SafePattern
from .methods.base import check_bool, check_positive_int
from .methods import available_methods, get_method, methods_taking, option_fields

QUANT_METHOD = "hf_quant"
# Version of the on-disk layout (see README "On-disk format"). Bump on any incompatible change.
# 1: qweight/scales/qzeros.  2: adds the optional per-layer `g_idx` (act-order GPTQ).  3: adds GGUF layers
# (`gguf`: qweight holds GGUF blocks, no scales/qzeros). 4: MoE experts quantized as per-expert layers
# (`experts.<e>.gate_up_proj.*` in place of the fused 3-D `experts.gate_up_proj`; runtime.experts). Older versions
# still load.
FORMAT_VERSION = 4

ON_INCOMPATIBLE = ("error", "skip")
_OVERRIDABLE = ("bits", "group_size", "sym", "gguf")
_SKIP_PREFIX = "-:"
_MATCH_PREFIX = "+:"
CALIBRATION_DTYPES = ("auto", "float32", "model")
SPILL_ACTIVATIONS = ("auto", True, False)
_RUNTIME_ONLY = ("dataset", "calibration_device", "hessian_dtype", "calibration_dtype", "spill_activations",
                 "spill_dir")  # how to calibrate this run, not what was saved
# __init__ arguments stored as given (the others are copied or checked first)
_PLAIN_FIELDS = ("method", "bits", "group_size", "sym", "on_incompatible", "dataset", "num_samples", "seq_len", "seed",
                 "damp_percent", "block_size", "desc_act", "static_groups", "true_sequential", "mse", "epochs",
                 "learning_rate", "block_name_to_quantize", "calibration_device", "format_version", "gguf",
                 "hessian_dtype", "calibration_dtype", "spill_activations", "spill_dir", "latent")


_SPEC_DEFAULTS = {"bits": 4, "group_size": 128, "sym": False}


def _check_fixed_spec(method: Any, given: dict[str, Any]) -> None:
    """A method that fixes its layout strictly (`strict_spec`: OneBit, BitNet) refuses bits / group_size / sym
    set to anything else, by name."""
    if not isinstance(method, str) or method not in available_methods():
        return  # post_init names the unknown method
    m = get_method(method)
    if not m.strict_spec:
        return
    for name, value in given.items():
        fixed = (m.fixed_spec or {}).get(name)
        if value != fixed or type(value) is not type(fixed):
            layout = ", ".join(f"{k}={v!r}" for k, v in (m.fixed_spec or {}).items())
            raise ValueError(f"QuantConfig.{name}={value!r} cannot be set for method={method!r}, whose layout is fixed "
                             f"({layout}); leave {name} unset.")


def _check_bits(bits: Any, field: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"QuantConfig.{field}={bits!r} is not supported; use one of {list(SUPPORTED_BITS)}.")


def _check_gguf_type(name: Any, field: str) -> None:
    if name is not None and (not isinstance(name, str) or name not in {**gguf_types.TYPES, **gguf_types.MIXES}):
        raise ValueError(f"QuantConfig.{field}={name!r} is not a supported GGUF block type or mix; use one of "
                         f"{sorted(gguf_types.TYPES)}, a mix {sorted(gguf_types.MIXES)}, or None.")


def _check_group_size(group_size: Any, field: str) -> None:
    ok = isinstance(group_size, int) and not isinstance(group_size, bool)
    ok = ok and (group_size == -1 or (group_size >= 16 and group_size & (group_size - 1) == 0))
    if not ok:
        raise ValueError(
            f"QuantConfig.{field}={group_size!r} is not supported; use -1 (one group per output channel) "
            "or a power of two >= 16 (e.g. 32, 64, 128)."
        )


def _check_format_version(fv: Any) -> None:
    if isinstance(fv, bool) or not isinstance(fv, int) or fv < 1:
        raise ValueError(f"QuantConfig.format_version={fv!r} must be a positive integer.")
    if fv > FORMAT_VERSION:
        raise ValueError(
            f"This checkpoint uses hf_quant format_version {fv}, but the installed hf_quant reads "
            f"format_version <= {FORMAT_VERSION}. Upgrade: pip install -U hf_quant."
        )


def _check_bool(value: Any, field: str) -> None:
    check_bool(field, value)


def _check_provenance(provenance: Any) -> None:
    if provenance is None:
        return
    try:
        ok = isinstance(provenance, dict) and all(isinstance(k, str) for k in provenance)
        ok = ok and json.loads(json.dumps(provenance)) == provenance
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"QuantConfig.provenance={provenance!r} must be None or a JSON object (dict with string keys "
                         "of strings, numbers, lists or dicts); hf_quant fills it in when it quantizes.")


class QuantConfig(QuantizationConfigMixin):
    """Quantization settings for `from_pretrained(..., quantization_config=QuantConfig(...))`.

    Args:
        method: algorithm name from `hf_quant.algorithms.available_methods()` (e.g. "rtn").
        bits: code width, one of 1, 2, 3, 4, 8 (default 4; 1 bit is the sign, symmetric, for "rtn" and
            "onebit"). Methods that fix the layout ("llm_int8", "onebit", "bitnet") set bits, group_size and sym.
        group_size: input channels sharing one scale/zero; -1 = one group per output channel (default 128).
        sym: symmetric grid (zero fixed at 2**(bits-1), not stored) instead of a per-group zero (default False).
        modules_to_not_convert: module names (or dotted suffixes) kept in float. `None` keeps the
            output embeddings / lm_head; tied weights are never quantized.
        dynamic: per-module overrides, `{regex: {"bits": 8, ...}}`, first `re.search` match wins;
            a key prefixed with "-:" keeps matching modules in float.
        on_incompatible: "error" (default) or "skip" (warn and keep in float) for layers whose
            in_features does not fit the group size.
        dataset: calibration data for methods that need it (GPTQ): a list of strings, of token-id
            tensors or of dicts with "input_ids", a `datasets.Dataset`, or None for the packaged
            public-domain text; cut into windows. For a multimodal model, a list of its processor's
            outputs (dicts with `pixel_values`, `image_grid_thw`, ...: one prompt each, unpadded): each
            is one whole calibration sample, run through the whole model. Not saved.
        num_samples, seq_len, seed: calibration windows drawn from `dataset` (without overlap); with
            whole samples, `num_samples` of them drawn with `seed` (seq_len does not apply).
        damp_percent, block_size: GPTQ's Hessian dampening (fraction of its mean diagonal) and
            lazy-update block width.
        desc_act: GPTQ's act-order: quantize input channels by decreasing Hessian diagonal. Groups
            then follow that order, so layers store a `g_idx` (unless `static_groups`).
        static_groups: with `desc_act`, fix every group's grid from the unquantized weights in the
            natural channel order first, so no `g_idx` is needed (kernels run as without act-order).
        true_sequential: inside a block, quantize layers in the order the forward pass reaches them
            (q/k/v, then o, then gate/up, then down), each calibrated on the outputs of the
            already-quantized layers before it. False: all from the float block in one pass.
        mse: search a clipped grid per group (shrink the range in 1% steps down to 20%, keep the one
            with the least |w - w_hat|^2.4), as GPTQ's reference `mse` option; RTN and GPTQ.
            None = the method's default: on for GPTQ, off for RTN (the plain min/max baseline).
        epochs, learning_rate: OmniQuant's learnable weight clipping: passes over the calibration
            windows per block, and its AdamW learning rate. None = the method's default (2, 5e-2);
            other methods refuse a value.
        block_name_to_quantize: dotted name of the nn.ModuleList of decoder blocks; None finds it
            (optimum's block patterns, then the ModuleList of num_hidden_layers modules).
        calibration_device: where each block is calibrated ("cuda", "cuda:1", "cpu"); None = the
            first GPU if there is one, else the model's device. Blocks move there one at a time,
            cached activations stay on the model's device. Not saved.
        hessian_dtype: what the calibration statistics (each layer's sum of x x^T over the windows) are
            added in: "float32" (default: least memory) or "float64" (twice the memory of the largest
            layer's Hessian). Each window's product is computed in fp32 either way; in fp64 the sum does
            not depend on the order of the windows, so a data-parallel run (torchrun) gives the same
            codes as one process. Not saved.
        calibration_dtype: the dtype each block computes in while it is calibrated: "auto" (default) is
            float32 on a CPU without native bf16 / fp16 matrix instructions (no AVX512-BF16 / AMX-BF16,
            resp. AVX512-FP16 / AMX-FP16; there such matmuls run at about half the fp32 speed) and the
            model's dtype elsewhere; "float32" or "model" choose. Scales are rounded to the model's dtype
            either way and the float parts of each block return to it, so the saved format is the same;
            the codes may differ from a run in the model's dtype by that dtype's rounding of the
            activations. Not saved.
        spill_activations: where the cached calibration activations (each block's inputs, and its outputs
            while they are computed) are kept: "auto" (default) spills them to a file when they would take
            more than a quarter of the available memory, True always, False never. Spilled activations are
            read back a window at a time; the result is bit-identical. Not saved.
        spill_dir: the directory for spilled activations: None = the streaming run's progress directory
            (`<dst>.partial`), else the system's temporary directory (TMPDIR). It must have room for twice
            the activations; a smaller one is refused before calibration starts. Not saved.
        format_version: on-disk layout version; set by hf_quant (2, or 3 for GGUF layers), checked when loading.
        latent: set by `hf_quant.training.prepare` (True): the checkpoint holds the latent state of
            quantization-aware training (float weights and the method's trainable vectors), which loads back
            as the prepared model; `training.convert` freezes it. None otherwise.
        provenance: set by hf_quant when it quantizes, informational (the model card shows it):
            base model, calibration data description, hf_quant version, and an `evaluation` entry
            when `hf-quant quantize --eval` measured perplexity.
    """

    def __init__(
        self,
        method: str = "rtn",
        bits: int | None = None,
        group_size: int | None = None,
        sym: bool | None = None,
        modules_to_not_convert: list[str] | None = None,
        dynamic: dict[str, dict[str, Any]] | None = None,
        on_incompatible: str = "error",
        dataset: Any = None,
        num_samples: int = 128,
        seq_len: int = 512,
        seed: int = 0,
        damp_percent: float = 0.01,
        block_size: int = 128,
        desc_act: bool = False,
        static_groups: bool = False,
        true_sequential: bool = True,
        mse: bool | None = None,
        epochs: int | None = None,
        learning_rate: float | None = None,
        block_name_to_quantize: str | None = None,
        calibration_device: str | None = None,
        format_version: int | None = None,
        provenance: dict[str, Any] | None = None,
        gguf: str | None = None,
        hessian_dtype: str = "float32",
        calibration_dtype: str = "auto",
        spill_activations: bool | str = "auto",
        spill_dir: str | None = None,
        latent: bool | None = None,
        **kwargs: Any,
    ) -> None:
        fields = dict(locals())
        if format_version is not None:
            _check_format_version(format_version)  # first: a newer checkpoint may carry fields we do not know
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"QuantConfig.quant_method must be {QUANT_METHOD!r}, got {quant_method!r}.")
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k in option_fields()}  # options of methods added later
        if kwargs:
            known = [p for p in inspect.signature(QuantConfig.__init__).parameters if p not in ("self", "kwargs")]
            raise ValueError(f"QuantConfig got unknown field(s) {sorted(kwargs)}; known fields: "
                             f"{sorted(set(known) | set(option_fields()))}.")
        self.quant_method = QUANT_METHOD
        if modules_to_not_convert is not None and not isinstance(modules_to_not_convert, (list, tuple)):
            raise ValueError(f"QuantConfig.modules_to_not_convert={modules_to_not_convert!r} must be a list of module "
                             "names (strings), e.g. ['lm_head'].")
        _check_fixed_spec(method, {k: fields[k] for k in ("bits", "group_size", "sym") if fields[k] is not None})
        for name, default in _SPEC_DEFAULTS.items():
            fields[name] = default if fields[name] is None else fields[name]
        for name in _PLAIN_FIELDS:  # dataset and calibration_device are used while calibrating, never saved
            setattr(self, name, fields[name])
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.dynamic = None if dynamic is None else copy.deepcopy(dynamic)
        self.provenance = copy.deepcopy(provenance)
        self.__dict__.update(extra)
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise a `ValueError` naming the field and the allowed values."""
        if self.format_version is not None:
            _check_format_version(self.format_version)
        if not isinstance(self.method, str) or self.method not in available_methods():
            raise ValueError(
                f"QuantConfig.method={self.method!r} is unknown; available methods: {available_methods()}."
            )
        self._resolve_method_options()
        for field in ("sym", "true_sequential"):
            _check_bool(getattr(self, field), field)
        if self.hessian_dtype not in ("float32", "float64"):
            raise ValueError(f"QuantConfig.hessian_dtype={self.hessian_dtype!r} is not supported; use 'float32' or "
                             "'float64'.")
        if self.calibration_dtype not in CALIBRATION_DTYPES:
            raise ValueError(f"QuantConfig.calibration_dtype={self.calibration_dtype!r} is not supported; use one of "
                             f"{list(CALIBRATION_DTYPES)}.")
        if not any(self.spill_activations is v or self.spill_activations == v and isinstance(v, str)
                   for v in SPILL_ACTIVATIONS):
            raise ValueError(f"QuantConfig.spill_activations={self.spill_activations!r} is not supported; use 'auto', "
                             "True (always spill calibration activations to disk) or False (keep them in memory).")
        if self.spill_dir is not None and not (isinstance(self.spill_dir, (str, os.PathLike))
                                               and os.path.isdir(self.spill_dir)):
            raise ValueError(f"QuantConfig.spill_dir={self.spill_dir!r} is not an existing directory; create it, or "
                             "pass None for the default (the streaming run's progress directory, else TMPDIR).")
        if self.latent not in (None, True):
            raise ValueError(f"QuantConfig.latent={self.latent!r} must be None or True (set by hf_quant.training.prepare).")
        _check_bits(self.bits, "bits")
        if self.bits == 1:
            self._check_one_bit(self.sym, "bits")
        _check_group_size(self.group_size, "group_size")
        self._check_gguf(self.gguf, "gguf")
        if self.block_name_to_quantize is not None and not isinstance(self.block_name_to_quantize, str):
            raise ValueError(
                f"QuantConfig.block_name_to_quantize={self.block_name_to_quantize!r} must be a module name "
                "such as 'model.layers', or None to find it."
            )
        self._check_calibration_device()
        if self.on_incompatible not in ON_INCOMPATIBLE:
            raise ValueError(
                f"QuantConfig.on_incompatible={self.on_incompatible!r}; use one of {list(ON_INCOMPATIBLE)}."
            )
        for field in ("num_samples", "seq_len"):
            check_positive_int(field, getattr(self, field))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"QuantConfig.seed={self.seed!r} must be an integer in [0, 2**63).")
        mods = self.modules_to_not_convert
        if mods is not None and not all(isinstance(m, str) for m in mods):
            raise ValueError("QuantConfig.modules_to_not_convert must be a list of module names (strings).")
        self._compiled_dynamic = self._validate_dynamic(self.dynamic)
        for regex, overrides in self._compiled_dynamic:
            if overrides is not None and overrides.get("bits") == 1:
                self._check_one_bit(overrides.get("sym", self.sym), f"dynamic[{regex.regex.pattern!r}]['bits']")
        fixed = get_method(self.method).fixed_spec or {}
        for regex, overrides in self._compiled_dynamic:
            if (overrides or {}).get("gguf") is not None:
                self._check_gguf(overrides["gguf"], f"{regex.field}['gguf']")
            clash = sorted(set(overrides or {}) & set(fixed))
            if clash:
                raise ValueError(f"{regex.field} overrides {clash}, which method={self.method!r} "
                                 f"fixes at {fixed}; use a '-:' rule to keep modules in float instead.")
        # the oldest layout that holds this config's layers: older hf_quant versions still read the rest
        needed = 3 if self.gguf is not None or any((o or {}).get("gguf") for _, o in self._compiled_dynamic) else 2
        self.format_version = max(self.format_version or needed, needed)
        self._spec_cache: dict[str, LayerSpec | None] = {}
        _check_provenance(self.provenance)

    def _resolve_method_options(self) -> None:
        """Check every method option (each by its own check), fill in the chosen method's defaults
        where the field is None, and refuse options that have no meaning for the chosen method."""
        method = get_method(self.method)
        for name, f in option_fields().items():
            value = getattr(self, name, None)
            if value is not None:
                f.metadata["check"](name, value)
            unused = f.metadata["unused"]
            if name in method.option_fields:
                if value is None:
                    setattr(self, name, method.default(name))
            elif value is None:
                setattr(self, name, unused)
            elif f.metadata["strict"] and value != unused:
                raise ValueError(f"QuantConfig.{name}={value!r} has no meaning for method={self.method!r}; "
                                 f"it applies to {methods_taking(name)}.")
        method.options_from(self)  # the method's own options dataclass validates the whole set
        for name, value in (method.fixed_spec or {}).items():  # e.g. LLM.int8: always 8-bit rows
            setattr(self, name, value)

    def _check_calibration_device(self) -> None:
        dev = self.calibration_device
        if dev is None:
            return
        import torch

        try:
            kind = torch.device(dev).type
        except (RuntimeError, TypeError):
            kind = None
        if kind not in ("cpu", "cuda", "xpu", "mps"):  # 'meta' would move blocks to a device that holds no data
            raise ValueError(
                f"QuantConfig.calibration_device={dev!r} is not a device that holds data; use e.g. 'cuda', 'cuda:0', "
                "'cpu' or None."
            )

    @staticmethod
    def _validate_dynamic(dynamic: dict | None) -> list[tuple[SafePattern, dict | None]]:
        if dynamic is None:
            return []
        if not isinstance(dynamic, dict):
            raise ValueError("QuantConfig.dynamic must be a dict {regex: {field: value}}.")
        compiled = []
        for pattern, overrides in dynamic.items():
            field = f"dynamic[{pattern!r}]"
            if not isinstance(pattern, str):
                raise ValueError(f"QuantConfig.{field}: keys must be regex strings.")
            skip = pattern.startswith(_SKIP_PREFIX)
            body = pattern[2:] if skip or pattern.startswith(_MATCH_PREFIX) else pattern
            regex = SafePattern(body, f"QuantConfig.{field}")  # untrusted: bounded in length, shape and time
            if not isinstance(overrides, dict):
                raise ValueError(f"QuantConfig.{field} must be a dict of overrides (fields {list(_OVERRIDABLE)}).")
            unknown = set(overrides) - set(_OVERRIDABLE)
            if unknown:
                raise ValueError(
                    f"QuantConfig.{field} overrides unknown field(s) {sorted(unknown)}; allowed: {list(_OVERRIDABLE)}."
                )
            if "bits" in overrides:
                _check_bits(overrides["bits"], f"{field}['bits']")
            if "group_size" in overrides:
                _check_group_size(overrides["group_size"], f"{field}['group_size']")
            if "sym" in overrides:
                _check_bool(overrides["sym"], f"{field}['sym']")
            if "gguf" in overrides:
                _check_gguf_type(overrides["gguf"], f"{field}['gguf']")
            compiled.append((regex, None if skip else dict(overrides)))
        return compiled

    def _check_one_bit(self, sym: Any, field: str) -> None:
        """1-bit codes are signs: a method that takes them, and a symmetric grid."""
        if not get_method(self.method).one_bit:
            takes = [m for m in available_methods() if get_method(m).one_bit]
            raise ValueError(f"QuantConfig.{field}=1 is not supported by method={self.method!r}; 1-bit (sign) codes "
                             f"come from {takes}.")
        if sym is not True:
            raise ValueError(f"QuantConfig.{field}=1 needs sym=True: 1-bit codes are signs, +-scale/2.")

    def _check_gguf(self, name: Any, field: str) -> None:
        if name is None:
            return
        _check_gguf_type(name, field)
        if not get_method(self.method).gguf:
            supported = [m for m in available_methods() if get_method(m).gguf]
            raise ValueError(f"QuantConfig.gguf={name!r}: method={self.method!r} cannot quantize onto GGUF grids; "
                             f"use one of {supported}.")
        if self.desc_act and not self.static_groups:
            raise ValueError("QuantConfig.gguf: GGUF blocks hold input channels in natural order (no g_idx); "
                             "use desc_act=False, or static_groups=True.")

    def layer_spec(self, module_name: str, n_layers: int | None = None, n_gqa: int = 1,
                   in_features: int | None = None) -> LayerSpec | None:
        """The spec for one module after `dynamic` overrides; `None` if a "-:" rule keeps it in float.
        Each module name is matched once per config (the result is remembered). A GGUF mix (gguf="Q4_K_M")
        needs the model's `n_layers` (and `n_gqa` = heads per KV head, the row width `in_features`)."""
        cache = self.__dict__.setdefault("_spec_cache", {})
        key = (module_name, n_layers, n_gqa, in_features)
        if key not in cache:
            cache[key] = self._layer_spec(module_name, n_layers, n_gqa, in_features)
        return cache[key]

    def _layer_spec(self, module_name: str, n_layers: int | None, n_gqa: int, in_features: int | None) -> LayerSpec | None:
        fields = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "gguf": self.gguf}
        for regex, overrides in self._compiled_dynamic:
            if regex.search(module_name):
                if overrides is None:
                    return None
                fields.update(overrides)
                break
        if fields["gguf"] in gguf_types.MIXES:
            if n_layers is None:
                raise ValueError(f"QuantConfig.gguf={fields['gguf']!r} is a mix: the type of {module_name} depends "
                                 "on the model's layer count (layer_spec(name, n_layers=...)).")
            fields["gguf"] = gguf_types.mix_type(fields["gguf"], module_name, n_layers, n_gqa, in_features)
        if fields["gguf"] is not None:  # the block type fixes the layout
            t = gguf_types.block_type(fields["gguf"])
            return LayerSpec(t.bits, t.sub, t.zero is not None, False, t.name)
        # act-order regroups channels unless the groups were fixed in natural order first
        g_idx = self.desc_act and not self.static_groups and fields["group_size"] != -1
        return LayerSpec(fields["bits"], fields["group_size"], fields["sym"], g_idx,
                         in_scale=get_method(self.method).input_scale)

    def to_dict(self) -> dict[str, Any]:
        d = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_") and k not in _RUNTIME_ONLY}
        d["quant_method"] = QUANT_METHOD
        return d

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantConfig) and self.to_dict() == other.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()
