"""LLM.int8() as a runtime scheme: the method, its config, the `int8_token` activation quantizer
that the reference oracle applies, and exact save / reload."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_quant
from hf_quant import kernels
from hf_quant.methods.llm_int8 import int8_rowwise
from hf_quant.runtime.activations import fake_quantize_int8_token, outlier_columns

from .conftest import TINY_LLAMA


def test_config_fixes_the_int8_row_grid_and_validates_threshold():
    cfg = hf_quant.QuantConfig(method="llm_int8")
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.threshold) == (8, -1, True, 6.0)
    assert hf_quant.QuantConfig(method="llm_int8", threshold=0).threshold == 0
    with pytest.raises(ValueError, match=r"QuantConfig.threshold=-1.*>= 0"):
        hf_quant.QuantConfig(method="llm_int8", threshold=-1)
    with pytest.raises(ValueError, match="threshold.*no meaning for method='rtn'"):
        hf_quant.QuantConfig(method="rtn", threshold=6.0)
    with pytest.raises(ValueError, match=r"dynamic\['mlp'\].*overrides \['bits'\].*'-:'"):
        hf_quant.QuantConfig(method="llm_int8", dynamic={"mlp": {"bits": 4}})
    hf_quant.QuantConfig(method="llm_int8", dynamic={"-:mlp": {}})  # skipping modules still works


def test_rowwise_codes_are_round_of_w_times_127_over_absmax():
    W = torch.randn(40, 64, dtype=torch.bfloat16).float()
    W[3] = 0  # an all-zero row
    qw = int8_rowwise(W)
    absmax = W.abs().amax(1)
    expected = torch.round(W * (127.0 / absmax).unsqueeze(1)).nan_to_num(0.0)
    assert torch.equal(qw.codes.to(torch.int16) - 128, expected.to(torch.int16))
    assert qw.scale.dtype == torch.float32 and torch.equal(qw.scale[:, 0], absmax / 127.0)
    assert int(qw.codes.min()) >= 1  # codes in [-127, 127] + 128: the symmetric int8 range


def test_int8_token_keeps_outlier_columns_and_rounds_the_rest_per_token():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    x[2, 7] = 9.0  # column 7 is an outlier for the whole batch
    x[4, 30] = -6.0  # |x| == threshold counts
    cols = outlier_columns(x, 6.0)
    assert cols.nonzero().flatten().tolist() == [7, 30]
    xq = fake_quantize_int8_token(x, threshold=6.0)
    assert torch.equal(xq[:, cols], x[:, cols])
    rest = x.masked_fill(x.abs() >= 6.0, 0)  # bitsandbytes: only outlier elements leave the absmax
    step = rest.abs().amax(1, keepdim=True) / 127
    assert ((xq - x).masked_fill(cols, 0).abs() <= step / 2 + 1e-6).all()
    assert not torch.equal(xq, x)
    # threshold 0: no decomposition, the outliers set the rows' absmax
    plain = fake_quantize_int8_token(x, threshold=0.0)
    assert plain[2, 7] == pytest.approx(9.0) and outlier_columns(x, 0.0) is None


def test_llm_int8_model_runs_saves_and_reloads_exactly(tmp_path):
    cfg = hf_quant.QuantConfig(method="llm_int8", threshold=6.0)
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=cfg, dtype=torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, hf_quant.QuantLinear)]
    assert layers and all(m.scheme.activation_name == "int8_token" and m.scales.dtype == torch.float32
                          for m in layers)
    assert dict(layers[0].scheme.activation.params) == {"threshold": 6.0}
    x = torch.randint(3, model.config.vocab_size, (2, 11))
    with torch.no_grad(), kernels.use_kernel("reference"):
        ref = model(x).logits
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert again.config.quantization_config.threshold == 6.0
    for (name, a), b in zip(((n, m) for n, m in model.named_modules() if isinstance(m, hf_quant.QuantLinear)),
                            (m for m in again.modules() if isinstance(m, hf_quant.QuantLinear))):
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales), name
        assert a.scheme == b.scheme, name
    with torch.no_grad(), kernels.use_kernel("reference"):
        assert torch.equal(again(x).logits, ref)
