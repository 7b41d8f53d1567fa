import json

import pytest

from hf_quant import FORMAT_VERSION, LayerSpec, QuantConfig


def test_defaults_and_json_round_trip():
    cfg = QuantConfig(method="rtn", bits=3, group_size=64, sym=True,
                      dynamic={r"down_proj": {"bits": 8}, r"-:o_proj": {}}, modules_to_not_convert=["lm_head"])
    again = QuantConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again == cfg
    assert again.to_dict()["quant_method"] == "hf_quant"
    assert again.format_version == 2  # no GGUF layers: readable by hf_quant versions that read format 2
    assert QuantConfig(gguf="Q4_K").format_version == 3 == FORMAT_VERSION - 1  # 4: MoE experts (test_moe.py)
    assert QuantConfig(dynamic={"v_proj": {"gguf": "Q6_K"}}).format_version == 3


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(bits=5), ["bits=5", "2, 3, 4, 8"]),
        (dict(bits=True), ["bits=True"]),
        (dict(group_size=100), ["group_size=100", "power of two"]),
        (dict(group_size=8), ["group_size=8"]),
        (dict(group_size=0), ["group_size=0"]),
        (dict(method="nope"), ["method='nope'", "rtn"]),
        (dict(sym="yes"), ["sym='yes'"]),
        (dict(on_incompatible="ignore"), ["on_incompatible", "skip"]),
        (dict(format_version=FORMAT_VERSION + 1), ["format_version", "pip install -U hf_quant"]),
        (dict(format_version=0), ["format_version=0"]),
        (dict(dynamic={"(": {"bits": 8}}), ["dynamic", "regex"]),
        (dict(dynamic={"down": {"bits": 7}}), ["dynamic['down']['bits']=7"]),
        (dict(dynamic={"down": {"lr": 1}}), ["unknown field", "lr"]),
        (dict(modules_to_not_convert=[1]), ["modules_to_not_convert"]),
        (dict(bogus=1), ["unknown field", "bogus"]),
        (dict(quant_method="gptq"), ["quant_method"]),
        (dict(method="rtn", desc_act=True), ["desc_act=True", "method='rtn'", "gptq"]),
        (dict(method="rtn", static_groups=True), ["static_groups=True", "gptq"]),
        (dict(method="gptq", desc_act="yes"), ["desc_act='yes'"]),
        (dict(true_sequential=1), ["true_sequential=1"]),
        (dict(mse="no"), ["mse='no'"]),
        (dict(block_name_to_quantize=3), ["block_name_to_quantize=3"]),
        (dict(calibration_device="gpu0"), ["calibration_device='gpu0'", "cuda"]),
        (dict(format_version=FORMAT_VERSION + 1, future_field=1), ["format_version", "pip install -U hf_quant"]),
    ],
)
def test_bad_fields_raise_naming_the_field(kwargs, words):
    with pytest.raises(ValueError) as e:
        QuantConfig(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_layer_spec_dynamic_overrides_first_match_wins():
    cfg = QuantConfig(bits=4, group_size=128, sym=False,
                      dynamic={r"-:layers\.0\.": {}, r"down_proj": {"bits": 8, "group_size": -1}, r"proj": {"bits": 2}})
    assert cfg.layer_spec("model.layers.0.mlp.down_proj") is None
    assert cfg.layer_spec("model.layers.1.mlp.down_proj") == LayerSpec(8, -1, False)
    assert cfg.layer_spec("model.layers.1.mlp.up_proj") == LayerSpec(2, 128, False)
    assert cfg.layer_spec("model.layers.1.attn.c_attn") == LayerSpec(4, 128, False)


def test_layer_spec_groups():
    s = LayerSpec(4, 128, True)
    assert (s.maxq, s.groups(512), s.effective_group_size(512)) == (15, 4, 128)
    s = LayerSpec(3, -1, False)
    assert (s.maxq, s.groups(512), s.effective_group_size(512)) == (7, 1, 512)


def test_act_order_layer_spec_and_runtime_fields_not_saved():
    cfg = QuantConfig(method="gptq", desc_act=True, group_size=64, calibration_device="cpu", dataset=["x"],
                      dynamic={"down": {"group_size": -1}})
    assert cfg.layer_spec("mlp.up_proj") == LayerSpec(4, 64, False, g_idx=True)
    assert cfg.layer_spec("mlp.down_proj") == LayerSpec(4, -1, False)  # one group: nothing to reorder
    static = QuantConfig(method="gptq", desc_act=True, static_groups=True)
    assert not static.layer_spec("mlp.up_proj").g_idx
    d = cfg.to_dict()
    assert "calibration_device" not in d and "dataset" not in d
    assert d["desc_act"] is True and d["true_sequential"] is True
    assert d["mse"] is True and QuantConfig(method="rtn").mse is False  # None: the method's default, saved resolved
    assert QuantConfig(method="gptq", mse=False).mse is False
    assert QuantConfig.from_dict(d).layer_spec("mlp.up_proj").g_idx
