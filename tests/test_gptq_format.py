"""GPTQ checkpoint layout: tensor conversion, export/import through transformers, an independent
GPTQ packer written here from the published description, and the errors at the boundary."""

import json
import math
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPTQConfig
from transformers.pytorch_utils import Conv1D

import hf_quant
from hf_quant import LayerSpec, QuantConfig, QuantLinear, kernels
from hf_quant.core import pack_codes, unpack_codes
from hf_quant.io.checkpoint import read_safetensors_header
from hf_quant.io.gptq_codec import from_gptq, parse_gptq_config, to_gptq
from hf_quant.io.gptq import export_gptq, import_gptq
from hf_quant.core import dequantize_weight

from .conftest import TINY_LLAMA, save_random_model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# --- tensor level ----------------------------------------------------------------------------------

def random_layer(spec: LayerSpec, in_f: int, out_f: int, seed: int, min_zero: int = 0) -> dict:
    """QuantLinear buffers with random codes, scales, zeros and (act-order) a random balanced g_idx."""
    g = torch.Generator().manual_seed(seed)
    n_groups = spec.groups(in_f)
    codes = torch.randint(0, 2**spec.bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    buffers = {"qweight": pack_codes(codes, spec.bits),
               "scales": (torch.rand(out_f, n_groups, generator=g) * 0.01 + 1e-4).half()}  # GPTQ's dtype
    if not spec.sym:
        buffers["qzeros"] = torch.randint(min_zero, 2**spec.bits, (out_f, n_groups), generator=g, dtype=torch.uint8)
    if spec.g_idx:
        perm = torch.randperm(in_f, generator=g)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // spec.group_size).to(torch.int32)
        buffers["g_idx"] = g_idx
    return buffers


@settings(max_examples=80, deadline=None, derandomize=True)
@given(bits=st.sampled_from([2, 3, 4, 8]), group_size=st.sampled_from([-1, 16, 32, 64]), sym=st.booleans(),
       act_order=st.booleans(), in32=st.integers(1, 8), out_units=st.integers(1, 12),
       checkpoint_format=st.sampled_from(["gptq", "gptq_v2"]), seed=st.integers(0, 2**16))
def test_tensor_round_trip_is_bit_identical(bits, group_size, sym, act_order, in32, out_units, checkpoint_format, seed):
    in_f, out_f = 32 * in32, out_units * 32 // math.gcd(bits, 32)  # out * bits % 32 == 0 (8 bits: any multiple of 4)
    assume(group_size == -1 or in_f % group_size == 0)
    spec = LayerSpec(bits, group_size, sym, g_idx=act_order and group_size != -1)
    ours = random_layer(spec, in_f, out_f, seed, min_zero=1 if checkpoint_format == "gptq" else 0)
    gptq = to_gptq(ours, spec, in_f, checkpoint_format=checkpoint_format, name="m")
    n_groups = spec.groups(in_f)
    assert {k: (t.dtype, tuple(t.shape)) for k, t in gptq.items()} == {
        "qweight": (torch.int32, (in_f * bits // 32, out_f)), "qzeros": (torch.int32, (n_groups, out_f * bits // 32)),
        "scales": (torch.float16, (n_groups, out_f)), "g_idx": (torch.int32, (in_f,))}
    back_spec, back = from_gptq(gptq, LayerSpec(bits, group_size, sym), in_f, checkpoint_format=checkpoint_format,
                                act_order=spec.g_idx, name="m")
    assert back_spec == spec
    assert back.keys() == ours.keys()
    for k in ours:
        assert back[k].dtype == ours[k].dtype and torch.equal(back[k], ours[k]), k
    if sys.byteorder == "little":  # both layouts are little-endian bit streams: qweight.T is our bytes
        assert torch.equal(gptq["qweight"].t().contiguous().view(torch.uint8), ours["qweight"])


def test_gptq_word_layout_matches_the_published_description():
    """4 bits: qweight[r, j] = sum_t q[8r + t, j] << 4t;  qzeros[g, c] = sum_t (zero[g, 8c + t] - 1) << 4t (v1)."""
    spec = LayerSpec(4, 32, False)
    ours = random_layer(spec, 64, 16, seed=3, min_zero=1)
    codes = unpack_codes(ours["qweight"], 4, 64)
    gptq = to_gptq(ours, spec, 64)
    for r, j in [(0, 0), (3, 5), (7, 15)]:
        word = sum(int(codes[j, 8 * r + t]) << (4 * t) for t in range(8)) & 0xFFFFFFFF
        assert int(gptq["qweight"][r, j]) & 0xFFFFFFFF == word
    for gi, c in [(0, 0), (1, 1)]:
        word = sum((int(ours["qzeros"][8 * c + t, gi]) - 1) << (4 * t) for t in range(8))
        assert int(gptq["qzeros"][gi, c]) & 0xFFFFFFFF == word
    assert torch.equal(gptq["g_idx"], torch.arange(64, dtype=torch.int32) // 32)


def test_v1_zero_of_zero_is_refused_and_v2_keeps_it():
    spec = LayerSpec(4, 32, False)
    ours = random_layer(spec, 64, 16, seed=1, min_zero=1)
    ours["qzeros"][5, 1] = 0
    with pytest.raises(ValueError, match=r"blk\.fc: 1 group\(s\) have zero points \(\[0\]\).*checkpoint_format='gptq_v2'"):
        to_gptq(ours, spec, 64, checkpoint_format="gptq", name="blk.fc")
    _, back = from_gptq(to_gptq(ours, spec, 64, checkpoint_format="gptq_v2"), spec, 64, checkpoint_format="gptq_v2")
    assert back["qzeros"][5, 1] == 0 and torch.equal(back["qzeros"], ours["qzeros"])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_v1_stored_maxq_reads_back_as_2_pow_bits(bits):
    """A v1 store of maxq means zero = 2**bits to every GPTQ loader; imported exactly, dequantized as such."""
    spec = LayerSpec(bits, 32, False)
    ours = random_layer(spec, 64, 32, seed=bits, min_zero=1)
    ours["qzeros"][3, 0] = 2**bits  # the zero a v1 store of maxq stands for
    gptq = to_gptq(ours, spec, 64, checkpoint_format="gptq", dtype=None)
    _, back = from_gptq(gptq, spec, 64, checkpoint_format="gptq")
    assert back["qzeros"][3, 0] == 2**bits and torch.equal(back["qzeros"], ours["qzeros"])
    W = dequantize_weight(back["qweight"], back["scales"], back["qzeros"], spec, 64)
    q = unpack_codes(back["qweight"], bits, 64)
    assert torch.equal(W[3, :32], (q[3, :32].float() - 2**bits) * back["scales"][3, 0].float())
    with pytest.raises(ValueError, match=r"cannot store.*Export with checkpoint_format='gptq'"):
        to_gptq(back, spec, 64, checkpoint_format="gptq_v2")
    layer = QuantLinear(64, 32, False, spec, dtype=torch.bfloat16)  # no kernel assumes zero <= maxq
    for k, t in back.items():
        getattr(layer, k).copy_(t)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad(), kernels.use_kernel("reference"):
        ref = layer(x)
    for kernel in ["dequant_matmul", "cpu_int4"]:
        with torch.no_grad(), kernels.use_kernel(kernel):
            assert torch.allclose(layer(x).float(), ref.float(), atol=1e-2, rtol=1e-2), kernel


def test_v1_8bit_zero_256_is_refused():
    spec = LayerSpec(8, -1, False)
    gptq = to_gptq(random_layer(spec, 32, 8, seed=0, min_zero=1), spec, 32)
    gptq["qzeros"][0, 0] = -1  # stored 255 for the first 4 output channels -> zero 256
    with pytest.raises(ValueError, match="m: a v1 .* zero point of 256 .* does not fit"):
        from_gptq(gptq, spec, 32, name="m")


def test_sym_import_checks_the_zero_points():
    spec = LayerSpec(4, 32, True)
    gptq = to_gptq(random_layer(spec, 64, 16, seed=0), spec, 64)
    assert torch.all(gptq["qzeros"] == 0x77777777)  # v1 stores 8 - 1 in every nibble
    assert "qzeros" not in from_gptq(gptq, spec, 64)[1]
    asym = to_gptq(random_layer(LayerSpec(4, 32, False), 64, 16, seed=0, min_zero=1), LayerSpec(4, 32, False), 64)
    with pytest.raises(ValueError, match=r"x\.y: the quantization_config says sym=True but .* \"sym\": false"):
        from_gptq(asym, spec, 64, name="x.y")


def test_g_idx_rules():
    spec = LayerSpec(4, 32, False, g_idx=True)
    gptq = to_gptq(random_layer(spec, 128, 16, seed=0, min_zero=1), spec, 128)
    base = LayerSpec(4, 32, False)
    assert from_gptq(gptq, base, 128)[0].g_idx  # a real act-order g_idx is kept
    with pytest.raises(ValueError, match=r"m\.g_idx: is not i // group_size although this layer \(no act-order\)"):
        from_gptq(gptq, base, 128, act_order=False, name="m")
    natural = to_gptq(random_layer(base, 128, 16, seed=0, min_zero=1), base, 128)
    assert "g_idx" not in from_gptq(natural, base, 128)[1]  # i // group_size: dropped
    assert torch.equal(from_gptq(natural, base, 128, act_order=True)[1]["g_idx"], natural["g_idx"])
    unbalanced = dict(gptq, g_idx=torch.zeros(128, dtype=torch.int32))
    unbalanced["g_idx"][-1] = 3
    with pytest.raises(ValueError, match=r"m\.g_idx: hf_quant layers need exactly group_size=32"):
        from_gptq(unbalanced, base, 128, name="m")


def test_incompatible_shapes_are_named():
    spec = LayerSpec(3, -1, True)
    with pytest.raises(ValueError, match=r"a\.b: cannot export to GPTQ: in_features=48 \* bits=3"):
        to_gptq(random_layer(spec, 48, 32, seed=0), spec, 48, name="a.b")
    gptq = to_gptq(random_layer(LayerSpec(4, 32, True), 64, 16, seed=0), LayerSpec(4, 32, True), 64)
    with pytest.raises(ValueError, match=r"a\.b\.qzeros: is torch.int32\[2, 2\], expected \[1, 2\] for bits=4, "
                                         r"group_size=-1"):
        from_gptq(gptq, LayerSpec(4, -1, True), 64, name="a.b")


# --- model level: quantize -> export_gptq -> import_gptq -> from_pretrained ------------------------

def _ids(n, seed=0):
    return [torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


GPTQ_CALIB = dict(method="gptq", dataset=_ids(8), num_samples=4, seq_len=32, calibration_device="cpu")
CASES = {  # name -> (model, QuantConfig kwargs, checkpoint_format)
    "llama-asym-v1": ("llama", dict(bits=4, group_size=32, sym=False), "gptq"),
    "llama-asym-v2": ("llama", dict(bits=2, group_size=64, sym=False), "gptq_v2"),
    "tied-sym-v1": ("tiny-llama", dict(bits=4, group_size=128, sym=True), "gptq"),
    "gpt2-conv1d-3bit": ("gpt2", dict(bits=3, group_size=32, sym=False), "gptq"),
    "qwen2-bias-8bit": ("qwen2", dict(bits=8, group_size=-1, sym=False), "gptq_v2"),
    "act-order": ("llama", dict(bits=4, group_size=32, sym=True, desc_act=True, **GPTQ_CALIB), "gptq"),
    "act-order-static": ("qwen2", dict(bits=4, group_size=64, desc_act=True, static_groups=True, **GPTQ_CALIB), "gptq"),
    "lm_head-quantized": ("llama", dict(bits=4, group_size=32, modules_to_not_convert=[]), "gptq_v2"),
    "mixed-dynamic": ("llama", dict(bits=4, group_size=32, sym=True, dynamic={
        r"down_proj": {"bits": 8, "group_size": -1, "sym": False}, r"layers\.1\.self_attn\.[qk]_proj": {"bits": 3},
        r"-:layers\.1\.self_attn\.o_proj": {}}), "gptq"),
}


def _source(tiny_models, name):
    return TINY_LLAMA if name == "tiny-llama" else tiny_models[name]


@pytest.mark.parametrize("case", list(CASES))
def test_export_import_round_trip(tiny_models, tmp_path, input_ids, case):
    arch, kwargs, fmt = CASES[case]
    q = AutoModelForCausalLM.from_pretrained(_source(tiny_models, arch), quantization_config=QuantConfig(**kwargs))
    layers = quant_layers(q)
    before = logits(q, input_ids)
    out = export_gptq(q, tmp_path / "gptq", checkpoint_format=fmt, dtype=torch.bfloat16)
    assert out == tmp_path / "gptq" and not list(tmp_path.glob(".*hf_quant-tmp*"))

    # config.json / quantize_config.json
    config = json.loads((out / "config.json").read_text())
    gq = config["quantization_config"]
    assert gq == json.loads((out / "quantize_config.json").read_text())
    act_order = any(m.g_idx is not None for m in layers.values())
    assert act_order == (case == "act-order")
    assert {k: gq[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format", "lm_head")} \
        == {"quant_method": "gptq", "bits": kwargs["bits"], "group_size": kwargs["group_size"],
            "sym": kwargs["sym"] if "sym" in kwargs else False, "desc_act": act_order, "checkpoint_format": fmt,
            "lm_head": "lm_head" in layers}
    assert gq["static_groups"] == kwargs.get("static_groups", False) and gq["damp_percent"] == 0.01
    assert gq["true_sequential"] is True and gq["meta"]["quantizer"] == [f"hf_quant:{hf_quant.__version__}"]
    assert config["dtype"] == config["torch_dtype"] == "bfloat16" and (out / "generation_config.json").exists()
    parsed = GPTQConfig.from_dict(gq)  # transformers' own GPTQ config reads it
    assert (parsed.bits, parsed.group_size, parsed.format, parsed.desc_act) == (
        gq["bits"], gq["group_size"], fmt, act_order)
    if case == "mixed-dynamic":  # exact-name rules for the modules that differ, "-:" for float ones
        assert gq["dynamic"] == {
            **{rf"+:^model\.layers\.{i}\.mlp\.down_proj$": {"bits": 8, "group_size": -1, "sym": False} for i in (0, 1)},
            **{rf"+:^model\.layers\.1\.self_attn\.{p}_proj$": {"bits": 3, "group_size": 32, "sym": True} for p in "qk"},
            r"-:^model\.layers\.1\.self_attn\.o_proj$": {}}
    else:
        assert "dynamic" not in gq
    settings = parse_gptq_config(gq)  # GPTQModel/vLLM `dynamic` semantics give every module its spec
    linears = {n for n, m in q.named_modules() if isinstance(m, (nn.Linear, Conv1D))}  # QuantLinear is an nn.Linear
    for name in linears - {"lm_head"}:
        s, expect = settings.spec(name), layers.get(name)
        expect = None if expect is None else LayerSpec(expect.spec.bits, expect.spec.group_size, expect.spec.sym)
        assert s == expect, name

    # tensors: GPTQ names, dtypes and shapes; tied lm_head left to the loader
    header = {}
    for f in out.glob("*.safetensors"):
        header.update(read_safetensors_header(str(f)))
    for name, m in layers.items():
        s, n_groups = m.spec, m.spec.groups(m.in_features)
        got = {k: (header[f"{name}.{k}"]["dtype"], header[f"{name}.{k}"]["shape"]) for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert got == {
            "qweight": ("I32", [m.in_features * s.bits // 32, m.out_features]),
            "qzeros": ("I32", [n_groups, m.out_features * s.bits // 32]),
            "scales": ("BF16", [n_groups, m.out_features]), "g_idx": ("I32", [m.in_features])}, name
    assert not any(e["dtype"] == "U8" for e in header.values())
    if q.config.tie_word_embeddings:
        assert "lm_head.weight" not in header

    # back to hf_quant
    back = import_gptq(out, tmp_path / "hfq")
    assert json.loads((back / "config.json").read_text())["quantization_config"]["quant_method"] == "hf_quant"
    again = AutoModelForCausalLM.from_pretrained(back)
    again_layers = quant_layers(again)
    assert {n: m.spec for n, m in again_layers.items()} == {n: m.spec for n, m in layers.items()}
    for name, m in again_layers.items():
        for buf in ("qweight", "scales", "qzeros", "g_idx", "bias"):
            a, b = getattr(m, buf), getattr(layers[name], buf)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), (name, buf)
    assert torch.equal(logits(again, input_ids), before)


def test_default_float16_export(tmp_path, input_ids):
    """The default: fp16 scales and float tensors, as GPTQ kernels expect (exact for an fp16 model)."""
    path = save_random_model(tmp_path / "fp16", "llama", dtype=torch.float16)
    q = AutoModelForCausalLM.from_pretrained(path, quantization_config=QuantConfig(bits=4, group_size=64, sym=True))
    out = export_gptq(q, tmp_path / "gptq", max_shard_size="100KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    header = {}
    for f in out.glob("*.safetensors"):
        header.update(read_safetensors_header(str(f)))
    assert {e["dtype"] for e in header.values()} == {"I32", "F16"}
    again = AutoModelForCausalLM.from_pretrained(import_gptq(out, tmp_path / "hfq"))
    assert again.model.layers[0].mlp.up_proj.scales.dtype == torch.float16
    assert torch.equal(logits(again, input_ids), logits(q, input_ids))


def test_export_to_float16_rounds_bf16_loudly_but_loads(tiny_models, tmp_path, input_ids, caplog):
    q = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=QuantConfig(bits=4, group_size=32))
    with caplog.at_level("WARNING", logger="hf_quant"):
        out = export_gptq(q, tmp_path / "gptq")
    assert "export_gptq rounded 2 tensor(s) to torch.float16" in caplog.text  # tiny embedding values
    assert "pass dtype=torch.bfloat16 to keep them exact" in caplog.text
    again = AutoModelForCausalLM.from_pretrained(import_gptq(out, tmp_path / "hfq"), dtype=torch.bfloat16)
    a, b = logits(again, input_ids), logits(q, input_ids)
    assert torch.allclose(a, b, atol=0.02, rtol=0.02) and torch.equal(a.argmax(-1), b.argmax(-1))


def test_v1_export_of_a_zero_of_zero_is_refused_atomically(tiny_models, tmp_path, input_ids):
    q = AutoModelForCausalLM.from_pretrained(tiny_models["llama"],
                                             quantization_config=QuantConfig(bits=4, group_size=32, sym=False))
    q.model.layers[1].mlp.up_proj.qzeros[7, 2] = 0
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: 1 group\(s\) .*'gptq_v2'.*sym=True"):
        export_gptq(q, tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists() and not list(tmp_path.iterdir())
    out = export_gptq(q, tmp_path / "gptq", checkpoint_format="gptq_v2", dtype=torch.bfloat16)
    again = AutoModelForCausalLM.from_pretrained(import_gptq(out, tmp_path / "hfq"))
    assert again.model.layers[1].mlp.up_proj.qzeros[7, 2] == 0
    assert torch.equal(logits(again, input_ids), logits(q, input_ids))


def test_export_refuses_a_float_model(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="export_gptq: model.config.quantization_config is not an hf_quant QuantConfig"):
        export_gptq(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), tmp_path / "x")


# --- independent check: a GPTQ checkpoint built here, without hf_quant's packing or conversion -------

def _to_int32(words: torch.Tensor) -> torch.Tensor:
    words = words & 0xFFFFFFFF  # uint32 semantics, as in AutoGPTQ's numpy packer
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's pack loop along dim 0 of an integer (rows, cols) tensor -> int32 (rows * bits / 32, cols)."""
    q = q.to(torch.int64)
    words = torch.zeros(q.shape[0] * bits // 32, q.shape[1], dtype=torch.int64)
    if bits in (2, 4, 8):
        per = 32 // bits
        for r in range(words.shape[0]):
            for t in range(per):
                words[r] |= q[r * per + t] << (bits * t)
        return _to_int32(words)
    assert bits == 3  # 32 rows fill 3 words; rows 10 and 21 of each 32 straddle a word boundary
    i = row = 0
    while row < words.shape[0]:
        for t in range(10):
            words[row] |= q[i + t] << (3 * t)
        i += 10
        words[row] |= q[i] << 30
        row += 1
        words[row] |= (q[i] >> 2) & 1
        i += 1
        for t in range(10):
            words[row] |= q[i + t] << (3 * t + 1)
        i += 10
        words[row] |= q[i] << 31
        row += 1
        words[row] |= (q[i] >> 1) & 3
        i += 1
        for t in range(10):
            words[row] |= q[i + t] << (3 * t + 2)
        i += 10
        row += 1
    return _to_int32(words)


def rtn(W: torch.Tensor, bits: int, group_size: int, sym: bool, g_idx: torch.Tensor):
    """Per-group min/max round-to-nearest of W (out, in); channel i in group g_idx[i].
    Returns integer codes (out, in), fp16 scales (out, G), integer zeros (out, G)."""
    maxq, n_groups = 2**bits - 1, int(g_idx.max()) + 1
    scale = torch.empty(W.shape[0], n_groups)
    zero = torch.empty(W.shape[0], n_groups)
    for g in range(n_groups):
        Wg = W[:, g_idx == g]
        if sym:
            scale[:, g] = 2 * Wg.abs().amax(1) / maxq
            zero[:, g] = 2 ** (bits - 1)
        else:
            lo, hi = Wg.amin(1).clamp(max=0), Wg.amax(1).clamp(min=0)
            scale[:, g] = (hi - lo) / maxq
            zero[:, g] = torch.round(-lo / scale[:, g])
    scale = scale.half()
    s, z = scale.float()[:, g_idx], zero[:, g_idx]
    q = torch.clamp(torch.round(W / s) + z, 0, maxq)
    return q.long(), scale, zero.long()


INDEPENDENT = [(4, 32, False, False), (4, 64, True, False), (3, 32, False, False), (3, -1, True, False),
               (4, 32, False, True), (2, 32, False, False), (8, -1, True, False)]


@pytest.mark.parametrize("bits, group_size, sym, act_order", INDEPENDENT)
def test_import_of_an_independently_packed_checkpoint(tiny_models, tmp_path, input_ids, bits, group_size, sym, act_order):
    src = tiny_models["llama-fp32"]
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = load_file(src / "model.safetensors")
    gen = torch.Generator().manual_seed(bits)
    for name, module in ref.named_modules():
        if not (isinstance(module, nn.Linear) and ".layers." in name):
            continue
        W = module.weight.detach().float()
        in_f = W.shape[1]
        gs = in_f if group_size == -1 else group_size
        g_idx = torch.arange(in_f) // gs
        if act_order:
            g_idx = torch.empty(in_f, dtype=torch.long)
            g_idx[torch.randperm(in_f, generator=gen)] = torch.arange(in_f) // gs
        q, scale, zero = rtn(W, bits, group_size, sym, g_idx)
        assert (zero >= 1).all()  # v1 stores zero - 1
        del state[f"{name}.weight"]
        state[f"{name}.qweight"] = gptq_pack(q.t(), bits)  # (in, out) packed along the input dim
        state[f"{name}.qzeros"] = gptq_pack(zero - 1, bits).t().contiguous()  # along the output dim
        state[f"{name}.scales"] = scale.t().contiguous()
        state[f"{name}.g_idx"] = g_idx.to(torch.int32)
        with torch.no_grad():  # the float model computes with exactly the dequantized weights
            module.weight.copy_((q - zero[:, g_idx]).float() * scale.float()[:, g_idx])
    out = tmp_path / "gptq"
    out.mkdir()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
                                     "desc_act": act_order}  # no checkpoint_format: v1, as older AutoGPTQ files
    (out / "config.json").write_text(json.dumps(config))

    imported = AutoModelForCausalLM.from_pretrained(import_gptq(out, tmp_path / "hfq"), dtype=torch.float32)
    layers = quant_layers(imported)
    assert len(layers) == 14 and all(m.spec == LayerSpec(bits, group_size, sym, act_order) for m in layers.values())
    a, b = logits(imported, input_ids), logits(ref, input_ids)
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), (a - b).abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_export_matches_the_independent_packer(bits, checkpoint_format):
    """The other direction: to_gptq's words equal the packer above, fed the codes and zeros directly."""
    spec = LayerSpec(bits, 32, False, g_idx=True)
    ours = random_layer(spec, 128, 64, seed=bits, min_zero=1)
    gptq = to_gptq(ours, spec, 128, checkpoint_format=checkpoint_format)
    codes = unpack_codes(ours["qweight"], bits, 128)
    stored = ours["qzeros"].long() - (1 if checkpoint_format == "gptq" else 0)
    assert torch.equal(gptq["qweight"], gptq_pack(codes.t(), bits))
    assert torch.equal(gptq["qzeros"], gptq_pack(stored, bits).t().contiguous())
    assert torch.equal(gptq["scales"], ours["scales"].t()) and torch.equal(gptq["g_idx"], ours["g_idx"])


# --- errors at the boundary ----------------------------------------------------------------------

@pytest.fixture()
def gptq_dir(tiny_models, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=QuantConfig(bits=4, group_size=32))
    return export_gptq(q, tmp_path / "gptq", dtype=torch.bfloat16)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"quant_method": "awq"}, r"quant_method='awq': import_gptq reads GPTQ checkpoints"),
    ({"checkpoint_format": "marlin"}, r"checkpoint_format='marlin'.*re-save the model in the 'gptq' format"),
    ({"checkpoint_format": None, "is_marlin_format": True}, r"checkpoint_format='marlin'"),
    ({"checkpoint_format": "gptq", "pack_dtype": "int16"}, r"pack_dtype='int16'"),
    ({"bits": 5}, r"bits=5: hf_quant supports \[2, 3, 4, 8\] bits"),
    ({"group_size": 100}, r"group_size=100: hf_quant layers support group_size -1 or a power of two"),
    ({"dynamic": {"+:(": {"bits": 8}}}, r"dynamic\['\+:\('\]: invalid regex"),
])
def test_bad_source_config_is_refused_before_tensors_are_read(gptq_dir, tmp_path, changes, message):
    _edit_config(gptq_dir, **changes)
    (gptq_dir / "model.safetensors").write_bytes(b"not a safetensors file")  # reading it would fail differently
    with pytest.raises(ValueError, match=message):
        import_gptq(gptq_dir, tmp_path / "hfq")
    assert not (tmp_path / "hfq").exists()


def test_pickle_checkpoint_is_refused(gptq_dir, tmp_path, monkeypatch):
    (gptq_dir / "model.safetensors").rename(gptq_dir / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(ValueError, match=r"no \.safetensors weights \(it has pytorch_model\.bin\).*safetensors only"):
        import_gptq(gptq_dir, tmp_path / "hfq")


def test_checkpoint_not_matching_its_config_is_refused(gptq_dir, tmp_path):
    _edit_config(gptq_dir, bits=8)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: checkpoint tensor 'qweight' is "
                                         r"I32\[16, 128\], expected I32\[32, 128\] for a 128->128 GPTQ layer with bits=8"):
        import_gptq(gptq_dir, tmp_path / "hfq")
    _edit_config(gptq_dir, bits=4, sym=True)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: the quantization_config says sym=True"):
        import_gptq(gptq_dir, tmp_path / "hfq")


def test_quantize_config_json_only_and_tokenizer_files_are_copied(gptq_dir, tmp_path, input_ids):
    """Older AutoGPTQ checkpoints carry the settings in quantize_config.json only."""
    config = json.loads((gptq_dir / "config.json").read_text())
    del config["quantization_config"]
    (gptq_dir / "config.json").write_text(json.dumps(config))
    (gptq_dir / "tokenizer_config.json").write_text("{}")
    (gptq_dir / "README.md").write_text("GPTQ card")
    out = import_gptq(gptq_dir, tmp_path / "hfq")
    assert (out / "tokenizer_config.json").exists() and (out / "generation_config.json").exists()
    assert not (out / "README.md").exists() and not (out / "quantize_config.json").exists()
    assert len(quant_layers(AutoModelForCausalLM.from_pretrained(out))) == 14


def test_hub_source_goes_through_snapshot_download(gptq_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(gptq_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    import_gptq("someone/model-GPTQ", tmp_path / "hfq", revision="v1", token="tok")
    (repo_id, kwargs), = calls
    assert repo_id == "someone/model-GPTQ" and kwargs["revision"] == "v1" and kwargs["token"] == "tok"
    assert "*.safetensors" in kwargs["allow_patterns"] and not any("bin" in p for p in kwargs["allow_patterns"])
    with pytest.raises(ValueError, match="revision='v1' applies to Hub repo ids"):
        import_gptq(gptq_dir, tmp_path / "other", revision="v1")
