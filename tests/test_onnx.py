"""ONNX Runtime export (`hf_quant.export_onnx`): onnxruntime is the judge.

- The MatMulNBits layout reads back to exactly the layer's W_hat (fp32), for every grid the exporter takes.
- An exported directory runs in onnxruntime (accuracy level 0, fp32 compute) with logits within 1e-3 relative of
  the hf_quant model in fp32, and greedy generation through the exported KV cache (empty past first, then one
  token at a time) gives the same 32 tokens: Llama (tiny-llama), GPT-2 (Conv1D), Qwen2 (biased q/k/v), Mistral.
- Float models through onnxruntime's dynamic int8 quantization.
- Bad input is refused by name before anything is written; a failed export leaves no directory.
- optimum-onnx's `ORTModelForCausalLM` loads the directory and generates (in a separate environment, see
  `test_optimum_ort_model_generates`).

onnx / onnxruntime / onnxscript are the `onnx` extra: the module is skipped with the reason without them.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

import hf_quant
from hf_quant import QuantConfig, QuantLinear
from hf_quant.core.dequant import dequantize_weight

from .conftest import TINY_LLAMA, save_random_model

pytest.importorskip("onnxruntime", reason="pip install 'hf_quant[onnx]' to run the ONNX export tests")
pytest.importorskip("onnxscript", reason="pip install 'hf_quant[onnx]' to run the ONNX export tests")
from hf_quant.io import onnx as ox  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 11, 32


def _w_hat32(layer: QuantLinear) -> torch.Tensor:
    return dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, layer.in_features,
                             torch.float32, layer.g_idx)


def _quantized(path: Path, **cfg) -> torch.nn.Module:
    if cfg["method"] == "gptq":  # a few random windows: these tests check the export, not the calibration
        ids = [torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
        cfg = dict(dataset=ids, num_samples=4, seq_len=32, calibration_device="cpu", **cfg)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=QuantConfig(**cfg)).eval()


def _check_same_function(model, out: Path, vocab: int, seed: int = 0) -> dict:
    """onnxruntime's logits vs the model's (fp32), and greedy generation through the exported cache."""
    session = ox.load_session(out)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, PROMPT_LEN), generator=g)
    ort_logits, _ = ox.run_session(session, ids)
    with torch.no_grad():
        ref = model(ids).logits.float()
    rel = float((ort_logits - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-3, rel
    ours = model.generate(ids[:1], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=0)[0, PROMPT_LEN:].tolist()
    theirs = ox.greedy(session, ids[:1], NEW_TOKENS)
    assert theirs == ours
    return {"rel": rel}


# ---------------------------------------------------------------------------------------------------------
# Layout


@pytest.mark.parametrize("n", [37, 128])  # a partial last byte (the bit-stream path) / whole bytes (shift-and-add)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_bits_round_trip_and_low_first(bits, n):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (3, 5, n), generator=g)
    packed = ox.pack_bits(values, bits)
    assert packed.shape == (3, 5, -(-n * bits // 8)) and packed.dtype == torch.uint8
    assert torch.equal(ox.unpack_bits(packed, bits, n), values.to(torch.int32))
    first = torch.tensor([[1] + [0] * 7])  # value 0 = 1 lands in bit 0 of byte 0
    assert int(ox.pack_bits(first, bits)[0, 0]) == 1


@pytest.mark.parametrize("cfg", [
    dict(method="rtn", bits=4, group_size=32),  # asymmetric, packed zero points
    dict(method="rtn", bits=4, group_size=64, sym=True),  # implicit zero 8 = the operator's default
    dict(method="rtn", bits=8, group_size=-1),  # per channel: one block of the next power of two
    dict(method="rtn", bits=2, group_size=16),
    dict(method="gptq", bits=4, group_size=32, desc_act=True),  # act-order: codes sorted by group + perm
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_layout_reads_back_to_the_layer_exactly(tiny_models, cfg):
    model = _quantized(tiny_models["qwen2"], **cfg)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert layers
    for name, layer in layers.items():
        nb = ox.MatMulNBitsLinear(layer)
        assert torch.equal(nb.dequantize(), _w_hat32(layer)), name
        x = torch.randn(3, layer.in_features)
        ref = torch.nn.functional.linear(x, _w_hat32(layer), None if layer.bias is None else layer.bias.float())
        torch.testing.assert_close(nb(x), ref, rtol=1e-5, atol=1e-5)
    if cfg.get("desc_act"):
        assert any(ox.MatMulNBitsLinear(m).perm is not None for m in layers.values())


def test_onnxruntime_probe_runs_its_widths_and_names_the_others():
    for bits in (2, 4, 8):
        assert ox.ort_support(bits, 32, 0) is None, bits
    assert ox.ort_support(4, 128, 4) is None
    why = ox.ort_support(3, 128, 0)
    if why is not None:  # onnxruntime <= 1.32 runs 2, 4 and 8 bits only
        assert "onnxruntime" in why


# ---------------------------------------------------------------------------------------------------------
# Same function under onnxruntime


@pytest.mark.parametrize("cfg", [
    dict(method="rtn", bits=4, group_size=128),
    dict(method="gptq", bits=4, group_size=128, desc_act=True),
    pytest.param(dict(method="rtn", bits=8, group_size=-1, sym=True), marks=pytest.mark.heavy),  # as qwen2's below
    dict(method="rtn", bits=2, group_size=32),
], ids=["rtn-w4g128", "gptq-w4g128-actorder", "rtn-w8-perchannel", "rtn-w2g32"])
def test_llama_same_function(tmp_path, tiny_models, cfg):
    model = _quantized(TINY_LLAMA if cfg["method"] == "rtn" and cfg["bits"] == 4 else tiny_models["llama"], **cfg)
    out = hf_quant.export_onnx(model, tmp_path / "onnx")
    _check_same_function(model, out, model.config.vocab_size)
    info = json.loads((out / "hf_quant_onnx.json").read_text())
    n_layers = 7 * model.config.num_hidden_layers
    assert len(info["layers"]) == n_layers and {v["bits"] for v in info["layers"].values()} == {cfg["bits"]}
    assert all(v["act_order"] == bool(cfg.get("desc_act")) for v in info["layers"].values())
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == n_layers and all(n.domain == "com.microsoft" for n in nodes)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert next(model.parameters()).dtype == torch.float32 and isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


def test_left_padded_batch_through_the_cache(tmp_path, tiny_models):
    """The attention mask is a real input of the graph (traced with ones, it must not be baked in): a
    left-padded batch gives the model's logits at every real position, in prefill and in a decode step."""
    model = _quantized(tiny_models["qwen2"], method="rtn", bits=4, group_size=64)
    session = ox.load_session(hf_quant.export_onnx(model, tmp_path / "onnx"))
    ids = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    logits, past = ox.run_session(session, ids, attention_mask=mask)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    real = mask.bool()
    assert float((logits - ref)[real].abs().max() / ref[real].abs().max()) <= 1e-3
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    step, _ = ox.run_session(session, nxt, past, attention_mask=mask2)
    with torch.no_grad():
        ref2 = model(input_ids=torch.cat([ids, nxt], 1), attention_mask=mask2,
                     position_ids=(mask2.cumsum(-1) - 1).clamp(min=0)).logits[:, -1:]
    assert float((step - ref2).abs().max() / ref2.abs().max()) <= 1e-3


