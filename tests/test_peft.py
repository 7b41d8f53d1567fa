"""LoRA with PEFT and Trainer on hf_quant models: gradients, checkpointing, adapter round trip, merge,
refusals, and 2-process data-parallel training."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.pytorch_utils import Conv1D

import hf_quant
from hf_quant import compat
from hf_quant.config import LayerSpec
from hf_quant.core import dequantize_weight
from hf_quant.runtime import QuantLinear

from .conftest import TINY_LLAMA
from .test_kernels import make_layer

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def quantized_dir(tmp_path_factory, float_dir: Path, name: str, **config) -> Path:
    out = tmp_path_factory.mktemp(name)
    cfg = hf_quant.QuantConfig(**{"method": "rtn", "bits": 4, "group_size": 32, **config})
    AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # as a shared quantized checkpoint would have
        if (float_dir / f).exists():
            shutil.copy(float_dir / f, out / f)
    return out


@pytest.fixture(scope="module")
def q_llama(tiny_models, tmp_path_factory) -> Path:
    return quantized_dir(tmp_path_factory, tiny_models["llama"], "q_llama")


def lora(model, seed: int = 0, **kw):
    """LoRA on all linears with B initialised randomly (so that the adapter changes the output)."""
    torch.manual_seed(seed)
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    cfg.update(kw)
    return get_peft_model(model, LoraConfig(**cfg))


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


# --- gradients through the frozen quantized base ---------------------------------------------------

@pytest.mark.parametrize("bits,group_size,act_order,bias", [
    (4, 32, False, True), (3, 64, False, False), (2, 32, True, True), (8, -1, False, False), (4, -1, False, True),
    (4, 32, True, False)])
@pytest.mark.parametrize("dtype,rows", [(torch.float32, 3), (torch.float32, 40), (torch.bfloat16, 2)])
def test_backward_matches_float_layer(bits, group_size, act_order, bias, dtype, rows):
    spec = LayerSpec(bits, group_size, sym=False, g_idx=act_order)
    layer, _ = make_layer(48, 128, spec, bias, seed=bits)
    layer.bias is not None and layer.bias.requires_grad_(True)
    ref = nn.Linear(128, 48, bias=bias)
    ref.weight.data = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, spec, 128, torch.float32, layer.g_idx)
    if bias:
        ref.bias.data = layer.bias.detach().float().clone()
    x = torch.randn(rows, 128, dtype=dtype, requires_grad=True)
    x_ref = x.detach().float().clone().requires_grad_(True)
    g = torch.randn(rows, 48)
    (layer(x).float() * g).sum().backward()
    (ref(x_ref) * g).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert x.grad.dtype == dtype
    assert (x.grad.float() - x_ref.grad).norm() / x_ref.grad.norm() < tol
    if bias:
        assert layer.bias.grad.dtype == layer.bias.dtype  # bf16, like the bias itself
        assert (layer.bias.grad.float() - ref.bias.grad).norm() / ref.bias.grad.norm() < max(tol, 1e-2)
    assert layer.qweight.grad is None


def test_backward_keeps_no_float_weight_alive():
    """Autograd saves nothing weight-sized for backward: W_hat is rebuilt there (QLoRA's memory saving)."""
    layer, _ = make_layer(256, 512, LayerSpec(4, 32, False), bias=False)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(4, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert not saved or max(saved) < 256 * 512
    y.sum().backward()
    assert x.grad is not None


def test_no_autograd_graph_without_grad():
    layer, _ = make_layer(32, 64, LayerSpec(4, 32, False), bias=True)
    y = layer(torch.randn(2, 64))
    assert y.grad_fn is None


# --- LoRA training -------------------------------------------------------------------------------

def test_lora_wraps_quantized_layers_and_trains(q_llama, input_ids):
    model = AutoModelForCausalLM.from_pretrained(q_llama)
    pm = lora(model, init_lora_weights=True)
    wrapped = [m for m in pm.modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert wrapped and all(isinstance(m.get_base_layer(), QuantLinear) for m in wrapped)
    assert len(wrapped) == sum(isinstance(m, QuantLinear) for m in pm.modules())
    frozen = {n: b.clone() for n, b in pm.named_buffers()}
    start = {n: p.detach().clone() for n, p in lora_params(pm).items()}
    opt = torch.optim.AdamW(lora_params(pm).values(), lr=1e-2)
    losses = []
    for _ in range(8):  # one fixed batch: the loss must fall
        loss = pm(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        assert all(p.grad is not None for p in lora_params(pm).values())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    # every adapter moved: gradients reached the first block's A and B through the quantized layers above
    assert all(not torch.equal(p, start[n]) for n, p in lora_params(pm).items())
    assert all(torch.equal(b, frozen[n]) for n, b in pm.named_buffers())  # the quantized base never moved


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(q_llama, input_ids, reentrant):
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(q_llama, dtype=torch.float32)
        if checkpointing:
            compat.enable_activation_checkpointing(model, use_reentrant=reentrant)
            model.enable_input_require_grads()
        pm = lora(model)
        pm.train()
        pm(input_ids=input_ids, labels=input_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in lora_params(pm).items()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_prepare_model_for_kbit_training_and_trainer(q_llama, input_ids, tmp_path):
    model = prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(q_llama))
    assert model.model.norm.weight.dtype == torch.float32  # PEFT upcasts non-quantized params
    assert all(isinstance(m.qweight, torch.Tensor) and m.qweight.dtype == torch.uint8
               for m in model.modules() if isinstance(m, QuantLinear))
    pm = lora(model, init_lora_weights=True)
    data = [{"input_ids": input_ids[i], "labels": input_ids[i]} for i in range(2)] * 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2,
                             learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, **compat.activation_checkpointing_arguments())
    start = {n: p.detach().clone() for n, p in lora_params(pm).items()}
    trainer = Trainer(model=pm, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert all(not torch.equal(p, start[n]) for n, p in lora_params(pm).items())  # checkpointed blocks too


def test_trainer_refuses_a_quantized_model_without_adapters(q_llama, tmp_path, input_ids):
    model = AutoModelForCausalLM.from_pretrained(q_llama)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=args, train_dataset=[{"input_ids": input_ids[0], "labels": input_ids[0]}])


@pytest.mark.parametrize("kw,match", [({"use_dora": True}, "use_dora=True"),
                                      ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
                                      ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
                                      ({"kasa_config": "kasa"}, "kasa_config")])
def test_lora_variants_that_need_float_weights_are_refused(q_llama, kw, match):
    """DoRA, KaSA (which would SVD the packed codes and write them back) and weight-rewriting inits."""
    if kw.get("kasa_config") == "kasa":
        if not hasattr(peft, "KasaConfig"):
            pytest.skip(f"peft {peft.__version__} has no KaSA (0.21 and later)")
        kw = {"kasa_config": peft.KasaConfig()}
    model = AutoModelForCausalLM.from_pretrained(q_llama)
    codes = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(ValueError, match=match) as err:
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], **kw))
    assert "model.layers.0.self_attn.q_proj" in str(err.value)
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers())


