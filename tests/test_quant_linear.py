import pickle

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from hf_quant import kernels
from hf_quant.calibration import quantize_layer
from hf_quant.config import LayerSpec
from hf_quant.runtime.convert import dequantize_model


def test_from_linear_close_to_float_and_state_dict_layout():
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True).to(torch.bfloat16)
    q = quantize_layer("blk.fc", lin, LayerSpec(8, 64, False), "rtn")
    assert isinstance(q, nn.Linear)  # PEFT's nn.Linear dispatch applies
    assert q.weight is q.qweight and q.weight.dtype == torch.uint8
    sd = q.state_dict()
    assert set(sd) == {"qweight", "scales", "qzeros", "bias"}
    assert sd["qweight"].shape == (96, 256) and sd["scales"].shape == (96, 4) and sd["scales"].dtype == torch.bfloat16
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    assert ((q(x).float() - lin(x).float()).norm() / lin(x).float().norm()) < 2e-2
    assert "bits=8, group_size=64, sym=False" in repr(q)


def test_sym_layer_has_no_zeros():
    q = quantize_layer("fc", nn.Linear(128, 32, bias=False), LayerSpec(4, 32, True), "rtn")
    assert set(q.state_dict()) == {"qweight", "scales"} and q.qzeros is None and q.bias is None


def test_conv1d_is_quantized_as_its_transpose():
    torch.manual_seed(0)
    conv = Conv1D(48, 128)  # nf=out, nx=in; weight (in, out)
    q = quantize_layer("attn.c_attn", conv, LayerSpec(4, 32, False), "rtn")
    assert (q.in_features, q.out_features, q.from_conv1d) == (128, 48, True)
    x = torch.randn(3, 128)
    assert ((q(x) - conv(x)).norm() / conv(x).norm()) < 0.1
    model = nn.Sequential(q)
    dequantize_model(model)
    assert isinstance(model[0], Conv1D) and model[0].weight.shape == (128, 48)
    with kernels.use_kernel("reference"):
        assert torch.allclose(model[0](x), q(x), atol=1e-5)


def test_nan_weight_names_the_module():
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight[3, 5] = float("nan")
        lin.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^model.layers.3.mlp.up_proj: weight has 2 NaN/inf"):
        quantize_layer("model.layers.3.mlp.up_proj", lin, LayerSpec(4, 32, False), "rtn")


def test_dtype_casts_keep_quantized_state():
    lin = nn.Linear(128, 32).to(torch.bfloat16)
    q = quantize_layer("fc", lin, LayerSpec(4, 32, False), "rtn")
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.to(torch.float16)
    q.float()
    for k, v in q.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    x = torch.randn(2, 128)
    assert q(x).dtype == torch.float32  # computes in the activation dtype


def test_check_buffers_and_pickle():
    q = quantize_layer("fc", nn.Linear(128, 32), LayerSpec(3, 64, False), "rtn")
    q(torch.randn(1, 128))
    q.check_buffers("fc")
    clone = pickle.loads(pickle.dumps(q))
    assert clone._kernel_cache == {} and torch.equal(clone.qweight, q.qweight)
    q.scales = torch.empty(32, 3)
    with pytest.raises(ValueError, match=r"fc.scales: loaded tensor is torch.float32\[32, 3\] on cpu, expected float\[32, 2\]"):
        q.check_buffers("fc")


def test_moving_a_layer_drops_its_kernel_layouts():
    """`.to()` gives the layer new buffers: the layouts built from the old ones go with them (a streamed block
    released to the meta device frees its packed layouts too)."""
    import torch

    from hf_quant.config import LayerSpec
    from hf_quant.methods import get_method
    from hf_quant.runtime import QuantLinear

    spec = LayerSpec(4, 128, False)
    layer = QuantLinear.from_quantized(get_method("rtn").quantize(torch.randn(64, 256) * 0.05, spec, torch.bfloat16),
                                       spec, None)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    before = layer(x)
    assert layer._prepared
    layer.to(torch.float32)
    assert not layer._prepared
    assert torch.allclose(layer(x.float()), before.float(), rtol=2e-2, atol=2e-2)
    layer.to("meta")
    assert not layer._prepared
