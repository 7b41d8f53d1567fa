"""End to end through transformers: quantize in from_pretrained, save, reload, dequantize, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import hf_quant
from hf_quant import QuantConfig, QuantLinear, kernels

from .conftest import save_random_model


def quantize(path, **cfg):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QuantConfig(**cfg))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_round_trip_bit_identical(tiny_models, tmp_path, input_ids, arch, bits, group_size, sym):
    q = quantize(tiny_models[arch], bits=bits, group_size=group_size, sym=sym)
    layers = quant_layers(q)
    assert len(layers) == (14 if arch == "llama" else 8)
    assert all(m.spec == hf_quant.LayerSpec(bits, group_size, sym) for m in layers.values())
    before = logits(q, input_ids)
    q.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hf_quant" and saved["bits"] == bits and saved["format_version"] == 2
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert {n: m.spec for n, m in quant_layers(again).items()} == {n: m.spec for n, m in layers.items()}
    assert torch.equal(logits(again, input_ids), before)
    for name, m in quant_layers(again).items():
        for buf in ("qweight", "scales", "qzeros", "bias"):
            a, b = getattr(m, buf), getattr(layers[name], buf)
            assert (a is None and b is None) or (torch.equal(a, b) and a.dtype == b.dtype), (name, buf)


def test_quantized_close_to_float_and_kernels_agree(tiny_models, input_ids):
    ref = AutoModelForCausalLM.from_pretrained(tiny_models["llama-fp32"])
    q = quantize(tiny_models["llama-fp32"], bits=8, group_size=-1)
    fast = logits(q, input_ids)
    with kernels.use_kernel("reference"):
        slow = logits(q, input_ids)
    assert ((fast - slow).norm() / slow.norm()) < 1e-3
    assert ((fast - logits(ref, input_ids)).norm() / logits(ref, input_ids).norm()) < 2e-2


def test_generate_runs_on_quantized_layers(tiny_models, input_ids):
    q = quantize(tiny_models["llama"], bits=4, group_size=32)
    calls = []
    layer = next(iter(quant_layers(q).values()))
    layer.register_forward_hook(lambda *a: calls.append(1))
    out = q.generate(input_ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11) and len(calls) >= 6


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sharded_save_reloads(tiny_models, tmp_path, input_ids, arch):
    q = quantize(tiny_models[arch], bits=4, group_size=32, sym=False)
    q.save_pretrained(tmp_path, max_shard_size="60KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(again, input_ids), logits(q, input_ids))


@pytest.mark.parametrize("arch, float_type", [("llama", nn.Linear), ("gpt2", Conv1D)])
def test_dequantize_restores_float_layers(tiny_models, tmp_path, input_ids, arch, float_type):
    q = quantize(tiny_models[arch], bits=4, group_size=32)
    with kernels.use_kernel("reference"):
        expected = logits(q, input_ids)
    model = q.dequantize()
    assert not quant_layers(model) and not getattr(model, "is_quantized", False)
    assert all(isinstance(model.get_submodule(n), float_type) for n in ["model.layers.0.mlp.down_proj" if arch == "llama" else "transformer.h.0.mlp.c_fc"])
    assert torch.equal(logits(model, input_ids), expected)  # same weights the reference kernel used
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(plain, input_ids), expected)


def test_default_skips_lm_head_and_tied_embeddings(tmp_path, input_ids):
    path = save_random_model(tmp_path / "tied", "llama", tie_word_embeddings=True)
    q = quantize(path)
    assert type(q.lm_head) is nn.Linear and type(q.model.embed_tokens) is nn.Embedding
    assert q.lm_head.weight is q.model.embed_tokens.weight
    assert "lm_head" in q.config.quantization_config.modules_to_not_convert


def test_explicit_modules_to_not_convert_and_dynamic(tiny_models, tmp_path, input_ids):
    q = quantize(tiny_models["llama"], bits=4, group_size=32,
                 modules_to_not_convert=["lm_head", "model.layers.0.self_attn"],
                 dynamic={r"down_proj": {"bits": 8, "group_size": -1}, r"-:layers\.1\.self_attn\.o_proj": {}})
    layers = quant_layers(q)
    assert not any(n.startswith("model.layers.0.self_attn") for n in layers)
    assert "model.layers.1.self_attn.o_proj" not in layers
    assert layers["model.layers.1.mlp.down_proj"].spec == hf_quant.LayerSpec(8, -1, False)
    assert layers["model.layers.1.mlp.up_proj"].spec == hf_quant.LayerSpec(4, 32, False)
    q.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert {n: m.spec for n, m in quant_layers(again).items()} == {n: m.spec for n, m in layers.items()}
    assert torch.equal(logits(again, input_ids), logits(q, input_ids))


def test_group_size_larger_than_in_features(tiny_models, tmp_path, input_ids):
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: cannot quantize: group_size=256 is larger than in_features=128"):
        quantize(tiny_models["llama"], group_size=256)
    q = quantize(tiny_models["llama"], group_size=256, on_incompatible="skip")
    assert set(quant_layers(q)) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    q.save_pretrained(tmp_path)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path), input_ids), logits(q, input_ids))


def test_nan_weight_is_refused_naming_the_module(tmp_path):
    path = save_random_model(tmp_path / "nan", "llama")
    sd = load_file(path / "model.safetensors")
    sd["model.layers.1.mlp.gate_proj.weight"][7, 3] = float("nan")
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.gate_proj: weight has 1 NaN/inf"):
        quantize(path)


@pytest.fixture()
def saved_quantized(tiny_models, tmp_path):
    out = tmp_path / "q"
    quantize(tiny_models["llama"], bits=4, group_size=32).save_pretrained(out)
    return out


def test_newer_format_version_is_refused(saved_quantized):
    cfg_path = saved_quantized / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 99.*pip install -U hf_quant"):
        AutoModelForCausalLM.from_pretrained(saved_quantized)


def test_format_version_1_checkpoint_still_loads(saved_quantized, input_ids, tmp_path):
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(saved_quantized, old)
    cfg = json.loads((old / "config.json").read_text())
    q = cfg["quantization_config"]
    v1_fields = {"quant_method", "method", "bits", "group_size", "sym", "modules_to_not_convert", "dynamic",
                 "on_incompatible", "num_samples", "seq_len", "seed", "damp_percent", "block_size"}
    cfg["quantization_config"] = {**{k: v for k, v in q.items() if k in v1_fields}, "format_version": 1}
    (old / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(old), input_ids),
                       logits(AutoModelForCausalLM.from_pretrained(saved_quantized), input_ids))


def test_malformed_quantization_config_is_refused(saved_quantized):
    cfg_path = saved_quantized / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["bits"] = -4
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bits=-4"):
        AutoModelForCausalLM.from_pretrained(saved_quantized)


def test_truncated_checkpoint_is_refused(saved_quantized):
    f = saved_quantized / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated safetensors file"):
        AutoModelForCausalLM.from_pretrained(saved_quantized)


@pytest.mark.parametrize("key", ["model.layers.1.mlp.up_proj.qweight", "model.layers.0.self_attn.k_proj.qzeros"])
def test_missing_quantized_tensor_is_refused(saved_quantized, key):
    f = saved_quantized / "model.safetensors"
    sd = load_file(f)
    del sd[key]
    save_file(sd, str(f), metadata={"format": "pt"})
    module, _, tensor = key.rpartition(".")
    with pytest.raises(ValueError, match=rf"{module}: the checkpoint has no '{tensor}' tensor"):
        AutoModelForCausalLM.from_pretrained(saved_quantized)


def test_mis_shaped_quantized_tensor_is_refused(saved_quantized):
    f = saved_quantized / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.mlp.down_proj.scales"] = sd["model.layers.0.mlp.down_proj.scales"][:, :3].contiguous()
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj: checkpoint tensor 'scales' is BF16\[128, 3\]"):
        AutoModelForCausalLM.from_pretrained(saved_quantized)


def test_float_cast_is_blocked_and_to_dtype_keeps_packed_state(tiny_models, input_ids):
    q = quantize(tiny_models["llama"], bits=4, group_size=32)
    with pytest.raises(ValueError, match="not supported for quantized model"):
        q.half()
    layer = q.model.layers[0].mlp.down_proj
    qweight, scales = layer.qweight.clone(), layer.scales.clone()
    q.to(torch.float32)
    assert torch.equal(layer.qweight, qweight) and layer.scales.dtype == torch.bfloat16 and torch.equal(layer.scales, scales)
    assert logits(q, input_ids).dtype == torch.float32


def test_loading_without_the_plugin_is_loud(saved_quantized):
    """Without `import hf_quant`, transformers only warns and skips quantization: document that it does."""
    code = (
        "import warnings, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(saved_quantized)!r})\n"
        "print('LOADED', type(m.model.layers[0].mlp.down_proj).__name__)\n"
    )
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="warning")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(saved_quantized).parent)
    out = res.stdout + res.stderr
    assert "Unknown quantization type, got hf_quant" in out
    assert "LOADED Linear" in out  # float layers with random weights: why README says `import hf_quant` first


def test_failed_quantization_leaves_the_model_untouched(tiny_models):
    from hf_quant.calibration import quantize_model
    from hf_quant.runtime.convert import find_targets

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")  # the last layer to be quantized
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = QuantConfig()
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj: weight has 1 NaN/inf"):
        quantize_model(model, cfg, find_targets(model, cfg, ["lm_head"]))
    assert not quant_layers(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_load_in_another_dtype(saved_quantized, input_ids):
    model = AutoModelForCausalLM.from_pretrained(saved_quantized, dtype=torch.float32)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.scales.dtype == torch.float32  # widened exactly from the saved bf16
    assert torch.isfinite(logits(model, input_ids)).all()


def test_reload_with_device_map(saved_quantized, input_ids):
    plain = AutoModelForCausalLM.from_pretrained(saved_quantized)
    mapped = AutoModelForCausalLM.from_pretrained(saved_quantized, device_map="cpu")
    assert isinstance(mapped.model.layers[0].mlp.down_proj, QuantLinear)
    assert torch.equal(logits(mapped, input_ids), logits(plain, input_ids))


def test_qwen2_with_biased_projections_round_trips(tiny_models, tmp_path, input_ids):
    q = quantize(tiny_models["qwen2"], bits=4, group_size=64)
    q_proj = q.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.bias is not None and q_proj.bias.dtype == torch.bfloat16
    q.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(again.model.layers[0].self_attn.q_proj.bias, q_proj.bias)
    assert torch.equal(logits(again, input_ids), logits(q, input_ids))


def test_dequantize_after_save_pretrained_in_the_readme_order(tiny_models, tmp_path, input_ids):
    """The README's usage block: quantize, save_pretrained, reload, then dequantize. After a save,
    `config.dtype` is the string "bfloat16", which transformers passes to `_dequantize` as the dtype."""
    q = quantize(tiny_models["llama"], method="rtn", bits=4, group_size=128, sym=False)
    with kernels.use_kernel("reference"):
        expected = logits(q, input_ids)
    quantized = logits(q, input_ids)
    q.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(again, input_ids), quantized)
    assert q.config.dtype == "bfloat16"  # the case of the bug: a string, not a torch.dtype
    model = q.dequantize()
    assert not quant_layers(model) and type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    out = logits(model, input_ids)
    assert torch.isfinite(out).all() and torch.equal(out, expected)  # the weights the reference kernel uses
    torch.testing.assert_close(out, quantized, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype, want", [("bfloat16", torch.bfloat16), ("torch.float32", torch.float32),
                                         ("float16", torch.float16), ("auto", torch.bfloat16),
                                         (None, torch.bfloat16), (torch.float32, torch.float32)])
def test_dequantize_model_takes_a_dtype_or_its_name(tiny_models, dtype, want):
    from hf_quant.runtime.convert import dequantize_model

    model = dequantize_model(quantize(tiny_models["llama"], bits=4, group_size=32), dtype)
    assert not quant_layers(model) and model.model.layers[1].self_attn.q_proj.weight.dtype == want


@pytest.mark.parametrize("dtype", ["bfloat17", "int8", "Tensor", torch.int8])
def test_dequantize_model_refuses_an_unknown_dtype_before_changing_anything(tiny_models, dtype):
    from hf_quant.runtime.convert import dequantize_model

    q = quantize(tiny_models["llama"], bits=4, group_size=32)
    with pytest.raises(ValueError, match=r"dequantize: dtype=.* is not a floating torch dtype"):
        dequantize_model(q, dtype)
    assert len(quant_layers(q)) == 14