def test_an_old_peft_is_named_with_the_fix(q_llama, monkeypatch):
    """PEFT 0.18 and older build LoRA layers from separate options: a clear error naming the version and the fix,
    not a TypeError from inside PEFT, and the model is left as it was."""
    monkeypatch.setattr(peft, "__version__", "0.18.1")
    model = AutoModelForCausalLM.from_pretrained(q_llama)
    codes = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(ImportError, match=r"needs peft >= 0\.19.*this is peft 0\.18\.1: pip install -U 'peft>=0\.19'"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers())


def test_a_second_adapter_is_checked_too(q_llama):
    pm = lora(AutoModelForCausalLM.from_pretrained(q_llama), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="use_dora=True"):
        pm.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))


def test_lora_layer_class_and_layer_level_merge_guard(q_llama):
    """hf_quant layers get PEFT's lora.Linear subclass `QuantLoraLinear` (no registration call); its own
    merge refuses too, so paths that skip the tuner's check (a direct layer.merge()) cannot write codes."""
    from hf_quant.integrations.peft_lora import QuantLoraLinear

    pm = lora(AutoModelForCausalLM.from_pretrained(q_llama))
    layers = [m for m in pm.modules() if isinstance(m, peft.tuners.lora.Linear)]
    quantized = [m for m in layers if isinstance(m.get_base_layer(), QuantLinear)]
    assert quantized and all(type(m) is QuantLoraLinear for m in quantized)
    before = quantized[0].get_base_layer().qweight.clone()
    for call in (quantized[0].merge, lambda: quantized[0].merge(safe_merge=True), quantized[0].unmerge):
        with pytest.raises(ValueError, match=r"hf_quant\.merge_lora"):
            call()
    assert torch.equal(quantized[0].get_base_layer().qweight, before)


def test_register_lora_uses_peft_documented_custom_module_route(q_llama, input_ids):
    from hf_quant.integrations.peft_lora import QuantLoraLinear

    config = hf_quant.register_lora(LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    assert config._custom_modules == {QuantLinear: QuantLoraLinear}
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(q_llama), config)
    assert any(type(m) is QuantLoraLinear for m in pm.modules())
    pm(input_ids=input_ids).logits.sum().backward()


