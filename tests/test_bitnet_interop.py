"""transformers' own BitNet support is the oracle of `export_bitnet` / `import_bitnet`: a model hf_quant quantized
with QuantConfig(method="bitnet") loads in plain transformers (its BitLinear layers, no hf_quant layer involved)
and computes the same function, a checkpoint built with transformers' own tools imports into hf_quant and
computes the same function, the ternary codes cross both ways unchanged, and what either side cannot represent
is refused by name.

transformers decorates BitLinear's `unpack_weights`, `activation_quant` and `post_quant_process` with
`torch.compile`: on CPU the first forward compiles them with inductor (about 26 s on this 2-core machine, 0.2 s
per forward afterwards). These tests run those functions eagerly (`torch._dynamo.config.disable`): the same
torch ops; the compiled run was measured once by hand with the same logit difference (5.7e-6).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitNetQuantConfig, Qwen2ForCausalLM
from transformers.integrations.bitnet import AutoBitLinear, BitLinear, WeightQuant, pack_weights, unpack_weights

import hf_quant
from hf_quant import LayerSpec, QuantConfig, QuantLinear
from hf_quant.core import pack_codes, unpack_codes
from hf_quant.io.bitnet import from_bitlinear, pack_ternary, to_bitlinear, unpack_ternary
from hf_quant.methods.bitnet import BITNET_SPEC, int8_activation, quantize_bitnet
from hf_quant.methods.rtn import quantize_rtn
from hf_quant.runtime.activations import quantize_rows
from hf_quant.runtime.scheme import ActivationSpec

from .conftest import TINY_LLAMA, tiny_qwen2_config

SPEC = LayerSpec(**BITNET_SPEC)
ACT = ActivationSpec.of(int8_activation())

# Tolerances, fp32, relative to the largest |output|. Per layer, on the same input, BitLinear and hf_quant produce
# the same int8 activation codes (round(x * (127 / absmax)) in fp32, half to even in both; checked below) and the
# same exact integer sums (|sum| <= 127 * 768 < 2**24); they differ only in the scaling: transformers divides by
# fl(1 / gamma) * fl(127 / absmax), hf_quant multiplies by gamma and absmax / 127, a handful of roundings of
# 2**-24 on each side. Measured over every layer of these tests (BitLinear and AutoBitLinear, with and without
# bias): at most 4.9e-7; LAYER_RTOL = 2e-6 is 16 fp32 epsilons. End to end (fp32 logits, BitLinear): at most
# 4.4e-7, with one or two threads (tiny-llama export: 5.7e-6 absolute at max |logit| 13.1; import: 4.4e-7;
# export -> import: 2.9e-7 to 4.4e-7; Qwen2 with biases: 2.7e-7); LOGIT_RTOL = 1e-5 leaves a factor of 20. It holds because no int8 rounding of a later layer
# flips on these inputs; AutoBitLinear, whose sums are not exact, does flip some (its test has its own bound).
# A real divergence (a wrong packing order, gamma instead of 1 / gamma, a changed code) moves logits by > 1e-2.
LOGIT_RTOL = 1e-5
LAYER_RTOL = 2e-6


@pytest.fixture(scope="module", autouse=True)
def _eager_bitlinear():
    """Run transformers' torch.compile-decorated BitNet functions eagerly (module docstring), on one intra-op
    thread: these models' ops are tiny, and on a busy 2-core machine two threads stall each other (the export test
    measured 40 s with two threads, 0.4 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch._dynamo.config.patch(disable=True):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 8000, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hq_model():
    """tiny-llama quantized by hf_quant's BitNet method, fp32 (tight comparisons)."""
    return AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32,
                                                quantization_config=QuantConfig(method="bitnet")).eval()


@pytest.fixture(scope="module")
def exported(hq_model, tmp_path_factory):
    return hf_quant.export_bitnet(hq_model, tmp_path_factory.mktemp("export") / "bitnet")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def rel_diff(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def bitlinears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, BitLinear)}


