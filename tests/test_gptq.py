"""GPTQ as a pure function (act-order, static groups, MSE grid) and through the block-wise driver."""

import json
import logging

import pytest
import torch

from hf_quant import QuantConfig, kernels
from hf_quant.core import grid
from hf_quant.methods import get_method
from hf_quant.config import LayerSpec


def dequant(qw, spec, shape):
    out_f, in_f = shape
    gs, n = spec.effective_group_size(in_f), spec.groups(in_f)
    zero = qw.zero.float() if qw.zero is not None else torch.full((out_f, n), 2.0 ** (spec.bits - 1))
    if qw.g_idx is not None:  # channel i on the grid of group g_idx[i]
        g = qw.g_idx.long()
        return (qw.codes.float() - zero[:, g]) * qw.scale.float()[:, g]
    return grid.dequantize(qw.codes.float().reshape(out_f, n, gs), qw.scale.float(), zero).reshape(shape)


VARIANTS = {  # name -> (gptq keyword arguments, spec stores g_idx)
    "plain": ({}, False),
    "act_order": ({"desc_act": True}, True),
    "act_order_static": ({"desc_act": True, "static_groups": True}, False),
    "mse": ({"mse": True}, False),
}


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
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gptq_lowers_output_error_vs_rtn(bits, group_size, sym, variant):
    in_f, out_f = 256, 64
    X = correlated_inputs(in_f, 2048, seed=bits)
    X = X[torch.randperm(in_f, generator=torch.Generator().manual_seed(bits))]  # large channels anywhere
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(7)) * 0.05
    H = 2 * X @ X.t() / X.shape[1]
    kwargs, g_idx = VARIANTS[variant]
    spec = LayerSpec(bits, group_size, sym, g_idx and group_size != -1)
    gptq = get_method("gptq").quantize(W, spec, torch.float32, H=H, block_size=64, **kwargs)
    rtn = get_method("rtn").quantize(W, spec, torch.float32)
    err = lambda qw: ((W - dequant(qw, spec, W.shape)) @ X).norm().item()  # noqa: E731
    assert int(gptq.codes.max()) <= spec.maxq
    assert (gptq.g_idx is not None) == spec.g_idx
    assert err(gptq) < 0.8 * err(rtn), (err(gptq), err(rtn))


@pytest.mark.parametrize("spec,kwargs", [
    (LayerSpec(4, 64, False), {}),
    (LayerSpec(3, 32, True), {"block_size": 48}),  # groups across lazy-update blocks
    (LayerSpec(2, -1, False), {"mse": True}),
    (LayerSpec(8, 128, False), {"block_size": 96}),
    (LayerSpec(4, 32, False, True), {"desc_act": True}),
    (LayerSpec(4, 32, False), {"desc_act": True, "static_groups": True}),
    (LayerSpec(3, 64, False), {"clip": "learned"}),
])
def test_fused_column_steps_are_the_torch_steps_bit_for_bit(spec, kwargs, monkeypatch):
    """A registered fused form of the column steps (the native CPU one where it builds) gives the torch steps'
    codes, scales and zeros bit for bit, whatever the group size, block size, act-order or clipping."""
    from hf_quant.methods import gptq as gptq_module

    if not gptq_module._COLUMN_STEPS:
        pytest.skip("no fused column steps registered here (native helpers not built)")
    calls = []
    fused = gptq_module._COLUMN_STEPS[0]
    monkeypatch.setattr(gptq_module, "_COLUMN_STEPS", [lambda *a: calls.append(a[3] - a[2]) or fused(*a)])
    g = torch.Generator().manual_seed(len(calls) + spec.bits)
    W = torch.randn(40, 256, generator=g)
    W[::7, 5] *= 6
    X = correlated_inputs(256, 512, seed=spec.bits)
    H = X @ X.t() / 512
    if kwargs.get("clip") == "learned":
        shape = (40, spec.groups(256))
        kwargs = {"clip": (torch.rand(shape, generator=g) * 0.3 + 0.7, torch.rand(shape, generator=g) * 0.3 + 0.7)}
    a = get_method("gptq").quantize(W, spec, torch.float16, H=H, **kwargs)
    assert sum(calls) == 256  # every column went through the fused form
    monkeypatch.setattr(gptq_module, "_COLUMN_STEPS", [])
    b = get_method("gptq").quantize(W, spec, torch.float16, H=H, **kwargs)
    for field in ("codes", "scale", "zero", "g_idx"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None and y is None) or torch.equal(x, y), field


