"""BitNet b1.58 to GGUF: llama.cpp's ternary block types TQ2_0 / TQ1_0 (core/gguf.py) against gguf-py's reference
quantize / dequantize and llama.cpp's own C dequantization; a ternary tiny-llama exported exactly (its codes and
scale unchanged), read back by transformers' GGUF loader and by import_gguf, and run by llama.cpp."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant import QuantConfig, QuantLinear
from hf_quant.core import gguf as G
from hf_quant.io.gguf import permute_qk, ternary_blocks, ternary_codes

from .conftest import TINY_LLAMA, save_random_model

gguf = pytest.importorskip("gguf")

TERNARY = ("TQ2_0", "TQ1_0")


def _qtype(name):
    return getattr(gguf.GGMLQuantizationType, name)


def _ternary_weights(N, K, seed):
    """Ternary values times one fp16-exact scale per 256-block (some blocks all zero), fp32."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (N, K), generator=g).float()
    t[0, :256] = 0  # an all-zero block: d = 0
    d = (torch.rand(N, K // 256, generator=g) * 0.1).to(torch.float16).float()
    return t * d.repeat_interleave(256, -1), t


@pytest.mark.parametrize("name", TERNARY)
def test_ternary_layout_round_trips_through_gguf_py(name):
    """gguf-py's reference quantizer's bytes: our fields read the same ternary digits and d, pack back to the same
    bytes, and dequantize bit for bit as gguf-py does; our round-to-nearest (d = absmax, as llama.cpp) writes
    the same bytes; fields we pack from digits and d are read by gguf-py as those values."""
    t = G.TYPES[name]
    N, K = 5, 3 * 256
    W, tern = _ternary_weights(N, K, 0)
    ref = np.ascontiguousarray(gguf.quants.quantize(W.numpy(), _qtype(name)))
    raw = torch.from_numpy(ref.copy()).reshape(N, -1)
    assert raw.shape == (N, G.row_bytes(t, K))
    f = G.unpack(raw, t, K)
    assert torch.equal(f.codes.float() - 1, tern)
    assert torch.equal(f.d.float(), W.abs().reshape(N, -1, 256).amax(-1))
    assert torch.equal(G.pack(f, t), raw)
    oracle = torch.from_numpy(gguf.quants.dequantize(ref, _qtype(name))).reshape(N, K)
    assert torch.equal(G.dequantize(raw, t, K), oracle) and torch.equal(oracle, W)
    assert torch.equal(G.pack(G.quantize_rtn(W, t), t), raw)
    mine = G.pack(G.Blocks((tern + 1).to(torch.uint8), f.d), t)
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(mine.numpy(), _qtype(name))).reshape(N, K), W)
    with pytest.raises(ValueError, match="ternary codes 0, 1, 2 only") if name == "TQ1_0" else _no_error():
        G.pack(G.Blocks(torch.full((1, 256), 3, dtype=torch.uint8), torch.ones(1, 1)), t)


