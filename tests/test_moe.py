"""MoE experts quantized (`runtime.experts`): transformers 5's fused 3-D experts become per-expert linear layers,
calibrated on the tokens routed to each expert, saved and reloaded (format_version 4), trained with LoRA, merged,
dequantized back to the fused layout; exporters whose engines build fused experts refuse them."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import hf_quant
from hf_quant.calibration import blockwise
from hf_quant.runtime import experts as X
from hf_quant.runtime.convert import EXPERTS_FORMAT_VERSION

from .conftest import tiny_family_config

DATA = [torch.arange(256).repeat(2)]
CALIB = dict(dataset=DATA, num_samples=4, seq_len=32)

# tiny configs of MoE families: concatenated gate/up (Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE, OLMoE,
# DeepSeek-V3 with a dense first block, PhiMoE), transposed + biased + interleaved (GPT-OSS), no gate (Nemotron-H)
MOE = {
    "mixtral": {},
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, first_k_dense_replace=1,
                        n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16,
                        qk_nope_head_dim=16, v_head_dim=32),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=32,
                    layer_types=["full_attention", "sliding_attention"]),
}


def moe_config(family: str):
    if family == "nemotron_h":
        return AutoConfig.for_model("nemotron_h", vocab_size=256, hidden_size=128, num_hidden_layers=2,
                                    layers_block_type=["attention", "moe"], num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=64, moe_shared_expert_intermediate_size=64, n_group=1,
                                    topk_group=1, intermediate_size=128)
    return tiny_family_config(family, **MOE[family])


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("family", [*MOE, "nemotron_h"])
def test_unfuse_keeps_the_function_and_fuse_gives_the_module_back(family, input_ids):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(family)).eval()
    model.set_experts_implementation("eager")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = logits(model, input_ids)
    names = [n for n, m in model.named_modules() if X.is_fused_experts(m)]
    assert names
    classes = {n: type(model.get_submodule(n)) for n in names}
    for n in names:
        X.unfuse(model.get_submodule(n))
    module = model.get_submodule(names[0])
    assert isinstance(module, X.UnfusedExperts) and isinstance(module, classes[names[0]])
    up = "gate_up_proj" if module.has_gate else "up_proj"
    layers = [getattr(module._modules[str(e)], p) for e in range(module.num_experts) for p in (up, "down_proj")]
    assert all(type(m) is nn.Linear for m in layers) and not [p for p in module.parameters(recurse=False)]
    # the eager loop of transformers, expert by expert; GPT-OSS's transposed weights: x @ W vs F.linear(x, W.T)
    torch.testing.assert_close(logits(model, input_ids), ref, rtol=0, atol=0 if family != "gpt_oss" else 2e-6)
    X.fuse(model)
    assert {n: type(model.get_submodule(n)) for n in names} == classes
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(logits(model, input_ids), ref)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "llm_int8", "w8a8"])
def test_moe_experts_are_quantized_saved_and_reloaded(tiny_models, tmp_path, input_ids, method):
    extra = {} if method in ("rtn", "llm_int8", "w8a8") else dict(CALIB, bits=4, group_size=32)
    if method == "rtn":
        extra = dict(bits=4, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"],
                                                 quantization_config=hf_quant.QuantConfig(method=method, **extra))
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, X.UnfusedExperts)
    layers = [m for n, m in experts.named_modules() if n.endswith("_proj")]
    assert len(layers) == 8 and all(isinstance(m, hf_quant.QuantLinear) for m in layers)
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    model.save_pretrained(tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == EXPERTS_FORMAT_VERSION
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    # transformers saves Mixtral's `mlp` under its original name `block_sparse_moe`; one layer per expert
    assert "model.layers.1.block_sparse_moe.experts.3.down_proj.qweight" in keys
    assert not [k for k in keys if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj")]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(again.model.layers[1].mlp.experts, X.UnfusedExperts)
    assert torch.equal(logits(again, input_ids), logits(model, input_ids))
    out = again.generate(input_ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 12


def test_each_expert_is_calibrated_on_the_tokens_routed_to_it(tiny_models, monkeypatch):
    rows: dict[str, int] = {}
    real = blockwise._quantize_with_hessian

    def spy(name, module, spec, config, options, Hsum, n, *args, **kwargs):
        rows[name] = n
        return real(name, module, spec, config, options, Hsum, n, *args, **kwargs)

    monkeypatch.setattr(blockwise, "_quantize_with_hessian", spy)
    cfg = hf_quant.QuantConfig(method="gptq", bits=4, group_size=32, **CALIB)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"], quantization_config=cfg)
    tokens = CALIB["num_samples"] * CALIB["seq_len"]
    for block in range(2):
        p = f"model.layers.{block}.mlp.experts."
        up = [rows[f"{p}{e}.gate_up_proj"] for e in range(4)]
        assert up == [rows[f"{p}{e}.down_proj"] for e in range(4)]
        # every token reaches top_k = 2 distinct experts, each expert only its own tokens
        assert sum(up) == 2 * tokens and all(0 < n < tokens for n in up), up
        assert rows[f"model.layers.{block}.self_attn.q_proj"] == tokens
    passes = [len(r["layer_errors"]) for r in model.hf_quantizer.calibration_report]
    assert passes == [12, 12]


def test_an_expert_no_token_reaches_is_quantized_with_rtn(tiny_models, monkeypatch, caplog):
    from transformers.models.mixtral import modeling_mixtral

    real = modeling_mixtral.MixtralTopKRouter.forward

    def to_experts_0_and_1(self, hidden_states):
        logits_, scores, _ = real(self, hidden_states)
        index = torch.tensor([0, 1]).expand(scores.shape[0], 2)
        return logits_, torch.full_like(scores, 0.5), index

    monkeypatch.setattr(modeling_mixtral.MixtralTopKRouter, "forward", to_experts_0_and_1)
    cfg = hf_quant.QuantConfig(method="gptq", bits=4, group_size=32, **CALIB)
    with caplog.at_level(logging.WARNING, logger="hf_quant"):
        gptq = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"], quantization_config=cfg)
    rtn = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"], quantization_config=hf_quant.QuantConfig(
        method="rtn", bits=4, group_size=32, mse=cfg.mse))  # the fallback keeps GPTQ's clipping search
    text = caplog.text
    for e, routed in ((0, True), (1, True), (2, False), (3, False)):
        name = f"model.layers.0.mlp.experts.{e}.gate_up_proj"
        same = torch.equal(gptq.get_submodule(name).qweight, rtn.get_submodule(name).qweight)
        assert same != routed, name
        assert (f"{name} received no calibration inputs" in text) != routed


def test_expert_passes_share_a_pass_per_projection_within_a_memory_bound(monkeypatch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config("mixtral"))
    X.unfuse(model.model.layers[0].mlp.experts)
    p = "model.layers.0."
    groups = [[p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"], [p + "self_attn.o_proj"]]
    for e in (2, 0, 3, 1):  # the order experts are hit
        groups += [[f"{p}mlp.experts.{e}.gate_up_proj"], [f"{p}mlp.experts.{e}.down_proj"]]
    passes = blockwise.sequential_passes(model, groups)
    assert [len(ps) for ps in passes] == [1, 1, 4, 4]
    assert [g[0].rsplit(".", 2)[1:] for g in passes[2]] == [["2", "gate_up_proj"], ["0", "gate_up_proj"],
                                                            ["3", "gate_up_proj"], ["1", "gate_up_proj"]]
    assert all(g[0].endswith("down_proj") for g in passes[3])
    # two 128-wide fp32 Hessians per pass at most; down_proj's inputs are 256 wide: one per pass
    monkeypatch.setattr(blockwise, "EXPERT_PASS_BYTES", 2 * 4 * 128 ** 2)
    assert [len(ps) for ps in blockwise.sequential_passes(model, groups)] == [1, 1, 2, 1, 1, 2, 1, 1]


def test_a_projection_kept_in_float_stays_fused(tiny_models, tmp_path, input_ids):
    cfg = hf_quant.QuantConfig(bits=4, group_size=32, dynamic={r"-:.*experts\.\d+\.down_proj": {}})
    model = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"], quantization_config=cfg)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.down_proj, nn.Parameter) and experts.down_proj.dim() == 3
    assert isinstance(experts._modules["2"].gate_up_proj, hf_quant.QuantLinear)
    assert not hasattr(experts._modules["2"], "down_proj")
    float_model = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"])
    assert torch.equal(experts.down_proj, float_model.model.layers[0].mlp.experts.down_proj)
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(logits(again, input_ids), logits(model, input_ids))


def test_experts_kept_in_float_stay_fused_and_older_checkpoints_load(tiny_models, tmp_path, input_ids, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_quant"):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_models["mixtral"], quantization_config=hf_quant.QuantConfig(
                bits=4, group_size=32, dynamic={r"-:\.experts\.\d+\.": {}}))  # what the exporters' refusal says
    assert "3 dimensions" not in caplog.text  # the user asked for it: no warning
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert model.config.quantization_config.format_version < EXPERTS_FORMAT_VERSION
    model.save_pretrained(tmp_path / "q")
    # a checkpoint of an hf_quant that did not quantize experts: float experts, no rule to skip them
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["dynamic"] = None
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(again.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert torch.equal(logits(again, input_ids), logits(model, input_ids))


def test_some_experts_of_a_projection_in_float_is_refused(tiny_models):
    cfg = hf_quant.QuantConfig(bits=4, group_size=32, dynamic={r"-:.*experts\.1\.down_proj": {}})
    message = r"model.layers.0.mlp.experts.1.down_proj: hf_quant quantizes an MoE projection for all of its experts or "
    with pytest.raises(ValueError, match=message + "for none"):
        AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"], quantization_config=cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"])
    before = model.state_dict()
    with pytest.raises(ValueError, match=message):
        hf_quant.quantize(model, cfg)
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"  # left as it was
    assert list(model.state_dict()) == list(before)


def test_an_unknown_experts_class_stays_float_with_a_warning(tiny_models, monkeypatch, caplog):
    monkeypatch.setattr(X, "is_fused_experts", lambda module: False)
    with caplog.at_level(logging.WARNING, logger="hf_quant"):
        model = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"],
                                                     quantization_config=hf_quant.QuantConfig(bits=4, group_size=32))
    messages = [r.getMessage() for r in caplog.records if "3 dimensions" in r.getMessage()]
    experts = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert len(messages) == 1 and len(experts) == 4 and f"e.g. {experts[0]}" in messages[0]
    float_model = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"])
    share = sum(p.numel() for p in float_model.parameters() if p.dim() == 3) / sum(
        p.numel() for p in float_model.parameters())
    assert f"hold {100 * share:.0f}% of the model's parameters" in messages[0]


def test_dequantize_gives_back_the_fused_experts(tiny_models, input_ids):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"],
                                                 quantization_config=hf_quant.QuantConfig(bits=8, group_size=32))
    expected = {e: model.get_submodule(f"model.layers.0.mlp.experts.{e}.gate_up_proj").dequantize() for e in range(4)}
    quantized = logits(model, input_ids)
    model.dequantize()
    experts = model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "MixtralExperts" and experts.gate_up_proj.shape == (4, 512, 128)
    for e in range(4):
        assert torch.equal(experts.gate_up_proj[e], expected[e].to(experts.gate_up_proj.dtype))
    torch.testing.assert_close(logits(model, input_ids), quantized, rtol=0.02, atol=0.02)


def test_lora_on_the_experts_trains_and_merges(tiny_models, input_ids):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"], dtype=torch.float32,
                                                 quantization_config=hf_quant.QuantConfig(bits=4, group_size=32))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_up_proj", "down_proj"],
                                                  init_lora_weights=False))
    lora = [n for n, _ in peft_model.named_modules() if n.endswith("experts.3.down_proj.lora_A")]
    assert len(lora) == 2  # PEFT's suffix match reaches each expert's layer
    peft_model(input_ids, labels=input_ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "experts" in n and "lora_B" in n]
    assert len(grads) == 16 and all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        expected = peft_model(input_ids).logits
    merged = hf_quant.merge_lora(peft_model, dtype=torch.float32)
    experts = merged.model.layers[0].mlp.experts
    assert type(experts).__name__ == "MixtralExperts" and experts.down_proj.dim() == 3
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=1e-4, atol=1e-4)
    merged_down = experts.down_proj.detach().clone()
    hf_quant.quantize(merged, hf_quant.QuantConfig(bits=8, group_size=32))  # quantized again: per expert
    layer = merged.get_submodule("model.layers.0.mlp.experts.3.down_proj")
    assert isinstance(layer, hf_quant.QuantLinear)
    torch.testing.assert_close(layer.dequantize().float(), merged_down[3], rtol=0, atol=0.02)


def test_exports_whose_engines_build_fused_experts_refuse_them(tiny_models, tmp_path):
    gptq = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"],
                                                quantization_config=hf_quant.QuantConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match=r"export_gptq: model.layers.0.mlp.experts holds MoE experts quantized per "
                                         r"expert .* a GPTQ engine"):
        hf_quant.export_gptq(gptq, tmp_path / "g")
    int8 = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"],
                                                quantization_config=hf_quant.QuantConfig(method="llm_int8"))
    with pytest.raises(ValueError, match=r"export_bnb8: .* bitsandbytes"):
        hf_quant.export_bnb8(int8, tmp_path / "b")
    assert not (tmp_path / "g").exists() and not (tmp_path / "b").exists()


def test_streaming_quantizes_moe_experts_as_in_memory(tmp_path):
    """Qwen2-MoE (a shared expert beside the routed ones; `mlp.experts.<e>.gate_proj` / `up_proj` / `down_proj` in
    the files) through AWQ: the streaming quantizer builds each block's fused experts with transformers' own
    converter and writes the bytes the in-memory path writes."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(moe_config("qwen2_moe")).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    with safe_open(tmp_path / "src" / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.3.up_proj.weight" in set(f.keys())  # per expert, as on the Hub
    cfg = dict(method="awq", bits=4, group_size=32, **CALIB)
    hf_quant.quantize_checkpoint(tmp_path / "src", tmp_path / "stream", hf_quant.QuantConfig(**cfg))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=hf_quant.QuantConfig(**cfg))
    model.save_pretrained(tmp_path / "mem")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "stream" / name).read_bytes() == (tmp_path / "mem" / name).read_bytes(), name
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "stream").model.layers[1].mlp.experts,
                      X.UnfusedExperts)