def test_bf16_model_is_exported_in_fp32_and_left_as_it_was(tmp_path, tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.bfloat16,
                                                 quantization_config=QuantConfig(method="rtn", bits=4, group_size=64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = hf_quant.export_onnx(model, tmp_path / "onnx")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    session = ox.load_session(out)
    ids = torch.randint(0, 256, (1, 9))
    logits, _ = ox.run_session(session, ids)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch,cfg", [
    ("gpt2", dict(method="gptq", bits=4, group_size=32)),  # Conv1D layers, biases
    ("qwen2", dict(method="rtn", bits=8, group_size=-1, sym=True)),  # biased q/k/v; per channel
    ("qwen3", dict(method="gptq", bits=4, group_size=64)),  # q/k norms, head_dim 128 apart from hidden / heads
    # llama's layers again (act-order as llama's gptq-w4g128-actorder above): not run by CI
    pytest.param("mistral", dict(method="gptq", bits=8, group_size=64, desc_act=True), marks=pytest.mark.heavy),
])
def test_other_architectures_same_function(tmp_path, tiny_models, arch, cfg):
    if arch == "mistral":
        torch.manual_seed(0)
        MistralForCausalLM(MistralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         sliding_window=8)).save_pretrained(tmp_path / "mistral")
        src = tmp_path / "mistral"
    else:
        src = tiny_models[arch]
    model = _quantized(src, **cfg)
    out = hf_quant.export_onnx(model, tmp_path / "onnx", external_data=arch == "gpt2")
    _check_same_function(model, out, 256)
    if arch == "gpt2":
        assert (out / ox.EXTERNAL_DATA_NAME).is_file()
        assert (out / "model.onnx").stat().st_size < (out / ox.EXTERNAL_DATA_NAME).stat().st_size