def test_refused_fused_column_steps_fall_back_without_a_second_search(monkeypatch):
    """Fused column steps that refuse (a helper that did not build) leave every column to the torch steps, on the
    grid already found: one search per group, and the torch steps' result."""
    from hf_quant.methods import gptq as gptq_module

    spec, W = LayerSpec(4, 32, False), torch.randn(24, 128, generator=torch.Generator().manual_seed(3))
    X = correlated_inputs(128, 256, seed=3)
    H = X @ X.t() / 256
    searches = []
    find_params = grid.find_params
    monkeypatch.setattr(grid, "find_params", lambda *a, **k: searches.append(1) or find_params(*a, **k))
    monkeypatch.setattr(gptq_module, "_COLUMN_STEPS", [lambda *a: False])
    a = get_method("gptq").quantize(W, spec, torch.float16, H=H, mse=True)
    assert len(searches) == 4
    monkeypatch.setattr(gptq_module, "_COLUMN_STEPS", [])
    b = get_method("gptq").quantize(W, spec, torch.float16, H=H, mse=True)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


def test_act_order_g_idx_follows_the_hessian_diagonal():
    """desc_act forms groups by decreasing diag(H): the group_size largest channels make group 0."""
    in_f, gs = 128, 32
    d = torch.rand(in_f, generator=torch.Generator().manual_seed(0)) + 0.1
    W = torch.randn(8, in_f)
    qw = get_method("gptq").quantize(W, LayerSpec(4, gs, False, True), torch.float32, H=torch.diag(d), desc_act=True)
    order = torch.argsort(d, descending=True)
    assert torch.equal(qw.g_idx[order].long(), torch.arange(in_f) // gs)
    static = get_method("gptq").quantize(W, LayerSpec(4, gs, False), torch.float32, H=torch.diag(d),
                                         desc_act=True, static_groups=True)
    assert static.g_idx is None
    # diagonal H: no error propagates, so static groups are exactly RTN whatever the order
    rtn = get_method("rtn").quantize(W, LayerSpec(4, gs, False), torch.float32)
    assert torch.equal(static.codes, rtn.codes) and torch.equal(static.scale, rtn.scale)
    with pytest.raises(ValueError, match="g_idx"):
        get_method("gptq").quantize(W, LayerSpec(4, gs, False), torch.float32, H=torch.diag(d), desc_act=True)


@pytest.mark.parametrize("bits, sym", [(2, False), (3, True), (4, False), (8, True)])
def test_mse_grid_never_increases_the_group_error(bits, sym):
    """The clipping search keeps the unclipped grid unless a shrunk one has a lower |w - w_hat|^2.4."""
    spec = LayerSpec(bits, 64, sym)
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(bits))
    W[::5, ::7] *= 8  # outliers worth clipping
    plain = get_method("rtn").quantize(W, spec, torch.bfloat16)
    mse = get_method("rtn").quantize(W, spec, torch.bfloat16, mse=True)

    def group_err(qw):
        return (dequant(qw, spec, W.shape) - W).abs().pow(2.4).reshape(32, 4, 64).sum(-1)

    assert torch.all(group_err(mse) <= group_err(plain) * (1 + 1e-5))
    share = (group_err(mse) < group_err(plain) * 0.99).float().mean()
    assert share > (0.1 if bits == 8 else 0.3), share  # clipping pays on many groups
    assert (mse.scale <= plain.scale).all() and (mse.scale < plain.scale).any()


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