@pytest.mark.parametrize("config", [lambda: peft.LoHaConfig(r=4, target_modules=["q_proj"]),
                                    lambda: peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[])])
def test_other_adapter_types_are_refused_on_quantized_layers(q_llama, config):
    """Their layers read the base weight as a float matrix (LoHa's forward reshapes the delta to it)."""
    model = AutoModelForCausalLM.from_pretrained(q_llama)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: PEFT .* adapters cannot wrap"):
        get_peft_model(model, config())


def test_lora_variants_allowed_on_float_modules_of_a_quantized_model(q_llama):
    model = AutoModelForCausalLM.from_pretrained(q_llama)  # lm_head stays in float
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head"], use_dora=True))
    assert isinstance(pm.base_model.model.lm_head, peft.tuners.lora.Linear)


# --- adapter round trip ------------------------------------------------------------------------------

def test_adapter_round_trip_gives_identical_logits(q_llama, input_ids, tmp_path):
    pm = lora(AutoModelForCausalLM.from_pretrained(q_llama), seed=3)
    pm.eval()
    with torch.no_grad():
        expected = pm(input_ids=input_ids).logits
    pm.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not any("qweight" in p.name for p in (tmp_path / "adapter").iterdir())
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(q_llama), tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=input_ids).logits, expected)
    native = AutoModelForCausalLM.from_pretrained(q_llama)  # transformers' own adapter loading
    native.load_adapter(str(tmp_path / "adapter"))
    native.eval()
    with torch.no_grad():
        assert torch.equal(native(input_ids=input_ids).logits, expected)


# --- merge ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("safe_merge", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_peft_in_place_merge_is_refused_clearly(tiny_models, tmp_path_factory, bits, safe_merge, input_ids):
    """PEFT's merge would add the delta into the packed codes (its safe merge would even cast the delta
    to uint8 and write it back at 8 bits): refused, naming hf_quant.merge_lora, with nothing changed."""
    q = quantized_dir(tmp_path_factory, tiny_models["llama"], f"q{bits}", bits=bits)
    pm = lora(AutoModelForCausalLM.from_pretrained(q))
    before = {n: b.clone() for n, b in pm.named_buffers()}
    for call in (lambda: pm.merge_and_unload(safe_merge=safe_merge), lambda: pm.merge_adapter(safe_merge=safe_merge)):
        with pytest.raises(ValueError, match=r"hf_quant\.merge_lora"):
            call()
    assert all(torch.equal(b, before[n]) for n, b in pm.named_buffers())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_merge_lora_into_float_model(tiny_models, tmp_path_factory, tmp_path, arch, input_ids):
    q = quantized_dir(tmp_path_factory, tiny_models[arch], f"q_{arch}")
    pm = lora(AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32), seed=5, lora_dropout=0.0)
    pm.eval()
    with torch.no_grad():
        expected = pm(input_ids=input_ids).logits
    merged = hf_quant.merge_lora(pm, dtype=torch.float32)
    assert not any(isinstance(m, (QuantLinear, peft.tuners.tuners_utils.BaseTunerLayer)) for m in merged.modules())
    assert getattr(merged, "hf_quantizer", None) is None and not hasattr(merged.config, "quantization_config")
    if arch == "gpt2":  # the architecture's own layer type comes back
        assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert getattr(again, "hf_quantizer", None) is None
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=input_ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_merge_lora_default_dtype_is_the_models(q_llama, input_ids):
    pm = lora(prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(q_llama)))
    merged = hf_quant.merge_lora(pm)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    merged(input_ids=input_ids)


