"""Untrusted checkpoints and configs (issue: hardening): each case from the issue's table either
raises a clear error naming what is wrong, or loads to an intact result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_quant
from hf_quant import kernels
from hf_quant.core import LayerSpec
from hf_quant.runtime import QuantLinear

from .conftest import save_random_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("float") / "llama", "llama", dtype=torch.float32)


def _quantized(float_dir: Path, out: Path, **kw) -> Path:
    cfg = hf_quant.QuantConfig(**{"method": "rtn", "bits": 4, "group_size": 32, **kw})
    AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def q_dir(float_dir, tmp_path_factory) -> Path:
    return _quantized(float_dir, tmp_path_factory.mktemp("q") / "asym")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **fields) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path)(input_ids=ids).logits


# --- 1: patterns from configs cannot hang ---------------------------------------------------------

def test_catastrophic_dynamic_pattern_in_a_checkpoint_fails_fast(q_dir, tmp_path):
    bad = _copy(q_dir, tmp_path / "bad")
    _edit_config(bad, dynamic={"^(.+)+!": {"bits": 8}})
    script = textwrap.dedent(f"""
        import faulthandler, sys, time
        import hf_quant
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(q_dir)!r})  # imports and warms up outside the timed part
        faulthandler.dump_traceback_later(5, exit=True)  # a C-level regex hang cannot outlive this
        start = time.perf_counter()
        try:
            AutoModelForCausalLM.from_pretrained({str(bad)!r})
        except ValueError as e:
            print("ERROR", e)
        faulthandler.cancel_dump_traceback_later()
        print("SECONDS", time.perf_counter() - start)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ERROR QuantConfig.dynamic['^(.+)+!']: the pattern nests quantifiers" in res.stdout
    assert float(res.stdout.split("SECONDS")[1]) < 5


def test_dynamic_patterns_are_bounded_and_matched_once():
    with pytest.raises(ValueError, match="at most 512 are accepted"):
        hf_quant.QuantConfig(dynamic={"a" * 600: {"bits": 8}})
    cfg = hf_quant.QuantConfig(dynamic={r"down_proj": {"bits": 8}})
    assert cfg.layer_spec("model.layers.0.mlp.down_proj").bits == 8
    pattern = cfg._compiled_dynamic[0][0]
    spent = pattern.spent
    for _ in range(100):
        cfg.layer_spec("model.layers.0.mlp.down_proj")
    assert pattern.spent == spent  # remembered: matched once per module name
    from hf_quant.io.gptq_codec import parse_gptq_config

    with pytest.raises(ValueError, match=r"quantization_config.dynamic\['-:\(a\*\)\*'\]: the pattern nests"):
        parse_gptq_config({"bits": 4, "group_size": 128, "dynamic": {"-:(a*)*": {}}})


# --- 2: a checkpoint must match its config exactly --------------------------------------------------

@pytest.mark.parametrize("edit, match", [
    (dict(sym=True), r"stores 'qzeros' for this module.*sym=True"),
    (dict(modules_to_not_convert=["lm_head", "model.layers.0.mlp.up_proj"]),
     r"^model.layers.0.mlp.up_proj: the checkpoint quantizes this module, but its quantization_config keeps it"),
    (dict(dynamic={r"-:layers\.1\.self_attn\.q_proj": {}}),
     r"^model.layers.1.self_attn.q_proj: the checkpoint quantizes this module"),
])
def test_config_edits_that_disagree_with_the_tensors_are_refused(q_dir, tmp_path, edit, match):
    bad = _copy(q_dir, tmp_path / "bad")
    _edit_config(bad, **edit)
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(bad)


def test_act_order_flag_removed_from_an_act_order_checkpoint_is_refused(float_dir, tmp_path):
    q = _quantized(float_dir, tmp_path / "act", method="gptq", desc_act=True, num_samples=2, seq_len=32,
                   dataset=[torch.arange(256)])
    _edit_config(q, desc_act=False)
    with pytest.raises(ValueError, match=r"stores 'g_idx'.*no act-order"):
        AutoModelForCausalLM.from_pretrained(q)


