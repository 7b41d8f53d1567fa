"""GGUF (llama.cpp) export and import, on the `gguf` package (its writer, reader, constants, name map).

Export: layers on a GGUF grid (`QuantConfig.gguf`) are written as their block bytes, unchanged (the
file computes the same weights as the hf_quant model). Ternary layers (BitNet b1.58: 2-bit symmetric codes
1, 2, 3 = -1, 0, +1 with one scale per row or per 256-multiple group) are written as TQ2_0 (or TQ1_0)
blocks: the same ternary digits, d = the scale in fp16, refused by name where that is not exact. Other
layers are written in float (float layers, and hf_quant layers of other grids dequantized exactly as
hf_quant computes them), or, with `type=`, rounded onto that GGUF type data-free (a second rounding:
warned). Llama-family q/k rows are permuted the way llama.cpp's converter does (rope layout); 1-D
tensors are F32.

Import: a GGUF file of a supported architecture becomes a transformers model whose linears hold the
file's blocks exactly (types hf_quant holds) or float weights (F32/F16/BF16); any other type is
refused naming the tensor, or rounded onto `requantize=` (dequantized by gguf-py first). TQ1_0 / TQ2_0
(BitNet) tensors come back as layers of that block type: the same weights, with float activations (a
GGUF file does not say how activations were rounded; llama.cpp rounds them to Q8_K blocks).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core import LayerSpec, unpack_codes
from ..core import gguf as G
from ..runtime import QuantLinear
from ..core.layers import FLOAT_LINEARS, set_module
from ..runtime.convert import mix_context

logger = logging.getLogger(__name__)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - an install problem
        raise ImportError("GGUF export/import needs the `gguf` package: pip install gguf") from e
    return gguf


@dataclass(frozen=True)
class Arch:
    gguf_name: str  # general.architecture
    permute_qk: bool  # llama.cpp's converter reorders q/k rows for its rope layout


ARCHS = {"llama": Arch("llama", True), "mistral": Arch("llama", True), "qwen2": Arch("qwen2", False),
         "qwen3": Arch("qwen3", False), "gpt2": Arch("gpt2", False)}  # Qwen3: Qwen2 + q/k norms, no biases

# Pre-tokenizer regexes of byte-level BPE tokenizers -> the name llama.cpp knows them by.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _arch(config: Any) -> Arch:
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise ValueError(f"GGUF export: architecture {mt!r} is not supported; supported model types: "
                         f"{sorted(ARCHS)}.")
    return ARCHS[mt]


def permute_qk(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF -> llama.cpp row order of a q/k projection (rows regrouped per head, halves interleaved)."""
    return W.reshape(n_head, 2, W.shape[0] // n_head // 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def unpermute_qk(W: torch.Tensor, n_head: int) -> torch.Tensor:
    return W.reshape(n_head, W.shape[0] // n_head // 2, 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def _rope_rows(data: torch.Tensor, mod_name: str, arch: Arch, n_head: int, n_kv: int, unpermute: bool = False
               ) -> torch.Tensor:
    """A q/k projection's rows in llama.cpp's order (or back, `unpermute`) where the architecture needs it;
    any other tensor unchanged."""
    heads = n_head if mod_name.endswith("q_proj") else n_kv if mod_name.endswith("k_proj") else None
    if not arch.permute_qk or heads is None:
        return data
    return unpermute_qk(data, heads) if unpermute else permute_qk(data, heads)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    kind = params.get("rope_type", "default")
    if kind not in (None, "default"):
        raise ValueError(f"GGUF export: rope_parameters.rope_type={kind!r} is not supported yet (only the default "
                         "rope); export the model with its float weights through llama.cpp's converter instead.")
    return float(theta if theta is not None else 10000.0)


def _head_counts(config: Any) -> tuple[int, int]:
    n_head = config.num_attention_heads
    return n_head, getattr(config, "num_key_value_heads", None) or n_head


def _write_metadata(w: Any, config: Any, arch: Arch) -> None:
    if arch.gguf_name == "gpt2":
        w.add_context_length(config.n_positions)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        w.add_block_count(config.n_layer)
        w.add_head_count(config.n_head)
        w.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    n_head, n_kv = _head_counts(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(_rope_theta(config))


def _pre_tokenizer_parts(spec: dict) -> list[dict]:
    """The tokenizer's pre-tokenizers, a Sequence's members in order."""
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]


def _pre_tokenizer(spec: dict) -> str:
    parts = _pre_tokenizer_parts(spec)
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"]:
        pattern = parts[0].get("pattern", {})
        name = PRE_TOKENIZERS.get(pattern.get("Regex", pattern.get("String")))
        if name is not None:
            return name
    raise ValueError(f"GGUF export: the tokenizer's pre-tokenizer ({kinds}) is not one llama.cpp is known to "
                     f"reproduce (byte-level GPT-2, Llama-3 or Qwen2 splits); llama.cpp would tokenize differently. "
                     "Pass tokenizer=None to write the model without a vocabulary.")


def _byte_level_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: the printable Latin-1 bytes stand for themselves, the other bytes for the
    code points from 256 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _byte_level_covered(spec: dict) -> bool:
    """A byte-level pre-tokenizer and all 256 byte symbols in the vocabulary: every piece of text is made of known
    symbols, so `byte_fallback` (and the unknown token) can never act, and the tokenizer is the plain byte-level
    BPE that llama.cpp's "gpt2" model reproduces (transformers 5.17's GGUF loader sets byte_fallback on the GPT-2
    tokenizers it builds)."""
    vocab = spec.get("model", {}).get("vocab") or {}
    return any(p.get("type") == "ByteLevel" for p in _pre_tokenizer_parts(spec)) and all(c in vocab for c in _byte_level_symbols())


def _write_tokenizer(w: Any, tokenizer: Any, vocab_size: int) -> None:
    import json

    gguf = _gguf()
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    model = (spec or {}).get("model", {})
    if model.get("type") != "BPE" or (model.get("byte_fallback") and not _byte_level_covered(spec)):
        raise ValueError("GGUF export: only byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2 style) are written so far; "
                         f"this one is {model.get('type')!r}{' with byte_fallback' if model.get('byte_fallback') else ''}. "
                         "Pass tokenizer=None to write the model without a vocabulary.")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = tokenizer.convert_ids_to_tokens(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added.get(i, {}).get("special") else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(spec))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            getattr(w, f"add_{kind}_token_id")(tid)
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))