def small_adapter(model, seed: int):
    """LoRA with B ~ N(0, 0.02): an adapter of the size training produces (B = 0 would change nothing)."""
    pm = lora(model, seed=seed, init_lora_weights=True, lora_dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    for n, p in lora_params(pm).items():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g).to(p.dtype) * 0.02
    return pm.eval()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_merge_lora_requantize(tiny_models, tmp_path_factory, tmp_path, input_ids, method):
    # GPTQ re-calibrates on the packaged text, so it needs a model with a tokenizer: the tiny-llama asset
    float_dir = TINY_LLAMA if method == "gptq" else tiny_models["llama"]
    q = quantized_dir(tmp_path_factory, float_dir, f"q_re_{method}", method=method, num_samples=8, seq_len=32)
    n_layers = sum(isinstance(m, QuantLinear) for m in AutoModelForCausalLM.from_pretrained(q).modules())

    def logits(model):
        with torch.no_grad():
            return model(input_ids=input_ids).logits

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    base_err = rel(logits(AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32)),
                   logits(AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)))
    quantized_base = logits(AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32))
    pm = small_adapter(AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32), seed=7)
    adapted = logits(pm)
    float_merged = logits(hf_quant.merge_lora(small_adapter(AutoModelForCausalLM.from_pretrained(
        q, dtype=torch.float32), seed=7), dtype=torch.float32))
    requant = hf_quant.merge_lora(pm, requantize=True)
    layers = [m for m in requant.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == n_layers and all(m.spec.bits == 4 and m.spec.group_size == 32 for m in layers)
    assert requant.config.quantization_config.method == method
    got = logits(requant)
    # re-quantizing the merged model costs about what quantizing the float model cost ...
    assert rel(got, float_merged) < 1.5 * base_err
    # ... and keeps the adapter's effect: closer to the adapted model than the un-adapted base is
    assert rel(got, adapted) < rel(quantized_base, adapted)
    requant.save_pretrained(tmp_path / "requant")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "requant", dtype=torch.float32)
    assert torch.equal(logits(again), got)


def test_merge_lora_errors(q_llama):
    model = AutoModelForCausalLM.from_pretrained(q_llama)
    with pytest.raises(TypeError, match="expected a PEFT model"):
        hf_quant.merge_lora(model)
    with pytest.raises(TypeError, match="requantize must be"):
        hf_quant.merge_lora(lora(model), requantize="rtn")


def test_quantize_in_memory_model(tiny_models, input_ids, tmp_path):
    cfg = hf_quant.QuantConfig(method="rtn", bits=4, group_size=32)
    via_load = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=cfg)
    model = hf_quant.quantize(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), cfg)
    assert model.is_quantized and model.config.quantization_config is cfg
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, via_load(input_ids=input_ids).logits)
    with pytest.raises(ValueError, match="already quantized"):
        hf_quant.quantize(model, cfg)
    bad = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with pytest.raises(ValueError, match="group_size"):
        hf_quant.quantize(bad, hf_quant.QuantConfig(method="rtn", bits=4, group_size=256))
    assert not getattr(bad, "is_quantized", False) and not hasattr(bad.config, "quantization_config")
    assert not any(isinstance(m, QuantLinear) for m in bad.modules())


# --- data-parallel training ------------------------------------------------------------------------

def test_two_process_training_ends_with_identical_adapters(tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU) runs examples/lora_finetune.py's Trainer; the two
    processes must end with the same adapter weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_lora_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file

    ranks = [load_file(tmp_path / f"adapter_rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 0
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    start = load_file(tmp_path / "adapter_start.safetensors")
    assert any(not torch.equal(start[k], ranks[0][k]) for k in start)  # training moved them


def test_hooks_go_in_when_peft_is_first_imported_after_the_model(q_llama):
    """Loading an hf_quant model does not import PEFT (bitsandbytes and inductor with it: seconds per process);
    importing PEFT afterwards puts the hooks in, so LoRA wraps the quantized layers and merging is refused."""
    code = f"""
import sys
from transformers import AutoModelForCausalLM
import hf_quant
model = AutoModelForCausalLM.from_pretrained({str(q_llama)!r})
assert "peft" not in sys.modules, "loading imported peft"
from peft import LoraConfig, get_peft_model
from hf_quant.integrations.peft_lora import QuantLoraLinear
peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
layers = [m for m in peft_model.modules() if isinstance(m, QuantLoraLinear)]
assert layers, "no QuantLoraLinear"
try:
    peft_model.merge_and_unload()
except ValueError as e:
    print("refused:", e)
else:
    raise SystemExit("merge was not refused")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "refused:" in proc.stdout


def test_when_imported_runs_now_for_an_imported_module_and_once_after_a_later_import(monkeypatch):
    import importlib

    ran = []
    compat.when_imported("json", lambda: ran.append("json"))  # imported already: at once
    assert ran == ["json"]
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    compat.when_imported("colorsys", lambda: ran.append("colorsys"))
    compat.when_imported("colorsys", lambda: ran.append("colorsys 2"))
    assert ran == ["json"]
    importlib.import_module("colorsys")
    assert ran == ["json", "colorsys", "colorsys 2"]
    assert not any(isinstance(f, compat._AfterImport) and f.module == "colorsys" for f in sys.meta_path)
    monkeypatch.delitem(sys.modules, "colorsys")
    importlib.import_module("colorsys")  # a second import runs nothing again
    assert ran == ["json", "colorsys", "colorsys 2"]