def tf_layers(model):
    """transformers' BitNet layers of a model, of either linear class."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (BitLinear, AutoBitLinear))}


def layer_inputs(model, ids):
    """The input each BitNet layer of a transformers model receives on `ids`."""
    seen, hooks = {}, []
    for name, m in tf_layers(model).items():
        hooks.append(m.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0].detach())))
    logits(model, ids)
    for h in hooks:
        h.remove()
    return seen


def check_same_layers(tf_model, hq_model, ids):
    """Each hf_quant layer against its transformers layer on the inputs transformers' model gives it: outputs a
    few fp32 ulps apart, and (BitLinear, which quantizes the activations to int8 codes as hf_quant does) the same
    int8 activation codes."""
    inputs = layer_inputs(tf_model, ids)
    assert set(inputs) == set(quant_layers(hq_model))
    with torch.no_grad():
        for name, x in inputs.items():
            tl = tf_model.get_submodule(name)
            if isinstance(tl, BitLinear):
                tf_codes, _ = tl.activation_quant(x)
                hq_codes, _ = quantize_rows(x.reshape(-1, x.shape[-1]), None)
                assert torch.equal(tf_codes.reshape(hq_codes.shape), hq_codes), name
            assert rel_diff(hq_model.get_submodule(name)(x), tl(x)) <= LAYER_RTOL, name


def generate(model, ids, n=16):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


def bitnet_layer(out_f, in_f, bias=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    return QuantLinear.from_quantized(quantize_bitnet(W, SPEC, dtype), SPEC, b, activation=ACT)


class Holder(nn.Module):
    """A model-like container of QuantLinear layers (for the refusals, which come before any config is read)."""

    def __init__(self, **layers):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)


# --- the codec ---------------------------------------------------------------------------------------

def test_packing_is_transformers_pack_weights_and_unpack_weights():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(-1, 2, (24, 40), generator=g).float()
    packed = pack_ternary((t + 1).to(torch.uint8))
    ref_input = t.clone()
    assert torch.equal(packed, pack_weights(ref_input))  # (pack_weights adds 1 to its argument in place)
    assert packed.shape == (6, 40) and packed.dtype == torch.uint8
    assert torch.equal(unpack_weights(packed, dtype=torch.float32), t)
    assert torch.equal(unpack_ternary(packed), (t + 1).to(torch.uint8))


def test_bitlinear_stores_the_reciprocal_scale():
    """BitLinear divides its product by weight_scale: the layout holds 1 / gamma, and the converted hf_quant
    layer computes what BitLinear computes (codes carried over exactly, both ways)."""
    for bias in (False, True):
        ours = bitnet_layer(48, 64, bias=bias, seed=3)
        tensors = to_bitlinear(ours.qweight, ours.scales, 64, "layer")
        gamma = ours.scales[0, 0]
        assert tensors["weight"].shape == (12, 64) and tensors["weight_scale"].shape == (1,)
        assert tensors["weight_scale"].item() == pytest.approx(1 / gamma.item(), rel=1e-7)
        tl = BitLinear(64, 48, bias=bias, dtype=torch.float32)
        tl.weight.copy_(tensors["weight"])
        tl.weight_scale.copy_(tensors["weight_scale"])
        if bias:
            tl.bias.copy_(ours.bias.data)
        x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert rel_diff(ours(x), tl(x)) <= LAYER_RTOL
            tl.weight_scale.copy_(gamma.reshape(1))  # gamma itself would be wrong by a factor gamma**2
            assert rel_diff(ours(x), tl(x)) > 0.5
        back = from_bitlinear(tensors["weight"], tensors["weight_scale"], 64, 48)
        assert torch.equal(back["qweight"], ours.qweight)
        assert (back["scales"] - ours.scales).abs().max() <= torch.finfo(torch.float32).eps * gamma  # <= 1 ulp


# --- export: hf_quant -> plain transformers --------------------------------------------------------

def test_export_loads_in_plain_transformers_and_computes_the_same_function(hq_model, exported, ids):
    config = json.loads((exported / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["linear_class"], qc["quantization_mode"], qc["use_rms_norm"],
            qc["modules_to_not_convert"]) == ("bitnet", "bitlinear", "offline", False, ["lm_head"])
    tf_model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    ours = quant_layers(hq_model)
    theirs = bitlinears(tf_model)
    assert len(ours) == 28 and set(theirs) == set(ours)
    assert all(type(m) is BitLinear for m in theirs.values()) and not quant_layers(tf_model)
    assert type(tf_model.lm_head) is nn.Linear
    for name, layer in ours.items():  # the codes, exactly: t + 1 there, t + 2 here
        assert torch.equal(unpack_ternary(theirs[name].weight) + 1, unpack_codes(layer.qweight, 2, layer.in_features))
    check_same_layers(tf_model, hq_model, ids)
    expected, got = logits(hq_model, ids), logits(tf_model, ids)
    assert rel_diff(got, expected) <= LOGIT_RTOL
    gen_hq, gen_tf = generate(hq_model, ids[:, :8]), generate(tf_model, ids[:, :8])
    assert gen_hq.shape == (2, 24) and torch.equal(gen_hq, gen_tf)


def test_export_then_import_gives_back_the_codes_and_the_function(hq_model, exported, tmp_path, ids):
    out = hf_quant.import_bitnet(exported, tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, layer in quant_layers(hq_model).items():
        other = back.get_submodule(name)
        assert isinstance(other, QuantLinear) and other.scheme.activation == ACT
        assert torch.equal(other.qweight, layer.qweight)
        # the scale went through its reciprocal: within one fp32 ulp (module docstring of hf_quant.io.bitnet)
        assert (other.scales - layer.scales).abs().max() <= torch.finfo(torch.float32).eps * layer.scales.abs().max()
    assert rel_diff(logits(back, ids), logits(hq_model, ids)) <= LOGIT_RTOL


def test_export_with_bias_qwen2(tmp_path):
    """Qwen2's biased q/k/v: the bias is added after the scaling on both sides."""
    torch.manual_seed(0)
    float_model = Qwen2ForCausalLM(tiny_qwen2_config())
    with torch.no_grad():
        for name, p in float_model.named_parameters():
            if name.endswith(".bias"):  # initialised to zero: give them values
                p.normal_(0.0, 0.5)
    float_model.save_pretrained(tmp_path / "float")
    hq = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.float32,
                                              quantization_config=QuantConfig(method="bitnet")).eval()
    assert hq.model.layers[0].self_attn.q_proj.bias.abs().min() > 0
    out = hf_quant.export_bitnet(hq, tmp_path / "bitnet")
    tf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(tf_model.model.layers[0].self_attn.q_proj) is BitLinear
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    check_same_layers(tf_model, hq, ids)
    assert rel_diff(logits(tf_model, ids), logits(hq, ids)) <= LOGIT_RTOL
    back = AutoModelForCausalLM.from_pretrained(hf_quant.import_bitnet(out, tmp_path / "back"))
    assert torch.equal(back.model.layers[1].self_attn.v_proj.bias, hq.model.layers[1].self_attn.v_proj.bias)
    assert rel_diff(logits(back, ids), logits(hq, ids)) <= LOGIT_RTOL
    # AutoBitLinear adds its bias before the scaling: imported, the bias is multiplied by gamma (one rounding)
    auto_src = as_autobitlinear(out, tmp_path / "auto")
    auto = AutoModelForCausalLM.from_pretrained(auto_src, dtype=torch.float32)
    check_same_layers(auto, hq, ids)
    auto_back = AutoModelForCausalLM.from_pretrained(hf_quant.import_bitnet(auto_src, tmp_path / "auto_back"))
    for name, layer in quant_layers(hq).items():
        if layer.bias is not None:
            assert rel_diff(auto_back.get_submodule(name).bias, layer.bias) <= LAYER_RTOL


