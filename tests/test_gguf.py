"""GGUF grids, export and import: gguf-py (the `gguf` package transformers also loads with) is the oracle
for the block layouts; transformers' own GGUF loader checks exported files. llama.cpp itself judges them
in tests/test_gguf_llama_cpp.py."""

import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant import QuantConfig, QuantLinear
from hf_quant.config import LayerSpec
from hf_quant.core import gguf as G
from hf_quant.methods import get_method

from .conftest import TINY_LLAMA, train_steps

gguf = pytest.importorskip("gguf")


def _oracle(raw: torch.Tensor, name: str, shape) -> torch.Tensor:
    out = gguf.quants.dequantize(raw.numpy(), getattr(gguf.GGMLQuantizationType, name))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


@pytest.mark.parametrize("name", sorted(G.TYPES))
@pytest.mark.parametrize("seed", [0, 1])
def test_codec_matches_gguf_py_on_random_bytes(name, seed):
    """Any bytes: our fields -> weights equal gguf-py's dequantization bit for bit (NaN/inf where its fp16
    scales are), and fields -> bytes gives the same bytes back (TQ1_0: bytes that decode the same; its base-3
    bytes have 13 spare values, written back in llama.cpp's canonical form)."""
    t = G.TYPES[name]
    g = torch.Generator().manual_seed(seed)
    N, K = 3 + seed, t.block * (2 + seed)
    raw = torch.randint(0, 256, (N, G.row_bytes(t, K)), dtype=torch.uint8, generator=g)
    fields = G.unpack(raw, t, K)
    assert fields.codes.max() <= (1 << t.bits) - 1
    ours, ref = G.dequantize_fields(fields, t), _oracle(raw, name, (N, K))
    assert torch.equal(torch.nan_to_num(ours, 7.0, 8.0, -8.0), torch.nan_to_num(ref, 7.0, 8.0, -8.0))
    if name == "TQ1_0":
        again = _oracle(G.pack(fields, t), name, (N, K))
        assert torch.equal(torch.nan_to_num(again, 7.0, 8.0, -8.0), torch.nan_to_num(ref, 7.0, 8.0, -8.0))
    else:
        assert torch.equal(G.pack(fields, t), raw)


