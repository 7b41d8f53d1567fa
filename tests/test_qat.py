"""OneBit and BitNet b1.58: the methods (SVID, absmean ternary), their trainable layers (prepare -> train ->
convert), distillation through Trainer, the latent checkpoint, and the bad inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

import hf_quant
from hf_quant import training
from hf_quant.core import LayerSpec, grid
from hf_quant.methods import onebit
from hf_quant.runtime import QuantLinear, kernels

from .conftest import TINY_LLAMA, train_steps

METHODS = ["onebit", "bitnet"]


@pytest.fixture()
def float_llama(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["llama-fp32"], dtype=torch.float32)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_svid_is_the_best_rank_one_of_abs_w_and_beats_absmean():
    g = torch.Generator().manual_seed(0)
    # weights whose magnitudes have row and column structure (as trained layers do), random signs
    W = torch.randn(96, 160, generator=g).sign() * torch.rand(96, 1, generator=g) * torch.rand(1, 160, generator=g)
    W = W * (1 + 0.3 * torch.randn(96, 160, generator=g))
    h, g_ = onebit.svid(W)
    assert (h >= 0).all() and (g_ >= 0).all()
    U, S, Vh = torch.linalg.svd(W.abs())
    torch.testing.assert_close(torch.outer(h, g_), S[0] * torch.outer(U[:, 0], Vh[0]).abs(), rtol=1e-4, atol=1e-5)
    err = {}
    for init in ("svid", "absmean"):
        layer = QuantLinear.from_quantized(onebit.quantize_onebit(W, LayerSpec(1, -1, True, in_scale=True),
                                                                  torch.float32, init=init),
                                           LayerSpec(1, -1, True, in_scale=True), None)
        err[init] = ((layer.dequantize() - W).norm() / W.norm()).item()
    assert err["svid"] < 0.9 * err["absmean"], err


def test_one_bit_grid_is_the_sign_times_the_mean_magnitude():
    W = torch.randn(8, 64)
    spec = LayerSpec(1, 32, True)
    Wg = grid.group(W, spec)
    scale, zero = grid.find_params(Wg, spec, torch.float32)
    q = grid.quantize(Wg, scale, zero, spec.maxq)
    W_hat = grid.dequantize(q, scale, zero).reshape(W.shape)
    torch.testing.assert_close(W_hat, torch.where(W >= 0, 1.0, -1.0) * Wg.abs().mean(-1, keepdim=True).expand(
        -1, -1, 32).reshape(W.shape))
    with pytest.raises(ValueError, match="sym=True"):
        grid.find_params(Wg, LayerSpec(1, 32, False), torch.float32)


@pytest.mark.parametrize("method", METHODS)
def test_layers_match_the_reference_kernel_and_store_their_bits(method, tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=hf_quant.QuantConfig(
        method=method))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.spec.bits == (1 if method == "onebit" else 2)
    x = torch.randn(3, 5, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        fast = layer(x)
        with kernels.use_kernel("reference"):
            ref = layer(x)
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2e-2, atol=2e-2)
    if method == "bitnet":  # ternary codes, one scale for the whole matrix
        assert set(torch.unique(hf_quant.core.unpack_codes(layer.qweight, 2, layer.in_features)).tolist()) <= {1, 2, 3}
        assert torch.unique(layer.scales).numel() == 1


def test_stored_size_against_bf16(tmp_path):
    """OneBit: 1 bit per weight + two 16-bit vectors; BitNet: 2 bits + one scale (per row here). On tiny-llama's
    256-768 wide layers (the vectors' share shrinks with width)."""
    from safetensors import safe_open

    for method, bound in (("onebit", 0.075), ("bitnet", 0.14)):
        model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.bfloat16,
                                                     quantization_config=hf_quant.QuantConfig(method=method))
        model.save_pretrained(tmp_path / method)
        with safe_open(str(tmp_path / method / "model.safetensors"), "pt") as f:
            layers = {k.rpartition(".")[0] for k in f.keys() if k.endswith(".qweight")}
            stored = sum(f.get_tensor(k).nbytes for k in f.keys() if k.rpartition(".")[0] in layers)
        bf16 = sum(m.in_features * m.out_features * 2 for n, m in model.named_modules() if n in layers)
        assert stored / bf16 <= bound, (method, stored / bf16)


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match=r"QuantConfig.group_size=64 cannot be set for method='onebit'"):
        hf_quant.QuantConfig(method="onebit", group_size=64)
    with pytest.raises(ValueError, match=r"QuantConfig.sym=False cannot be set for method='onebit'"):
        hf_quant.QuantConfig(method="onebit", sym=False)
    with pytest.raises(ValueError, match=r"QuantConfig.bits=4 cannot be set for method='bitnet'"):
        hf_quant.QuantConfig(method="bitnet", bits=4)
    with pytest.raises(ValueError, match=r"QuantConfig.init='nmf' is not supported"):
        hf_quant.QuantConfig(method="onebit", init="nmf")
    with pytest.raises(ValueError, match=r"QuantConfig.bits=1 is not supported by method='gptq'"):
        hf_quant.QuantConfig(method="gptq", bits=1, sym=True)
    assert hf_quant.QuantConfig(method="onebit", bits=1, group_size=-1, sym=True).bits == 1  # its own values
    reloaded = hf_quant.QuantConfig.from_dict(hf_quant.QuantConfig(method="onebit").to_dict())
    assert reloaded.layer_spec("x") == LayerSpec(1, -1, True, in_scale=True)


