"""Model families beyond Llama / GPT-2 / Qwen2 / OPT, end to end, and the pieces they needed:

- Gemma 2: norms computing x * (1 + weight), into which AWQ's and SmoothQuant's scales now fold
  (`awq.norm_offset` finds the form by probing the module; `_fold_offset_norm` keeps the float function);
- GPT-NeoX: transformers loads its `embed_out` tensor as the module `lm_head` (and saves it back under the old
  name), which hf_quant's checkpoint checks and the streaming quantizer now follow (`compat.checkpoint_key_renamer`);
- Falcon: adds in place to a linear's output while autograd records (LoRA), which a custom Function's view output
  forbade;
- Cohere: a LayerNorm without bias under its own class name, q/k/v and the MLP reading one norm;
- Mixtral: experts stacked in 3-D tensors, quantized per expert (tests/test_moe.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_quant
from hf_quant.methods import awq

from .conftest import FAMILIES, tiny_family_config

DATA = [torch.arange(256).repeat(2)]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_family_quantizes_saves_reloads_and_trains_lora(tiny_models, tmp_path, input_ids, arch, method):
    extra = {} if method == "rtn" else dict(dataset=DATA, num_samples=4, seq_len=32)
    cfg = hf_quant.QuantConfig(method=method, bits=4, group_size=32, **extra)
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], quantization_config=cfg)
    blocks = [m for n, m in model.named_modules() if ".layers.0." in f".{n}." or ".h.0." in f".{n}."]
    linears = [m for m in blocks if isinstance(m, (nn.Linear, hf_quant.QuantLinear))]
    assert linears and all(isinstance(m, hf_quant.QuantLinear) for m in linears)  # every linear of a block
    if method == "awq":
        notes = " ".join(n for r in model.hf_quantizer.calibration_report for n in r["notes"])
        expected = {"qwen3": ["q_proj,k_proj,v_proj <- input_layernorm", "gate_proj,up_proj <- post_attention_layernorm"],
                    "gemma2": ["q_proj,k_proj,v_proj <- input_layernorm", "gate_proj,up_proj <- pre_feedforward_layernorm"],
                    "gpt_neox": ["query_key_value <- input_layernorm", "dense_h_to_4h <- post_attention_layernorm"],
                    "falcon": ["query_key_value,dense_h_to_4h <- input_layernorm"],
                    "cohere": ["q_proj,k_proj,v_proj,gate_proj,up_proj <- input_layernorm", "down_proj <- mlp.up_proj"],
                    "mixtral": ["q_proj,k_proj,v_proj <- input_layernorm"]}[arch]
        for e in expected:
            assert e in notes, (e, notes)
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(logits(again, input_ids), logits(model, input_ids))
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(again, LoraConfig(r=4, target_modules="all-linear"))
    peft_model(input_ids, labels=input_ids).loss.backward()  # Falcon: `mlp_output += attention_output` under autograd
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_quant_linear_output_can_be_changed_in_place_under_autograd():
    from hf_quant.calibration.layer import quantize_layer

    layer = quantize_layer("fc", nn.Linear(64, 32), hf_quant.LayerSpec(4, 32, False), "rtn")
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    y += 1  # a custom Function's view output would refuse this
    y.sum().backward()
    ref = x.detach().requires_grad_()
    (ref @ layer.dequantize().float().T + layer.bias).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-4, atol=1e-4)


def test_gpt_neox_checkpoint_keys_follow_transformers_renaming(tiny_models, tmp_path, input_ids):
    src = tiny_models["gpt_neox"]
    assert "embed_out.weight" in load_file(src / "model.safetensors")  # the name on disk; the module is lm_head
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=hf_quant.QuantConfig(bits=4, group_size=32))
    model.save_pretrained(tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    assert "embed_out.weight" in tensors and "lm_head.weight" not in tensors
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), input_ids), logits(model, input_ids))
    # the check still catches the tensor when it is really missing
    del tensors["embed_out.weight"]
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lm_head: the quantization_config keeps this layer in float, but the "
                                         r"checkpoint has no 'lm_head.weight'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_streaming_refuses_a_source_without_a_tensor_outside_the_blocks(tiny_models, tmp_path):
    src = tmp_path / "src"
    AutoModelForCausalLM.from_pretrained(tiny_models["gpt_neox"]).save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    del tensors["embed_out.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has no tensor 'lm_head.weight' that GPTNeoXForCausalLM needs outside"):
        hf_quant.quantize_checkpoint(src, tmp_path / "out", hf_quant.QuantConfig(bits=4, group_size=32))
    assert not (tmp_path / "out").exists()


# --- the norm probe and the fold into (1 + weight) norms ---------------------------------------------------

class _WeightFirst(nn.Module):
    """RMS norm of x * weight: the weight acts before the normalisation, so no scale folds into it."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        x = x * self.weight
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _Squared(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.weight ** 2


def _norms(width):
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return {"LayerNorm": (nn.LayerNorm(width), 0.0), "LlamaRMSNorm": (LlamaRMSNorm(width), 0.0),
            "CohereLayerNorm": (CohereLayerNorm(width), 0.0), "Gemma2RMSNorm": (Gemma2RMSNorm(width), 1.0),
            "weight first": (_WeightFirst(width), None), "squared": (_Squared(width), None),
            "Linear": (nn.Linear(width, width), None)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(_norms(8)))
def test_norm_offset_probes_the_form_and_leaves_the_module_as_it_was(name, dtype):
    module, expected = _norms(48)[name]
    module = module.to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    ids = {k: v.data_ptr() for k, v in module.state_dict().items()}
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    assert awq.norm_offset(module, 48) == expected
    assert awq.norm_offset(module, 47) is None  # another width: not this group's producer
    assert not calls  # a calibration pass's hooks never see the probe
    assert all(torch.equal(v, before[k]) and v.data_ptr() == ids[k] for k, v in module.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scales_fold_into_a_one_plus_weight_norm_keeping_the_function(dtype):
    from types import SimpleNamespace

    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    width = 64
    g = torch.Generator().manual_seed(0)
    norm = Gemma2RMSNorm(width).to(dtype)
    linear = nn.Linear(width, 32, bias=False).to(dtype)
    with torch.no_grad():  # trained Gemma norms: 1 + weight anywhere from ~0 to a few; one dead channel
        norm.weight.copy_(torch.rand(width, generator=g) * 3 - 0.99)
        norm.weight[5] = -1.0
    s = torch.rand(width, generator=g) * 20 + 0.05
    s[7] = 5000.0  # (1 + w) / s - 1 rounds to -1: the multiplier would vanish
    x = torch.randn(16, width, generator=g).to(dtype)
    ref = linear(norm(x)).float()
    W = {"l": linear.weight.detach().float()}
    undo = []
    target = awq.FoldTarget(norm, "norm", True, offset=1.0)
    applied = awq.fold_scales(SimpleNamespace(undo=undo), target, {"l": linear}, W, s)
    assert applied[5] == 1 and norm.weight[5] == -1  # the dead channel is left alone
    assert (1 + norm.weight.float() != 0).sum() == width - 1  # no live channel rounded to a zero multiplier
    out = linear(norm(x)).float()
    err = ((out - ref).norm() / ref.norm()).item()
    if dtype == torch.float32:
        live = torch.arange(width) != 5  # near the vanishing multiplier fp32 needs the compensation too
        assert err < 1e-5 and torch.allclose(applied[live], s[live], rtol=1e-3)
    else:  # the layer's own bf16 rounding of W * s remains; without the compensation the norm alone is off by %s
        naive = ((1 + before_weight(undo, norm).float()) / s - 1).to(dtype)
        with torch.no_grad():
            n2 = Gemma2RMSNorm(width).to(dtype)
            n2.weight.copy_(naive)
            l2 = nn.Linear(width, 32, bias=False).to(dtype)
            l2.weight.copy_((W["l"] * s).to(dtype))
        naive_err = ((l2(n2(x)).float() - ref).norm() / ref.norm()).item()
        assert err < 0.01 and err < naive_err / 2, (err, naive_err)
    with torch.no_grad():
        for t, original in reversed(undo):
            t.copy_(original)
    assert torch.equal(linear(norm(x)).float(), ref)


def before_weight(undo, norm):
    return next(original for t, original in undo if t is norm.weight)


def _run_stage(model, stage: str, idx: int = 1) -> tuple[float, str]:
    """Block `idx`'s AWQ scaling or SmoothQuant smoothing (smooth=0.5) on the float model: (the largest relative
    change of the block's outputs, the stage's notes)."""
    from hf_quant.methods import w8a8

    from .test_awq import _block_context

    ctx = _block_context(model, idx=idx)
    before = ctx.run(ctx.inputs)
    if stage == "awq":
        awq.awq_scales(ctx)
    else:
        ctx.config.smooth = 0.5
        w8a8.smooth_scales(ctx)
    change = max(((a - b).norm() / a.norm()).item() for a, b in zip(before, ctx.run(ctx.inputs)))
    return change, " ".join(ctx.notes)


@pytest.mark.parametrize("stage", ["awq", "w8a8"])
def test_awq_and_smoothing_keep_the_float_block_of_gemma2(tiny_models, stage):
    """The block-level form of the test above, through the stages themselves (fp32: to the layers' rounding)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma2"], dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.rand_like(p) * 3 - 0.99)
    change, notes = _run_stage(model, stage)
    assert "q_proj,k_proj,v_proj <- input_layernorm" in notes and "<- pre_feedforward_layernorm" in notes, notes
    assert change < 1e-5, change


def _deepseek_v3(tmp_path):
    """DeepSeek-V3's second block is MoE: its router and stacked experts read post_attention_layernorm's output
    beside the shared experts' gate/up linears (Qwen2-MoE's shared expert likewise)."""
    cfg = tiny_family_config("deepseek_v3", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                             first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16,
                             qk_nope_head_dim=16, v_head_dim=32, n_group=1, topk_group=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "ds")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "ds", dtype=torch.float32)


@pytest.mark.parametrize("stage", ["awq", "w8a8"])
def test_no_fold_into_a_norm_that_a_router_also_reads(tmp_path, monkeypatch, stage):
    change, notes = _run_stage(_deepseek_v3(tmp_path), stage)
    assert change < 1e-5, notes
    assert ("mlp.shared_experts.gate_proj: no " in notes and "post_attention_layernorm's output is read by more "
            "than this group" in notes), notes
    assert "q_a_proj,kv_a_proj_with_mqa <- input_layernorm" in notes and "down_proj <- mlp.shared_experts.up_proj" \
        in notes  # the other folds of the block still happen
    # without the check, the fold would change the block (the router and the experts see scaled inputs)
    monkeypatch.setattr(awq, "_folds_keep_the_block", lambda ctx, candidates: {g[0]: True for g, _ in candidates})
    change, notes = _run_stage(_deepseek_v3(tmp_path / "again"), stage)
    assert change > 1e-2 and "gate_proj,up_proj <- post_attention_layernorm" in notes, (change, notes)


def test_calibration_runs_in_eval_mode_and_restores_the_mode(tiny_models):
    """GPT-BigCode / Seed-OSS-style dropout (here GPT-2's, 0.1) must not reach the statistics: a model quantized in
    memory while in train mode gets the same layers as in eval mode, and is handed back in train mode."""
    cfg = dict(method="awq", bits=4, group_size=32, dataset=DATA, num_samples=4, seq_len=32)
    states = []
    for train in (True, False):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"], dtype=torch.float32)
        assert model.config.attn_pdrop > 0
        model.train(train)
        hf_quant.quantize(model, hf_quant.QuantConfig(**cfg))
        assert all(m.training == train for m in model.modules())
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