@pytest.mark.parametrize("reduce_range", [True, False], ids=["7bit", "8bit"])
def test_float_model_dynamic_int8(tmp_path, tiny_models, reduce_range):
    from hf_quant.core.devices import cpu_flags

    if not reduce_range and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_flags()) \
            and platform.machine().lower() in ("x86_64", "amd64"):
        pytest.skip("8-bit weights saturate in onnxruntime's u8 x s8 kernel on x86 CPUs without VNNI (the reason "
                    "7-bit weights are the default)")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32).eval()
    out = hf_quant.export_onnx(model, tmp_path / "onnx", quantize="dynamic-int8", reduce_range=reduce_range)
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"} and "MatMulNBits" not in ops
    session = ox.load_session(out)
    ids = torch.randint(0, 256, (1, 24))
    logits, _ = ox.run_session(session, ids)
    with torch.no_grad():
        ref = model(ids).logits
    assert float((logits - ref).abs().max() / ref.abs().max()) < 0.1  # int8 weights and activations
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_full_range_is_an_option_of_dynamic_int8(tmp_path, tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="reduce_range=False.*dynamic-int8"):
        hf_quant.export_onnx(model, tmp_path / "onnx", reduce_range=False)
    assert not (tmp_path / "onnx").exists()


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_refusals_name_the_module_and_the_fix(tmp_path, tiny_models):
    model = _quantized(tiny_models["llama"], method="rtn", bits=4, group_size=128)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory; pass overwrite=True"):
        hf_quant.export_onnx(model, target)
    with pytest.raises(ValueError, match="quantize='dynamic-int8' quantizes a float model"):
        hf_quant.export_onnx(model, tmp_path / "a", quantize="dynamic-int8")
    with pytest.raises(ValueError, match="quantize='int4' is not one of"):
        hf_quant.export_onnx(model, tmp_path / "a", quantize="int4")
    opt = _quantized(tiny_models["opt"], method="rtn", bits=4, group_size=128)
    with pytest.raises(ValueError, match="model_type 'opt' is not one the ONNX export supports"):
        hf_quant.export_onnx(opt, tmp_path / "a")
    w3 = _quantized(tiny_models["llama"], method="rtn", bits=3, group_size=128)
    if ox.ort_support(3, 128, 0) is not None:
        with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: MatMulNBits with bits=3.*"
                                             r"Re-quantize with bits 2, 4 or 8, or upgrade onnxruntime"):
            hf_quant.export_onnx(w3, tmp_path / "a")
    onebit = _quantized(tiny_models["llama"], method="rtn", bits=1, group_size=128, sym=True)
    with pytest.raises(ValueError, match="1-bit OneBit layers|no MatMulNBits form"):
        hf_quant.export_onnx(onebit, tmp_path / "a")
    int8 = _quantized(tiny_models["llama"], method="llm_int8")
    with pytest.raises(ValueError, match="quantizes its activations too"):
        hf_quant.export_onnx(int8, tmp_path / "a")
    g48 = _quantized(tiny_models["llama"], method="rtn", bits=4, group_size=64)
    for layer in g48.modules():
        if isinstance(layer, QuantLinear):
            object.__setattr__(layer, "spec", type(layer.spec)(**{**layer.spec.__dict__, "group_size": 48}))
            break
    with pytest.raises(ValueError, match="group_size=48 is not a power of two >= 16"):
        hf_quant.export_onnx(g48, tmp_path / "a")
    meta = _quantized(tiny_models["llama"], method="rtn", bits=4, group_size=64)
    meta.lm_head.weight = torch.nn.Parameter(torch.empty_like(meta.lm_head.weight, device="meta"))
    with pytest.raises(ValueError, match=r"lm_head\.weight is on meta; the export traces the model on CPU"):
        hf_quant.export_onnx(meta, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch, tiny_models):
    model = _quantized(tiny_models["llama"], method="rtn", bits=4, group_size=128)

    def broken(*a, **k):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(ox, "_export_graph", broken)
    with pytest.raises(RuntimeError, match="exporter broke"):
        hf_quant.export_onnx(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # the model is back as it was: quantized layers, fp32, usable
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_an_onnxscript_too_old_for_torchs_exporter_is_named_with_the_fix(tmp_path, monkeypatch, tiny_models):
    """torch 2.11+'s exporter imports onnxscript's API for its own version (onnxscript 0.5 has none for torch 2.13:
    ModuleNotFoundError deep inside torch): an ImportError naming onnxscript's version and the upgrade, nothing
    written; a missing module that is not onnxscript's propagates as it is."""
    import onnxscript

    model = _quantized(tiny_models["llama"], method="rtn", bits=4, group_size=128)

    def missing(name):
        def export(*a, **k):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return export

    monkeypatch.setattr(torch.onnx, "export", missing("onnxscript._framework_apis.torch_9_99"))
    with pytest.raises(ImportError, match=rf"needs a newer onnxscript than {re.escape(onnxscript.__version__)} "
                                          r"\(it has no onnxscript\._framework_apis\.torch_9_99\): "
                                          r"pip install -U 'onnxscript>=0\.6'"):
        hf_quant.export_onnx(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(torch.onnx, "export", missing("somethingelse"))
    with pytest.raises(ModuleNotFoundError, match="somethingelse"):
        hf_quant.export_onnx(model, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------
# optimum-onnx's ORTModelForCausalLM, the client the directory is written for

_OPTIMUM_PY = os.environ.get("HF_QUANT_OPTIMUM_PYTHON")
_OPTIMUM_SCRIPT = """
import json, sys, torch
from optimum.onnxruntime import ORTModelForCausalLM
out = []
for directory, ids, n in json.loads(sys.argv[1]):
    model = ORTModelForCausalLM.from_pretrained(directory, use_cache=True, use_io_binding=False)
    ids = torch.tensor(ids)
    gen = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    out.append(gen[0, ids.shape[1]:].tolist())
print(json.dumps(out))
"""


@pytest.mark.skipif(not _OPTIMUM_PY, reason="optimum-onnx 0.1 pins transformers < 4.58 and does not import under "
                    "transformers 5: set HF_QUANT_OPTIMUM_PYTHON to a Python with optimum-onnx[onnxruntime] "
                    "(.ci/run builds one)")
def test_optimum_ort_model_generates(tmp_path, tiny_models):
    """ORTModelForCausalLM (optimum-onnx, in its own environment) loads each export and its greedy `generate`
    equals hf_quant's: Llama GPTQ with act-order, GPT-2 (Conv1D) RTN, Qwen2 GPTQ 8-bit, Qwen3 RTN. (optimum-onnx
    0.1 sizes Qwen3's cache by hidden_size / heads, so its Qwen3 here has head_dim = hidden_size / heads: a
    released Qwen3 whose head_dim differs, e.g. 0.6B or 4B, fails in optimum whoever exported it.)"""
    cases = [("llama", dict(method="gptq", bits=4, group_size=64, desc_act=True)),
             ("gpt2", dict(method="rtn", bits=4, group_size=128)),
             ("qwen2", dict(method="gptq", bits=8, group_size=128)),
             ("qwen3", dict(method="rtn", bits=4, group_size=64))]
    jobs, expected = [], []
    for i, (arch, cfg) in enumerate(cases):
        src = tiny_models[arch]
        if arch == "qwen3":
            src = save_random_model(tmp_path / "qwen3-src", "qwen3", head_dim=32)
        model = _quantized(src, **cfg)
        out = hf_quant.export_onnx(model, tmp_path / arch)
        ids = torch.randint(0, 256, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(i))
        expected.append(model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                       pad_token_id=0)[0, PROMPT_LEN:].tolist())
        jobs.append([str(out), ids.tolist(), NEW_TOKENS])
    res = subprocess.run([_OPTIMUM_PY, "-c", _OPTIMUM_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny-llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("cfg", [
    dict(method="rtn", bits=4, group_size=128),
    dict(method="gptq", bits=4, group_size=128),
    dict(method="gptq", bits=4, group_size=128, desc_act=True),
    dict(method="rtn", bits=8, group_size=128),
    dict(method="gptq", bits=8, group_size=128, desc_act=True),
    dict(method="gptq", bits=2, group_size=64),
], ids=["rtn-w4", "gptq-w4", "gptq-w4-act", "rtn-w8", "gptq-w8-act", "gptq-w2g64"])
def test_full_matrix_same_function(tmp_path, tiny_models, arch, cfg):
    """The issue's whole matrix (3-bit is refused by onnxruntime <= 1.32, see the refusal test)."""
    model = _quantized(TINY_LLAMA if arch == "tiny-llama" else tiny_models[arch], **cfg)
    out = hf_quant.export_onnx(model, tmp_path / "onnx")
    _check_same_function(model, out, model.config.vocab_size)