@pytest.mark.parametrize("method", METHODS)
def test_prepare_train_convert_round_trip(method, float_llama, input_ids, tmp_path):
    model = training.prepare(float_llama, hf_quant.QuantConfig(method=method))
    layers = [m for m in model.modules() if training.is_training_layer(m)]
    assert len(layers) == 14
    losses = train_steps(model, [p for p in model.parameters() if p.requires_grad], input_ids, 5, 1e-3)
    assert losses[-1] < losses[0]
    model.eval()
    trained = _logits(model, input_ids)
    # the latent state saves and loads back as the prepared model, never as a float or quantized one
    model.save_pretrained(tmp_path / "latent")
    latent = AutoModelForCausalLM.from_pretrained(tmp_path / "latent")
    assert sum(training.is_training_layer(m) for m in latent.modules()) == 14
    assert latent.config.quantization_config.latent is True and latent.hf_quantizer.is_qat_trainable
    assert torch.equal(_logits(latent, input_ids), trained)
    training.convert(model)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    with hf_quant.kernels.use_kernel("reference"):
        torch.testing.assert_close(_logits(model, input_ids), trained, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "frozen")
    card = (tmp_path / "frozen" / "README.md").read_text()  # written with the checkpoint, as pushed
    assert ("OneBit" if method == "onebit" else "BitNet") in card and "quantization-aware training" in card
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "frozen")
    assert again.config.quantization_config.latent is None
    assert torch.equal(_logits(again, input_ids), _logits(model, input_ids))
    # the reloaded latent model converts to the same layers
    training.convert(latent)
    for a, b in zip(latent.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_bitnet_ramp_goes_from_float_to_quantized(float_llama, input_ids):
    ref = _logits(float_llama, input_ids)
    model = training.prepare(float_llama, hf_quant.QuantConfig(method="bitnet"))
    training.set_ramp(model, 0.0)
    assert torch.equal(_logits(model, input_ids), ref)
    training.set_ramp(model, 1.0)
    quantized = _logits(model, input_ids)
    training.set_ramp(model, 0.5)
    half = _logits(model, input_ids)
    assert not torch.equal(half, quantized) and not torch.equal(half, ref)
    ramp = training.QuantRamp(4)
    assert [ramp.value(s) for s in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]


def test_sign_ste_passes_gradients_inside_the_bound():
    w = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5], requires_grad=True)
    s = grid.sign_ste(w, 1.0)
    assert s.tolist() == [-1, -1, 1, 1, 1]
    s.sum().backward()
    assert w.grad.tolist() == [0, 1, 1, 1, 0]