def test_bf16_export_agrees_within_transformers_own_bf16_rounding(tmp_path, ids):
    """In bf16 transformers quantizes the activations in bf16 (127 / absmax and x * scale rounded to bf16) and
    rounds its integer sums to bf16 before scaling; hf_quant computes the int8 codes in fp32 and the sums exactly.
    The two bf16 models then differ by bf16 noise: measured 0.20 max on logits of 13, where transformers' own bf16
    run is 0.14 from the fp32 run of the same checkpoint. Bound: three times transformers' own bf16 error (other
    CPUs round bf16 matmuls differently); a wrong scale or packing is off by the logits' whole size."""
    hq = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.bfloat16,
                                              quantization_config=QuantConfig(method="bitnet")).eval()
    out = hf_quant.export_bitnet(hq, tmp_path / "bitnet")
    tf16 = AutoModelForCausalLM.from_pretrained(out)  # the checkpoint's dtype: bf16
    assert tf16.dtype == torch.bfloat16 and tf16.model.layers[0].mlp.up_proj.weight_scale.dtype == torch.bfloat16
    tf32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    a, b, ref = logits(tf16, ids), logits(hq, ids), logits(tf32, ids)
    own_noise = (a - ref).abs().max().item()
    assert (a - b).abs().max().item() <= 3 * own_noise
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


# --- import: transformers' own checkpoint -> hf_quant ----------------------------------------------

