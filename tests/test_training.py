"""Quantization-aware training: prepare -> train -> convert, on RTN's grid in straight-through form."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_quant
from hf_quant import training
from hf_quant.core import LayerSpec, grid
from hf_quant.runtime import QuantLinear

from .conftest import train_steps


def test_ste_grid_is_rtn_forward_and_identity_backward():
    W = torch.randn(16, 64, requires_grad=True)
    spec = LayerSpec(3, 32, False)
    W_hat = training.fake_quant.rtn_grid_ste(W, spec, torch.float32)
    assert torch.equal(W_hat, grid.fake_quantize(W.detach(), spec, torch.float32))
    W_hat.sum().backward()
    assert torch.equal(W.grad, torch.ones_like(W))


def test_clamp_ste_passes_the_gradient_at_the_bounds_whatever_torch_does():
    """The grid's ends are codes like any other: gradient 1 at the bounds and inside, 0 beyond (torch 2.14's own
    clamp gives 0 at scalar bounds and 0.5 at tensor ones), for scalar and tensor bounds; the forward is clamp's."""
    for lo, hi in ((0.0, 7.0), (torch.zeros(6), torch.full((6,), 7.0))):
        x = torch.tensor([-1.0, 0.0, 1.0, 3.0, 7.0, 8.0], requires_grad=True)
        y = grid.clamp_ste(x, lo, hi)
        assert torch.equal(y, x.detach().clamp(lo, hi))
        y.sum().backward()
        assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.fixture()
def float_llama(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["llama-fp32"], dtype=torch.float32)


def test_prepare_train_convert_keeps_the_trained_function(float_llama, input_ids, tmp_path):
    cfg = hf_quant.QuantConfig(method="rtn", bits=3, group_size=32)
    model = training.prepare(float_llama, cfg)
    fake = [m for m in model.modules() if isinstance(m, training.FakeQuantLinear)]
    assert len(fake) == 14 and not any(isinstance(m, QuantLinear) for m in model.modules())
    losses = train_steps(model, [p for m in fake for p in m.parameters()], input_ids, 6, 1e-3)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=input_ids).logits
    training.convert(model)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    with torch.no_grad(), hf_quant.kernels.use_kernel("reference"):
        torch.testing.assert_close(model(input_ids=input_ids).logits, trained, rtol=1e-4, atol=1e-4)
    # a regular hf_quant model: saves and reloads exactly
    model.save_pretrained(tmp_path / "qat")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "qat")
    with torch.no_grad():
        assert torch.equal(again(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_prepare_refuses_clearly(float_llama):
    with pytest.raises(ValueError, match=r"method='gptq' has no quantization-aware training; trainable methods: \['bitnet', 'onebit', 'rtn'\]"):
        training.prepare(float_llama, hf_quant.QuantConfig(method="gptq"))
    with pytest.raises(ValueError, match="no fake-quantized layers"):
        training.convert(float_llama)
    training.prepare(float_llama, hf_quant.QuantConfig(method="rtn", group_size=32))
    with pytest.raises(ValueError, match="already has quantized or fake-quantized layers"):
        training.prepare(float_llama, hf_quant.QuantConfig(method="rtn", group_size=32))


def test_prepared_model_trains_with_trainer(float_llama, input_ids, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = training.prepare(float_llama, hf_quant.QuantConfig(method="rtn", bits=4, group_size=32))
    latent = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    data = [{"input_ids": input_ids[i], "labels": input_ids[i]} for i in range(2)] * 2
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, latent)  # the latent weights learned
    training.convert(model)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear) and model.hf_quantizer is not None