def _float_type(dtype: torch.dtype) -> tuple[Any, Any]:
    gguf = _gguf()
    import numpy as np

    if dtype == torch.float16:
        return gguf.GGMLQuantizationType.F16, np.float16
    return gguf.GGMLQuantizationType.F32, np.float32


TERNARY_TYPES = ("TQ2_0", "TQ1_0")


def ternary_codes(module: QuantLinear) -> torch.Tensor | None:
    """The codes (N, K) of a ternary layer: 2-bit symmetric (zero 2), codes only 1, 2, 3 (-1, 0, +1 times the
    scale), no act-order, input scales, zero points or output norm (BitNet b1.58's layers); else None."""
    spec = module.spec
    if (spec.gguf is not None or spec.bits != 2 or not spec.sym or spec.g_idx or spec.in_scale
            or module.qzeros is not None or module.scales is None or module.scheme.output_norm):
        return None
    codes = unpack_codes(module.qweight, 2, module.in_features).cpu()
    return codes if codes.numel() == 0 or int(codes.min()) >= 1 else None


def ternary_blocks(module: QuantLinear, codes: torch.Tensor, t: G.BlockType, name: str) -> torch.Tensor:
    """A ternary layer's block bytes (N, row_bytes) on TQ2_0 / TQ1_0: digit u = code - 1 (the same -1, 0, +1),
    d = the scale of the block's group as fp16, so d * (u - 1) equals hf_quant's weight exactly. Refuses (naming
    the module) rows not a multiple of 256 wide, groups that split a 256-block, or a scale fp16 cannot hold."""
    N, K = codes.shape
    gs = module.spec.effective_group_size(K)
    fixes = ("Keep the layer in float (QuantConfig(modules_to_not_convert=[...]) when quantizing), or export it "
             "on another type: export_gguf(..., ternary=None) writes it dequantized in float, or rounded onto "
             "type= (e.g. type='Q8_0').")
    if K % t.block or gs % t.block:
        what = f"in_features={K}" if K % t.block else f"group_size={gs}"
        raise ValueError(f"GGUF export: {name} is a ternary (BitNet) layer with {what}, not a multiple of {t.name}'s "
                         f"block width {t.block}; {t.name} cannot hold it exactly. {fixes}")
    scales = module.scales.detach().cpu()
    d = scales.to(torch.float16)
    exact = d.to(scales.dtype) == scales
    used = (codes.reshape(N, -1, gs) != 2).any(-1)  # a group of zeros is exact whatever d is
    bad = used & ~exact
    if bad.any():
        row, g = (int(i) for i in bad.nonzero()[0])
        value = scales[row, g].item()
        why = ("outside fp16's range" if value != 0 and (abs(value) > 65504 or abs(value) < 2.0 ** -24)
               else "not representable in fp16" if torch.isfinite(scales[row, g]) else "not finite")
        raise ValueError(f"GGUF export: {name} is a ternary (BitNet) layer whose {scales.dtype} scale {value!r} (row "
                         f"{row}) is {why}; {t.name} stores d as fp16, so the weights would change ({int(bad.sum())} "
                         f"scale(s) affected). Quantize the model in float16 or bfloat16 (BitNet rounds its scale to "
                         f"the model dtype; bfloat16 values within fp16's range convert exactly). {fixes}")
    d = torch.where(exact, d, torch.zeros_like(d)).float().repeat_interleave(gs // t.block, -1)
    return G.pack(G.Blocks((codes - 1).to(torch.uint8), d), t)


def _tensors(model: nn.Module, arch: Arch, type_: str | None, ternary: str | None = "TQ2_0"
             ) -> list[tuple[str, Any, Any]]:
    """(HF name, numpy data, GGML type or None) of every tensor to write, in the model's order."""
    import numpy as np

    gguf = _gguf()
    config = model.config
    n_head, n_kv = (config.n_head, config.n_head) if arch.gguf_name == "gpt2" else _head_counts(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    target = None if type_ is None else G.block_type(type_)
    tq = None if ternary is None else G.block_type(ternary)
    qc = getattr(config, "quantization_config", None)
    mix = qc.get("gguf") if isinstance(qc, dict) else getattr(qc, "gguf", None)
    mix = mix if mix in G.MIXES else None
    n_layers, n_gqa = mix_context(config)
    rounded: list[str] = []
    out = []
    for mod_name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            if module.scheme.output_norm:
                raise ValueError(f"{mod_name}: cannot export to GGUF: a OneBit layer normalises its product (LN(x @ "
                                 "W^T) + bias), which no GGUF tensor or llama.cpp's llama graph computes. Quantize "
                                 "with QuantConfig(method='onebit', output_norm=False) to export its weights (as "
                                 "float or a GGUF type), or keep hf_quant's own format.")
            W_rows = None
            codes = None if tq is None else ternary_codes(module)
            if module.spec.gguf is not None:
                raw, t = module.qweight.cpu(), G.block_type(module.spec.gguf)
            elif codes is not None:  # BitNet: the ternary digits and their scale, exactly
                raw, t = ternary_blocks(module, codes, tq, mod_name), tq
            elif target is not None:
                G.check_shape(target, module.in_features, mod_name)
                raw, t = G.pack(G.quantize_rtn(module.dequantize().float().cpu(), target), target), target
                rounded.append(mod_name)
            else:
                W_rows, t = module.dequantize().cpu(), None
            data = _rope_rows(raw if W_rows is None else W_rows, mod_name, arch, n_head, n_kv)
            out.append((f"{mod_name}.weight", data, t))
            if module.bias is not None:
                out.append((f"{mod_name}.bias", module.bias.detach(), None))
            continue
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if tied and full.endswith("lm_head.weight"):
                continue  # llama.cpp reuses token_embd
            data = p.detach().cpu()
            if type(module).__name__ == "Conv1D" and pname == "weight":
                data = data.t()  # transformers' Conv1D stores (in, out)
            data = _rope_rows(data, mod_name, arch, n_head, n_kv)
            t = None
            is_matrix = data.dim() == 2 and (isinstance(module, (*FLOAT_LINEARS, nn.Embedding)))
            kept = _source_blocks(module, pname, data) if is_matrix and target is None else None
            if kept is not None and kept[1] is not None:  # an imported quantized embedding, unchanged: its own
                out.append((full, kept[1], kept[0]))  # blocks, byte for byte
                continue
            role, _ = G.role_of(mod_name)
            to = target if kept is None else kept[0]  # changed since the import: rounded onto its file's type
            if to is None and mix is not None and is_matrix and role in ("output", "token_embd"):
                # llama.cpp's mix for the embeddings; a tied token_embd is also the output
                name = "lm_head" if tied and role == "token_embd" else mod_name
                to = G.block_type(G.mix_type(mix, name, n_layers, n_gqa, data.shape[1]))
            if to is not None and is_matrix:
                G.check_shape(to, data.shape[1], full)
                data, t = G.pack(G.quantize_rtn(data.float(), to), to), to
                if target is not None:
                    rounded.append(full)
            out.append((full, data, t))
    if rounded:
        logger.warning("hf_quant: export_gguf rounded %d float or non-GGUF-grid tensor(s) onto %s data-free (a second "
                       "rounding for quantized layers; quantize with QuantConfig(gguf=%r) to calibrate on the GGUF grid "
                       "instead): %s", len(rounded), type_, type_, ", ".join(rounded[:5]) + (" ..." if len(rounded) > 5 else ""))
    result = []
    for name, data, t in out:
        if t is not None:
            result.append((name, data.contiguous().numpy().view(np.uint8), getattr(gguf.GGMLQuantizationType, t.name)))
        else:
            ggml, np_type = _float_type(data.dtype if data.dim() > 1 else torch.float32)
            result.append((name, data.float().numpy().astype(np_type), None if data.dim() == 1 else ggml))
    return result


def export_gguf(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, *, type: str | None = None,
                ternary: str | None = "TQ2_0") -> Path:
    """Write `model` (transformers Llama / Mistral / Qwen2 / Qwen3 / GPT-2, float or hf_quant-quantized) as one GGUF file.

    GGUF-grid layers keep their exact blocks. Ternary layers (BitNet b1.58) are written as `ternary` blocks
    ("TQ2_0", llama.cpp's faster ternary type, or "TQ1_0", 1.69 bits per weight), their ternary digits unchanged
    and d = their scale in fp16 (refused by name where fp16 cannot hold the scale exactly, or the rows are not a
    multiple of 256 wide); `ternary=None` treats them as any other layer. `type` (e.g. "Q8_0", "Q4_K") rounds
    every other matrix onto that type data-free (warned); without it they are written in float (F16 for fp16
    models, else F32). The file is written to a temporary name and renamed: a failed export leaves nothing at `path`.
    """
    gguf = _gguf()
    if ternary is not None and ternary not in TERNARY_TYPES:
        raise ValueError(f"export_gguf: ternary={ternary!r} is not a ternary GGUF type; use one of {TERNARY_TYPES} "
                         "or None.")
    arch = _arch(model.config)
    path = Path(path)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name.upper()], _n_blocks(model.config))
    tensors = _tensors(model, arch, type, ternary)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch.gguf_name)
        w.add_name(getattr(model.config, "_name_or_path", "") or "model")
        _write_metadata(w, model.config, arch)
        w.add_vocab_size(model.config.vocab_size)
        if tokenizer is not None:
            _write_tokenizer(w, tokenizer, model.config.vocab_size)
        else:  # llama.cpp loads a model without a vocabulary only when it says so (token ids in, logits out)
            w.add_tokenizer_model("none")
        w.add_file_type(_file_type(tensors))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, data, ggml in tensors:
            gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ValueError(f"GGUF export: no llama.cpp tensor name for {name!r} ({arch.gguf_name}).")
            w.add_tensor(gname, data, raw_dtype=ggml)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def export_gguf_dir(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Any = None, **_: Any) -> Path:
    """The `gguf` checkpoint format of `hf-quant quantize --format gguf`: OUT/model.gguf."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return export_gguf(model, out / "model.gguf", tokenizer)


def _n_blocks(config: Any) -> int:
    return getattr(config, "num_hidden_layers", None) or config.n_layer


def _file_type(tensors: list) -> Any:
    """general.file_type: the most common quantized type's LlamaFileType (informational in llama.cpp)."""
    gguf = _gguf()
    counts = Counter(t.name for _, _, t in tensors if t is not None and t.name not in ("F32", "F16", "BF16"))
    if not counts:
        return gguf.LlamaFileType.ALL_F32
    name = counts.most_common(1)[0][0]
    return getattr(gguf.LlamaFileType, f"MOSTLY_{name}", getattr(gguf.LlamaFileType, f"MOSTLY_{name}_M", 0))


