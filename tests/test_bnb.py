"""bitsandbytes is the oracle of hf_quant's `llm_int8`: same int8 codes and row scales bit for bit from
the same float weight, outputs within bitsandbytes' own tolerance; `import_bnb8` / `export_bnb8`
convert its `load_in_8bit` checkpoints both ways without requantizing; exporters refuse what they
cannot represent.

bitsandbytes (>= 0.45, whose CPU backend runs LLM.int8) is an optional test dependency: the tests that
need it are skipped with the reason when it cannot be imported.

Two properties of bitsandbytes on CPU shape these tests:
- a `Linear8bitLt` in training mode runs `MatMul8bitFp` (weight-only: dequantize + matmul, no
  activation quantization), so the oracle is always run in eval mode, as `from_pretrained` leaves it;
- it casts activations to fp16 before quantizing them: the same codes as hf_quant's for fp16 and bf16
  activations (bf16 -> fp16 is exact in range), different int8 roundings for fp32 activations. The
  checks run in fp16 and bf16. (A bitsandbytes model loaded with dtype=float32 still computes in the
  checkpoint's bf16.)
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_quant
from hf_quant import QuantLinear, kernels
from hf_quant.core import LayerSpec
from hf_quant.io.bnb import scale_from_scb, scb_from_scale
from hf_quant.methods.llm_int8 import int8_rowwise
from hf_quant.runtime.scheme import ActivationSpec

from .conftest import TINY_LLAMA

# The oracle's own CPU results are right from 0.48.1 on: 0.48.0 computes a reloaded 8-bit checkpoint wrongly on CPU
# (its own save_pretrained too: 61% relative logit error on tiny-llama, transformers 5.17), 0.47 gives NaN logits,
# and transformers 5.17 refuses anything before 0.46.1.
BNB_MIN = "0.48.1"
try:
    bnb = importlib.import_module("bitsandbytes")
    from packaging.version import Version

    _BNB_ERROR = None if Version(bnb.__version__) >= Version(BNB_MIN) else f"version {bnb.__version__}"
except Exception as e:  # ImportError, or a broken native library
    bnb, _BNB_ERROR = None, f"{type(e).__name__}: {e}"

needs_bnb = pytest.mark.skipif(_BNB_ERROR is not None, reason=f"bitsandbytes cannot serve as the oracle "
                               f"({_BNB_ERROR}); pip install 'bitsandbytes>={BNB_MIN}' to run the oracle tests")
# bitsandbytes' own tolerance for Linear8bitLt(threshold=6.0, has_fp16_weights=False) on a 1024 -> 3072 layer
# with default init and randn half inputs (its test_linear_no_igemmlt: allclose(..., atol=0.02)).
BNB_ATOL = 0.02


@pytest.fixture(autouse=True)
def _quiet_bnb():
    """bitsandbytes logs a warning per matmul for non-fp16 inputs."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """One unit in the last place of `dtype` at `magnitude`."""
    mantissa = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[dtype]
    return 2.0 ** (torch.tensor(magnitude).log2().floor().item() - mantissa)


def bnb_linear(weight: torch.Tensor, bias: torch.Tensor | None, threshold: float):
    out_f, in_f = weight.shape
    layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return layer.to("cpu").eval()  # .to(device) quantizes; eval: the LLM.int8 path (module docstring)


def planted_inputs(rows: int, in_f: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """randn with planted outlier columns: some columns +-10 in every row, others only in some rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g)
    for c in (3, 100, 700):  # whole-column outliers
        x[:, c] = 10.0 * torch.where(torch.rand(rows, generator=g) < 0.5, -1.0, 1.0)
    for c in (50, 512):  # outliers in some rows only; the rest of the column stays small
        x[::3, c] = -10.0
    return x.to(dtype)


# --- the layer: codes, scales, outputs -------------------------------------------------------------

