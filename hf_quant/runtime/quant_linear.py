"""`QuantLinear`: a linear layer holding packed integer codes, scales and zeros.

It subclasses `nn.Linear` and exposes `weight` as its packed tensor (as bitsandbytes' `Linear4bit`
does) so that PEFT's standard LoRA layer wraps it. Everywhere in hf_quant, test
`isinstance(m, QuantLinear)` before `nn.Linear`. No kernel code here: `forward` goes through
`dispatch.linear`, which runs the kernel chosen for the device, dtype, scheme and row count.

The chosen kernels and their prepared weight layouts are cached on the layer and dropped wherever
its buffers change: assigning a buffer, `load_state_dict`, `.to()`/`_apply`, and in-place edits
(a layout remembers its buffers' version counters; the buffers are never inference tensors, so
edits under `torch.inference_mode` count too).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import QUANT_BUFFERS, LayerSpec, gguf, QuantizedWeight, buffer_specs, check_values, dequantize_weight, pack_codes
from .dispatch import linear, register_layer
from .scheme import ActivationSpec, Scheme


OUTPUT_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, as OneBit's layer uses it


def _invalidate_after_load(module: QuantLinear, incompatible_keys: Any) -> None:
    module.invalidate_kernels()  # load_state_dict copies into the buffers in place


class QuantLinear(nn.Linear):
    """y = x @ W_hat.T + bias, W_hat = (codes - zero) * scale per group of input channels."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        spec: LayerSpec,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        from_conv1d: bool = False,
        activation: ActivationSpec | None = None,
        scale_dtype: torch.dtype | None = None,
        output_norm: bool = False,
    ) -> None:
        if output_norm and spec.bits != 1:
            raise ValueError(f"QuantLinear: output_norm (OneBit's normalised layer) needs 1-bit codes, not {spec}.")
        nn.Module.__init__(self)
        self._kernel_cache: dict = {}  # (device, dtype, row class) -> (kernel forward, prepared layout)
        self._prepared: dict = {}  # (kernel name, device, dtype) -> prepared layout
        self._op_id = register_layer(self)  # how torch.ops.hf_quant.quant_linear finds this layer
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.scheme = Scheme(spec, activation, output_norm)
        self.from_conv1d = from_conv1d  # restore a transformers Conv1D on dequantize
        self.float_dtype = scale_dtype or dtype  # of the scales; of W_hat for GGUF layers (which store none)
        with torch.inference_mode(False):  # buffers track in-place edits (their version counters), always
            for name, (shape, buf_dtype) in buffer_specs(in_features, out_features, spec, scale_dtype or dtype).items():
                self.register_buffer(name, torch.empty(shape, dtype=buf_dtype, device=device))
        if spec.gguf is not None:
            self.register_buffer("scales", None)
        if spec.sym or spec.gguf is not None:
            self.register_buffer("qzeros", None)
        if not spec.g_idx:
            self.register_buffer("g_idx", None)
        if not spec.in_scale:
            self.register_buffer("in_scales", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_load_state_dict_post_hook(_invalidate_after_load)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The packed codes (uint8): what PEFT and transformers see as this layer's weight."""
        return self.qweight

    @property
    def kernel_bias(self) -> torch.Tensor | None:
        """The bias the kernels add to their product: none when the scheme normalises the product first
        (`forward` adds it after the norm)."""
        return None if self.scheme.output_norm else self.bias

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, spec: LayerSpec, bias: torch.Tensor | None, from_conv1d: bool = False,
        activation: ActivationSpec | None = None, output_norm: bool = False,
    ) -> QuantLinear:
        """Pack an algorithm's result into a new layer (on the codes' device). The bias keeps its
        dtype; the scales keep theirs (the model's, or e.g. fp32 for LLM.int8's rows)."""
        out_features, in_features = qw.codes.shape
        if spec.gguf is not None:  # the block bytes hold everything; W_hat in the bias's (model's) dtype
            layer = cls(in_features, out_features, bias is not None, spec,
                        dtype=bias.dtype if bias is not None else torch.float32, device=qw.codes.device,
                        from_conv1d=from_conv1d, activation=activation)
            layer.qweight.copy_(qw.raw)
            if bias is not None:
                layer.bias.data.copy_(bias.detach().to(layer.bias.dtype))
            return layer
        layer = cls(in_features, out_features, bias is not None, spec,
                    dtype=bias.dtype if bias is not None else qw.scale.dtype, device=qw.codes.device,
                    from_conv1d=from_conv1d, activation=activation, scale_dtype=qw.scale.dtype,
                    output_norm=output_norm)
        layer.qweight.copy_(pack_codes(qw.codes, spec.bits))
        if spec.in_scale:
            if qw.in_scale is None:
                raise ValueError(f"{spec} stores in_scales but the quantized weight has none")
            layer.in_scales.copy_(qw.in_scale)
        layer.scales.copy_(qw.scale)
        if qw.zero is not None:
            layer.qzeros.copy_(qw.zero)
        if spec.g_idx:
            if qw.g_idx is None:
                raise ValueError(f"{spec} stores a g_idx but the quantized weight has none")
            layer.g_idx.copy_(qw.g_idx)
            layer._check_g_idx("QuantLinear.from_quantized")
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(layer.bias.dtype))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scheme.output_norm:
            return linear(self, x)
        y = F.layer_norm(linear(self, x), (self.out_features,), eps=OUTPUT_NORM_EPS)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def prepared(self, kernel: Any, device: torch.device, dtype: torch.dtype) -> Any:
        """`kernel`'s weight layout for this layer on `device` / `dtype`, built once."""
        key = (kernel.layout or kernel.name, device, dtype)
        if key not in self._prepared:
            self._prepared[key] = kernel.prepare(self, device, dtype)
        return self._prepared[key]

    def set_activation(self, activation: ActivationSpec | None) -> None:
        """Give the layer a run-time activation quantization (or none): its scheme, and so its kernels."""
        self.scheme = Scheme(self.spec, activation, self.scheme.output_norm)
        self.invalidate_kernels()

    def invalidate_kernels(self) -> None:
        """Drop the cached kernel choices and layouts (after the packed buffers changed)."""
        self._kernel_cache.clear()
        self._prepared.clear()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> QuantLinear:
        """`.to()` / `.cpu()` / `.half()` ...: the buffers are new tensors, so the layouts built from the old
        ones go (they would keep the old device's or dtype's memory alive, e.g. a streamed block released to
        the meta device)."""
        out = super()._apply(fn, *args, **kwargs)
        self.invalidate_kernels()
        return out

    def __setattr__(self, name: str, value: Any) -> None:
        if name in QUANT_BUFFERS and isinstance(value, torch.Tensor) and value.is_inference():
            with torch.inference_mode(False):  # a normal tensor: in-place edits stay visible to the caches
                value = value.clone()
        super().__setattr__(name, value)
        if name in QUANT_BUFFERS + ("bias",) and "_prepared" in self.__dict__:
            self.invalidate_kernels()

    def tracked_buffers(self) -> tuple[torch.Tensor, ...]:
        """The packed buffers a prepared kernel layout is built from (for staleness checks)."""
        return tuple(t for t in (getattr(self, name) for name in QUANT_BUFFERS) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """The float weight W_hat (out, in), in the dtype of the scales (GGUF layers: fp32, as llama.cpp
        computes it); with `in_scales`, each input channel times its factor. (A layer with an output norm is
        LN(x @ W_hat^T) + bias: W_hat is its linear part.)"""
        dtype = torch.float32 if self.scales is None else self.scales.dtype
        W = dequantize_weight(self.qweight, self.scales, self.qzeros, self.spec, self.in_features,
                              dtype if self.in_scales is None else torch.float32, self.g_idx)
        return W if self.in_scales is None else (W * self.in_scales.float()).to(dtype)

    def check_buffers(self, name: str) -> None:
        """Raise if loading left a buffer missing, on meta, or of the wrong shape/dtype."""
        for buf_name, (shape, dtype) in buffer_specs(self.in_features, self.out_features, self.spec, None).items():
            t = getattr(self, buf_name)
            bad = t is None or t.is_meta or tuple(t.shape) != shape
            bad = bad or (t.dtype != dtype if dtype is not None else not t.is_floating_point())
            if bad:
                got = "missing" if t is None else f"{t.dtype}{list(t.shape)} on {t.device}"
                raise ValueError(f"{name}.{buf_name}: loaded tensor is {got}, expected {dtype or 'float'}{list(shape)}.")
        self._check_g_idx(name)
        if self.spec.gguf is not None:
            gguf.check_blocks(self.qweight, gguf.block_type(self.spec.gguf), self.in_features, name)
        else:
            check_values(self.scales, self.qzeros, self.spec, name)
        if self.in_scales is not None and not torch.isfinite(self.in_scales).all():
            raise ValueError(f"{name}.in_scales: NaN or inf values; the checkpoint is corrupt. Re-quantize the model "
                             "or re-download the checkpoint.")

    def _check_g_idx(self, name: str) -> None:
        """Act-order layers: g_idx must put exactly group_size channels in each group (kernels rely on it)."""
        if self.g_idx is None:
            return
        n_groups = self.spec.groups(self.in_features)
        g = self.g_idx.long()
        if g.min() < 0 or g.max() >= n_groups or (torch.bincount(g, minlength=n_groups) != self.spec.group_size).any():
            raise ValueError(
                f"{name}.g_idx: every group must hold exactly group_size={self.spec.group_size} input channels, "
                f"with group indices in [0, {n_groups}); this g_idx does not. Re-quantize or re-save the layer.")

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        # `.to()`/`.cuda()`/`.half()` move the layer but never cast its quantized state: kernels cast
        # scales and bias to the activation dtype, so the stored grid stays exactly what was saved.
        device = fn(torch.empty(0, device=self.qweight.device)).device
        with torch.inference_mode(False):
            for name, buf in self._buffers.items():
                if buf is not None:
                    self._buffers[name] = buf.to(device)
        if self.bias is not None:
            moved = self.bias.data.to(device)
            try:
                self.bias.data = moved
            except RuntimeError:  # to / from the meta device: a new Parameter (the data cannot be swapped)
                self.bias = torch.nn.Parameter(moved, requires_grad=self.bias.requires_grad)
        self.invalidate_kernels()
        return self

    def extra_repr(self) -> str:
        s = self.spec
        act = self.scheme.activation
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + (f"gguf={s.gguf}" if s.gguf else f"bits={s.bits}, group_size={s.group_size}, sym={s.sym}")
                + (", act_order" if s.g_idx else "") + (", in_scales" if s.in_scale else "")
                + (", output_norm" if self.scheme.output_norm else "")
                + (f", activation={act.name}" if act is not None else ""))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = dict(state)
        state["_kernel_cache"], state["_prepared"] = {}, {}
        state.pop("_op_id", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._op_id = register_layer(self)