_OPTIONS = [{}, {"desc_act": True}, {"desc_act": True, "static_groups": True},
            {"true_sequential": False, "mse": False, "sym": True}]


@pytest.mark.parametrize("arch, options", [(a, o) for a in ("llama", "gpt2", "qwen2") for o in _OPTIONS]
                         + [("opt", {"desc_act": True})])
def test_gptq_in_from_pretrained_round_trips(tiny_models, tmp_path, input_ids, arch, options):
    """Llama, GPT-2 (Conv1D), Qwen2 (biased q/k/v) and OPT calibrate unchanged; act-order models store
    g_idx and reload with identical logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_quant import QuantLinear

    cfg = QuantConfig(method="gptq", bits=4, group_size=32, dataset=_ids(12), num_samples=8, seq_len=32,
                      calibration_device="cpu", **options)
    q = AutoModelForCausalLM.from_pretrained(tiny_models[arch], quantization_config=cfg)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == {"gpt2": 8, "opt": 12}.get(arch, 14)
    act_order = options.get("desc_act", False) and not options.get("static_groups", False)
    assert all((m.g_idx is not None) == act_order for m in layers.values())
    q.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "gptq" and saved["format_version"] == 2
    assert "dataset" not in saved and "calibration_device" not in saved
    assert all(saved[k] == v for k, v in options.items())
    tensors = load_file(tmp_path / "model.safetensors")
    assert any(k.endswith(".g_idx") for k in tensors) == act_order
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, q(input_ids).logits)
        with kernels.use_kernel("reference"):
            ref = q(input_ids).logits
        assert torch.allclose(again(input_ids).logits, ref, atol=0.05, rtol=0.05)


def test_gptq_is_deterministic_and_differs_from_rtn(tiny_models):
    from transformers import AutoModelForCausalLM

    def run(method, seed=0):
        cfg = QuantConfig(method=method, bits=3, group_size=32, dataset=_ids(12), num_samples=8, seq_len=32, seed=seed)
        return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=cfg).state_dict()

    a, b, r = run("gptq"), run("gptq"), run("rtn")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.1.mlp.down_proj.qweight"], r["model.layers.1.mlp.down_proj.qweight"])


@pytest.mark.parametrize("chunk", [1 << 24, 1000])  # one chunk of shrink factors (as on a GPU), or many
@pytest.mark.parametrize("sym", [True, False])
def test_batched_mse_search_equals_a_loop_over_shrink_factors(chunk, sym, monkeypatch):
    """The torch search (the oracle; a CPU's native search, registered, is compared with it in test_native.py)."""
    assert grid._chunk_elements(torch.device("cuda")) == grid.MSE_CHUNK_ELEMENTS_ACCEL == 1 << 24
    monkeypatch.setattr(grid, "MSE_CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(grid, "_MSE_SEARCHES", [])
    spec = LayerSpec(3, 32, sym)
    Wg = torch.randn(24, 4, 32, generator=torch.Generator().manual_seed(0))
    Wg[::3, :, ::5] *= 6
    scale, zero = grid.find_params(Wg, spec, torch.bfloat16, mse=True)
    # oracle: the reference quantizer's loop, strict improvement only
    xmax = torch.maximum(Wg.amin(-1).clamp(max=0).abs(), Wg.amax(-1).clamp(min=0)) if sym else Wg.amax(-1)
    xmin = -xmax if sym else Wg.amin(-1)
    best = torch.full(xmin.shape, float("inf"))
    want_s, want_z = torch.zeros_like(best), torch.zeros_like(best)
    for i in range(80):
        p = 1 - i / 100
        s = grid.store_scale((p * xmax - p * xmin) / spec.maxq, torch.bfloat16)
        z = torch.full_like(s, 4.0) if sym else torch.round(-p * xmin / s).clamp(0, spec.maxq)
        err = (grid.dequantize(grid.quantize(Wg, s, z, spec.maxq), s, z) - Wg).abs().pow(2.4).sum(-1)
        better = err < best
        best, want_s, want_z = torch.where(better, err, best), torch.where(better, s, want_s), torch.where(better, z, want_z)
    assert torch.equal(scale, want_s) and torch.equal(zero, want_z)


def test_mse_option_reaches_rtn_and_gptq_in_from_pretrained(tiny_models):
    from transformers import AutoModelForCausalLM

    def run(**kw):
        cfg = QuantConfig(bits=3, group_size=32, dataset=_ids(12), num_samples=8, seq_len=32, **kw)
        return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=cfg).state_dict()

    key = "model.layers.0.mlp.up_proj.scales"
    plain, mse = run(method="rtn"), run(method="rtn", mse=True)
    assert (mse[key] <= plain[key]).all() and (mse[key] < plain[key]).any()  # clipped grids only shrink
    plain, mse = run(method="gptq", mse=False), run(method="gptq")  # on by default for GPTQ
    assert not torch.equal(mse[key], plain[key])


def test_too_little_calibration_data(tiny_models):
    from transformers import AutoModelForCausalLM

    cfg = QuantConfig(method="gptq", dataset=_ids(2), num_samples=8, seq_len=32)
    with pytest.raises(ValueError, match=r"has 80 tokens, but num_samples=8 x seq_len=32 needs at least 256"):
        AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=cfg)