@needs_bnb
@pytest.mark.parametrize("threshold", [6.0, 0.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_llm_int8_layer_matches_bitsandbytes(dtype, threshold):
    torch.manual_seed(0)
    ref = torch.nn.Linear(1024, 3072).to(dtype)  # bitsandbytes' own test layer
    W, bias = ref.weight.data, ref.bias.data
    oracle = bnb_linear(W, bias, threshold)
    spec = LayerSpec(8, -1, True)
    ours = QuantLinear.from_quantized(int8_rowwise(W), spec, bias,
                                      activation=ActivationSpec("int8_token", (("threshold", threshold),)))
    # int8 codes and row scales, bit for bit
    CB, SCB = oracle.state.CB if oracle.weight.CB is None else oracle.weight.CB, oracle.weight.SCB
    assert SCB.dtype == torch.float32 and ours.scales.dtype == torch.float32
    assert torch.equal((ours.qweight.to(torch.int16) - 128).to(torch.int8), CB)
    assert torch.equal(ours.scales, scale_from_scb(SCB))  # scale == fl32(SCB / 127)
    scb, _ = scb_from_scale(ours.scales)
    assert torch.equal(scb, SCB)  # and SCB comes back exactly
    # outputs: prefill-sized batches with planted outliers, a 3-d input, and one decode row
    for x in (planted_inputs(16, 1024, dtype, 1), planted_inputs(24, 1024, dtype, 2).reshape(2, 12, 1024),
              planted_inputs(1, 1024, dtype, 3)):
        with torch.no_grad():
            expected = oracle(x).float()
            for kernel in ("reference", None):
                if kernel is None:
                    got = ours(x).float()
                else:
                    with kernels.use_kernel(kernel):
                        got = ours(x).float()
                diff = (got - expected).abs().max().item()
                assert diff <= BNB_ATOL, (kernel, diff)
                # in fact within two units in the last place of the output dtype: the same int8 products
                assert diff <= 2 * ulp(dtype, expected.abs().max().item()), (kernel, diff)


def test_scb_is_recovered_exactly_from_the_scale():
    # every positive fp16 value (bitsandbytes' SCB is the absmax of an fp16 weight): one exact answer
    h = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    scb, _ = scb_from_scale(scale_from_scb(h))
    assert torch.equal(scb, h)
    # arbitrary fp32 absmax (hf_quant quantizing an fp32 model): fl32(SCB / 127) == scale always; two
    # preimages only for significands in [127/64, 2), and there the nearer one is taken
    g = torch.Generator().manual_seed(0)
    a = torch.exp(torch.randn(200_000, generator=g) * 3)
    scale = scale_from_scb(a)
    scb, ambiguous = scb_from_scale(scale)
    assert torch.equal(scale_from_scb(scb), scale)
    significand = a / torch.exp2(torch.floor(torch.log2(a)))
    upper = (significand >= 127 / 64).float().mean().item()
    assert 0 < ambiguous / a.numel() <= upper + 1e-3
    assert ((scb != a).float().mean().item()) <= ambiguous / a.numel()
    assert torch.equal(scb_from_scale(torch.zeros(3, 1))[0], torch.zeros(3))


# --- checkpoints -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bnb_dir(tmp_path_factory):
    """A checkpoint written by transformers + bitsandbytes themselves (BitsAndBytesConfig(load_in_8bit=True) on CPU)."""
    if bnb is None:
        pytest.skip(f"bitsandbytes cannot be imported ({_BNB_ERROR})")
    from transformers import BitsAndBytesConfig

    out = tmp_path_factory.mktemp("bnb8")
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                 device_map="cpu")
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_LLAMA / f, out / f)
    return out


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(3, 8000, (2, 16), generator=torch.Generator().manual_seed(0))


def quantized_layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def per_layer_max_diff(bnb_model, hq_model, input_ids) -> dict[str, tuple[float, float]]:
    """Each hf_quant layer against its bitsandbytes layer on the inputs bitsandbytes' model gives it:
    name -> (max abs diff, max |output|)."""
    inputs, hooks = {}, []
    for name, m in bnb_model.named_modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            hooks.append(m.register_forward_hook(lambda m, i, o, name=name: inputs.__setitem__(name, i[0].detach())))
    with torch.no_grad():
        bnb_model(input_ids)
        for h in hooks:
            h.remove()
        out = {}
        for name, layer in quantized_layers(hq_model).items():
            expected = bnb_model.get_submodule(name)(inputs[name]).float()
            out[name] = ((layer(inputs[name]).float() - expected).abs().max().item(), expected.abs().max().item())
    return out


