"""llama.cpp itself judges exported files (llama-cpp-python; .ci/run builds it from source when no wheel
installs). ref-llama's figures: benchmarks/bench_gguf.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant import QuantConfig
from hf_quant.eval_gguf import compare_with_llama_cpp, llama_cpp_perplexity, load_llama_cpp

from .conftest import TINY_LLAMA

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

PROMPTS = ("The old man looked at the sea and", "Once upon a time", "In the morning the village")
# the acceptance bars: top-1 agreement with llama.cpp's logits per type
TOP1 = {"Q8_0": 0.98, "Q4_K": 0.95, "Q6_K": 0.98, "Q3_K": 0.9}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_LLAMA)


@pytest.mark.parametrize("type_,method", [("Q8_0", "rtn"), ("Q4_K", "gptq"), ("Q6_K", "rtn"), ("Q3_K", "gptq")])
def test_llama_cpp_computes_what_hf_quant_computes(tokenizer, tmp_path, type_, method):
    cfg = QuantConfig(method=method, gguf=type_, **({"num_samples": 8, "seq_len": 128} if method == "gptq" else {}))
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32, quantization_config=cfg)
    path = hf_quant.export_gguf(model, tmp_path / f"tiny-{type_}.gguf", tokenizer)
    r = compare_with_llama_cpp(model, tokenizer, path, seq_len=256, max_windows=4, prompts=PROMPTS)
    assert r.tokenization_equal, f"llama.cpp tokenizes differently from token {r.first_token_mismatch} on"
    assert r.top1_agreement >= TOP1[type_], r
    assert abs(r.ppl_ratio - 1) < 0.01, r
    for g in r.greedy:  # continuations: reported; most match, and any divergence comes late
        assert g["match"] or g["first_divergence"] >= 4, g


def test_llama_cpp_reads_a_float_export_and_its_perplexity_matches(tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32)
    path = hf_quant.export_gguf(model, tmp_path / "tiny-f32.gguf", tokenizer)
    ids = tokenizer(hf_quant.eval.bundled_text()[:20000], add_special_tokens=False).input_ids
    ppl_lc = llama_cpp_perplexity(path, ids, seq_len=256, max_windows=4, llm=load_llama_cpp(path, 256))
    with torch.no_grad():
        windows = torch.tensor(ids[:4 * 256]).reshape(4, 256)
        loss = model(input_ids=windows, labels=windows).loss
    assert abs(ppl_lc / torch.exp(loss).item() - 1) < 0.005


@pytest.mark.parametrize("mix,ftype", [("Q4_K_M", "Q4_K_M"), ("Q5_K_M", "Q5_K_M"), ("Q3_K_M", "Q3_K_M"),
                                       ("Q2_K_M", "Q2_K")])
def test_mixes_give_each_tensor_llama_cpps_type(tokenizer, tmp_path, mix, ftype):
    """QuantConfig(gguf=<mix>) gives every tensor the type llama.cpp's own quantizer gives it for that file
    type (llama_model_quantize of a float export of the same model)."""
    import ctypes

    import gguf
    import llama_cpp

    flt = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32)
    src = hf_quant.export_gguf(flt, tmp_path / "f32.gguf", tokenizer)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"), 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(tmp_path / "lc.gguf").encode(), ctypes.byref(params)) == 0
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32, quantization_config=QuantConfig(gguf=mix))
    ours = hf_quant.export_gguf(model, tmp_path / "ours.gguf", tokenizer)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(ours).tensors}
    assert types == {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "lc.gguf").tensors}
    assert len(set(types.values()) - {"F32"}) >= 2  # a mix, not one type


@pytest.mark.parametrize("arch,type_", [("llama", "Q8_0"), ("qwen2", "Q4_0"), ("gpt2", "Q8_0"), ("mistral", "Q5_1"),
                                        ("qwen3", "Q4_0")])
def test_every_architecture_runs_in_llama_cpp(tiny_models, tmp_path, arch, type_):
    """Llama (GQA), Qwen2 (q/k/v biases), GPT-2 (fused c_attn from Conv1D, learned positions), Mistral and Qwen3
    (q/k norms), written without a vocabulary: llama.cpp's logits on random token ids match hf_quant's."""
    import numpy as np
    from transformers import MistralConfig, MistralForCausalLM

    if arch == "mistral":
        torch.manual_seed(0)
        MistralForCausalLM(MistralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         sliding_window=None)).save_pretrained(tmp_path / "src")
        src = tmp_path / "src"
    else:
        src = tiny_models[arch]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=QuantConfig(gguf=type_))
    path = hf_quant.export_gguf(model, tmp_path / "m.gguf")
    llm = load_llama_cpp(path, n_ctx=64)
    ids = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    from hf_quant.eval_gguf import llama_cpp_logits

    theirs = llama_cpp_logits(llm, ids)
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9
    assert np.abs(theirs - ours).max() < 0.05 * np.abs(ours).max()