def test_failed_calibration_restores_the_model(tiny_models):
    from transformers import AutoModelForCausalLM

    from hf_quant import QuantLinear
    from hf_quant.calibration import quantize_model
    from hf_quant.runtime.convert import find_targets

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
    for method in ("rtn", "gptq"):  # fp32: bf16 matmuls are slow on CPUs without AVX-512 bf16
        cfg = QuantConfig(method=method, bits=3, group_size=128, num_samples=16, seq_len=256)
        model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32, quantization_config=cfg)
        ppl[method] = hf_quant.eval.perplexity(model, tok, seq_len=256, max_windows=16)
    assert ppl["gptq"] < ppl["rtn"], ppl


def test_true_sequential_groups_follow_the_forward_pass(tiny_models):
    from transformers import AutoModelForCausalLM

    from hf_quant.calibration.blockwise import capture_block_inputs, find_blocks, input_groups

    expected = {
        "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                  ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
        "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    }
    for arch, groups in expected.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
        prefix, blocks = find_blocks(model)
        assert prefix == {"llama": "model.layers", "gpt2": "transformer.h"}[arch]
        inputs = capture_block_inputs(model, blocks[0], torch.stack(_ids(2)))
        names = [f"{prefix}.0.{n}" for g in reversed(groups) for n in g]  # order must come from the forward pass
        found = input_groups(blocks[0], f"{prefix}.0.", names, inputs, torch.device("cpu"))
        assert [[n.removeprefix(f"{prefix}.0.") for n in g] for g in found] == groups


def test_true_sequential_changes_the_result_and_summary_is_logged(tiny_models, caplog):
    from transformers import AutoModelForCausalLM

    def run(**kw):
        cfg = QuantConfig(method="gptq", bits=3, group_size=32, dataset=_ids(12), num_samples=8, seq_len=32, **kw)
        return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=cfg).state_dict()

    with caplog.at_level(logging.INFO, logger="hf_quant"):
        seq = run()
    lines = [r.getMessage() for r in caplog.records if "output rel. error" in r.getMessage()]
    assert len(lines) == 2 and lines[0].startswith("hf_quant: block 1/2: 7 layers in 4 groups")
    assert "worst layer " in lines[0]
    assert any("calibrated 2 blocks" in r.getMessage() for r in caplog.records)
    par = run(true_sequential=False)
    key = "model.layers.0.self_attn.q_proj.qweight"  # first group: same inputs either way
    assert torch.equal(seq[key], par[key])
    assert not torch.equal(seq["model.layers.0.mlp.down_proj.qweight"], par["model.layers.0.mlp.down_proj.qweight"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_statistics_passes_stop_each_window_after_its_last_hooked_layer(tiny_models, monkeypatch, arch):
    """A true-sequential group's pass stops each window once the group's layers have their inputs (past the
    reference windows, whose outputs the report needs, and the first window, which shows each layer called once):
    the attention groups' passes never reach the MLP. The statistics, and so the quantized model, are bit-identical
    to whole passes."""
    from transformers import AutoModelForCausalLM

    from hf_quant.calibration import blockwise

    whole, calibrate = blockwise._pass, blockwise.calibrate_block

    def run(n=24):
        mlp_calls = []

        def counting(model, block, *args, **kwargs):  # the block's MLP (a container: it stays) counts its calls
            hook = block.get_submodule("mlp").register_forward_pre_hook(lambda m, a: mlp_calls.append(1))
            try:
                return calibrate(model, block, *args, **kwargs)
            finally:
                hook.remove()

        monkeypatch.setattr(blockwise, "calibrate_block", counting)
        cfg = QuantConfig(method="gptq", bits=3, group_size=32, dataset=_ids(n), num_samples=n, seq_len=32)
        model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], quantization_config=cfg)
        return model.state_dict(), len(mlp_calls)

    early, early_calls = run()
    monkeypatch.setattr(blockwise, "_pass", lambda *args, heads=(), **kwargs: whole(*args, **kwargs))
    full, full_calls = run()
    assert early.keys() == full.keys() and all(torch.equal(early[k], full[k]) for k in early)
    n_ref = min(blockwise.REFERENCE_WINDOWS, 24)
    assert full_calls - early_calls == 2 * ((24 - n_ref) + (24 - 1))  # 2 blocks: the q/k/v and o passes