# relative Frobenius error of RTN on Gaussian weights, with headroom (llama.cpp's reference quantizers
# measure about the same: Q8_0 0.006, Q4_K 0.08, Q2_K 0.33 here; the ternary types, d = absmax as llama.cpp sets
# it, 0.81: they are meant for ternary-trained weights (BitNet), not for rounding Gaussian ones)
_RTN_ERR = {"Q8_0": 0.01, "Q4_0": 0.12, "Q4_1": 0.1, "Q5_0": 0.06, "Q5_1": 0.05, "Q2_K": 0.4, "Q3_K": 0.2,
            "Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.03, "TQ1_0": 0.85, "TQ2_0": 0.85}


@pytest.mark.parametrize("name", sorted(G.TYPES))
def test_rtn_onto_each_type(name):
    t = G.TYPES[name]
    W = torch.randn(8, 2 * t.block, generator=torch.Generator().manual_seed(3))
    W[0, 5] = 9.0  # an outlier: its block's range must cover it
    qw = get_method("rtn").quantize(W, LayerSpec(t.bits, t.sub, t.zero is not None, False, name), torch.float32)
    W_hat = _oracle(qw.raw, name, W.shape)
    err = ((W_hat - W).norm() / W.norm()).item()
    assert err < _RTN_ERR[name], err
    assert abs(W_hat[0, 5] - 9.0) < 0.5 * 9.0 / (t.maxq // 2)  # within about a step of the outlier
    assert torch.equal(G.dequantize(qw.raw, t, W.shape[1]), W_hat)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q3_K", "Q6_K"])
def test_gptq_on_gguf_grid_beats_rtn_on_the_layer_loss(name):
    """GPTQ's group step finds each super-block's grid from the updated weights: its output error
    ||(W - W_hat) X|| on correlated inputs is below RTN's on the same grid type."""
    t = G.TYPES[name]
    g = torch.Generator().manual_seed(0)
    K = 2 * t.block
    X = torch.randn(1024, K, generator=g) @ torch.randn(K, K, generator=g) / K**0.5  # correlated channels
    W = torch.randn(32, K, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    spec = LayerSpec(t.bits, t.sub, t.zero is not None, False, name)
    errs = {}
    for method, kw in (("rtn", {}), ("gptq", {"H": H})):
        qw = get_method(method).quantize(W, spec, torch.float32, **kw)
        assert qw.raw.shape == (32, G.row_bytes(t, K))
        errs[method] = ((_oracle(qw.raw, name, W.shape) - W) @ X.T).norm().item()
    assert errs["gptq"] < 0.9 * errs["rtn"], errs


def test_config_validation():
    with pytest.raises(ValueError, match=r"QuantConfig.gguf='Q4_K_S'.*Q4_K"):
        QuantConfig(gguf="Q4_K_S")
    with pytest.raises(ValueError, match=r"gguf='Q4_K': method='llm_int8' cannot.*awq.*gptq.*omniquant"):
        QuantConfig(method="llm_int8", gguf="Q4_K")
    with pytest.raises(ValueError, match="desc_act=False"):
        QuantConfig(method="gptq", gguf="Q4_K", desc_act=True)
    with pytest.raises(ValueError, match=r"dynamic\['v_proj'\]\['gguf'\]"):
        QuantConfig(gguf="Q4_K", dynamic={"v_proj": {"gguf": "Q7"}})
    cfg = QuantConfig(gguf="Q4_K", dynamic={r"v_proj": {"gguf": "Q6_K"}})
    assert cfg.layer_spec("model.layers.0.self_attn.v_proj") == LayerSpec(6, 16, True, False, "Q6_K")
    assert cfg.layer_spec("model.layers.0.mlp.up_proj") == LayerSpec(4, 32, False, False, "Q4_K")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_mix_rules():
    """llama.cpp's mixes: attn_v / ffn_down get more bits in the first and last eighth and every third layer
    (Q4_K_M / Q5_K_M), Q3_K_M grades them by depth, the output layer is Q6_K, narrow rows fall back."""
    cfg = QuantConfig(gguf="Q4_K_M")
    with pytest.raises(ValueError, match="is a mix.*n_layers"):
        cfg.layer_spec("model.layers.0.self_attn.v_proj")
    v = [cfg.layer_spec(f"model.layers.{i}.self_attn.v_proj", 32).gguf for i in range(32)]
    assert [i for i, t in enumerate(v) if t == "Q6_K"] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert set(v) == {"Q4_K", "Q6_K"} and cfg.layer_spec("model.layers.5.mlp.up_proj", 32).gguf == "Q4_K"
    assert cfg.layer_spec("lm_head", 32).gguf == "Q6_K"
    assert cfg.layer_spec("model.layers.5.mlp.up_proj", 32, in_features=4160).gguf == "Q5_0"  # 4160 % 256 != 0
    q3 = QuantConfig(gguf="Q3_K_M")
    assert [q3.layer_spec(f"model.layers.{i}.self_attn.v_proj", 32).gguf for i in (0, 1, 2)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert [q3.layer_spec(f"model.layers.{i}.mlp.down_proj", 32).gguf for i in (0, 1, 2)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert q3.layer_spec("model.layers.4.self_attn.o_proj", 32).gguf == "Q4_K"
    q2 = QuantConfig(gguf="Q2_K_M")
    assert q2.layer_spec("model.layers.4.self_attn.v_proj", 32, n_gqa=4).gguf == "Q4_K"
    assert q2.layer_spec("model.layers.4.self_attn.q_proj", 32, n_gqa=4).gguf == "Q2_K"


@pytest.fixture(scope="module")
def tiny_q4k():
    return AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32,
                                                quantization_config=QuantConfig(gguf="Q4_K"))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_LLAMA)


def _ids(n=24):
    return torch.randint(0, 8000, (2, n), generator=torch.Generator().manual_seed(5))


def test_gguf_layers_save_and_reload_exactly(tiny_q4k, tmp_path):
    layers = [m for m in tiny_q4k.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.spec.gguf == "Q4_K" and m.scales is None for m in layers)
    tiny_q4k.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(tiny_q4k(_ids()).logits, again(_ids()).logits)
    sd = again.state_dict()
    assert all(torch.equal(m.qweight, sd[f"{n}.qweight"]) for n, m in tiny_q4k.named_modules()
               if isinstance(m, QuantLinear))


def test_export_loads_in_transformers_with_equal_weights(tiny_q4k, tmp_path):
    """transformers' GGUF loader (gguf-py dequantization, its own q/k un-permutation) gives exactly the
    weights hf_quant computes with, and so the same logits."""
    hf_quant.export_gguf(tiny_q4k, tmp_path / "m.gguf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    sd = hf.state_dict()
    for name, m in tiny_q4k.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.dequantize(), sd[f"{name}.weight"]), name
    with torch.no_grad():
        assert torch.equal(tiny_q4k(_ids()).logits, hf(_ids()).logits)


def test_import_is_exact_and_round_trip_is_byte_identical(tiny_q4k, tokenizer, tmp_path):
    first = hf_quant.export_gguf(tiny_q4k, tmp_path / "a.gguf", tokenizer)
    model = hf_quant.import_gguf(first, dtype=torch.float32)
    assert all(m.spec.gguf == "Q4_K" for m in model.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        assert torch.equal(tiny_q4k(_ids()).logits, model(_ids()).logits)
    second = hf_quant.export_gguf(model, tmp_path / "b.gguf", tokenizer)
    a, b = gguf.GGUFReader(first), gguf.GGUFReader(second)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x.tensor_type == y.tensor_type and np.array_equal(x.data, y.data), x.name
    model.save_pretrained(tmp_path / "hf")  # an imported model is an hf_quant checkpoint like any other
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(again(_ids()).logits, model(_ids()).logits)


def _with_model(tokenizer, edit):
    """A copy of `tokenizer` whose tokenizers JSON went through `edit` (a function of the parsed spec)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    edit(spec)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   **{f"{k}_token": getattr(tokenizer, f"{k}_token") for k in ("bos", "eos", "unk", "pad")})


def _vocabulary(path):
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.ggml.")}


def test_byte_fallback_on_a_byte_level_vocabulary_writes_the_same_tokenizer(tiny_q4k, tokenizer, tmp_path):
    """transformers 5.17's GGUF loader builds GPT-2 tokenizers with byte_fallback (and an unknown token) set: with a
    byte-level pre-tokenizer and all 256 byte symbols in the vocabulary neither can act, so the export writes the
    same vocabulary as for the plain tokenizer. Without a byte-level pre-tokenizer byte_fallback does act (and
    llama.cpp's "gpt2" model would not reproduce it): refused, naming the fix."""
    def fallback(spec):
        spec["model"].update(byte_fallback=True, fuse_unk=True)

    plain = hf_quant.export_gguf(tiny_q4k, tmp_path / "plain.gguf", tokenizer)
    flagged = hf_quant.export_gguf(tiny_q4k, tmp_path / "flagged.gguf", _with_model(tokenizer, fallback))
    want = _vocabulary(plain)
    assert len(want["tokenizer.ggml.tokens"]) == 8192 and want == _vocabulary(flagged)

    def metaspace(spec):
        fallback(spec)
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                                 "split": False}

    with pytest.raises(ValueError, match="'BPE' with byte_fallback.*tokenizer=None"):
        hf_quant.export_gguf(tiny_q4k, tmp_path / "m.gguf", _with_model(tokenizer, metaspace))
    assert not (tmp_path / "m.gguf").exists()

    def missing_byte(spec):  # a byte-level vocabulary without one of its byte symbols: byte_fallback can act
        fallback(spec)
        spec["model"]["vocab"].pop("\u0100")

    with pytest.raises(ValueError, match="with byte_fallback"):
        hf_quant.export_gguf(tiny_q4k, tmp_path / "b.gguf", _with_model(tokenizer, missing_byte))


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q2_K_M"])
def test_mix_round_trip_is_byte_identical_including_quantized_embeddings(tokenizer, tmp_path, mix):
    """A mix quantizes token_embd (a K-quant, whose rounding is not idempotent): the import keeps the file's blocks
    in memory and the export writes them back unchanged, so every tensor's bytes survive export -> import -> export;
    an embedding changed after the import is rounded again instead of written as stale blocks."""
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32, quantization_config=QuantConfig(gguf=mix))
    first = hf_quant.export_gguf(model, tmp_path / "a.gguf", tokenizer)
    a = gguf.GGUFReader(first)
    assert a.get_tensor(_index(a, "token_embd.weight")).tensor_type.name not in ("F32", "F16", "BF16")
    back = hf_quant.import_gguf(first)
    second = hf_quant.export_gguf(back, tmp_path / "b.gguf", tokenizer)
    b = gguf.GGUFReader(second)
    assert [(t.name, t.tensor_type) for t in a.tensors] == [(t.name, t.tensor_type) for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert np.array_equal(x.data, y.data), x.name
    with torch.no_grad():
        back.get_input_embeddings().weight[0] += 0.5
    third = gguf.GGUFReader(hf_quant.export_gguf(back, tmp_path / "c.gguf", tokenizer))
    emb = third.get_tensor(_index(third, "token_embd.weight"))
    assert emb.tensor_type == a.get_tensor(_index(a, "token_embd.weight")).tensor_type
    assert not np.array_equal(emb.data, a.get_tensor(_index(a, "token_embd.weight")).data)


def _index(reader, name):
    return next(i for i, t in enumerate(reader.tensors) if t.name == name)


def test_mixed_types_and_requantize(tmp_path):
    cfg = QuantConfig(gguf="Q4_K", dynamic={r"v_proj|down_proj": {"gguf": "Q6_K"}, r"-:layers\.0\.mlp\.up_proj": {}})
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32, quantization_config=cfg)
    path = hf_quant.export_gguf(model, tmp_path / "mix.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_v.weight"] == "Q6_K" and types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.ffn_up.weight"] == "F32"
    back = hf_quant.import_gguf(path, dtype=torch.float32)
    assert isinstance(back.model.layers[0].self_attn.v_proj, QuantLinear)
    assert back.model.layers[0].self_attn.v_proj.spec.gguf == "Q6_K"
    assert not isinstance(back.model.layers[0].mlp.up_proj, QuantLinear)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, back(_ids()).logits)
    # a float model rounded data-free onto a type, with the double-rounding warning for quantized layers
    flt = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32)
    p8 = hf_quant.export_gguf(flt, tmp_path / "q8.gguf", type="Q8_0")
    assert {t.tensor_type.name for t in gguf.GGUFReader(p8).tensors} == {"Q8_0", "F32"}


@pytest.mark.parametrize("arch,type_", [("gpt2", "Q8_0"), ("qwen2", "Q4_0"), ("llama", "Q5_0"), ("qwen3", "Q8_0")])
def test_other_architectures_in_transformers(tiny_models, arch, type_, tmp_path):
    """GPT-2 (fused c_attn from Conv1D), Qwen2 (biases, no q/k permutation), Llama with GQA, Qwen3 (q/k norms,
    head_dim 128 apart from hidden_size / heads; transformers' GGUF loader reads no head_dim for qwen3 and takes
    Qwen3's default, 128, as every released Qwen3 has)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32,
                                                 quantization_config=QuantConfig(gguf=type_))
    hf_quant.export_gguf(model, tmp_path / "m.gguf")
    # no tokenizer in these files: transformers would take GPT-2's default vocabulary size from it
    config = None
    if arch == "gpt2":
        config = type(model.config).from_dict({k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32, config=config)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, hf(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    if arch != "gpt2":
        back = hf_quant.import_gguf(tmp_path / "m.gguf", dtype=torch.float32)
        with torch.no_grad():
            assert torch.equal(back(ids).logits, a)


def test_bad_input(tiny_q4k, tiny_models, tmp_path, monkeypatch):
    good = hf_quant.export_gguf(tiny_q4k, tmp_path / "good.gguf")
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf is not a readable GGUF file.*truncated or corrupt"):
        hf_quant.import_gguf(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        hf_quant.import_gguf(tmp_path / "junk.gguf")
    # an unsupported tensor type is refused by name, or rounded with requantize=
    w = gguf.GGUFWriter(tmp_path / "iq.gguf", "llama")
    _copy_with_one_type(gguf.GGUFReader(good), w, "blk.0.attn_q.weight", gguf.GGMLQuantizationType.IQ4_NL)
    with pytest.raises(ValueError, match=r"'blk.0.attn_q.weight' has type IQ4_NL.*requantize="):
        hf_quant.import_gguf(tmp_path / "iq.gguf")
    model = hf_quant.import_gguf(tmp_path / "iq.gguf", requantize="Q8_0", dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.spec.gguf == "Q8_0"
    # unknown architecture
    opt = AutoModelForCausalLM.from_pretrained(tiny_models["opt"])
    with pytest.raises(ValueError, match="architecture 'opt' is not supported"):
        hf_quant.export_gguf(opt, tmp_path / "opt.gguf")
    # shapes that are not a multiple of the block width
    with pytest.raises(ValueError, match="in_features=128 is not a multiple of Q4_K's block width 256"):
        AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=QuantConfig(gguf="Q4_K"))
    flt = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with pytest.raises(ValueError, match="block width 256"):
        hf_quant.export_gguf(flt, tmp_path / "k.gguf", type="Q4_K")
    # a failed export leaves nothing behind
    target = tmp_path / "fail.gguf"
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", _boom)
    with pytest.raises(RuntimeError, match="disk full"):
        hf_quant.export_gguf(tiny_q4k, target)
    assert sorted(p.name for p in tmp_path.iterdir() if "fail" in p.name) == []


def _boom(*args, **kwargs):
    raise RuntimeError("disk full")


def _copy_with_one_type(reader, w, name, qtype):
    """A copy of a GGUF file's llama metadata and tensors, with tensor `name` stored as random `qtype` blocks."""
    arch = "llama"
    for key in ("context_length", "embedding_length", "feed_forward_length", "block_count",
                "attention.head_count", "attention.head_count_kv", "rope.dimension_count",
                "attention.layer_norm_rms_epsilon", "rope.freq_base", "vocab_size"):
        f = reader.fields.get(f"{arch}.{key}")
        if f is not None:
            v = f.contents()
            (w.add_float32 if isinstance(v, float) else w.add_uint32)(f"{arch}.{key}", v)
    for t in reader.tensors:
        if t.name == name:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            rows, cols = int(t.shape[1]), int(t.shape[0])
            raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
            raw.reshape(rows, -1, size)[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            w.add_tensor(t.name, raw, raw_dtype=qtype)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_lora_trains_on_a_gguf_base():
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32, quantization_config=QuantConfig(gguf="Q4_K"))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    losses = train_steps(model, [p for p in model.parameters() if p.requires_grad], _ids(16), 4, 1e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", sorted(G.TYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_cpu_kernel_runs_gguf_layers_like_the_reference(monkeypatch, name, dtype):
    """cpu_int4 takes Q4_0 / Q4_1 / Q4_K and the ternary TQ1_0 / TQ2_0 (codes of at most 4 bits in sub-blocks of
    32..256), cpu_int4x2 Q8_0 / Q5_0 / Q5_1 / Q5_K, dequant_tiles (nibbles or bytes) and dequant_matmul every type;
    each against the reference (llama.cpp's fp32 weights) on random inputs, several tiles."""
    from hf_quant import kernels
    from hf_quant.runtime.kernels import cpu_measure
    from hf_quant.runtime.kernels.base import KERNELS
    from hf_quant.runtime.kernels.cpu import DequantTilesKernel

    monkeypatch.setattr(DequantTilesKernel, "TILE_N", 32)
    t = G.TYPES[name]
    W = torch.randn(80, 2 * t.block, generator=torch.Generator().manual_seed(2)) * 0.05
    spec = LayerSpec(t.bits, t.sub, t.zero is not None, False, name)
    layer = QuantLinear.from_quantized(get_method("rtn").quantize(W, spec, torch.float32), spec,
                                       torch.randn(80).to(dtype))
    cpu = torch.device("cpu")
    found = {k.name for k in cpu_measure.candidates(layer, cpu, dtype)}
    assert {"dequant_tiles", "dequant_matmul"} <= found
    assert ("cpu_int4" in found) == (name in ("Q4_0", "Q4_1", "Q4_K", "TQ1_0", "TQ2_0"))
    assert ("cpu_int4x2" in found) == (name in ("Q8_0", "Q5_0", "Q5_1", "Q5_K"))
    for rows in (3, 300):  # both GEMM orientations of dequant_tiles
        x = torch.randn(rows, W.shape[1], generator=torch.Generator().manual_seed(rows)).to(dtype)
        with kernels.use_kernel("reference"):
            ref = layer(x)
        for kname in sorted(found):
            if not KERNELS.get(kname).runs(layer, cpu, dtype, rows):  # cpu_int4 takes up to 4 fp32 rows
                continue
            with kernels.use_kernel(kname):
                out = layer(x)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < (1e-5 if dtype == torch.float32 else 1e-2), (kname, rows, err)


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q4_0", "Q5_1", "Q6_K"])
def test_mse_search_lowers_the_rounding_error(name):
    """`mse=True` (GPTQ's default) clips each sub-block's range where that lowers |w - w_hat|^2.4, on the
    grid as stored: never worse than plain min/max, better on weights with outliers."""
    t = G.TYPES[name]
    W = torch.randn(32, 2 * t.block, generator=torch.Generator().manual_seed(4))
    W[:, ::37] *= 4
    plain = (G.fake_quantize(W, t) - W).abs().pow(2.4).sum()
    searched = (G.dequantize_fields(G.quantize_rtn(W, t, mse=True), t) - W).abs().pow(2.4).sum()
    assert searched <= plain * 1.001
    if t.bits <= 4:
        assert searched < 0.97 * plain, (plain, searched)


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q4_1", "Q6_K", "Q8_0"])
def test_ste_grid_is_the_stored_grid_and_passes_gradients(name):
    """OmniQuant's differentiable GGUF grid equals the stored one (RTN with the same clipping) up to ties,
    and its clipping factors get gradients."""
    t = G.TYPES[name]
    W = torch.randn(16, t.block, generator=torch.Generator().manual_seed(6))
    n_sub = t.block // t.sub
    low = torch.full((16, n_sub), 0.9, requires_grad=True)
    high = torch.full((16, n_sub), 0.8, requires_grad=True)
    W_ste = G.fake_quantize_ste(W, t, low, high)
    W_rtn = G.fake_quantize(W, t, (low.detach(), high.detach()))
    assert ((W_ste.detach() - W_rtn).abs() > 1e-4).float().mean() < 0.01  # fp32 op order aside: ties only
    ((W_ste - W) ** 2).sum().backward()
    assert high.grad.abs().sum() > 0 and (t.zero is not None or low.grad.abs().sum() > 0)


def test_a_mix_file_with_a_quantized_output_layer_imports(tiny_models, tmp_path):
    """Q4_K_M on an untied model: the export rounds the float lm_head to the mix's output type (here the
    fallback of Q6_K for 128-wide rows, Q8_0); importing gives a quantized lm_head that reloads."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32,
                                                 quantization_config=QuantConfig(gguf="Q4_K_M"))
    assert not isinstance(model.lm_head, QuantLinear)
    path = hf_quant.export_gguf(model, tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["output.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q5_0"  # 128-wide fallbacks
    back = hf_quant.import_gguf(path)
    assert isinstance(back.lm_head, QuantLinear) and back.lm_head.spec.gguf == "Q8_0"
    back.save_pretrained(tmp_path / "hf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, back(ids).logits)
