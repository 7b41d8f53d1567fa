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