def test_layer_error_from_hessian_equals_direct_output_error():
    from hf_quant.calibration import quantize_layer
    from hf_quant.calibration.blockwise import _weighted_error

    X = correlated_inputs(64, 300, seed=5)  # (in, n)
    lin = torch.nn.Linear(64, 24, bias=False)
    layer = quantize_layer("l", lin, LayerSpec(3, 32, False), "rtn")
    W, W_hat = lin.weight.detach(), layer.dequantize().float()
    direct = ((W - W_hat) @ X).pow(2).sum() / (W @ X).pow(2).sum()
    assert _weighted_error(lin, layer, X @ X.t()) == pytest.approx(direct.item(), rel=1e-4)


def test_calibration_report(tiny_models):
    from transformers import AutoModelForCausalLM

    cfg = QuantConfig(method="gptq", bits=3, group_size=32, dataset=_ids(12), num_samples=8, seq_len=32)
    q = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], quantization_config=cfg)
    report = q.hf_quantizer.calibration_report
    assert [r["block"] for r in report] == [0, 1] and all(r["layers"] == 7 and r["groups"] == 4 for r in report)
    assert all(0 < r["output_error"] < 0.5 and r["seconds"] > 0 for r in report)
    assert set(report[0]["layer_errors"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert all(0 < e < 0.5 for r in report for e in r["layer_errors"].values())


def test_block_discovery_errors_and_override(tiny_models):
    from transformers import AutoModelForCausalLM

    cfg = QuantConfig(method="gptq", dataset=_ids(12), num_samples=8, seq_len=32, block_name_to_quantize="model.norm")
    with pytest.raises(ValueError, match=r"block_name_to_quantize='model.norm'.*candidates: \['model.layers'\]"):
        AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=cfg)
    cfg = QuantConfig(method="gptq", bits=4, group_size=32, dataset=_ids(12), num_samples=8, seq_len=32,
                      block_name_to_quantize="model.layers")
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=cfg)


