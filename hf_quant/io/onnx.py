"""ONNX Runtime export: hf_quant's own codes as `com.microsoft::MatMulNBits`, float models through dynamic int8.

`export_onnx(model, dir)` writes a decoder-only model as one ONNX graph with its past key/value cache, in the
input/output naming optimum's `ORTModelForCausalLM` reads (`input_ids`, `attention_mask`, `position_ids`,
`past_key_values.{i}.key|value` in; `logits`, `present.{i}.key|value` out), plus `config.json`, the generation
config, the tokenizer and `hf_quant_onnx.json` (what was exported and how).

- The graph comes from PyTorch's own exporter (`torch.onnx.export(..., dynamo=True)`), on the model as it is,
  its cache a transformers `DynamicCache` built from the flat past inputs. Nothing of the architecture is
  written by hand here.
- Every `QuantLinear` is swapped, for the export only, for a `MatMulNBitsLinear`: one custom torch op whose ONNX
  translation is the single contrib node `MatMulNBits(A, B, scales, zero_points, g_idx=None, bias)`. Its
  inputs are hf_quant's codes, scales and zero points, repacked into the operator's layout and never rounded
  again: B (N, k_blocks, block_size * bits / 8) uint8, codes packed low bits first along K; scales (N, k_blocks)
  in fp32; zero points (N * ceil(k_blocks * bits / 8)) uint8 packed the same way, omitted for symmetric grids
  (whose implicit zero 2^(bits-1) is the operator's default). `block_size` is the group size; a per-channel
  layer is one block of the next power of two >= K (the operator pads K).
- Act-order layers are exported with their permutation folded into the graph: the activations are gathered
  in group order (one `Gather`) and the codes are stored sorted by group, so every block is contiguous. The
  operator's own `g_idx` input is not used: onnxruntime documents it as deprecated and its kernels do not all
  take it.
- Which bit widths and block sizes the installed onnxruntime runs is asked of onnxruntime itself (a one-node
  model, checked against the reference dequantization); a layer it cannot run is refused by name.
- `quantize="dynamic-int8"` exports a float model and passes it through onnxruntime's `quantize_dynamic`
  (int8 weights per output channel, activations quantized per tensor at run time): the "dynamic
  quantization" of ONNX Runtime. Its weights are 7-bit by default (`reduce_range=True`): onnxruntime's
  x86 kernels multiply uint8 activations by int8 weights with `vpmaddubsw` on CPUs without VNNI (AVX2, AVX-512
  without VNNI), whose int16 pair sums saturate with full-range weights; the file is run on CPUs the exporter
  does not know, so the default is the form that does not saturate on any of them (measured on an AVX2-only
  Zen 1, tiny Qwen2: logits 0.21 from the float model's, relative to their max, with 8-bit weights, 0.034 with
  7-bit ones). `reduce_range=False` keeps 8-bit weights, for CPUs with VNNI / AMX, or ARM.
- Float layers (embeddings, norms, an unquantized lm_head) stay float32. Models whose weights exceed 1.5 GiB
  (or `external_data=True`) keep their tensors in `model.onnx_data` beside the graph.

The export is all-or-nothing: it is written into a temporary directory beside `dir` and moved into place.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.dequant import codes_by_group
from ..core.layers import set_module
from ..runtime import QuantLinear
from .atomic import atomic_directory
from .checkpoint import write_json

logger = logging.getLogger("hf_quant")

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")  # model types whose export is tested end to end
QUANTIZE = ("dynamic-int8",)
ONNX_NAME = "model.onnx"
EXTERNAL_DATA_NAME = "model.onnx_data"
EXTERNAL_DATA_BYTES = 1536 * 2**20  # above this, tensors go to EXTERNAL_DATA_NAME (protobuf's limit is 2 GiB)
OPSET = 18
_INSTALL = "pip install 'hf_quant[onnx]' (onnx, onnxruntime, onnxscript)"


def _require() -> None:
    missing = []
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ImportError(f"export_onnx needs {', '.join(missing)}: {_INSTALL}.")


# ---------------------------------------------------------------------------------------------------------
# The MatMulNBits layout


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of `values` (integers in [0, 2^bits)) as a little-endian bit stream: value i
    occupies bits [i*bits, (i+1)*bits) counted from the low bit of byte 0. (..., n) -> (..., ceil(n*bits/8)) uint8."""
    *lead, n = values.shape
    if 8 % bits == 0 and n * bits % 8 == 0:  # whole values per byte (2, 4, 8 bits): shift and add in place
        per = 8 // bits
        v = values.to(torch.int32).reshape(*lead, n // per, per)
        return (v << (torch.arange(per, dtype=torch.int32) * bits)).sum(-1).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((values.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(*lead, n * bits)
    pad = (-stream.shape[-1]) % 8
    if pad:
        stream = F.pad(stream, (0, pad))
    weights = (1 << torch.arange(8, dtype=torch.int32))
    return (stream.reshape(*lead, -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first n values of each row, as int32."""
    *lead, nbytes = packed.shape
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(*lead, nbytes * 8)
    stream = stream[..., : n * bits].reshape(*lead, n, bits)
    return (stream << torch.arange(bits, dtype=torch.int32)).sum(-1)


def block_size_of(layer: QuantLinear) -> int:
    """MatMulNBits' block_size for a layer: its group size, or one power-of-two block covering K."""
    if layer.spec.group_size == -1:
        return max(16, 1 << (layer.in_features - 1).bit_length())
    return layer.spec.group_size


def refusal(name: str, layer: nn.Module) -> str | None:
    """Why `layer` cannot become a MatMulNBits node (None: it can, as far as the layout goes)."""
    if not isinstance(layer, QuantLinear):
        return None
    spec = layer.spec
    if spec.gguf is not None:
        return (f"{name}: a GGUF-grid layer ({spec.gguf}) has no MatMulNBits form; export it with export_gguf, or "
                "re-quantize with a plain grid (e.g. method='gptq').")
    if layer.scheme.activation is not None:
        return (f"{name}: this layer quantizes its activations too ({layer.scheme.activation}); MatMulNBits is "
                "weight-only. Export the float model with quantize='dynamic-int8' instead.")
    if spec.bits == 1 or spec.in_scale or layer.scheme.output_norm:
        return (f"{name}: 1-bit OneBit layers (signs, value vectors, output norm) have no MatMulNBits form; "
                "keep them in PyTorch.")
    bs = block_size_of(layer)
    if bs < 16 or bs & (bs - 1):
        return (f"{name}: group_size={spec.group_size} is not a power of two >= 16, which MatMulNBits' block_size "
                "must be; re-quantize with group_size 32, 64 or 128 (or -1).")
    return None


def layout_w_hat(B: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, K: int, N: int, bits: int,
                 block_size: int) -> torch.Tensor:
    """W_hat (N, K) in fp32, in the layout's (group) channel order, read from MatMulNBits' inputs: (code - zero) *
    scale per block, the zero 2^(bits-1) when `zero_points` is None (the operator's default)."""
    k_blocks = B.shape[1]
    codes = unpack_bits(B, bits, block_size).reshape(N, -1)[:, :K].float()
    zero = (torch.full((N, k_blocks), float(2 ** (bits - 1)), device=B.device) if zero_points is None else
            unpack_bits(zero_points.reshape(N, -1), bits, k_blocks).float())
    group = torch.arange(K, device=B.device) // block_size
    return (codes - zero[:, group]) * scales.float()[:, group]


class MatMulNBitsLinear(nn.Module):
    """The ONNX form of one `QuantLinear`: the inputs of one `MatMulNBits` node, built from its codes exactly.

    forward(x) = x[..., perm] @ W_hat^T + bias, computed (in PyTorch) from this layout alone, so that the layout
    can be checked against `QuantLinear.dequantize()`; in the exported graph it is the one contrib node."""

    def __init__(self, layer: QuantLinear, accuracy_level: int = 0) -> None:
        super().__init__()
        spec, K, N = layer.spec, layer.in_features, layer.out_features
        self.K, self.N, self.bits = K, N, spec.bits
        self.block_size = block_size_of(layer)
        self.accuracy_level = accuracy_level
        self.k_blocks = -(-K // self.block_size)
        codes, perm = codes_by_group(layer.qweight, spec, K, layer.g_idx)
        padded = F.pad(codes.to(torch.int32), (0, self.k_blocks * self.block_size - K))
        self.register_buffer("B", pack_bits(padded.reshape(N, self.k_blocks, self.block_size), self.bits))
        self.register_buffer("scales", layer.scales.float().contiguous())
        zp = None
        if layer.qzeros is not None:
            zp = pack_bits(layer.qzeros.to(torch.int32), self.bits).reshape(-1)
        self.register_buffer("zero_points", zp)
        self.register_buffer("perm", None if perm is None else perm.to(torch.int64))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())

    def dequantize(self) -> torch.Tensor:
        """W_hat (N, K) in the original channel order, read back from the MatMulNBits layout (fp32)."""
        W = layout_w_hat(self.B, self.scales, self.zero_points, self.K, self.N, self.bits, self.block_size)
        if self.perm is not None:
            W = torch.empty_like(W).index_copy_(1, self.perm, W)
        return W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return torch.ops.hf_quant_onnx.matmul_nbits(x, self.B, self.scales, self.zero_points, self.bias,
                                                    self.K, self.N, self.bits, self.block_size, self.accuracy_level)


@torch.library.custom_op("hf_quant_onnx::matmul_nbits", mutates_args=())
def _matmul_nbits(x: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], K: int, N: int, bits: int, block_size: int,
                  accuracy_level: int) -> torch.Tensor:
    """y = x @ W_hat^T + bias with W_hat read from the MatMulNBits layout (x already in group order)."""
    W = layout_w_hat(B, scales, zero_points, K, N, bits, block_size)
    return F.linear(x.float(), W, None if bias is None else bias.float()).to(x.dtype)


@_matmul_nbits.register_fake
def _(x, B, scales, zero_points, bias, K, N, bits, block_size, accuracy_level):
    return x.new_empty(*x.shape[:-1], N)


@lru_cache(maxsize=1)
def _register_schema() -> None:
    """MatMulNBits' signature for the ONNX builder (onnxruntime registers its contrib schemas in its own
    library, not in onnx's registry, which the exporter consults)."""
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("MatMulNBits", 1, "com.microsoft")
        return
    except Exception:  # noqa: BLE001 - not registered yet
        pass
    P, A, T = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType
    opt = OpSchema.FormalParameterOption.Optional
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    onnx.defs.register_schema(OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=opt),
                P("g_idx", "T4", param_option=opt), P("bias", "T1", param_option=opt)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(int32)", *floats], ""), ("T4", ["tensor(int32)"], "")],
        attributes=[A("K", T.INT, ""), A("N", T.INT, ""), A("bits", T.INT, ""), A("block_size", T.INT, ""),
                    A("accuracy_level", T.INT, "")]))


def _translation_table() -> dict:
    import onnxscript

    _register_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def matmul_nbits(x, B, scales, zero_points, bias, K: int, N: int, bits: int, block_size: int,
                     accuracy_level: int):
        return msft.MatMulNBits(x, B, scales, zero_points, None, bias, K=K, N=N, bits=bits, block_size=block_size,
                                accuracy_level=accuracy_level)

    return {torch.ops.hf_quant_onnx.matmul_nbits.default: matmul_nbits}


@lru_cache(maxsize=None)
def ort_support(bits: int, block_size: int, accuracy_level: int) -> str | None:
    """None if the installed onnxruntime runs MatMulNBits with these attributes on CPU and computes the
    reference function of this module's layout (asymmetric, K not a whole number of blocks); else why not."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    g = torch.Generator().manual_seed(0)
    K, N = block_size + block_size // 2, 8
    k_blocks = -(-K // block_size)
    codes = torch.randint(0, 2**bits, (N, k_blocks * block_size), generator=g)
    codes[:, K:] = 0
    zero = torch.randint(0, 2**bits, (N, k_blocks), generator=g)
    scales = torch.rand(N, k_blocks, generator=g) + 0.5
    B = pack_bits(codes.reshape(N, k_blocks, block_size), bits)
    zp = pack_bits(zero, bits).reshape(-1)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=bits, block_size=block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "probe", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        [numpy_helper.from_array(B.numpy(), "B"), numpy_helper.from_array(scales.numpy(), "scales"),
         numpy_helper.from_array(zp.numpy(), "zero_points")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = torch.randn(3, K, generator=g)
        y = sess.run(None, {"A": x.numpy()})[0]
    except Exception as e:  # noqa: BLE001 - onnxruntime refuses the attributes
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        return f"onnxruntime {ort.__version__} cannot run it ({first[:300]})"
    group = torch.arange(K) // block_size
    W = (codes[:, :K].float() - zero[:, group].float()) * scales[:, group]
    ref = (x @ W.T).numpy()
    err = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12))
    tol = 1e-4 if accuracy_level in (0, 1) else 5e-2
    if not err <= tol:
        return (f"onnxruntime {ort.__version__} computes a different function for this layout (relative error "
                f"{err:.2e} > {tol:g}); please report it")
    return None


# ---------------------------------------------------------------------------------------------------------
# The graph


class _CausalLMWithFlatCache(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present), past/present flat as
    (key_0, value_0, key_1, ...) of shape (batch, kv_heads, length, head_dim): optimum's convention."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{_cache_argument(self.model): cache})
        present = []
        for layer in _cache_of(out).layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _cache_argument(model: nn.Module) -> str:
    """The forward argument that takes the cache: `cache` (transformers >= 5.2x), else `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def _io_names(layers: int) -> tuple[list[str], list[str]]:
    kv = [(i, kind) for i in range(layers) for kind in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{k}" for i, k in kv],
            ["logits"] + [f"present.{i}.{k}" for i, k in kv])


@contextmanager
def _export_state(model: nn.Module, swaps: dict[str, nn.Module]) -> Iterator[None]:
    """The model as the exporter must see it, restored afterwards: float tensors in fp32, eager attention,
    `swaps` in place of the modules they name, no gradients."""
    saved_dtypes = {id(t): t.dtype for t in list(model.parameters()) + list(model.buffers())}
    originals = {name: model.get_submodule(name) for name in swaps}
    attn = getattr(model.config, "_attn_implementation", None)
    training = model.training
    try:
        for name, new in swaps.items():
            set_module(model, name, new)
        with torch.no_grad():  # (transformers refuses .float() on a quantized model)
            for t in list(model.parameters()) + list(model.buffers()):
                if t.is_floating_point() and t.dtype != torch.float32:
                    t.data = t.data.float()
        model.eval()
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        yield
    finally:
        for name, old in originals.items():
            set_module(model, name, old)
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dtype = saved_dtypes.get(id(t))
                if dtype is not None and t.dtype != dtype:
                    t.data = t.data.to(dtype)
        if attn is not None and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn)
        model.train(training)


def _sample_inputs(model: nn.Module, layers: int) -> tuple:
    """(input_ids, attention_mask, position_ids, *past) with batch 2, 3 new tokens after 4 cached ones (no
    dimension of size 0 or 1, which the exporter would specialise)."""
    batch, new, past_len = 2, 3, 4
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, past_len + new), generator=g)
    with torch.no_grad():
        cache = _cache_of(model(input_ids=ids[:, :past_len], use_cache=True))
    past = []
    for layer in cache.layers[:layers]:
        past += [layer.keys.float().contiguous(), layer.values.float().contiguous()]
    attention_mask = torch.ones(batch, past_len + new, dtype=torch.int64)
    position_ids = torch.arange(past_len, past_len + new).unsqueeze(0).expand(batch, new).contiguous()
    return (ids[:, past_len:], attention_mask, position_ids, *past)


def _export_graph(model: nn.Module, path: Path, external_data: bool, translation: dict | None) -> None:
    from torch.export import Dim

    layers = model.config.get_text_config().num_hidden_layers
    args = _sample_inputs(model, layers)
    wrapper = _CausalLMWithFlatCache(model, layers)
    batch, seq, past, total = (Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length"),
                               Dim("total_sequence_length"))
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
               tuple({0: batch, 2: past} for _ in range(2 * layers)))
    names_in, names_out = _io_names(layers)
    try:
        program = torch.onnx.export(wrapper, args, dynamic_shapes=dynamic, dynamo=True, opset_version=OPSET,
                                    input_names=names_in, output_names=names_out, verbose=False,
                                    custom_translation_table=translation or None)
    except ModuleNotFoundError as e:  # torch's exporter imports onnxscript's API for its own torch version
        if not (e.name or "").startswith("onnxscript"):
            raise
        import onnxscript

        raise ImportError(f"export_onnx: torch {torch.__version__}'s ONNX exporter needs a newer onnxscript than "
                          f"{onnxscript.__version__} (it has no {e.name}): pip install -U 'onnxscript>=0.6' "
                          f"(torch 2.11 and later)") from e
    if external_data:
        _save_external(program.model_proto, path)
    else:
        program.save(str(path))


def _save_external(proto: Any, path: Path) -> None:
    import onnx

    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_NAME, size_threshold=1024)


def _float_bytes(model: nn.Module) -> int:
    return sum(t.numel() * 4 for t in model.parameters() if t.is_floating_point())


def _quantize_dynamic(src: Path, dst: Path, external_data: bool, reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                     op_types_to_quantize=["MatMul"], use_external_data_format=external_data)


def export_onnx(model: nn.Module, save_directory: str | os.PathLike, tokenizer: Any = None, *,
                quantize: str | None = None, accuracy_level: int = 0, external_data: bool | None = None,
                overwrite: bool = False, reduce_range: bool = True) -> Path:
    """Write `model` (an hf_quant model, or a float one with `quantize="dynamic-int8"`) as an ONNX Runtime
    directory that optimum's `ORTModelForCausalLM.from_pretrained(dir)` loads; see the module docstring.

    accuracy_level: MatMulNBits' `accuracy_level` (0: fp32 compute, exact; 4: int8 activations, faster).
    external_data: tensors in `model.onnx_data` beside the graph (default: above 1.5 GiB of weights).
    overwrite: write into an existing non-empty directory (its export files are replaced).
    reduce_range: with quantize="dynamic-int8", 7-bit weights (default; exact on every x86 CPU) or, False,
    8-bit ones (exact only where onnxruntime's int8 kernel does not saturate: VNNI / AMX CPUs, ARM)."""
    _require()
    who = "export_onnx"
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{who}: model_type {model_type!r} is not one the ONNX export supports ({', '.join(ARCHITECTURES)}): "
                         "its graph and cache wiring are untested. Export one of those architectures, or run the model "
                         "in PyTorch.")
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"{who}: quantize={quantize!r} is not one of {QUANTIZE} (or None for the model as it is).")
    if not reduce_range and quantize != "dynamic-int8":
        raise ValueError(f"{who}: reduce_range=False (--full-range) is an option of quantize='dynamic-int8' "
                         "(--dynamic-int8); drop it, or add that.")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"{who}: accuracy_level={accuracy_level!r} must be 0-4 (0: fp32 compute; 4: int8 compute).")
    target = Path(save_directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ValueError(f"{who}: {target} already exists and is not an empty directory; pass overwrite=True "
                         "(--overwrite) to replace its export files, or choose a new directory.")
    away = next(((n, t.device) for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if t.device.type != "cpu"), None)
    if away is not None:
        raise ValueError(f"{who}: {away[0]} is on {away[1]}; the export traces the model on CPU. Load it on CPU "
                         "(no device_map, or device_map='cpu') and export again.")
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    lora = [name for name, m in model.named_modules() if type(m).__name__.startswith("Lora") or hasattr(m, "lora_A")]
    if lora:
        raise ValueError(f"{who}: {lora[0]} holds LoRA adapters; merge them first (hf_quant.merge_lora or "
                         "model.merge_and_unload()) or export the base model.")
    if quantize == "dynamic-int8" and quantized:
        raise ValueError(f"{who}: quantize='dynamic-int8' quantizes a float model, but {next(iter(quantized))} is "
                         "already an hf_quant layer; export this model with quantize=None (its own codes).")
    swaps: dict[str, nn.Module] = {}
    for name, layer in quantized.items():
        why = refusal(name, layer)
        if why is None:
            bs = block_size_of(layer)
            why = ort_support(layer.spec.bits, bs, accuracy_level)
            if why is not None:
                why = (f"{name}: MatMulNBits with bits={layer.spec.bits}, block_size={bs}, "
                       f"accuracy_level={accuracy_level}: {why}. Re-quantize with bits 2, 4 or 8, or upgrade "
                       "onnxruntime.")
        if why is not None:
            raise ValueError(f"{who}: {why}")
        swaps[name] = MatMulNBitsLinear(layer, accuracy_level)
    if external_data is None:
        external_data = _float_bytes(model) - sum(_float_bytes(m) for m in quantized.values()) + sum(
            m.B.numel() + m.scales.numel() * 4 for m in swaps.values()) > EXTERNAL_DATA_BYTES
    import onnxruntime

    with _export_state(model, swaps), atomic_directory(target) as tmp:
        if quantize == "dynamic-int8":
            with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f".{target.name}.float-") as scratch:
                float_path = Path(scratch) / ONNX_NAME
                _export_graph(model, float_path, external_data, None)
                _quantize_dynamic(float_path, tmp / ONNX_NAME, external_data, reduce_range)
        else:
            _export_graph(model, tmp / ONNX_NAME, external_data, _translation_table() if swaps else None)
        cfg = config.to_diff_dict()
        cfg.pop("quantization_config", None)
        cfg["use_cache"] = True
        write_json(tmp / "config.json", cfg)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        from ..version import __version__

        layers = {name: {"bits": m.bits, "block_size": m.block_size, "asymmetric": m.zero_points is not None,
                         "act_order": m.perm is not None, "bias": m.bias is not None} for name, m in swaps.items()}
        write_json(tmp / "hf_quant_onnx.json", {
            "hf_quant_version": __version__, "onnxruntime_version": onnxruntime.__version__,
            "torch_version": torch.__version__, "quantize": quantize or ("matmul_nbits" if swaps else None),
            "accuracy_level": accuracy_level, "opset": OPSET, "external_data": bool(external_data),
            "inputs": _io_names(config.get_text_config().num_hidden_layers)[0][:3], "layers": layers})
    return target


def load_session(directory: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU `InferenceSession` of an `export_onnx` directory (tests and benchmarks)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(Path(directory) / ONNX_NAME), opts, providers=["CPUExecutionProvider"])


def run_session(session: Any, input_ids: torch.Tensor, past: list | None = None, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list]:
    """(logits, present) of one call: `input_ids` (batch, new) after `past` (a previous call's present, or
    None for an empty cache); the attention mask covers past + new (all ones unless given)."""
    import numpy as np

    names = [i.name for i in session.get_inputs()]
    kv = [n for n in names if n.startswith("past_key_values.")]
    batch, new = input_ids.shape
    if past is None:
        shapes = {i.name: i.shape for i in session.get_inputs()}
        past = []
        for n in kv:
            heads, head_dim = shapes[n][1], shapes[n][3]
            past.append(np.zeros((batch, heads, 0, head_dim), np.float32))
    past_len = past[0].shape[2] if past else 0
    mask = (torch.ones(batch, past_len + new, dtype=torch.int64) if attention_mask is None else attention_mask)
    feed = {"input_ids": input_ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)}
    if "position_ids" in names:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        feed["position_ids"] = pos.numpy().astype(np.int64)
    feed.update(zip(kv, past))
    out = session.run(None, feed)
    return torch.from_numpy(out[0]), out[1:]


def greedy(session: Any, input_ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy continuation of one prompt through the exported cache: `new_tokens` ids."""
    logits, past = run_session(session, input_ids)
    out = []
    for _ in range(new_tokens):
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        logits, past = run_session(session, torch.tensor([[tok]]), past)
    return out


__all__ = ["ARCHITECTURES", "MatMulNBitsLinear", "export_onnx", "greedy", "layout_w_hat", "load_session", "ort_support",
           "pack_bits", "run_session", "unpack_bits"]