class _no_error:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _ggml_dequantize():
    """llama.cpp's own `dequantize_row_<type>` (ggml-base, shipped with llama-cpp-python), or skip."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(lib_dir.glob("*ggml-base.*"))
    if not found:
        pytest.skip(f"no ggml-base library next to llama_cpp ({lib_dir})")
    lib = ctypes.CDLL(str(found[0]))

    def dequantize(raw: np.ndarray, name: str, n: int) -> np.ndarray:
        fn = getattr(lib, f"dequantize_row_{name.lower()}")
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.empty(n, np.float32)
        fn(raw.ctypes.data, out.ctypes.data, n)
        return out

    return dequantize


@pytest.mark.parametrize("name", TERNARY)
def test_llama_cpps_own_dequantization_matches_on_random_bytes(name):
    """Any bytes (TQ2_0's digit 3 included; TQ1_0's spare byte values included), finite d: llama.cpp's C
    dequantize_row_tq*_0 gives our weights bit for bit."""
    dequantize = _ggml_dequantize()
    t = G.TYPES[name]
    N, K = 4, 2 * 256
    raw = torch.randint(0, 256, (N, G.row_bytes(t, K)), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    d = (torch.randn(N, K // 256, generator=torch.Generator().manual_seed(2))).to(torch.float16)
    raw.view(N, -1, t.nbytes)[..., -2:] = d.unsqueeze(-1).view(torch.uint8)
    theirs = dequantize(raw.numpy(), name, N * K).reshape(N, K)
    assert torch.equal(G.dequantize(raw, t, K), torch.from_numpy(theirs))


@pytest.fixture(scope="module")
def bitnet():
    """tiny-llama rounded to BitNet b1.58 in bf16 (its own dtype): gamma held in bf16, which fp16 holds exactly."""
    return AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.bfloat16,
                                                quantization_config=QuantConfig(method="bitnet"))


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("name", TERNARY)
def test_bitnet_exports_exactly_and_reads_back(bitnet, tmp_path, name):
    """Every BitNet layer is written as `name` blocks (no other type, embeddings in F32); transformers' GGUF loader
    (gguf-py's dequantization) reads exactly hf_quant's weights; import_gguf gives `name` layers with the same
    weights, which export back byte for byte."""
    layers = _layers(bitnet)
    assert len(layers) == 28 and all(ternary_codes(m) is not None for m in layers.values())
    path = hf_quant.export_gguf(bitnet, tmp_path / "m.gguf", ternary=name)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert sum(v == name for v in types.values()) == 28 and set(types.values()) == {name, "F32"}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    sd = hf.state_dict()
    for n, m in layers.items():
        assert torch.equal(m.dequantize().float(), sd[f"{n}.weight"]), n
    back = hf_quant.import_gguf(path, dtype=torch.float32)
    got = _layers(back)
    assert got.keys() == layers.keys() and all(m.spec.gguf == name for m in got.values())
    for n, m in layers.items():
        assert torch.equal(m.dequantize().float(), got[n].dequantize()), n
    again = gguf.GGUFReader(hf_quant.export_gguf(back, tmp_path / "again.gguf", ternary=name))
    for x, y in zip(reader.tensors, again.tensors):
        assert x.name == y.name and x.tensor_type == y.tensor_type and np.array_equal(x.data, y.data), x.name


def test_ternary_export_refusals(bitnet, tmp_path):
    """Where d = the scale in fp16 would change the weights, or the rows do not fill 256-blocks, the export refuses
    naming the module and the fixes; ternary=None writes such layers as before (float, or rounded onto type=)."""
    fp32 = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32,
                                                quantization_config=QuantConfig(method="bitnet"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj is a ternary \(BitNet\) layer whose "
                                         r"torch\.float32 scale .* not representable in fp16.*float16 or bfloat16.*"
                                         r"modules_to_not_convert.*ternary=None.*type="):
        hf_quant.export_gguf(fp32, tmp_path / "fp32.gguf")
    assert not (tmp_path / "fp32.gguf").exists()
    p = hf_quant.export_gguf(fp32, tmp_path / "f32.gguf", ternary=None)
    assert {t.tensor_type.name for t in gguf.GGUFReader(p).tensors} == {"F32"}
    p = hf_quant.export_gguf(fp32, tmp_path / "q8.gguf", ternary=None, type="Q8_0")
    assert {t.tensor_type.name for t in gguf.GGUFReader(p).tensors} == {"Q8_0", "F32"}
    # a group of zeros needs no exact d: written with d = 0
    layer = fp32.model.layers[0].self_attn.q_proj
    zeros = torch.full((layer.out_features, layer.in_features), 2, dtype=torch.uint8)
    raw = ternary_blocks(layer, zeros, G.TYPES["TQ2_0"], "q_proj")
    assert torch.equal(G.dequantize(raw, G.TYPES["TQ2_0"], layer.in_features), torch.zeros(zeros.shape))
    # a bf16 scale beyond fp16's range
    v = bitnet.model.layers[1].mlp.down_proj
    kept = v.scales.clone()
    try:
        v.scales.fill_(1e6)
        with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj is a ternary .* torch\.bfloat16 scale "
                                             r"999424\.0 .* outside fp16's range"):
            hf_quant.export_gguf(bitnet, tmp_path / "big.gguf")
    finally:
        v.scales.copy_(kept)
    # rows of 128
    narrow = AutoModelForCausalLM.from_pretrained(save_random_model(tmp_path / "narrow", "llama"), dtype=torch.bfloat16,
                                                  quantization_config=QuantConfig(method="bitnet"))
    with pytest.raises(ValueError, match=r"q_proj is a ternary \(BitNet\) layer with in_features=128, not a multiple of "
                                         r"TQ2_0's block width 256.*modules_to_not_convert.*ternary=None"):
        hf_quant.export_gguf(narrow, tmp_path / "narrow.gguf")
    with pytest.raises(ValueError, match=r"ternary='Q4_0' is not a ternary GGUF type"):
        hf_quant.export_gguf(bitnet, tmp_path / "x.gguf", ternary="Q4_0")


# llama.cpp against hf_quant on the bf16 BitNet tiny-llama, 2 windows of 128 tokens of the bundled text, relative to
# the largest |logit| (about 21). Measured (llama-cpp-python 0.3.36, CPU):
#   llama.cpp TQ2_0 (and TQ1_0, identical logits) vs hf_quant:  max 0.0118 (0.25), mean |d| 0.018, top-1 0.984
#   llama.cpp Q8_0 of the same weights (ternary=None, type="Q8_0", an ordinary type):  max 0.0150, top-1 0.984
#   llama.cpp F32 of the same weights (no activation rounding in llama.cpp):  max 0.0110 -- hf_quant's own int8
#   per-token activations against float ones; llama.cpp TQ2_0 vs the float ternary model: max 0.0071.
# (3 windows, fp32 / fp16 BitNet models: TQ2_0 0.013 / 0.011, Q8_0 0.013 / 0.012.) The weights are exact
# (checked bit for bit through llama.cpp's own dequantization below); what differs is how activations are
# rounded: hf_quant to int8 per token (BitNet's absmax), llama.cpp to Q8_K (int8 per block of 256, one fp32 scale
# each) for TQ matmuls, Q8_0 (per 32) for Q8_0. So the bound is that of an ordinary type: 0.03 (twice the
# measured Q8_0 difference), and no more than 1.5x what Q8_0 differs by.
LC_MAX_REL = 0.03


def test_llama_cpp_runs_the_ternary_export(bitnet, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    del llama_cpp
    from hf_quant.eval_gguf import llama_cpp_logits, load_llama_cpp

    dequantize = _ggml_dequantize()
    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)
    ids = tok(hf_quant.eval.bundled_text()[:8000], add_special_tokens=False).input_ids
    windows = [ids[i * 128:(i + 1) * 128] for i in range(2)]
    with torch.no_grad():
        ours = np.concatenate([bitnet(input_ids=torch.tensor([w])).logits[0].float().numpy() for w in windows])
    logits, rel = {}, {}
    for label, kw in (("TQ2_0", {}), ("TQ1_0", {"ternary": "TQ1_0"}), ("Q8_0", {"ternary": None, "type": "Q8_0"})):
        path = hf_quant.export_gguf(bitnet, tmp_path / f"{label}.gguf", tok, **kw)
        llm = load_llama_cpp(path, n_ctx=128)
        logits[label] = np.concatenate([llama_cpp_logits(llm, w) for w in windows])
        del llm
        rel[label] = float(np.abs(logits[label] - ours).max() / np.abs(ours).max())
        if label != "Q8_0":  # llama.cpp's own dequantization of each ternary tensor: hf_quant's weights exactly
            reader = gguf.GGUFReader(path)
            tensors = {t.name: t for t in reader.tensors}
            config = bitnet.config
            for n, m in _layers(bitnet).items():
                i, role = n.split(".")[2], {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj":
                                            "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                                            "down_proj": "ffn_down"}[n.rsplit(".", 1)[1]]
                t = tensors[f"blk.{i}.{role}.weight"]
                assert t.tensor_type.name == label
                W = torch.from_numpy(dequantize(t.data, label, m.out_features * m.in_features))
                W = W.reshape(m.out_features, m.in_features)
                heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(role)
                mine = m.dequantize().float()
                assert torch.equal(W, mine if heads is None else permute_qk(mine, heads)), n
    top1 = {k: float((v.argmax(-1) == ours.argmax(-1)).mean()) for k, v in logits.items()}
    assert rel["TQ2_0"] < LC_MAX_REL and top1["TQ2_0"] >= 0.95, (rel, top1)
    assert rel["TQ2_0"] <= 1.5 * rel["Q8_0"], (rel, top1)
    # the same weights and the same Q8_K activations: TQ1_0 computes what TQ2_0 does (identical here)
    np.testing.assert_allclose(logits["TQ1_0"], logits["TQ2_0"], rtol=0, atol=1e-3)


def test_cli_export_gguf_writes_bitnet_as_ternary(tmp_path, capsys):
    """hf-quant quantize --method bitnet, then export-gguf: TQ2_0 by default, --ternary TQ1_0, or --ternary none
    (the old float export)."""
    import json

    from hf_quant.cli import main

    def run(*argv):
        main(["-q", *map(str, argv)])
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    q = tmp_path / "q"
    run("quantize", TINY_LLAMA, q, "--method", "bitnet", "--dtype", "bfloat16")
    for flag, want in ((None, "TQ2_0"), ("TQ1_0", "TQ1_0"), ("none", "F32")):
        out = tmp_path / f"{want}.gguf"
        run("export-gguf", q, out, *(() if flag is None else ("--ternary", flag)))
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
        assert types["blk.0.attn_q.weight"] == want and types["blk.3.ffn_down.weight"] == want