def test_unavailable_calibration_device_is_a_clear_error(tiny_models):
    from transformers import AutoModelForCausalLM

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    cfg = QuantConfig(method="gptq", dataset=_ids(12), num_samples=8, seq_len=32, calibration_device="cuda")
    with pytest.raises(ValueError, match="calibration_device='cuda' but this machine has no CUDA device"):
        AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=cfg)


def test_layer_without_calibration_inputs_falls_back_to_rtn(caplog):
    from hf_quant.calibration import quantize_layer
    from hf_quant.calibration.blockwise import _quantize_with_hessian

    cfg = QuantConfig(method="gptq", bits=4, group_size=32)
    lin = torch.nn.Linear(64, 16, bias=False)
    spec = cfg.layer_spec("x")
    with caplog.at_level(logging.WARNING, logger="hf_quant"):
        layer = _quantize_with_hessian("experts.3.w1", lin, spec, cfg, {}, torch.zeros(64, 64), 0)
    assert "experts.3.w1 received no calibration inputs" in caplog.text
    rtn = quantize_layer("experts.3.w1", lin, spec, "rtn", mse=cfg.mse)  # same grid search as the GPTQ layers
    assert torch.equal(layer.qweight, rtn.qweight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_calibrate_on_gpu_model_stays_on_cpu(tiny_models, input_ids):
    from transformers import AutoModelForCausalLM

    from hf_quant import QuantLinear

    cfg = QuantConfig(method="gptq", bits=4, group_size=32, dataset=_ids(12), num_samples=8, seq_len=32)
    q = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=cfg)
    assert all(p.device.type == "cpu" for p in q.state_dict().values())
    cpu = AutoModelForCausalLM.from_pretrained(
        tiny_models["llama"], quantization_config=QuantConfig(**{**cfg.to_dict(), "calibration_device": "cpu"},
                                                              dataset=_ids(12)))
    same = [torch.equal(a, b) for a, b in zip(q.state_dict().values(), cpu.state_dict().values())]
    assert sum(same) / len(same) > 0.5  # float rounding differs between devices; most tensors still match
    assert any(isinstance(m, QuantLinear) for m in q.modules())


def test_blocks_called_with_hidden_states_by_keyword():
    from hf_quant.calibration.blockwise import capture_block_inputs, run_block

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, hidden_states, scale=1.0):
            return self.proj(hidden_states) * scale

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 8)
            self.layers = torch.nn.ModuleList([Block()])

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, use_cache=False):
            return self.layers[0](hidden_states=self.embed(input_ids), scale=2.0)

    model = Model()
    ids = torch.randint(0, 16, (3, 5))
    inputs = capture_block_inputs(model, model.layers[0], ids)
    assert len(inputs) == 3 and inputs[0][1] == {"scale": 2.0}
    outs = run_block(model.layers[0], torch.device("cpu"), "", inputs)
    with torch.no_grad():
        assert torch.equal(outs[1], model(ids[1][None]))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_nan_in_a_layernorm_is_refused_naming_the_layer_and_the_model_is_left_as_it_was(tmp_path, method):
    """A NaN in a norm weight makes the calibration inputs of the next layers NaN: GPTQ refuses the
    first such layer by name (a ValueError, not torch's Cholesky error), and nothing is changed."""
    from transformers import AutoModelForCausalLM

    import hf_quant
    from hf_quant import QuantLinear

    from .conftest import save_random_model

    model = AutoModelForCausalLM.from_pretrained(save_random_model(tmp_path / "llama", "llama"))
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = QuantConfig(method=method, dataset=_ids(12), num_samples=8, seq_len=32)
    with pytest.raises(ValueError) as info:
        hf_quant.quantize(model, cfg)
    msg = str(info.value)
    start = {"gptq": "model.layers.1.self_attn.q_proj: the calibration inputs of model.layers.1.self_attn.q_proj "
                     "contain NaN/inf",
             "awq": "model.layers.1.self_attn.q_proj: AWQ's scale search gets non-finite block outputs"}[method]
    assert msg.startswith(start), msg
    assert "norm" in msg and "modules_to_not_convert=['model.layers.1.self_attn.q_proj']" in msg
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # bit for bit, the NaN included
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert getattr(model, "hf_quantizer", None) is None


