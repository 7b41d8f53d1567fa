"""Multimodal models (`runtime.multimodal`): the language model of a vision-language model is quantized and
calibrated on text; the vision encoder and projector stay in float unless the user names another skip list; the
model answers image prompts, saves, reloads, streams, trains LoRA and exports like a text model."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, LlamaConfig,
                          LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration)

import hf_quant
from hf_quant import QuantLinear
from hf_quant.calibration.blockwise import find_blocks
from hf_quant.integrations import hub
from hf_quant.runtime import multimodal

TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000, max_position_embeddings=256, head_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
IMAGE_TOKEN = 999
# per family: the config's extra fields, and how many image tokens one 32x32 image makes
FAMILIES = {
    "llava": (dict(image_token_id=IMAGE_TOKEN, projector_hidden_act="gelu"), 16),
    "gemma3": (dict(image_token_id=IMAGE_TOKEN, boi_token_id=997, eoi_token_id=998, mm_tokens_per_image=4), 4),
}
CALIB = dict(dataset=[torch.arange(5, 517)], num_samples=4, seq_len=64)


def tiny_vlm_config(model_type: str):
    return AutoConfig.for_model(model_type, text_config=TEXT, vision_config=VISION, **FAMILIES[model_type][0])


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    """A tiny random bf16 model of each family, saved."""
    dirs = {}
    for model_type in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(tiny_vlm_config(model_type), dtype=torch.bfloat16)
        with torch.no_grad():  # Gemma 3's projector starts at zero: the image would not reach the language model
            for p in model.parameters():
                if p.dim() == 2 and not p.any():
                    p.normal_(0, 0.05)
        dirs[model_type] = tmp_path_factory.mktemp(model_type)
        model.save_pretrained(dirs[model_type])
    return dirs


def image_prompt(model_type: str):
    """(input_ids, pixel_values) of a prompt with one image: its image tokens between text tokens."""
    n = FAMILIES[model_type][1]
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * n + list(range(10, 20))])
    return ids, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


def logits(model, ids, pixels=None):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits.float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def quantized(model):
    return {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# --- structure -----------------------------------------------------------------------------------------------

TEXT_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
STRUCTURE = {  # model type: (text config extras, language model, non-text modules, decoder blocks)
    "llava": ({}, "model.language_model", ["model.vision_tower", "model.multi_modal_projector"],
              "model.language_model.layers"),
    "gemma3": ({}, "model.language_model", ["model.vision_tower"], "model.language_model.layers"),
    "mistral3": ({}, "model.language_model", ["model.vision_tower", "model.multi_modal_projector"],
                 "model.language_model.layers"),
    "qwen2_5_vl": (dict(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
                   "model.language_model", ["model.visual"], "model.language_model.layers"),
    "qwen3_5": (dict(layer_types=["linear_attention", "linear_attention", "full_attention"]), "model.language_model",
                ["model.visual"], "model.language_model.layers"),
    "idefics3": ({}, "model.text_model", ["model.vision_model", "model.connector"], "model.text_model.layers"),
    "llama4": (dict(num_local_experts=2, interleave_moe_layer_step=1, intermediate_size_mlp=128), "language_model",
               ["vision_model", "multi_modal_projector"], "language_model.model.layers"),
}


@pytest.mark.parametrize("model_type", list(STRUCTURE))
def test_language_model_non_text_modules_and_blocks(model_type):
    extra, language_model, others, blocks = STRUCTURE[model_type]
    config = AutoConfig.for_model(model_type, text_config={**TEXT_SMALL, **extra})
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert multimodal.is_multimodal(model)
    assert multimodal.language_model_name(model) == language_model
    assert multimodal.non_text_modules(model) == others
    assert find_blocks(model)[0] == blocks
    # the default skip list holds them; an explicit one replaces the defaults
    skip = hf_quant.runtime.convert.resolve_modules_to_not_convert(model, None, None)
    assert set(others) <= set(skip)
    assert not set(others) & set(hf_quant.runtime.convert.resolve_modules_to_not_convert(model, ["lm_head"], None))


def test_a_text_model_has_no_non_text_modules():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TEXT_SMALL.items()}))
    assert not multimodal.is_multimodal(model)
    assert multimodal.language_model_name(model) is None and multimodal.non_text_modules(model) == []
    assert multimodal.text_config({"num_hidden_layers": 3}) == {"num_hidden_layers": 3}
    assert multimodal.text_config({"text_config": {"num_hidden_layers": 5}}) == {"num_hidden_layers": 5}


def test_auto_class_rebuilds_what_the_checkpoint_names():
    def auto(model_type, architectures=None):
        config = AutoConfig.for_model(model_type)
        config.architectures = architectures
        return multimodal.auto_class(config)

    assert auto("llama") is AutoModelForCausalLM
    assert auto("llava") is AutoModelForImageTextToText
    assert auto("gemma3", ["Gemma3ForConditionalGeneration"]) is AutoModelForCausalLM  # its causal-LM class
    # Qwen3.5's causal-LM class is its text model alone: a checkpoint of the whole model is rebuilt whole
    assert auto("qwen3_5", ["Qwen3_5ForConditionalGeneration"]) is AutoModelForImageTextToText
    assert auto("qwen3_5", ["Qwen3_5ForCausalLM"]) is AutoModelForCausalLM


# --- quantize, answer image prompts, save, reload ------------------------------------------------------------

@pytest.mark.parametrize("model_type,method,auto", [("llava", "gptq", AutoModelForImageTextToText),
                                                     ("gemma3", "awq", AutoModelForCausalLM),
                                                     ("llava", "rtn", AutoModelForImageTextToText)])
def test_language_model_quantized_vision_float_images_answered(vlm_dirs, tmp_path, model_type, method, auto):
    src = vlm_dirs[model_type]
    fp = AutoModelForImageTextToText.from_pretrained(src).eval()
    kw = CALIB if method != "rtn" else {}
    q = auto.from_pretrained(src, quantization_config=hf_quant.QuantConfig(method=method, bits=4, group_size=32, **kw))
    assert type(q) is type(fp)
    names = quantized(q)
    language_model = multimodal.language_model_name(q)
    assert names and all(n.startswith(language_model + ".") for n in names)
    linears = [n for n, m in q.named_modules() if type(m) is torch.nn.Linear and n.startswith(language_model)
               and not n.endswith("lm_head")]
    assert not linears  # every linear of the language model is quantized
    others = multimodal.non_text_modules(q)
    assert others and set(others) <= set(q.config.quantization_config.modules_to_not_convert)
    assert all(type(q.get_submodule(n)) is type(fp.get_submodule(n)) for n in others)
    for n in others:  # the encoders' weights are the float model's
        for (a, pa), (_, pb) in zip(q.get_submodule(n).named_parameters(), fp.get_submodule(n).named_parameters()):
            assert torch.equal(pa, pb), a

    ids, pixels = image_prompt(model_type)
    err = rel(logits(q, ids, pixels), logits(fp, ids, pixels))
    image_free = rel(logits(q, ids[:, -10:]), logits(fp, ids[:, -10:]))
    assert 0 < err < 0.35 and image_free < 0.35, (err, image_free)
    assert not torch.equal(logits(q, ids, pixels), logits(q, ids, pixels * 0))  # the image reaches the output
    generated = q.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)

    q.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert set(others) <= set(saved["modules_to_not_convert"])
    # transformers writes Llava's keys in its original layout (`language_model.model.layers...`)
    packed = [k for k in load_file(tmp_path / "model.safetensors") if k.endswith(".qweight")]
    assert len(packed) == len(names) and not [k for k in packed if "vision" in k or "projector" in k]
    again = auto.from_pretrained(tmp_path)
    assert quantized(again) == names
    assert torch.equal(logits(again, ids, pixels), logits(q, ids, pixels))
    card = (tmp_path / "README.md").read_text()
    assert f"{auto.__name__}.from_pretrained" in card


def test_text_calibration_of_a_vlm_equals_that_of_its_language_model(tmp_path):
    """A Llava whose language model is a Llama computes, on text, that Llama's function: GPTQ gives both the same
    codes, bit for bit (the block inputs are the same)."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TEXT.items() if k != "head_dim"}, head_dim=32))
    llama.to(torch.bfloat16).save_pretrained(tmp_path / "llama")
    vlm = LlavaForConditionalGeneration(LlavaConfig(text_config=llama.config.to_dict(), vision_config=VISION,
                                                    image_token_id=IMAGE_TOKEN))
    vlm.model.language_model.load_state_dict(llama.model.state_dict())
    vlm.lm_head.load_state_dict(llama.lm_head.state_dict())
    vlm.to(torch.bfloat16).save_pretrained(tmp_path / "vlm")
    config = hf_quant.QuantConfig(method="gptq", bits=4, group_size=32, **CALIB)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", quantization_config=config)
    b = AutoModelForImageTextToText.from_pretrained(tmp_path / "vlm", quantization_config=config)
    qa = {n.removeprefix("model."): m for n, m in a.named_modules() if isinstance(m, QuantLinear)}
    qb = {n.removeprefix("model.language_model."): m for n, m in b.named_modules() if isinstance(m, QuantLinear)}
    assert qa.keys() == qb.keys() and len(qa) == 14
    for n in qa:
        for buf in ("qweight", "scales", "qzeros"):
            assert torch.equal(getattr(qa[n], buf), getattr(qb[n], buf)), (n, buf)
    ids = torch.tensor([list(range(10, 40))])
    assert torch.equal(logits(a, ids), logits(b, ids))


