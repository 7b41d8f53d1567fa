"""Checkpoint formats: one registry of exporters and importers.

Each format is a pure codec (tensors in, tensors out: `gptq_codec`) plus its file handling
(`native`, `gptq`), which reads only safetensors, checks headers before reading tensors, and
writes all-or-nothing (`atomic.atomic_directory`). Adding a format = one module here that
calls `register_format`, imported below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.registry import Registry


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    export: Callable[..., Path] | None = None  # export(model, out_dir, *, tokenizer=None, **options)
    import_: Callable[..., Path] | None = None  # import_(src, out_dir, **options) -> an hf_quant checkpoint


FORMATS: Registry[Format] = Registry("checkpoint format")


def register_format(fmt: Format) -> Format:
    return FORMATS.register(fmt.name, fmt)


def get_format(name: str) -> Format:
    return FORMATS.get(name)


def available_formats(*, exporting: bool = False, importing: bool = False) -> list[str]:
    return [f.name for f in FORMATS.values()
            if (not exporting or f.export is not None) and (not importing or f.import_ is not None)]


from . import bitnet, bnb, gguf, gptq, native, onnx  # noqa: E402

register_format(Format("hf_quant", "hf_quant's own safetensors layout (README: On-disk format)",
                       export=native.export_native))
register_format(Format("gptq", "the GPTQ layout vLLM / TGI / GPTQModel / transformers load (v1 or v2)",
                       export=gptq.export_gptq, import_=gptq.import_gptq))
register_format(Format("bnb8", "bitsandbytes' 8-bit (load_in_8bit, LLM.int8) layout transformers loads; "
                       "llm_int8 / w8a8 models only", export=bnb.export_bnb8, import_=bnb.import_bnb8))
register_format(Format("bitnet", "transformers' own BitNet layout (BitLinear, offline: ternary weights packed 4 per "
                       "byte, 1/gamma); bitnet models only", export=bitnet.export_bitnet, import_=bitnet.import_bitnet))
register_format(Format("gguf", "one GGUF file for llama.cpp, OUT/model.gguf (GGUF-grid layers exactly, others in "
                       "float)", export=gguf.export_gguf_dir))
register_format(Format("onnx", "an ONNX Runtime directory (optimum's ORTModelForCausalLM loads it): every quantized "
                       "linear one MatMulNBits node with hf_quant's codes (2/4/8 bits)", export=onnx.export_onnx))

__all__ = ["FORMATS", "Format", "available_formats", "get_format", "register_format"]
