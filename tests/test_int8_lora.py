"""LoRA on the int8 schemes: an adapter trains on an `llm_int8` model (gradient through the frozen int8
base and its per-token activation quantization), saves and reloads, and `hf_quant.merge_lora` merges
it: into a float model, or (requantize=True) back onto the method's own grid, int8 rows with fp32
scales, with the activation scheme and its threshold kept."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_quant
from hf_quant import QuantLinear
from hf_quant.methods.llm_int8 import int8_rowwise
from hf_quant.runtime.scheme import ActivationSpec

from .conftest import TINY_LLAMA

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model

SCHEME = ActivationSpec("int8_token", (("threshold", 6.0),))


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm_int8")
    AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=hf_quant.QuantConfig(method="llm_int8"),
                                         dtype=torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(3, 8000, (2, 24), generator=torch.Generator().manual_seed(0))


def load(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_lora_trains_saves_and_reloads_on_llm_int8(int8_dir, input_ids, tmp_path):
    model = load(int8_dir)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.scheme.activation == SCHEME for m in layers)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    frozen = {n: b.clone() for n, b in pm.named_buffers()}
    start = {n: p.detach().clone() for n, p in lora_params(pm).items()}
    opt = torch.optim.AdamW(lora_params(pm).values(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = pm(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora_params(pm).items()
                   if "lora_B" in n or losses)  # B first; A once B has moved off zero
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    # the gradient reached the first block's adapters through every int8 layer above them
    assert all(not torch.equal(p, start[n]) for n, p in lora_params(pm).items())
    assert all(torch.equal(b, frozen[n]) for n, b in pm.named_buffers())  # the int8 base never moved
    assert all(m.scheme.activation == SCHEME for m in pm.modules() if isinstance(m, QuantLinear))

    pm.eval()
    expected = logits(pm, input_ids)
    pm.save_pretrained(tmp_path / "adapter")
    fresh = PeftModel.from_pretrained(load(int8_dir), tmp_path / "adapter").eval()
    assert torch.equal(logits(fresh, input_ids), expected)


def small_adapter(model, seed):
    """LoRA with B ~ N(0, 0.02): an adapter of the size training produces."""
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    for n, p in lora_params(pm).items():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g).to(p.dtype) * 0.02
    return pm.eval()


def test_merge_lora_requantizes_onto_int8_rows_and_keeps_the_scheme(int8_dir, input_ids, tmp_path):
    base = logits(load(int8_dir), input_ids)
    adapted = logits(small_adapter(load(int8_dir), 7), input_ids)
    float_merged = hf_quant.merge_lora(small_adapter(load(int8_dir), 7), dtype=torch.float32)
    assert not any(isinstance(m, QuantLinear) for m in float_merged.modules())
    float_logits = logits(float_merged, input_ids)
    assert rel(float_logits, adapted) < 0.05  # the float merge drops only the int8 rounding of W and x

    requant = hf_quant.merge_lora(small_adapter(load(int8_dir), 7), requantize=True, dtype=torch.float32)
    qc = requant.config.quantization_config
    assert (qc.method, qc.threshold) == ("llm_int8", 6.0)
    layers = {n: m for n, m in requant.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 28
    for name, layer in layers.items():
        assert layer.scheme.activation == SCHEME, name
        assert (layer.spec.bits, layer.spec.group_size, layer.spec.sym) == (8, -1, True)
        assert layer.scales.dtype == torch.float32
        # the method's own grid: bitsandbytes' int8 rows of the merged float weight, bit for bit
        qw = int8_rowwise(float_merged.get_submodule(name).weight.detach())
        assert torch.equal(layer.qweight, qw.codes) and torch.equal(layer.scales, qw.scale), name
    got = logits(requant, input_ids)
    # merged logits are close to the unmerged adapter model's: int8 rows cost little, and the
    # adapter's effect is kept (far closer to the adapted model than the un-adapted base is)
    assert rel(got, adapted) < 0.05
    assert rel(got, adapted) < 0.5 * rel(base, adapted)
    requant.save_pretrained(tmp_path / "requant")
    again = load(tmp_path / "requant")
    assert all(m.scheme.activation == SCHEME for m in again.modules() if isinstance(m, QuantLinear))
    assert torch.equal(logits(again, input_ids), got)