def test_an_explicit_skip_list_replaces_the_defaults(vlm_dirs):
    src = vlm_dirs["llava"]
    q = AutoModelForImageTextToText.from_pretrained(src, quantization_config=hf_quant.QuantConfig(
        method="rtn", bits=4, group_size=32, modules_to_not_convert=["lm_head"]))
    assert any(n.startswith("model.vision_tower.") for n in quantized(q))  # data-free: the vision tower too
    with pytest.raises(ValueError, match=r"model\.vision_tower is outside the language model.*"
                                         r"add 'model\.vision_tower' to modules_to_not_convert"):
        AutoModelForImageTextToText.from_pretrained(src, quantization_config=hf_quant.QuantConfig(
            method="gptq", bits=4, group_size=32, modules_to_not_convert=["lm_head"], **CALIB))
    q = AutoModelForImageTextToText.from_pretrained(src, quantization_config=hf_quant.QuantConfig(
        method="gptq", bits=4, group_size=32, modules_to_not_convert=["lm_head", "model.vision_tower",
                                                                       "model.multi_modal_projector"], **CALIB))
    assert quantized(q) and all(n.startswith("model.language_model.") for n in quantized(q))


def test_a_bare_inner_name_in_the_skip_list_is_warned_of(vlm_dirs, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_quant"):
        q = AutoModelForImageTextToText.from_pretrained(vlm_dirs["llava"], quantization_config=hf_quant.QuantConfig(
            method="rtn", bits=4, group_size=32, modules_to_not_convert=["vision_tower", "lm_head", "q_proj"]))
    warned = [r.getMessage() for r in caplog.records if "matches no linear layer" in r.getMessage()]
    assert len(warned) == 1 and "'vision_tower'" in warned[0] and "'model.vision_tower'" in warned[0], warned
    assert not any(n.endswith("q_proj") for n in quantized(q))  # a suffix entry matches, no warning


def test_streaming_a_vlm_writes_the_in_memory_files(vlm_dirs, tmp_path):
    config = hf_quant.QuantConfig(method="gptq", bits=4, group_size=32, **CALIB)
    AutoModelForImageTextToText.from_pretrained(vlm_dirs["llava"], quantization_config=config).save_pretrained(
        tmp_path / "memory")
    hf_quant.quantize_checkpoint(vlm_dirs["llava"], tmp_path / "stream", config, tokenizer=None)
    assert (tmp_path / "stream" / "model.safetensors").read_bytes() == (
        tmp_path / "memory" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "stream" / "config.json").read_text()) == json.loads(
        (tmp_path / "memory" / "config.json").read_text())