@needs_bnb
def test_import_bnb8_carries_codes_and_scales_over_and_matches_bitsandbytes(bnb_dir, tmp_path, input_ids):
    out = hf_quant.import_bnb8(bnb_dir, tmp_path / "hq")
    assert out == tmp_path / "hq" and (out / "tokenizer.json").exists()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["method"], qc["threshold"], qc["modules_to_not_convert"]) == (
        "hf_quant", "llm_int8", 6.0, ["lm_head"])
    hq = AutoModelForCausalLM.from_pretrained(out)
    source = load_file(bnb_dir / "model.safetensors")
    layers = quantized_layers(hq)
    assert len(layers) == 28
    for name, layer in layers.items():
        assert torch.equal(layer.qweight, (source[f"{name}.weight"].to(torch.int16) + 128).to(torch.uint8)), name
        assert torch.equal(layer.scales[:, 0], source[f"{name}.SCB"] / 127), name
        assert layer.scheme.activation == ActivationSpec("int8_token", (("threshold", 6.0),)), name
    # no requantization, and no difference from hf_quant quantizing the float model itself
    own = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=hf_quant.QuantConfig(method="llm_int8"),
                                               dtype=torch.bfloat16)
    for name, layer in quantized_layers(own).items():
        assert torch.equal(layer.qweight, layers[name].qweight) and torch.equal(layer.scales, layers[name].scales)

    bnb_model = AutoModelForCausalLM.from_pretrained(bnb_dir, device_map="cpu")
    assert hq.dtype == bnb_model.dtype == torch.bfloat16
    # layer by layer on the same inputs: within two bf16 ulps of each output (the same int8 products)
    for name, (diff, magnitude) in per_layer_max_diff(bnb_model, hq, input_ids).items():
        assert diff <= 2 * ulp(torch.bfloat16, magnitude), (name, diff, magnitude)
    # the whole model: those ulps compound through 4 bf16 blocks as any two bf16 implementations' do;
    # the logits stay as close to bitsandbytes' as bitsandbytes' are to the float model, same top-1
    with torch.no_grad():
        got, expected = hq(input_ids).logits.float(), bnb_model(input_ids).logits.float()
        float_logits = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.bfloat16)(input_ids).logits.float()
    diff = (got - expected).abs().max().item()
    assert diff <= max(2 * (expected - float_logits).abs().max().item(), 0.05 * expected.abs().max().item())
    assert torch.equal(got.argmax(-1), expected.argmax(-1))

    model = hf_quant.import_bnb8(bnb_dir)  # without dst_dir: the loaded model
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits.float(), got)


@needs_bnb
def test_export_bnb8_round_trip_is_bit_identical_and_loads_in_transformers(bnb_dir, tmp_path, input_ids):
    hq = hf_quant.import_bnb8(bnb_dir)
    out = hf_quant.export_bnb8(hq, tmp_path / "bnb")
    a, b = load_file(bnb_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["load_in_8bit"], qc["load_in_4bit"], qc["llm_int8_threshold"]) == (
        "bitsandbytes", True, False, 6.0)
    again = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert isinstance(again.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    original = AutoModelForCausalLM.from_pretrained(bnb_dir, device_map="cpu")
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, original(input_ids).logits)


@needs_bnb
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_export_bnb8_of_an_hf_quant_model_equals_bitsandbytes_quantizing_it(tmp_path, input_ids, threshold):
    """hf_quant quantizes the float model; bitsandbytes loads the export and computes exactly what it computes
    when it quantizes the same float model itself (threshold 0: plain dynamic W8A8, no decomposition)."""
    from transformers import BitsAndBytesConfig

    hq = AutoModelForCausalLM.from_pretrained(
        TINY_LLAMA, quantization_config=hf_quant.QuantConfig(method="llm_int8", threshold=threshold),
        dtype=torch.bfloat16)
    out = hf_quant.export_bnb8(hq, tmp_path / "bnb")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_threshold"] == threshold
    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    direct = AutoModelForCausalLM.from_pretrained(
        TINY_LLAMA, device_map="cpu", quantization_config=BitsAndBytesConfig(load_in_8bit=True,
                                                                             llm_int8_threshold=threshold))
    for name, m in direct.named_modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            other = loaded.get_submodule(name)
            assert torch.equal(other.weight.data, m.weight.data) and torch.equal(other.weight.SCB, m.weight.SCB)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, direct(input_ids).logits)
    for name, (diff, magnitude) in per_layer_max_diff(loaded, hq, input_ids).items():
        assert diff <= 2 * ulp(torch.bfloat16, magnitude), (name, diff, magnitude)


