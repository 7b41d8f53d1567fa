"""w8a8: int8 rows + dynamic int8 tokens (no decomposition), with optional SmoothQuant smoothing
folded into the previous op through AWQ's fold machinery. Config validation, the fold keeps the
float function and equalises the ranges, smoothing wins on a model with planted activation
outliers, exact save / reload with LoRA on top, and a failed smoothing leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant import kernels
from hf_quant.calibration import blockwise, quantize_model
from hf_quant.eval_outliers import plant_outliers
from hf_quant.methods import get_method, w8a8
from hf_quant.runtime.convert import find_targets
from hf_quant.runtime.scheme import ActivationSpec

from .conftest import TINY_LLAMA

CPU = torch.device("cpu")
SCHEME = ActivationSpec("int8_token", (("threshold", 0.0),))
FAST = dict(num_samples=4, seq_len=64, true_sequential=False)  # w8a8's weights do not depend on the Hessians
OUTLIER_CHANNELS = [3, 50, 100, 200]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel_err(out, ref):
    return ((out - ref).pow(2).mean() / ref.pow(2).mean()).item()


@pytest.fixture(scope="module")
def held_out():
    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)
    return tok(hf_quant.eval.bundled_text(), return_tensors="pt").input_ids[0][:2 * 128].reshape(2, 128)


def float_model(dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=dtype)


def quantized(model, **kw):
    """`model` quantized in place with w8a8 (through the same driver as from_pretrained)."""
    config = hf_quant.QuantConfig(method="w8a8", **{**FAST, **kw})
    report = quantize_model(model, config, find_targets(model, config, ["lm_head"]))
    return model, report


# --- config ----------------------------------------------------------------------------------------

def test_config_fixes_the_int8_grid_and_validates_smooth():
    cfg = hf_quant.QuantConfig(method="w8a8")
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.smooth) == (8, -1, True, None)
    for alpha in (0, 0.5, 1, 1.0):
        assert hf_quant.QuantConfig(method="w8a8", smooth=alpha).smooth == alpha
    for bad in (-0.1, 1.5, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match=r"QuantConfig.smooth=.* must be a number in \[0, 1\]"):
            hf_quant.QuantConfig(method="w8a8", smooth=bad)
    with pytest.raises(ValueError, match=r"QuantConfig.smooth=0.5 has no meaning for method='rtn'.*\['w8a8'\]"):
        hf_quant.QuantConfig(method="rtn", smooth=0.5)
    with pytest.raises(ValueError, match=r"dynamic\['mlp'\].*overrides \['bits'\]"):
        hf_quant.QuantConfig(method="w8a8", dynamic={"mlp": {"bits": 4}})
    assert hf_quant.QuantConfig(method="rtn").smooth is None  # saved as null by the other methods
    again = hf_quant.QuantConfig.from_dict(hf_quant.QuantConfig(method="w8a8", smooth=0.25).to_dict())
    assert again.smooth == 0.25 and again.method == "w8a8"

    method = get_method("w8a8")
    assert method.scale_dtype == torch.float32 and "SmoothQuant" in method.description
    assert method.activation_of({"smooth": 0.5}) == ("int8_token", {"threshold": 0.0})
    assert method.calibrates({"smooth": 0.5}) and not method.calibrates({"smooth": None})


def test_smoothing_without_data_names_the_dataset_and_no_smoothing_needs_none(held_out):
    model = float_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"QuantConfig.dataset=\[\] holds no calibration data, but "
                                         r"method='w8a8', smooth=0.5 calibrates.*or smooth=None"):
        quantized(model, smooth=0.5, dataset=[])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # smooth=None: plain dynamic W8A8, data-free: the (empty) dataset is never read, no calibration report
    model, report = quantized(model, smooth=None, dataset=[])
    assert report == []
    layers = [m for m in model.modules() if isinstance(m, hf_quant.QuantLinear)]
    assert len(layers) == 4 * 7 and all(m.scheme.activation == SCHEME for m in layers)
    # the same computation as llm_int8 without decomposition: codes and fp32 row scales bit for bit
    config = hf_quant.QuantConfig(method="llm_int8", threshold=0.0)
    plain = float_model()
    quantize_model(plain, config, find_targets(plain, config, ["lm_head"]))
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, held_out[:, :32]), logits(plain, held_out[:, :32]))


# --- the fold -------------------------------------------------------------------------------------

def smooth_float(model, alpha, ids):
    """Run w8a8's smoothing stage on every block of a float model (no quantization); the block
    contexts, in order. Each block sees the float outputs of the blocks before it."""
    config = hf_quant.QuantConfig(method="w8a8", smooth=alpha)
    prefix, blocks = blockwise.find_blocks(model)
    targets = find_targets(model, config, ["lm_head"])
    inputs = blockwise.capture_block_inputs(model, blocks[0], ids)
    contexts = []
    for i, block in enumerate(blocks):
        bp = f"{prefix}.{i}."
        names = [n for n in targets if n.startswith(bp)]
        groups = blockwise.input_groups(block, bp, names, inputs, CPU)
        ctx = blockwise.block_context(model, block, bp, groups, {n: targets[n] for n in names}, config, inputs, CPU)
        w8a8.smooth_scales(ctx)
        contexts.append(ctx)
        outs = blockwise.run_block(block, CPU, bp, inputs)
        inputs = [((y,) + tuple(a[1:]), k) for y, (a, k) in zip(outs, inputs)]
    return contexts


def test_smoothing_keeps_the_float_function_and_equalises_the_ranges(held_out):
    model = float_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ref = logits(model, held_out)
    contexts = smooth_float(model, 0.5, held_out[:, :64])
    after = logits(model, held_out)
    torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original[k])}
    for i in range(4):
        assert {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight",
                f"model.layers.{i}.mlp.up_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"} <= changed
    notes = " ".join(contexts[0].notes)
    assert "q_proj,k_proj,v_proj <- input_layernorm: smooth=0.5" in notes
    assert "gate_proj,up_proj <- post_attention_layernorm" in notes and "down_proj <- mlp.up_proj" in notes
    assert "o_proj: no smoothing (its input mixes v_proj heads" in notes  # grouped-query attention

    # alpha = 0.5: after the fold, max|X'_j| = max|W'_j| = sqrt(max|X_j| max|W_j|) for every channel
    ctx = contexts[1]
    head = ctx.prefix + "self_attn.q_proj"
    x_max = {}
    hook = model.get_submodule(head).register_forward_hook(
        lambda m, args, out: w8a8.observe_abs_max(x_max, head, args[0], 1))
    ctx.run(ctx.inputs)
    hook.remove()
    w_max = torch.stack([model.get_submodule(ctx.prefix + f"self_attn.{p}_proj").weight.abs().amax(0)
                         for p in "qkv"]).amax(0)
    torch.testing.assert_close(x_max[head], w_max, rtol=1e-4, atol=0)
    # the undo log restores the float model bit for bit
    with torch.no_grad():
        for c in reversed(contexts):
            for tensor, saved in reversed(c.undo):
                tensor.copy_(saved)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "opt"])
def test_smoothing_folds_on_other_architectures(tiny_models, arch, input_ids):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ref = logits(model, input_ids)
    contexts = smooth_float(model, 0.5, torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(logits(model, input_ids), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert any(not torch.equal(v, original[k]) for k, v in model.state_dict().items())
    expected = {"gpt2": ["c_attn <- ln_1", "c_fc <- ln_2", "attn.c_proj: no smoothing"],  # Conv1D, LayerNorm bias
                "qwen2": ["<- input_layernorm", "down_proj <- mlp.up_proj"],
                "opt": ["out_proj <- self_attn.v_proj", "fc2 <- fc1"]}[arch]
    notes = " ".join(contexts[0].notes)
    assert all(e in notes for e in expected), contexts[0].notes


def test_plant_outliers_keeps_the_float_function(held_out):
    model = float_model()
    ref = logits(model, held_out)
    assert plant_outliers(model, OUTLIER_CHANNELS, 32.0) == 8
    assert torch.equal(logits(model, held_out), ref)  # a power of two: bit for bit
    norm = model.model.layers[0].input_layernorm.weight
    assert norm[OUTLIER_CHANNELS].abs().min() > 8 * norm.abs().median()
    with pytest.raises(ValueError, match="factor"):
        plant_outliers(model, OUTLIER_CHANNELS, 0)


# --- quality on planted outliers -------------------------------------------------------------------

def test_smoothing_recovers_planted_outliers(held_out):
    planted = float_model()
    plant_outliers(planted, OUTLIER_CHANNELS, 32.0)
    ref = logits(planted, held_out)
    plain, _ = quantized(planted, smooth=None)
    plain_err = rel_err(logits(plain, held_out), ref)
    planted = float_model()
    plant_outliers(planted, OUTLIER_CHANNELS, 32.0)
    smoothed, report = quantized(planted, smooth=0.5)
    smooth_err = rel_err(logits(smoothed, held_out), ref)
    # measured: plain ~3.5e-3, smoothed ~9e-5 (the unplanted model's plain W8A8: ~9e-5)
    assert smooth_err < 0.1 * plain_err, (plain_err, smooth_err)
    assert len(report) == 4 and all("smooth=0.5" in " ".join(e["notes"]) for e in report)


# --- save / reload / LoRA --------------------------------------------------------------------------

def test_w8a8_smoothed_saves_reloads_exactly_and_trains_lora(held_out, tmp_path):
    cfg = hf_quant.QuantConfig(method="w8a8", smooth=0.5, dataset=[held_out.flatten()], **FAST)
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=cfg, dtype=torch.bfloat16)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, hf_quant.QuantLinear)}
    assert len(layers) == 28 and all(m.scheme.activation == SCHEME and m.scales.dtype == torch.float32
                                     for m in layers.values())
    float_norm = float_model(torch.bfloat16).model.layers[0].input_layernorm.weight
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, float_norm)  # smoothing folded in
    x = held_out[:, :32]
    with torch.no_grad(), kernels.use_kernel("reference"):
        ref = model(x).logits
    model.save_pretrained(tmp_path)
    assert "SmoothQuant" in (tmp_path / "README.md").read_text()
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    qc = again.config.quantization_config
    assert (qc.method, qc.smooth, qc.bits, qc.group_size, qc.sym) == ("w8a8", 0.5, 8, -1, True)
    state = again.state_dict()
    for k, v in model.state_dict().items():  # codes, fp32 scales and the smoothed norm weights
        assert torch.equal(state[k], v), k
    assert all(again.get_submodule(n).scheme == m.scheme for n, m in layers.items())
    with torch.no_grad(), kernels.use_kernel("reference"):
        assert torch.equal(again(x).logits, ref)
    assert torch.equal(logits(again, x), logits(model, x))

    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(again, peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    pm(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "lora_B" in n]  # B starts at 0: A gets none yet
    assert grads and all(g is not None for g in grads) and all(g.abs().sum() > 0 for g in grads)


# --- a failed smoothing leaves the model as it was -------------------------------------------------

@pytest.mark.parametrize("failure", ["non-finite scales", "exception inside the fold"])
def test_failed_smoothing_leaves_the_model_bit_identical(failure, monkeypatch):
    model = float_model(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: type(m) for n, m in model.named_modules()}
    calls = {"n": 0}
    # block 0: qkv, gate/up, down smoothed (3 folds) and quantized; block 1 fails in its second group,
    # after its first group was folded
    if failure == "non-finite scales":
        real = w8a8.smoothing_scales

        def scales(*args):
            calls["n"] += 1
            s = real(*args)
            return s.index_fill(0, torch.tensor([7]), float("nan")) if calls["n"] == 5 else s

        monkeypatch.setattr(w8a8, "smoothing_scales", scales)
        expected = (ValueError, r"model.layers.1.mlp.gate_proj: SmoothQuant scales are not finite \(1 channel")
    else:
        real = w8a8.fold_scales

        def fold(*args):
            calls["n"] += 1
            real(*args)
            if calls["n"] == 5:
                raise RuntimeError("boom")

        monkeypatch.setattr(w8a8, "fold_scales", fold)
        expected = (RuntimeError, "boom")
    with pytest.raises(expected[0], match=expected[1]):
        quantized(model, smooth=0.5)
    assert calls["n"] == 5
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)  # every parameter and buffer
    assert {n: type(m) for n, m in model.named_modules()} == modules  # the float layers are back