def test_lora_on_the_quantized_language_model_then_merge(vlm_dirs):
    from peft import LoraConfig, get_peft_model

    q = AutoModelForImageTextToText.from_pretrained(vlm_dirs["llava"], quantization_config=hf_quant.QuantConfig(
        method="rtn", bits=4, group_size=32))
    ids, pixels = image_prompt("llava")
    before = logits(q, ids, pixels)
    peft_model = get_peft_model(q, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)"))
    loss = peft_model(input_ids=ids, pixel_values=pixels, labels=ids).loss
    loss.backward()
    grads = {n for n, p in peft_model.named_parameters() if "lora_B" in n and p.grad is not None}
    assert len(grads) == 6 and all("language_model" in n for n in grads)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    tuned = logits(peft_model, ids, pixels)
    assert rel(tuned, before) > 1e-3
    merged = hf_quant.merge_lora(peft_model)
    assert not quantized(merged) and type(merged) is LlavaForConditionalGeneration
    assert rel(logits(merged, ids, pixels), tuned) < 0.02


def test_the_gptq_and_bnb_exports_keep_the_encoders_in_float(vlm_dirs, tmp_path):
    src = vlm_dirs["llava"]
    q = AutoModelForImageTextToText.from_pretrained(src, quantization_config=hf_quant.QuantConfig(
        method="gptq", bits=4, group_size=32, **CALIB))
    hf_quant.export_gptq(q, tmp_path / "gptq", dtype=torch.bfloat16)
    hf_quant.import_gptq(tmp_path / "gptq", tmp_path / "back")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "back")
    ids, pixels = image_prompt("llava")
    assert quantized(again) == quantized(q)
    assert torch.equal(logits(again, ids, pixels), logits(q, ids, pixels))


