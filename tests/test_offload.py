"""from_pretrained(..., quantization_config=..., device_map=...) when the float model does not fit: accelerate offloads
it to disk, every decoder block is sent there, and calibration reads one block at a time (hf_quant.core.offload).
The result is the in-memory path's, byte for byte."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

import hf_quant
from hf_quant import QuantConfig
from hf_quant.core import offload
from hf_quant.runtime import QuantLinear

from conftest import REF_LLAMA, TINY_LLAMA
from test_streaming import CASES, _windows, assert_same_files, in_memory

TOO_SMALL = {"cpu": "3MB"}  # tiny-llama is 11 MB: accelerate offloads most of it


def _float_blocks_in_memory(model: nn.Module) -> int:
    """How many decoder blocks hold a float linear weight in memory right now."""
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    return sum(any(isinstance(m, nn.Linear) and not isinstance(m, QuantLinear) and m.weight.device.type != "meta"
                   for m in b.modules()) or any(type(m).__name__ == "Conv1D" and m.weight.device.type != "meta"
                                                for m in b.modules())
               for b in blocks)


@pytest.fixture()
def watch(monkeypatch):
    """Record, at each `onload`, how many float blocks were already in memory and how many tensors it loaded."""
    seen: list[tuple[int, int]] = []
    models: list[nn.Module] = []
    real = offload.onload

    def spy(module):
        if models:
            before = _float_blocks_in_memory(models[0])
        else:
            before = -1
        records = real(module)
        seen.append((before, len(records)))
        return records

    monkeypatch.setattr(offload, "onload", spy)
    real_keep = offload.keep_onloaded

    def keep(model):
        models.append(model)
        return real_keep(model)

    monkeypatch.setattr(offload, "keep_onloaded", keep)
    return seen, models


@pytest.mark.parametrize("case", ["rtn", "gptq", pytest.param("gptq-act-order", marks=pytest.mark.heavy),
                                  pytest.param("awq", marks=pytest.mark.heavy)])
def test_offloaded_from_pretrained_writes_the_in_memory_checkpoint(case, tmp_path, watch):
    cfg = QuantConfig(**CASES[case])
    ref = in_memory(TINY_LLAMA, tmp_path / "a" / "out", cfg)
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=copy.copy(cfg), device_map="auto",
                                                 max_memory=TOO_SMALL)
    seen, _ = watch
    assert sum(n for _, n in seen) > 0  # the offloaded path was taken: tensors were read from disk
    assert not offload.is_offloaded(model) and not hasattr(model, "hf_device_map")
    assert all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())  # an ordinary in-memory model
    from transformers import AutoTokenizer

    model.save_pretrained(tmp_path / "b" / "out", tokenizer=AutoTokenizer.from_pretrained(TINY_LLAMA))
    assert_same_files(ref, tmp_path / "b" / "out")


def test_calibration_holds_one_float_block_at_a_time(monkeypatch):
    """Each block is read from disk when its turn comes; the float layers it replaced go back to disk."""
    counts: list[int] = []
    holder: dict = {}
    real = offload.onload

    def spy(module):
        if "model" in holder and any(module is b for b in holder["model"].model.layers):  # a block's turn
            counts.append(_float_blocks_in_memory(holder["model"]))
        return real(module)

    from hf_quant.calibration import blockwise

    real_capture = blockwise.capture_block_inputs

    def capture(model, *args, **kwargs):
        holder["model"] = model
        return real_capture(model, *args, **kwargs)

    monkeypatch.setattr(offload, "onload", spy)
    monkeypatch.setattr(blockwise, "capture_block_inputs", capture)
    cfg = QuantConfig(**CASES["gptq"])
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=cfg, device_map="auto",
                                                 max_memory=TOO_SMALL)
    assert len(counts) == len(model.model.layers) and max(counts) == 0  # before each block: no float block left
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in model.hf_quantizer.targets)


def test_a_user_device_map_with_some_blocks_on_disk(tmp_path):
    cfg = QuantConfig(**CASES["gptq"])
    ref = in_memory(TINY_LLAMA, tmp_path / "a" / "out", cfg)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
                  "model.layers.3": "disk", "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # tied
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=copy.copy(cfg), device_map=device_map,
                                                 offload_folder=str(tmp_path / "offload"))
    from transformers import AutoTokenizer

    model.save_pretrained(tmp_path / "b" / "out", tokenizer=AutoTokenizer.from_pretrained(TINY_LLAMA))
    assert_same_files(ref, tmp_path / "b" / "out")


def test_the_inferred_map_sends_every_block_to_disk():
    from hf_quant.integrations.transformers import _blocks_to_disk

    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "disk",
                  "lm_head": "disk"}
    _blocks_to_disk(device_map, model, "model.layers")
    assert device_map == {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk",
                          "model.norm": "disk", "lm_head": "disk"}
    whole = {"model": "cpu", "lm_head": "disk"}  # the blocks inside an entry with other modules: split
    _blocks_to_disk(whole, model, "model.layers")
    assert whole == {"lm_head": "disk", "model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                     "model.rotary_emb": "cpu"}


def test_gpt2_conv1d_offloaded(tiny_models, tmp_path, watch):
    cfg = QuantConfig(method="gptq", bits=4, group_size=32, num_samples=4, seq_len=32, dataset=_windows(4, 32))
    ref = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"], quantization_config=copy.copy(cfg))
    got = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"], quantization_config=copy.copy(cfg),
                                               device_map="auto", max_memory={"cpu": "50KB"})
    assert sum(n for _, n in watch[0]) > 0  # read from disk
    a, b = ref.state_dict(), got.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_quantize_an_offloaded_model_and_a_failure_leaves_it_as_loaded(monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, device_map="auto", max_memory=TOO_SMALL)
    ids = torch.arange(1, 17)[None]
    before = model(ids).logits
    from hf_quant.calibration import blockwise

    real = blockwise.calibrate_block
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("planted failure in block 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwise, "calibrate_block", failing)
    with pytest.raises(RuntimeError, match="planted failure"):
        hf_quant.quantize(model, QuantConfig(**CASES["awq"]))
    assert _float_blocks_in_memory(model) == 0 and offload.is_offloaded(model)  # offloaded again, as loaded
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.equal(model(ids).logits, before)
    monkeypatch.setattr(blockwise, "calibrate_block", real)
    hf_quant.quantize(model, QuantConfig(**CASES["rtn"]))  # data-free: a layer at a time
    ref = hf_quant.quantize(AutoModelForCausalLM.from_pretrained(TINY_LLAMA), QuantConfig(**CASES["rtn"]))
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_a_quantized_checkpoint_is_not_offloaded_to_disk(tmp_path):
    AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=QuantConfig(**CASES["rtn"])).save_pretrained(
        tmp_path / "q")
    with pytest.raises(ValueError, match="cannot be offloaded to disk"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="auto", max_memory=TOO_SMALL)


def test_a_checkpoint_larger_than_memory_loaded_whole_gets_advice(monkeypatch, caplog):
    from hf_quant.core import devices

    monkeypatch.setattr(devices, "available_memory_bytes", lambda: 1 << 20)
    with caplog.at_level("WARNING", logger="hf_quant"):
        AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=QuantConfig(**CASES["rtn"]))
    assert "Pass device_map='auto'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_quant"):
        AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=QuantConfig(**CASES["rtn"]),
                                             device_map="auto", max_memory=TOO_SMALL)
    assert "device_map='auto'" not in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gptq", "awq"])
def test_offloaded_ref_llama_matches_in_memory(case, tmp_path):
    if not REF_LLAMA.is_dir():
        pytest.skip(f"{REF_LLAMA} not present")
    from transformers import AutoTokenizer

    cfg = QuantConfig(**{**CASES[case], "group_size": 128, "num_samples": 16, "seq_len": 256})
    ref = in_memory(REF_LLAMA, tmp_path / "a" / "out", cfg)
    model = AutoModelForCausalLM.from_pretrained(REF_LLAMA, quantization_config=copy.copy(cfg), device_map="auto",
                                                 max_memory={"cpu": "20MB"})
    model.save_pretrained(tmp_path / "b" / "out", tokenizer=AutoTokenizer.from_pretrained(REF_LLAMA))
    assert_same_files(ref, tmp_path / "b" / "out")