@pytest.fixture(scope="module")
def tf_checkpoint(tmp_path_factory):
    """A BitLinear checkpoint built with transformers' tools: tiny-llama's float weights ternarized as its
    WeightQuant does (scale = 1 / mean|W|), packed by its pack_weights, weight_scale = that scale (BitLinear
    divides by it), config from BitNetQuantConfig."""
    out = tmp_path_factory.mktemp("tf_bitnet")
    float_model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in float_model.state_dict().items() if k != "lm_head.weight"}  # tied
    for name, m in float_model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            W = m.weight.detach()
            scale = 1.0 / W.abs().mean().clamp(min=1e-5)
            t = (W * scale).round().clamp(-1, 1)
            assert torch.equal(t / scale, WeightQuant.apply(W))
            state[f"{name}.weight"] = pack_weights(t.clone())
            state[f"{name}.weight_scale"] = scale.reshape(1)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = float_model.config.to_dict()
    config["quantization_config"] = BitNetQuantConfig(modules_to_not_convert=["lm_head"]).to_dict()
    config["quantization_config"]["quant_method"] = "bitnet"
    (out / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(TINY_LLAMA / f, out / f)
    return out


def test_import_transformers_checkpoint(tf_checkpoint, tmp_path, ids):
    tf_model = AutoModelForCausalLM.from_pretrained(tf_checkpoint, dtype=torch.float32)
    assert len(bitlinears(tf_model)) == 28 and all(type(m) is BitLinear for m in bitlinears(tf_model).values())
    out = hf_quant.import_bitnet(tf_checkpoint, tmp_path / "hq")
    assert (out / "tokenizer.json").exists()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["method"], qc["bits"], qc["modules_to_not_convert"]) == (
        "hf_quant", "bitnet", 2, ["lm_head"])
    hq = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    source = load_file(tf_checkpoint / "model.safetensors")
    layers = quant_layers(hq)
    assert set(layers) == set(bitlinears(tf_model))
    for name, layer in layers.items():
        assert layer.scheme.activation == ACT
        t = unpack_weights(source[f"{name}.weight"], dtype=torch.float32)
        assert torch.equal(unpack_codes(layer.qweight, 2, layer.in_features), (t + 2).to(torch.uint8))
        gamma = (1 / source[f"{name}.weight_scale"].double()).float()  # 1 / weight_scale, rounded once
        assert torch.equal(layer.scales, gamma.expand(layer.out_features, 1))
    check_same_layers(tf_model, hq, ids)
    assert rel_diff(logits(hq, ids), logits(tf_model, ids)) <= LOGIT_RTOL