# --- import ---------------------------------------------------------------------------------------

_IMPORT_CONFIG = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}  # general.architecture -> transformers config


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _config_from_gguf(reader: Any) -> Any:
    import transformers

    arch = _field(reader, "general.architecture")
    if arch not in _IMPORT_CONFIG:
        raise ValueError(f"import_gguf: architecture {arch!r} is not supported; supported: {sorted(_IMPORT_CONFIG)}.")
    cls_name = _IMPORT_CONFIG[arch]
    n_head = _field(reader, f"{arch}.attention.head_count")
    n_embd = _field(reader, f"{arch}.embedding_length")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    vocab = _field(reader, f"{arch}.vocab_size") or next(t.shape[-1] for t in reader.tensors if t.name == "token_embd.weight")
    head_dim = _field(reader, f"{arch}.rope.dimension_count") or n_embd // n_head
    return getattr(transformers, cls_name)(
        vocab_size=int(vocab), hidden_size=int(n_embd),
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")), num_attention_heads=int(n_head),
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)), head_dim=int(head_dim),
        tie_word_embeddings=not has_output,
        **({"bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id"))}
           if _field(reader, "tokenizer.ggml.bos_token_id") is not None else {}),
        **({"eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id"))}
           if _field(reader, "tokenizer.ggml.eos_token_id") is not None else {}),
    ), arch