def _distill(model, teacher, tmp_path, steps, **kw):
    ids = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(32, dtype=torch.long)} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=2e-3, report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True,
                             save_strategy="steps", save_steps=2, seed=0, data_seed=0, **kw)
    trainer = training.DistillationTrainer(model=model, teacher=teacher, args=args, train_dataset=data,
                                           hidden_weight=1.0, ramp_steps=2)
    return trainer


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("method", METHODS)
def test_distillation_trainer_trains_and_resumes_with_identical_losses(method, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32)

    def student():
        return training.prepare(AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32),
                                hf_quant.QuantConfig(method=method))

    whole = _distill(student(), teacher, tmp_path / "whole", 4)
    whole.train()
    full = _losses(whole)
    assert len(full) == 4
    if method == "onebit":
        assert full[-1] < full[0], full
    else:  # ramped in over 2 steps: at the first step lambda = 0, the student is the teacher
        assert full[0] == 0.0 and full[1] > 0, full
    resumed = _distill(student(), teacher, tmp_path / "whole", 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert _losses(resumed)[-2:] == full[-2:]
    if method == "bitnet":
        assert {m.ramp for m in resumed.model.modules() if training.is_training_layer(m)} == {1.0}


def test_gradient_checkpointing_and_bf16(float_llama, input_ids):
    model = training.prepare(float_llama.to(torch.bfloat16), hf_quant.QuantConfig(method="onebit"))
    model.gradient_checkpointing_enable()
    model.train()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = [m.h.grad for m in model.modules() if isinstance(m, training.OneBitLinear)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_lora_on_a_prepared_model_is_refused_and_works_after_convert(float_llama, input_ids):
    peft = pytest.importorskip("peft")
    model = training.prepare(float_llama, hf_quant.QuantConfig(method="onebit"))
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="quantization-aware training .* hf_quant.training.convert"):
        peft.get_peft_model(model, config)
    training.convert(model)
    lora = peft.get_peft_model(model, config)
    lora(input_ids=input_ids, labels=input_ids).loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)


def test_onebit_layers_do_not_pretend_to_be_linear(float_llama):
    """The normalised OneBit layer is not x @ W^T: dequantizing it to nn.Linear (or merging into one) is refused."""
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=hf_quant.QuantConfig(
        method="onebit"))
    with pytest.raises(ValueError, match="output_norm"):
        model.dequantize()
    plain = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32, quantization_config=hf_quant.QuantConfig(
        method="onebit", output_norm=False))
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad(), kernels.use_kernel("reference"):
        q = plain(input_ids=ids).logits
    plain.dequantize()
    torch.testing.assert_close(_logits(plain, ids), q, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["onebit", pytest.param("bitnet", marks=pytest.mark.heavy)])
def test_two_process_distillation_ends_with_identical_parameters(method, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU) runs DistillationTrainer on a prepared model; both processes end
    with the same latent weights and value vectors, moved by training."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(repo / "tests" / "ddp_qat_worker.py"), str(tmp_path), method]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [load_file(tmp_path / f"qat_rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 0
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    start = load_file(tmp_path / "qat_start.safetensors")
    assert any(not torch.equal(start[k], ranks[0][k]) for k in start)


def test_exporters_refuse_what_they_cannot_represent(tmp_path):
    for method in ("onebit", "bitnet"):
        model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=hf_quant.QuantConfig(method=method))
        with pytest.raises(ValueError, match="cannot export to GPTQ"):
            hf_quant.export_gptq(model, tmp_path / f"gptq-{method}")
        assert not (tmp_path / f"gptq-{method}").exists()
        with pytest.raises(ValueError):
            hf_quant.export_bnb8(model, tmp_path / f"bnb-{method}")
        assert not (tmp_path / f"bnb-{method}").exists()
        if method == "onebit":
            with pytest.raises(ValueError, match="cannot export to GGUF: a OneBit layer normalises its product"):
                hf_quant.export_gguf(model, tmp_path / "onebit.gguf")
            assert not (tmp_path / "onebit.gguf").exists()