def test_model_card_of_a_vlm(vlm_dirs, tmp_path):
    q = AutoModelForImageTextToText.from_pretrained(vlm_dirs["llava"], quantization_config=hf_quant.QuantConfig(
        method="rtn", bits=4, group_size=32))
    q.save_pretrained(tmp_path)
    card = hub.model_card(tmp_path)
    assert card.data.pipeline_tag == "image-text-to-text"
    assert "AutoModelForImageTextToText.from_pretrained" in card.text
    assert "model.vision_tower" in card.text


# --- calibration on whole multimodal samples (processor outputs) ---------------------------------------------

def image_samples(n: int, seed: int = 3, pixels_seed: int | None = None) -> list[dict]:
    """n processor-like outputs: text, one image's tokens, text (lengths differ), and the image's pixels."""
    g = torch.Generator().manual_seed(seed)
    gp = g if pixels_seed is None else torch.Generator().manual_seed(pixels_seed)
    samples = []
    for i in range(n):
        ids = torch.cat([torch.randint(5, 900, (10 + i,), generator=g), torch.full((16,), IMAGE_TOKEN),
                         torch.randint(5, 900, (12 + 2 * i,), generator=g)])
        samples.append({"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long),
                        "pixel_values": torch.randn(1, 3, 32, 32, generator=gp)})
    return samples