def test_streaming_refuses_a_source_without_the_experts(tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(moe_config("mixtral")).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "src" / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".experts.2." not in k}, tmp_path / "src" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts.gate_up_proj: the checkpoint's tensors make shape "
                                         r"\(3, 512, 128\), the model needs \(4, 512, 128\) \(4 experts\)"):
        hf_quant.quantize_checkpoint(tmp_path / "src", tmp_path / "out", hf_quant.QuantConfig(bits=4, group_size=32))
    assert not (tmp_path / "out").exists()


def test_a_failed_calibration_gives_the_fused_float_model_back(tiny_models, monkeypatch, input_ids):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(model, input_ids)
    real = blockwise._quantize_with_hessian

    def fail_late(name, *args, **kwargs):
        if name == "model.layers.1.mlp.experts.2.down_proj":
            raise RuntimeError("boom")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(blockwise, "_quantize_with_hessian", fail_late)
    with pytest.raises(RuntimeError, match="boom"):
        hf_quant.quantize(model, hf_quant.QuantConfig(method="gptq", bits=4, group_size=32, **CALIB))
    assert type(model.model.layers[1].mlp.experts).__name__ == "MixtralExperts"
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(logits(model, input_ids), expected)


def test_an_unfused_model_pickles_and_deep_copies(input_ids):
    import copy
    import io

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config("mixtral")).eval()
    X.unfuse(model.model.layers[0].mlp.experts)
    buf = io.BytesIO()
    torch.save(model, buf)  # the class is made at run time: pickled through its importable base
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        assert type(other.model.layers[0].mlp.experts) is type(model.model.layers[0].mlp.experts)
        assert torch.equal(logits(other, input_ids), logits(model, input_ids))