def import_gguf(path: str | os.PathLike, dst_dir: str | os.PathLike | None = None, *, requantize: str | None = None,
                dtype: torch.dtype | None = None, tokenizer: Any = None) -> nn.Module | Path:
    """An hf_quant model (Llama / Qwen2 / Qwen3) built from a GGUF file, its linears holding the file's blocks.

    Linears of a type hf_quant holds (core/gguf.py TYPES) keep their block bytes exactly (export_gguf writes
    them back byte for byte); F32/F16/BF16 tensors load as float in `dtype`. Another quantized type is refused
    naming the tensor and type, unless `requantize` names a GGUF type to round it onto (after gguf-py's
    dequantization). Norms and embeddings load as float, in `dtype` (default: the dtype that holds the file's
    float tensors exactly, fp32 unless they are all F16 or all BF16). With `dst_dir`: writes the hf_quant checkpoint there
    (atomically, with `tokenizer` if given) and returns its path; without: returns the loaded model.
    """
    from transformers import AutoModelForCausalLM

    from .atomic import atomic_directory

    model, blocks = _build_from_gguf(path, requantize, dtype)
    if dst_dir is not None:
        with atomic_directory(dst_dir) as tmp:
            type(model).save_pretrained(model, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return Path(dst_dir)
    with tempfile.TemporaryDirectory(prefix="hf_quant-gguf-") as tmp:  # load through transformers: a normal
        type(model).save_pretrained(model, tmp)  # hf_quant model (its quantizer attached, saves like any other)
        loaded = AutoModelForCausalLM.from_pretrained(tmp)
        for t in list(loaded.parameters()) + list(loaded.buffers()):  # no storage may outlive the files it maps
            if t.device.type == "cpu" and not t.is_meta:
                t.data = t.data.clone()
    attach_source_blocks(loaded, blocks)
    return loaded


SOURCE_BLOCKS = "_hf_quant_gguf_blocks"


def attach_source_blocks(model: nn.Module, blocks: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Remember the file's blocks of quantized float-held tensors (embeddings) on their modules, in memory
    only: export_gguf writes them back unchanged while the float weight still equals their dequantization
    (K-quant rounding is not idempotent, so re-rounding the dequantized weight would change the bytes)."""
    for hf_name, (type_name, raw) in blocks.items():
        mod_name, pname = hf_name.rsplit(".", 1)
        module = model.get_submodule(mod_name)
        module.__dict__.setdefault(SOURCE_BLOCKS, {})[pname] = (type_name, raw)


def _source_blocks(module: nn.Module, pname: str, data: torch.Tensor) -> tuple[Any, torch.Tensor | None] | None:
    """(type, blocks) that `attach_source_blocks` kept for this parameter: the blocks if its value is still
    theirs, else None (changed since the import: to be rounded again onto the same type)."""
    found = module.__dict__.get(SOURCE_BLOCKS, {}).get(pname)
    if found is None or data.dim() != 2:
        return None
    t, raw = G.block_type(found[0]), found[1]
    if raw.shape[0] != data.shape[0] or data.shape[1] % t.block:
        return None
    return t, raw if torch.equal(G.dequantize(raw, t, data.shape[1]).to(data.dtype), data) else None


def _build_from_gguf(path: str | os.PathLike, requantize: str | None, dtype: torch.dtype
                     ) -> tuple[nn.Module, dict[str, tuple[str, torch.Tensor]]]:
    gguf = _gguf()
    from transformers import AutoModelForCausalLM

    try:
        reader = gguf.GGUFReader(os.fspath(path))
    except Exception as e:  # the reader raises ValueError/IndexError/struct.error on damaged files
        raise ValueError(f"import_gguf: {path} is not a readable GGUF file ({type(e).__name__}: {e}); it is truncated "
                         "or corrupt.") from e
    config, arch = _config_from_gguf(reader)
    if dtype is None:
        kinds = {t.tensor_type.name for t in reader.tensors if t.tensor_type.name in ("F32", "F16", "BF16")}
        dtype = {frozenset({"F16"}): torch.float16, frozenset({"BF16"}): torch.bfloat16}.get(frozenset(kinds),
                                                                                             torch.float32)
    rope = ARCHS[config.model_type]
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    hf_of = {}
    for hf_name in model.state_dict():
        g = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g is not None:
            hf_of[g] = hf_name
    float_types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    state: dict[str, torch.Tensor] = {}
    layer_types: dict[str, str] = {}
    blocks: dict[str, tuple[str, torch.Tensor]] = {}
    for t in reader.tensors:
        if t.name not in hf_of:
            raise ValueError(f"import_gguf: tensor {t.name!r} has no place in a {arch} model.")
        hf_name = hf_of[t.name]
        mod_name = hf_name.rsplit(".", 1)[0]
        module = model.get_submodule(mod_name)
        is_linear = isinstance(module, nn.Linear) and hf_name.endswith(".weight")
        if t.tensor_type in float_types or not is_linear:  # float, or a quantized embedding: dequantized
            W = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            W = W.reshape(module.get_parameter(hf_name.rsplit(".", 1)[1]).shape)
            if t.tensor_type not in float_types and t.tensor_type.name in G.TYPES:  # its blocks, for export_gguf
                blocks[hf_name] = (t.tensor_type.name, torch.from_numpy(t.data.copy()).reshape(W.shape[0], -1))
            if is_linear:
                W = _rope_rows(W, mod_name, rope, n_head, n_kv, unpermute=True)
            state[hf_name] = W.to(dtype)
            continue
        name = t.tensor_type.name
        raw = torch.from_numpy(t.data.copy()).reshape(module.out_features, -1)
        if name not in G.TYPES:
            if requantize is None:
                raise ValueError(f"import_gguf: tensor {t.name!r} has type {name}, which hf_quant cannot hold "
                                 f"exactly (supported: {sorted(G.TYPES)}); pass requantize='Q8_0' (or another type) "
                                 "to round it onto a supported type.")
            W = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(module.out_features, -1)
            target = G.block_type(requantize)
            raw, name = G.pack(G.quantize_rtn(W, target), target), target.name
        state[hf_name] = _rope_rows(raw, mod_name, rope, n_head, n_kv, unpermute=True)
        layer_types[mod_name] = name
    return _assemble(model, state, layer_types, dtype), blocks


def _assemble(model: nn.Module, state: dict[str, torch.Tensor], layer_types: dict[str, str],
              dtype: torch.dtype) -> nn.Module:
    """Swap the GGUF-typed linears for QuantLinear layers, load every tensor, and attach the config."""
    from ..config import QuantConfig

    common = Counter(layer_types.values()).most_common(1)[0][0] if layer_types else None
    for mod_name, type_name in layer_types.items():
        old = model.get_submodule(mod_name)
        t = G.block_type(type_name)
        spec = LayerSpec(t.bits, t.sub, t.zero is not None, False, t.name)
        layer = QuantLinear(old.in_features, old.out_features, old.bias is not None, spec, dtype=dtype)
        layer.qweight = state.pop(f"{mod_name}.weight").contiguous()
        if old.bias is not None:
            layer.bias = nn.Parameter(state.pop(f"{mod_name}.bias").to(dtype), requires_grad=False)
        set_module(model, mod_name, layer)
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    for n, m in list(model.named_modules()):  # rotary tables: non-persistent buffers, rebuilt from the config
        if n.endswith("rotary_emb") and any(b.is_meta for b in m.buffers()):
            with torch.device("cpu"):
                set_module(model, n, type(m)(config=model.config))
    missing = [n for n in missing if "rotary_emb" not in n]
    if missing:
        raise ValueError(f"import_gguf: the file has no tensor for {missing[:5]}; it is incomplete.")
    dynamic = {f"+:^{re.escape(n)}$": {"gguf": t} for n, t in layer_types.items() if t != common}
    linears = {n for n, m in model.named_modules() if isinstance(m, FLOAT_LINEARS) and not isinstance(m, QuantLinear)}
    if common is not None:
        model.config.quantization_config = QuantConfig(method="rtn", gguf=common, dynamic=dynamic or None,
                                                       modules_to_not_convert=sorted(linears))
    model.eval()
    return model


__all__ = ["export_gguf", "import_gguf", "permute_qk", "unpermute_qk"]