def packed(model):
    return {n: (m.qweight.clone(), m.scales.clone()) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_calibration_on_image_samples_sees_the_image_tokens(vlm_dirs, monkeypatch):
    from hf_quant.calibration import blockwise

    seen = []
    real = blockwise.capture_block_inputs

    def capture(model, block, windows, *args, **kwargs):
        inputs = real(model, block, windows, *args, **kwargs)
        seen.extend(inputs[i][0][0].shape[1] for i in range(len(inputs)))
        return inputs

    monkeypatch.setattr(blockwise, "capture_block_inputs", capture)
    src = vlm_dirs["llava"]
    samples = image_samples(6)

    def quantize(data, **kw):
        return AutoModelForImageTextToText.from_pretrained(src, quantization_config=hf_quant.QuantConfig(
            method="gptq", bits=4, group_size=32, dataset=data, num_samples=4, **kw))

    q = quantize(samples)
    lengths = [s["input_ids"].shape[1] for s in samples]
    assert len(seen) == 4 and set(seen) <= set(lengths) and len(set(seen)) == 4  # 4 whole samples, own lengths
    assert "multimodal sample(s) (attention_mask, input_ids, pixel_values); 4 of them" in (
        q.config.quantization_config.provenance["calibration"])
    again = packed(quantize(samples))
    assert all(torch.equal(again[n][0], v[0]) for n, v in packed(q).items())  # reproducible (seeded choice)
    # the pixels reach the statistics: other images, same text, other codes
    other = packed(quantize(image_samples(6, pixels_seed=11)))
    assert any(not torch.equal(other[n][0], v[0]) for n, v in packed(q).items())
    ids, pixels = image_prompt("llava")
    fp = AutoModelForImageTextToText.from_pretrained(src).eval()
    assert rel(logits(q, ids, pixels), logits(fp, ids, pixels)) < 0.35


@pytest.mark.parametrize("method", ["awq", "omniquant", "w8a8"])
def test_other_calibrating_methods_take_image_samples(vlm_dirs, method):
    kw = dict(epochs=1) if method == "omniquant" else dict(bits=8, group_size=-1) if method == "w8a8" else {}
    kw = {"bits": 4, "group_size": 32, **kw}
    q = AutoModelForImageTextToText.from_pretrained(vlm_dirs["llava"], quantization_config=hf_quant.QuantConfig(
        method=method, dataset=image_samples(4), num_samples=4, **kw))
    ids, pixels = image_prompt("llava")
    fp = AutoModelForImageTextToText.from_pretrained(vlm_dirs["llava"]).eval()
    assert quantized(q) and rel(logits(q, ids, pixels), logits(fp, ids, pixels)) < 0.35


def test_streaming_with_image_samples_writes_the_in_memory_files(vlm_dirs, tmp_path):
    config = hf_quant.QuantConfig(method="gptq", bits=4, group_size=32, dataset=image_samples(5), num_samples=4)
    AutoModelForImageTextToText.from_pretrained(vlm_dirs["llava"], quantization_config=config).save_pretrained(
        tmp_path / "memory")
    hf_quant.quantize_checkpoint(vlm_dirs["llava"], tmp_path / "stream", config, tokenizer=None)
    assert (tmp_path / "stream" / "model.safetensors").read_bytes() == (
        tmp_path / "memory" / "model.safetensors").read_bytes()


def test_spilled_activations_of_image_samples_are_bit_identical(vlm_dirs, tmp_path):
    def quantize(**kw):
        return packed(AutoModelForImageTextToText.from_pretrained(vlm_dirs["llava"], quantization_config=(
            hf_quant.QuantConfig(method="gptq", bits=4, group_size=32, dataset=image_samples(4), num_samples=4,
                                 **kw))))

    memory, spilled = quantize(), quantize(spill_activations=True, spill_dir=str(tmp_path))
    assert all(torch.equal(spilled[n][0], v[0]) and torch.equal(spilled[n][1], v[1]) for n, v in memory.items())


@pytest.mark.parametrize("bad,match", [
    (lambda s: s[:2] + ["some text"], r"mixes whole samples .*\(item 2 is a str\)"),
    (lambda s: [s[0], {k: v for k, v in s[1].items() if k != "input_ids"}, *s[2:]], r"sample 1 has no 'input_ids'"),
    (lambda s: [{**x, "input_ids": x["input_ids"].repeat(2, 1)} for x in s], r"sample 0 has input_ids of shape \(2, "),
    (lambda s: [{**x, "attention_mask": torch.zeros_like(x["attention_mask"])} for x in s], r"sample 0 is padded"),
    (lambda s: [{**x, "input_ids": x["input_ids"] + 5000} for x in s], r"sample 0 has token id \d+, outside"),
    (lambda s: s[:3], r"has 3 samples, but num_samples=4 asks for more; .* num_samples=3"),
])
def test_bad_samples_are_refused_by_name(vlm_dirs, bad, match):
    from hf_quant.calibration.data import calibration_windows

    with pytest.raises(ValueError, match=match):
        calibration_windows(bad(image_samples(4)), lambda: None, 4, 64, 0, 1000)


def test_samples_are_told_apart_from_text():
    from hf_quant.calibration.data import CalibrationSamples, calibration_windows, fingerprint, is_sample_dataset

    text = [{"input_ids": torch.arange(300), "attention_mask": torch.ones(300)}]
    assert not is_sample_dataset(text) and not is_sample_dataset(["a"]) and not is_sample_dataset(None)
    windows = calibration_windows(text, lambda: None, 4, 64, 0, 1000)
    assert isinstance(windows, torch.Tensor) and windows.shape == (4, 64)  # token dicts are still cut into windows
    samples = calibration_windows(image_samples(4), lambda: None, 4, 64, 0, 1000)
    assert isinstance(samples, CalibrationSamples) and len(samples) == 4
    assert fingerprint(samples) == fingerprint(calibration_windows(image_samples(4), lambda: None, 4, 64, 0, 1000))
    assert fingerprint(samples) != fingerprint(calibration_windows(image_samples(4, pixels_seed=5), lambda: None, 4,
                                                                   64, 0, 1000))


def test_qwen2_5_vl_calibrates_on_its_processor_layout(tmp_path):
    """Qwen2.5-VL's processor gives flattened patches (patches, 3*2*14*14) and `image_grid_thw`, and positions in 3
    rotary sections: the block inputs of each sample carry them."""
    text = dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6})
    text.pop("head_dim")
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                  fullatt_block_indexes=[1])
    config = AutoConfig.for_model("qwen2_5_vl", text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                                  video_token_id=998, vision_start_token_id=997, vision_end_token_id=996)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(4):
        ids = torch.cat([torch.randint(5, 900, (8 + i,), generator=g), torch.tensor([997]),
                         torch.full((4,), IMAGE_TOKEN), torch.tensor([996]), torch.randint(5, 900, (10,), generator=g)])
        samples.append({"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long),
                        "pixel_values": torch.randn(16, 3 * 2 * 14 * 14, generator=g),
                        "image_grid_thw": torch.tensor([[1, 4, 4]])})
    fp = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    q = AutoModelForImageTextToText.from_pretrained(tmp_path, quantization_config=hf_quant.QuantConfig(
        method="gptq", bits=4, group_size=32, dataset=samples, num_samples=4))
    assert multimodal.non_text_modules(q) == ["model.visual"] and len(quantized(q)) == 14
    inputs = {**samples[0], "pixel_values": samples[0]["pixel_values"].to(torch.bfloat16)}
    with torch.no_grad():
        assert rel(q(**inputs).logits.float(), fp(**inputs).logits.float()) < 0.35


def test_the_command_line_quantizes_a_vlm_whole(vlm_dirs, tmp_path, capsys):
    from hf_quant.cli import main

    main(["-q", "quantize", str(vlm_dirs["llava"]), str(tmp_path / "q"), "--method", "rtn", "--bits", "4",
          "--group-size", "32"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    q = AutoModelForImageTextToText.from_pretrained(tmp_path / "q")
    assert type(q) is LlavaForConditionalGeneration and result["quantized_layers"] == len(quantized(q)) == 14
    assert all(n.startswith("model.language_model.") for n in quantized(q))