def test_missing_float_weight_is_refused(q_dir, tmp_path):
    bad = _copy(q_dir, tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^lm_head: the quantization_config keeps this layer in float, but"):
        AutoModelForCausalLM.from_pretrained(bad)


# --- 9, 10: values are checked; the grid stays inside its dtype ---------------------------------------

@pytest.mark.parametrize("tensor, value, match", [
    ("scales", float("nan"), r"scales: 1 value\(s\) are NaN or inf"),
    ("scales", float("inf"), r"scales: 1 value\(s\) are NaN or inf"),
    ("scales", 1e30, r"scales: the grid reaches weights of magnitude"),
    ("qzeros", 200, r"qzeros: a zero point of 200 is outside the 4-bit code range"),
])
def test_corrupt_values_are_refused_naming_the_tensor(q_dir, tmp_path, tensor, value, match):
    bad = _copy(q_dir, tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    key = f"model.layers.1.mlp.down_proj.{tensor}"
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = value
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^model.layers.1.mlp.down_proj." + match):
        AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize("sym", [False, True])
def test_fp16_weights_at_the_edge_of_the_range_dequantize_finite(sym):
    from hf_quant.calibration import quantize_layer

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16).half()
    with torch.no_grad():
        lin.weight[:, 0], lin.weight[:, 1] = 65504.0, -65504.0
    q = quantize_layer("fc", lin, LayerSpec(4, 32, sym), "rtn")
    assert torch.isfinite(q.dequantize()).all()
    x = torch.randn(2, 64, dtype=torch.float16) * 1e-3
    outs = {}
    for name in ("reference", "dequant_matmul", "cpu_int4"):
        with kernels.use_kernel(name):
            outs[name] = q(x).float()
    assert all(torch.isfinite(o).all() for o in outs.values())
    torch.testing.assert_close(outs["dequant_matmul"], outs["reference"], rtol=1e-2, atol=1e-1)
    torch.testing.assert_close(outs["cpu_int4"], outs["reference"], rtol=1e-2, atol=1e-1)


# --- 12: calibration inputs ------------------------------------------------------------------------

@pytest.mark.parametrize("dataset, match", [
    ([torch.full((512,), 300)], r"token id 300 is outside the model's vocabulary \[0, 256\)"),
    ([torch.full((512,), -1)], r"token id -1 is outside"),
    ([{"ids": [1, 2, 3]}], r"a dict item has no 'input_ids'"),
])
def test_bad_calibration_data_is_refused_and_the_model_is_left_as_it_was(float_dir, dataset, match):
    model = AutoModelForCausalLM.from_pretrained(float_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = hf_quant.QuantConfig(method="gptq", group_size=32, num_samples=1, seq_len=32, dataset=dataset)
    with pytest.raises(ValueError, match=match):
        hf_quant.quantize(model, cfg)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("kw, match", [(dict(seed=2**70), r"seed=.* must be an integer in \[0, 2\*\*63\)"),
                                       (dict(seed=-1), r"seed=-1"),
                                       (dict(calibration_device="meta"), r"calibration_device='meta' is not a device")])
def test_seed_and_device_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        hf_quant.QuantConfig(method="gptq", **kw)


# --- 13, 14: header and index parsing ---------------------------------------------------------------

def _write_header(path: Path, header) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 64)


@pytest.mark.parametrize("header, what", [
    ([1, 2], "the safetensors header is a JSON list, not an object"),
    ({"a.qweight": {"dtype": "U8", "shape": [2, 2]}}, "header entry 'a.qweight' is malformed"),
    ({"a.qweight": {"dtype": "U8", "shape": [2, 2], "data_offsets": [0, "x"]}}, "header entry 'a.qweight' is malformed"),
])
def test_malformed_headers_give_one_kind_of_error(tmp_path, header, what):
    from hf_quant.io.checkpoint import read_safetensors_header

    _write_header(tmp_path / "m.safetensors", header)
    with pytest.raises(ValueError, match=rf"^corrupt checkpoint {tmp_path}/m.safetensors: {what}"):
        read_safetensors_header(str(tmp_path / "m.safetensors"))


def test_a_symlinked_weight_file_is_reported_as_a_symlink(q_dir, tmp_path):
    bad = _copy(q_dir, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    os.symlink("/etc/passwd", bad / "model.safetensors")
    from hf_quant.io.checkpoint import read_safetensors_header

    with pytest.raises(ValueError, match=r"corrupt checkpoint .*model.safetensors \(a symlink to /etc/passwd\)"):
        read_safetensors_header(str(bad / "model.safetensors"))
    with pytest.raises(Exception):  # transformers' own reader or ours: never loads
        AutoModelForCausalLM.from_pretrained(bad)


def test_shard_index_pointing_outside_the_checkpoint_is_refused(q_dir, tmp_path):
    bad = _copy(q_dir, tmp_path / "ckpt" / "bad")
    outside = tmp_path / "other"
    outside.mkdir()
    shutil.move(bad / "model.safetensors", outside / "model.safetensors")
    keys = load_file(str(outside / "model.safetensors")).keys()
    (bad / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../../other/model.safetensors" for k in keys}}))
    from hf_quant.io.checkpoint import index_checkpoint

    with pytest.raises(ValueError, match="points outside the checkpoint directory"):
        index_checkpoint([str(bad / "../../other/model.safetensors")])
    # transformers >= 5.25 checks the index itself before our loader sees it; either refusal names the cause
    with pytest.raises(ValueError, match="points outside the (checkpoint|model) directory"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_quantization_config_that_is_not_an_object_is_refused(q_dir, tmp_path):
    bad = _copy(q_dir, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = "hf_quant"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ValueError, AttributeError, TypeError)):
        AutoModelForCausalLM.from_pretrained(bad)


def test_an_intact_checkpoint_still_loads_identically(q_dir):
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(q_dir, ids), _logits(q_dir, ids), rtol=0, atol=0)
    assert any(isinstance(m, QuantLinear) for m in AutoModelForCausalLM.from_pretrained(q_dir).modules())


def test_an_old_triton_leaves_hf_quant_importable_and_names_the_upgrade(tmp_path):
    """Triton 3.2-3.4 (torch 2.6-2.8's) lack `triton.constexpr_function`: `import hf_quant` used to fail with an
    AttributeError. Now it imports, with the Triton kernels unregistered and the reason naming the upgrade."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '3.4.0'\n")  # a Triton without constexpr_function
    code = ("import torch, hf_quant\n"
            "from hf_quant.runtime.kernels import triton as t\n"
            "from hf_quant.runtime.kernels.base import KERNELS\n"
            "print(t.AVAILABLE, '|', t.UNAVAILABLE_REASON, '|', 'triton_gemv' in KERNELS.names())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    available, reason, registered = (s.strip() for s in out.stdout.strip().splitlines()[-1].split("|"))
    assert available == "False" and registered == "False"
    assert reason == "Triton 3.4.0 is older than 3.5 (the kernels use triton.constexpr_function): " \
                     "pip install -U 'triton>=3.5'"