@needs_bnb
def test_import_bnb8_refuses_4bit_checkpoints(tmp_path):
    from transformers import BitsAndBytesConfig

    src = tmp_path / "bnb4"
    AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=BitsAndBytesConfig(load_in_4bit=True),
                                         device_map="cpu").save_pretrained(src)
    with pytest.raises(ValueError, match=r"model\.layers\.\d+\.\w+\.\w+_proj: a 4-bit bitsandbytes layer "
                                         r"\(load_in_4bit"):
        hf_quant.import_bnb8(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_bnb8_checks_its_config(tmp_path):
    shutil.copytree(TINY_LLAMA, tmp_path / "float")
    with pytest.raises(ValueError, match="no quantization_config"):
        hf_quant.import_bnb8(tmp_path / "float", tmp_path / "out")
    cfg = json.loads((tmp_path / "float" / "config.json").read_text())
    for qc, match in (({"quant_method": "gptq", "bits": 4}, "quant_method='gptq'"),
                      ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "load_in_4bit=true"),
                      ({"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": -1},
                       "llm_int8_threshold=-1"),
                      ({"quant_method": "bitsandbytes", "load_in_8bit": True}, r"no tensor named '\*\.SCB'")):
        (tmp_path / "float" / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
        with pytest.raises(ValueError, match=match):
            hf_quant.import_bnb8(tmp_path / "float", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- exporters refuse what they cannot represent ---------------------------------------------------------

@pytest.fixture(scope="module")
def int8_model():
    return AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=hf_quant.QuantConfig(
        method="llm_int8"), dtype=torch.bfloat16)


@pytest.mark.parametrize("config, what", [
    (dict(method="rtn", bits=4, group_size=32), "a 4-bit rtn layer"),
    (dict(method="gptq", bits=4, group_size=32, num_samples=2, seq_len=16), "a 4-bit gptq layer"),
    (dict(method="rtn", bits=8, group_size=-1, sym=True), r"an 8-bit rtn layer .*activations: float \(weight-only\)")])
def test_export_bnb8_refuses_layers_it_cannot_represent(tmp_path, config, what):
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=hf_quant.QuantConfig(**config),
                                                 dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: cannot export to bitsandbytes "
                                         rf"8-bit: it is {what}"):
        hf_quant.export_bnb8(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_bnb8_refuses_mixed_thresholds(int8_model, tmp_path):
    layer = int8_model.model.layers[1].mlp.up_proj
    layer.set_activation(ActivationSpec("int8_token", (("threshold", 4.0),)))
    try:
        with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj has threshold 4\.0.*one "
                                             "llm_int8_threshold"):
            hf_quant.export_bnb8(int8_model, tmp_path / "out")
    finally:
        layer.set_activation(ActivationSpec("int8_token", (("threshold", 6.0),)))


def test_gptq_exporter_refuses_activation_schemes(int8_model, tmp_path):
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: cannot export to GPTQ: this layer "
                                         r"\(method 'llm_int8'\) quantizes its activations at run time \(activation "
                                         r"scheme 'int8_token', threshold=6\.0\)"):
        hf_quant.export_gptq(int8_model, tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()


def test_cli_quantize_format_gptq_refuses_llm_int8(tmp_path, capsys):
    from hf_quant.cli import CliError, main

    with pytest.raises((CliError, SystemExit)):
        main(["-q", "quantize", str(TINY_LLAMA), str(tmp_path / "out"), "--method", "llm_int8", "--format", "gptq"])
    err = capsys.readouterr().err
    assert "q_proj: cannot export to GPTQ" in err and "'int8_token'" in err


@needs_bnb
def test_cli_import_and_export_bnb8(bnb_dir, tmp_path, capsys):
    from hf_quant.cli import main

    main(["-q", "import-bnb8", str(bnb_dir), str(tmp_path / "hq")])
    assert json.loads(capsys.readouterr().out) == {"saved": str(tmp_path / "hq")}
    main(["-q", "export-bnb8", str(tmp_path / "hq"), str(tmp_path / "bnb")])
    assert json.loads(capsys.readouterr().out)["saved"] == str(tmp_path / "bnb")
    a, b = load_file(bnb_dir / "model.safetensors"), load_file(tmp_path / "bnb" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
