"""GPTQ as a pure function (the block-wise calibration driver that feeds it Hessians comes next)."""

import pytest
import torch

from hf_quant import QuantConfig
from hf_quant.algorithms import get_method, grid
from hf_quant.config import LayerSpec


def dequant(qw, spec, shape):
    out_f, in_f = shape
    gs, n = spec.effective_group_size(in_f), spec.groups(in_f)
    zero = qw.zero.float() if qw.zero is not None else torch.full((out_f, n), 2.0 ** (spec.bits - 1))
    return grid.dequantize(qw.codes.float().reshape(out_f, n, gs), qw.scale.float(), zero).reshape(shape)


def correlated_inputs(in_f, n, seed):
    """Calibration inputs with strongly correlated channels and a few large ones, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(in_f, in_f // 8, generator=g)
    X = basis @ torch.randn(in_f // 8, n, generator=g) + 0.1 * torch.randn(in_f, n, generator=g)
    X[:4] *= 10
    return X


def test_identity_hessian_reduces_to_rtn():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 256, generator=g)
    for spec in (LayerSpec(4, 64, False), LayerSpec(3, -1, True)):
        a = get_method("gptq").quantize(W, spec, torch.bfloat16, H=torch.eye(256))
        b = get_method("rtn").quantize(W, spec, torch.bfloat16)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
        assert (a.zero is None and b.zero is None) or torch.equal(a.zero, b.zero)


@pytest.mark.parametrize("bits, group_size", [(4, 128), (3, 64), (2, 32), (4, -1), (8, 128)])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_lowers_output_error_vs_rtn(bits, group_size, sym):
    in_f, out_f = 256, 64
    X = correlated_inputs(in_f, 2048, seed=bits)
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(7)) * 0.05
    H = 2 * X @ X.t() / X.shape[1]
    spec = LayerSpec(bits, group_size, sym)
    gptq = get_method("gptq").quantize(W, spec, torch.float32, H=H, block_size=64)
    rtn = get_method("rtn").quantize(W, spec, torch.float32)
    err = lambda qw: ((W - dequant(qw, spec, W.shape)) @ X).norm().item()  # noqa: E731
    assert int(gptq.codes.max()) <= spec.maxq
    assert err(gptq) < 0.8 * err(rtn), (err(gptq), err(rtn))


def test_dead_inputs_and_determinism():
    X = correlated_inputs(128, 512, seed=3)
    X[5] = 0  # an input channel that never fires
    H = 2 * X @ X.t() / X.shape[1]
    W = torch.randn(16, 128)
    spec = LayerSpec(4, 32, False)
    a = get_method("gptq").quantize(W, spec, torch.bfloat16, H=H)
    b = get_method("gptq").quantize(W.clone(), spec, torch.bfloat16, H=H.clone())
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    assert torch.all(dequant(a, spec, W.shape)[:, 5].abs() <= a.scale.float()[:, 0] / 2 + 1e-6)


def _ids(n, seed=0):
    return [torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gptq_in_from_pretrained_round_trips(tiny_models, tmp_path, input_ids, arch):
    from transformers import AutoModelForCausalLM

    from hf_quant import QuantLinear

    cfg = QuantConfig(method="gptq", bits=4, group_size=32, dataset=_ids(12), num_samples=8, seq_len=32)
    q = AutoModelForCausalLM.from_pretrained(tiny_models[arch], quantization_config=cfg)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == (14 if arch == "llama" else 8)
    q.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert '"method": "gptq"' in saved and "dataset" not in saved
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, q(input_ids).logits)


def test_gptq_is_deterministic_and_differs_from_rtn(tiny_models):
    from transformers import AutoModelForCausalLM

    def run(method, seed=0):
        cfg = QuantConfig(method=method, bits=3, group_size=32, dataset=_ids(12), num_samples=8, seq_len=32, seed=seed)
        return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=cfg).state_dict()

    a, b, r = run("gptq"), run("gptq"), run("rtn")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.1.mlp.down_proj.qweight"], r["model.layers.1.mlp.down_proj.qweight"])


def test_too_little_calibration_data(tiny_models):
    from transformers import AutoModelForCausalLM

    cfg = QuantConfig(method="gptq", dataset=_ids(2), num_samples=8, seq_len=32)
    with pytest.raises(ValueError, match=r"has 80 tokens, but num_samples=8 x seq_len=32 needs at least 256"):
        AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=cfg)


def test_failed_calibration_restores_the_model(tiny_models):
    from transformers import AutoModelForCausalLM

    from hf_quant import QuantLinear
    from hf_quant.calibration import quantize_model
    from hf_quant.nn.convert import find_targets

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    cfg = QuantConfig(method="gptq", dataset=_ids(12), num_samples=8, seq_len=32)
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj: weight has 1 NaN/inf"):
        quantize_model(model, cfg, find_targets(model, cfg, ["lm_head"]))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_gptq_beats_rtn_on_tiny_llama_packaged_text():
    """Real trained model, default (packaged) calibration text, 3 bits: GPTQ below RTN."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_quant

    from .conftest import TINY_LLAMA

    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)
    ppl = {}
    for method in ("rtn", "gptq"):
        cfg = QuantConfig(method=method, bits=3, group_size=128, num_samples=32, seq_len=256)
        model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.bfloat16, quantization_config=cfg)
        ppl[method] = hf_quant.eval.perplexity(model, tok, max_windows=16)
    assert ppl["gptq"] < ppl["rtn"], ppl