def test_non_finite_or_indefinite_hessian_is_a_value_error_naming_the_layer():
    from hf_quant.calibration.layer import quantize_layer

    lin = torch.nn.Linear(64, 16)
    spec = LayerSpec(4, 32, False)
    H = torch.eye(64)
    H[2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"^model.layers.0.mlp.up_proj: the calibration inputs of "
                                         r"model.layers.0.mlp.up_proj contain NaN/inf \(1 non-finite"):
        quantize_layer("model.layers.0.mlp.up_proj", lin, spec, "gptq", H=H)
    with pytest.raises(ValueError, match=r"^GPTQ: the Hessian has 1 NaN/inf entries"):  # the method alone
        get_method("gptq").quantize(lin.weight.detach(), spec, torch.float32, H=H)
    H = torch.eye(64)
    H[0, 1] = H[1, 0] = 5.0  # eigenvalues 1 +- 5: not positive-definite, and dampening by 1% cannot fix it
    with pytest.raises(ValueError, match=r"^model.layers.0.mlp.up_proj: GPTQ: the Hessian .* not positive-definite "
                                         r"even after dampening with damp_percent=0.01 .* larger "
                                         r"QuantConfig.damp_percent \(e.g. 0.1\)") as info:
        quantize_layer("model.layers.0.mlp.up_proj", lin, spec, "gptq", H=H)
    assert not isinstance(info.value, torch.linalg.LinAlgError)


_QUANTIZED_HASHES = """
import hashlib, json, torch
import hf_quant
from transformers import AutoModelForCausalLM


def quantized_hashes(path):
    ids = [torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(i)) for i in range(12)]
    cfg = hf_quant.QuantConfig(method="gptq", bits=3, group_size=32, desc_act=True, dataset=ids, num_samples=8,
                               seq_len=32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in model.state_dict().items()}
"""


def test_gptq_is_bit_identical_across_processes_at_the_same_thread_count(tiny_models):
    """What the README promises: the same data, seed, machine, torch build and thread count give
    bit-identical quantized tensors, also in a fresh process. (Across thread counts the codes can
    differ: torch's CPU Cholesky (MKL) rounds differently with 1 and 2 threads; see the README.)"""
    import subprocess
    import sys

    threads = torch.get_num_threads()
    code = (_QUANTIZED_HASHES + f"torch.set_num_threads({threads})\n"
            f"print(json.dumps(quantized_hashes({str(tiny_models['llama'])!r})))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    fresh = json.loads(res.stdout.strip().splitlines()[-1])
    namespace: dict = {}
    exec(_QUANTIZED_HASHES, namespace)
    here = namespace["quantized_hashes"](tiny_models["llama"])
    assert any(k.endswith(".g_idx") for k in here)
    assert fresh == here, sorted(k for k in here if here[k] != fresh.get(k))


@pytest.mark.parametrize("n", [1, 130, 1500])
def test_hessian_inverse_cholesky_in_place_equals_the_plain_factorizations(n):
    """The factorizations on H's column-major view plus the in-place transpose give exactly torch's plain
    cholesky -> cholesky_inverse -> upper cholesky, in H's own storage."""
    from hf_quant.methods.gptq import hessian_inverse_cholesky, transpose_square_

    g = torch.Generator().manual_seed(n)
    X = torch.randn(n + 7, n, generator=g)
    H = X.t() @ X
    damped = H.clone()
    damped.diagonal().add_(0.01 * torch.mean(torch.diag(H)))
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    buf = H.clone()
    got = hessian_inverse_cholesky(buf, 0.01)
    assert got.is_contiguous() and got.data_ptr() == buf.data_ptr() and torch.equal(got, want)
    A = torch.randn(n, n, generator=g)
    assert torch.equal(transpose_square_(A.clone(), tile=64), A.t())
