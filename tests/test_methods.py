import pytest
import torch

from hf_quant.core import grid
from hf_quant.methods import available_methods, get_method, register_method
from hf_quant.config import LayerSpec


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rtn_codes_and_error_bound(bits, group_size, sym, scale_dtype):
    g = torch.Generator().manual_seed(bits * 1000 + group_size)
    W = torch.randn(48, 256, generator=g) * 0.05
    W[3, 10] = 1.5  # an outlier
    spec = LayerSpec(bits, group_size, sym)
    qw = get_method("rtn").quantize(W, spec, scale_dtype)
    n_groups = spec.groups(256)
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == W.shape
    assert int(qw.codes.max()) <= spec.maxq
    assert qw.scale.dtype == scale_dtype and qw.scale.shape == (48, n_groups)
    if sym:
        assert qw.zero is None
        zero = torch.full((48, n_groups), 2 ** (bits - 1), dtype=torch.float32)
    else:
        assert qw.zero.dtype == torch.uint8 and qw.zero.shape == (48, n_groups)
        zero = qw.zero.float()
    gs = spec.effective_group_size(256)
    W_hat = grid.dequantize(qw.codes.float().reshape(48, n_groups, gs), qw.scale.float(), zero)
    err = (W_hat - W.reshape(48, n_groups, gs)).abs()
    # round-to-nearest on a grid covering the group's range: at most half a step per weight
    assert (err <= qw.scale.float().unsqueeze(-1) * 0.5 * (1 + 1e-3) + 1e-7).all()


def test_rtn_is_deterministic_and_handles_zero_and_tiny_groups():
    W = torch.randn(8, 64)
    W[0] = 0.0
    W[1] = 1e-9
    a = get_method("rtn").quantize(W, LayerSpec(4, 32, False), torch.float16)
    b = get_method("rtn").quantize(W.clone(), LayerSpec(4, 32, False), torch.float16)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    assert torch.isfinite(a.scale.float()).all() and (a.scale > 0).all()


def test_registry():
    assert "rtn" in available_methods()
    with pytest.raises(ValueError, match="already registered"):
        register_method("rtn", needs_calibration=False)(lambda *a: None)
    with pytest.raises(ValueError, match="unknown quantization method"):
        get_method("nope")


# --- the registry feeds config validation, the CLI, the card and the driver ---------------------------

@pytest.fixture()
def toy_method():
    """A method registered for one test only: round-to-nearest with a new option `shrink`."""
    from dataclasses import dataclass

    from hf_quant.methods import Options, base, option
    from hf_quant.methods.base import check_fraction

    @dataclass
    class ShrinkOptions(Options):
        shrink: float = option(0.5, check_fraction("0.5"), strict=True, help="toy: clipping factor")

    def quantize_toy(W, spec, scale_dtype, shrink=0.5):
        from hf_quant.methods.rtn import round_to_nearest

        p = torch.full((W.shape[0], spec.groups(W.shape[1])), 1 - shrink / 2)
        return round_to_nearest(W, spec, scale_dtype, clip=(p, p))

    register_method("toy", needs_calibration=False, options=ShrinkOptions, description="Toy clipped RTN")(quantize_toy)
    yield "toy"
    base.METHODS.unregister("toy")


def test_a_new_method_needs_no_change_outside_methods(toy_method, tmp_path):
    """Its option is a QuantConfig field (validated, saved, refused elsewhere), a CLI flag, and the
    driver passes it; the model card names the method."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_quant
    from hf_quant.cli import build_parser
    from hf_quant.config import QuantConfig

    cfg = QuantConfig(method="toy", group_size=32)
    assert cfg.shrink == 0.5 and QuantConfig(method="toy", shrink=0.25).to_dict()["shrink"] == 0.25
    with pytest.raises(ValueError, match=r"QuantConfig.shrink=2 must be a number in \(0, 1\)"):
        QuantConfig(method="toy", shrink=2)
    with pytest.raises(ValueError, match=r"QuantConfig.shrink=0.25 has no meaning for method='rtn'; it applies to \['toy'\]"):
        QuantConfig(method="rtn", shrink=0.25)
    args = build_parser().parse_args(["quantize", "m", "o", "--method", "toy", "--shrink", "0.25"])
    assert args.shrink == 0.25
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    hf_quant.quantize(model, QuantConfig(method="toy", group_size=32, shrink=0.25))
    q = model.model.layers[0].mlp.up_proj
    W = model.model.layers[0].mlp.up_proj.dequantize()
    assert isinstance(q, hf_quant.QuantLinear) and W.abs().max() > 0
    model.save_pretrained(tmp_path / "toy")
    saved = json.loads((tmp_path / "toy" / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "toy" and saved["shrink"] == 0.25
    assert "Toy clipped RTN" in (tmp_path / "toy" / "README.md").read_text()


def test_options_dataclasses_validate_when_built():
    from hf_quant.methods.gptq import GPTQOptions
    from hf_quant.methods.omniquant import LWCOptions

    assert GPTQOptions().mse is True and GPTQOptions().block_size == 128
    with pytest.raises(ValueError, match=r"QuantConfig.block_size=0 must be a positive integer"):
        GPTQOptions(block_size=0)
    with pytest.raises(ValueError, match=r"QuantConfig.learning_rate=2 must be a number in \(0, 1\)"):
        LWCOptions(learning_rate=2)
    assert get_method("gptq").options_from(hf_quant_config(method="gptq")) == {
        "block_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False, "mse": True}
    assert get_method("awq").options_from(hf_quant_config(method="awq")) == {}


def hf_quant_config(**kw):
    from hf_quant.config import QuantConfig

    return QuantConfig(**kw)


def test_methods_declare_stage_and_card_wording():
    assert get_method("awq").stage is not None and get_method("awq").observe is not None
    assert get_method("omniquant").stage is not None and get_method("gptq").stage is None
    assert get_method("gptq").act_order and get_method("awq+gptq").act_order and not get_method("rtn").act_order
    assert all(get_method(m).description for m in available_methods())