def as_autobitlinear(src, dst):
    """transformers' other offline layout of the same checkpoint: AutoBitLinear multiplies its product by
    weight_scale (so it holds gamma = 1 / BitLinear's weight_scale) and adds its bias before that scaling
    (so it holds bias / gamma)."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    for key in [k for k in state if k.endswith(".weight_scale")]:
        gamma = (1 / state[key].double())
        state[key] = gamma.to(state[key].dtype)
        bias = key.removesuffix("weight_scale") + "bias"
        if bias in state:
            state[bias] = (state[bias].double() / gamma).to(state[bias].dtype)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["linear_class"] = "autobitlinear"
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_import_autobitlinear_offline_checkpoint(tf_checkpoint, tmp_path, ids):
    """AutoBitLinear ("autobitlinear", "offline"): weight_scale is gamma itself, so the import is exact, and gives
    the very layers the BitLinear form of the same checkpoint gives. Per layer it computes hf_quant's function
    (within LAYER_RTOL). End to end it does not stay within LOGIT_RTOL: it multiplies the fake-quantized float
    activations codes / (127 / absmax) by the ternary weights, so its sums are not exact integers; those last-bit
    differences flip a few int8 roundings in later layers, and each flip moves an output by a full quantization
    step. Measured: 0.083 max on logits of 13 (0.6%), from hidden-state differences of 8e-5 after the first block
    (0 before it); BitLinear's own model is the same 0.083 from it. Bound: 2%, and the same argmax almost
    everywhere."""
    src = as_autobitlinear(tf_checkpoint, tmp_path / "auto")
    auto = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    layers = tf_layers(auto)
    assert len(layers) == 28 and all(type(m) is AutoBitLinear for m in layers.values())
    hq_auto = AutoModelForCausalLM.from_pretrained(hf_quant.import_bitnet(src, tmp_path / "hq_auto"))
    hq_bit = AutoModelForCausalLM.from_pretrained(hf_quant.import_bitnet(tf_checkpoint, tmp_path / "hq_bit"))
    source = load_file(src / "model.safetensors")
    for name, layer in quant_layers(hq_auto).items():
        assert torch.equal(layer.qweight, hq_bit.get_submodule(name).qweight)
        assert torch.equal(layer.scales, hq_bit.get_submodule(name).scales)
        assert torch.equal(layer.scales, source[f"{name}.weight_scale"].expand(layer.out_features, 1))
    check_same_layers(auto, hq_auto, ids)
    a, b = logits(auto, ids), logits(hq_auto, ids)
    assert rel_diff(a, b) <= 0.02
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


def test_import_refuses_corrupt_packed_weights(tf_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tf_checkpoint, src)
    state = load_file(src / "model.safetensors")
    state["model.layers.2.mlp.up_proj.weight"][5, 7] |= 0b11 << 4  # a 2-bit field of 3: no ternary value
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.up_proj\.weight: 1 packed 2-bit field\(s\) hold 3"):
        hf_quant.import_bitnet(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- refusals ----------------------------------------------------------------------------------------

def test_export_refuses_what_transformers_bitnet_cannot_hold(tmp_path):
    out = tmp_path / "out"

    def refused(model, match):
        with pytest.raises(ValueError, match=match):
            hf_quant.export_bitnet(model, out)
        assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing left behind

    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    rtn4 = LayerSpec(4, -1, True)
    refused(Holder(fc=QuantLinear.from_quantized(quantize_rtn(W, rtn4, torch.float32), rtn4, None)),
            r"fc: cannot export to transformers' BitNet \(BitLinear\): its grid is bits=4, group_size=-1, sym=True, "
            r"not BitNet's ternary .*its activations are float \(weight-only\).*QuantConfig\(method='bitnet'\)")
    weight_only = bitnet_layer(32, 64)
    weight_only.set_activation(None)
    refused(Holder(a=bitnet_layer(32, 64), b=weight_only), r"^b: .*its activations are float \(weight-only\), not "
            r"per-token int8")
    zero_code = bitnet_layer(32, 64)
    codes = unpack_codes(zero_code.qweight, 2, 64)
    codes[3, 9] = 0
    zero_code.qweight = pack_codes(codes, 2)
    refused(Holder(q=zero_code), r"q: 1 code\(s\) are 0 .*ternary codes \{1, 2, 3\}")
    per_row = bitnet_layer(32, 64)
    per_row.scales = per_row.scales.clone()
    per_row.scales[7] *= 2
    refused(Holder(p=per_row), r"p: the rows have different scales \(2 distinct values\)")
    refused(Holder(o=bitnet_layer(30, 64)), r"o: out_features=30 is not a multiple of 4, which transformers' "
            r"BitLinear needs")
    refused(Holder(lin=nn.Linear(8, 8)), r"no QuantLinear layers; quantize it with hf_quant.QuantConfig\(method='bitnet'\)")


def test_export_refuses_a_non_empty_target_and_writes_all_or_nothing(hq_model, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"export_bitnet: .*taken is a directory that is not empty"):
        hf_quant.export_bitnet(hq_model, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]

    class FailingTokenizer:  # fails after the weights and config.json are written
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        hf_quant.export_bitnet(hq_model, tmp_path / "new", tokenizer=FailingTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no target, no temporary directory
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    assert (hf_quant.export_bitnet(hq_model, tmp_path / "empty") / "model.safetensors").is_file()


def bitnet_source(tmp_path, **quantization_config):
    src = tmp_path / "src"
    src.mkdir()
    config = json.loads((TINY_LLAMA / "config.json").read_text())
    if quantization_config:
        config["quantization_config"] = {"quant_method": "bitnet", **quantization_config}
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("qc, match", [
    ({}, r"config.json has no quantization_config; this is not a transformers BitNet checkpoint"),
    ({"linear_class": "bitlinear", "quantization_mode": "offline", "use_rms_norm": True},
     r"use_rms_norm=true: .*RMSNorm .*hf_quant's BitNet layer does not have"),
    ({"linear_class": "autobitlinear", "quantization_mode": "online"},
     r"linear_class='autobitlinear' with quantization_mode='online': this checkpoint holds the float weights.*"
     r"quantize with hf_quant.QuantConfig\(method='bitnet'\) instead"),
])
def test_import_refuses_what_hf_quant_bitnet_cannot_compute(tmp_path, qc, match):
    src = bitnet_source(tmp_path, **qc)
    with pytest.raises(ValueError, match=match):
        hf_quant.import_bitnet(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_non_empty_target(tf_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(ValueError, match=r"import_bitnet: .*out is a directory that is not empty"):
        hf_quant.import_bitnet(tf_checkpoint, tmp_path / "out")
