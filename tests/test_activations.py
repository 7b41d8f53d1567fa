"""Calibration activations spilled to disk (QuantConfig.spill_activations / spill_dir): bit-identical results, files
removed, resumable, and a clear error when the spill directory is too small."""

from __future__ import annotations

import copy
import gc
import os
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_quant import QuantConfig, quantize_checkpoint
from hf_quant.calibration import activations
from hf_quant.calibration.activations import SpilledInputs, SpillTooSmall

from conftest import TINY_LLAMA
from test_streaming import (CASES, CLI, CLI_OPTIONS, assert_same_files, in_memory, kill_after_a_random_block,
                            small_tmpfs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_spilled_inputs_round_trip(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(1, 5 + i, 8, generator=g).to(dtype) for i in range(4)]  # windows of different lengths
    mask = torch.ones(3)
    store = SpilledInputs(tmp_path, [((), {"mask": mask, "i": i}) for i in range(4)])
    for h in hidden:
        store.append_hidden(h)
    assert len(store) == 4
    for i, (args, kwargs) in enumerate(store):
        assert torch.equal(args[0], hidden[i]) and args[0].dtype == dtype and kwargs["i"] == i
    assert [a[0].shape for a, _ in store[1:3]] == [hidden[1].shape, hidden[2].shape]
    assert torch.equal(store[-1][0][0], hidden[-1])
    nxt = store.follow()
    nxt.append_hidden(hidden[0] * 2)
    assert torch.equal(nxt[0][0][0], hidden[0] * 2) and nxt[0][1]["i"] == 0
    nxt.persist(tmp_path / "inputs-00001.pt")
    again = SpilledInputs.reopen(tmp_path / "inputs-00001.pt", torch.load(tmp_path / "inputs-00001.pt",
                                                                            weights_only=True))
    assert torch.equal(again[0][0][0], hidden[0] * 2)
    path = store.path
    del store, nxt, again
    gc.collect()
    assert not os.path.exists(path)  # a working file goes with its store
    assert (tmp_path / "inputs-00001.activations").is_file()  # a persisted one stays (a resume needs it)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", ["gptq", pytest.param("gptq-act-order", marks=pytest.mark.heavy),
                                  pytest.param("awq", marks=pytest.mark.heavy)])
def test_spilled_calibration_is_bit_identical_and_leaves_no_file(case, tmp_path, monkeypatch):
    created = []
    real = SpilledInputs.__init__

    def spy(self, directory, rest):
        real(self, directory, rest)
        created.append(self.path)

    monkeypatch.setattr(SpilledInputs, "__init__", spy)
    ref = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=QuantConfig(**CASES[case],
                                                                                          spill_activations=False))
    assert not created
    spill = tmp_path / "spill"
    spill.mkdir()
    got = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=QuantConfig(
        **CASES[case], spill_activations=True, spill_dir=str(spill)))
    assert len(created) == 4 and all(os.path.dirname(p) == str(spill) for p in created)  # capture + 3 blocks
    a, b = _state(ref), _state(got)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    gc.collect()
    assert os.listdir(spill) == []


def test_auto_spills_when_memory_is_short(monkeypatch, tmp_path):
    spilled = []
    real = activations.Spiller.store

    def spy(self, first):
        store = real(self, first)
        spilled.append(store is not None)
        return store

    monkeypatch.setattr(activations.Spiller, "store", spy)
    cfg = dict(CASES["gptq"])
    AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=QuantConfig(**cfg))
    monkeypatch.setattr(activations, "available_memory_bytes", lambda: 64 << 10)  # 64 KiB available
    AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=QuantConfig(**cfg))
    assert spilled == [False, True]


def test_a_spill_dir_too_small_is_refused_before_calibrating(monkeypatch, tmp_path):
    import shutil as sh

    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(activations.shutil, "disk_usage", lambda p: usage._replace(free=100 << 10))
    with pytest.raises(SpillTooSmall, match=r"QuantConfig.spill_dir .* MiB free, but the calibration activations "
                                            r"need .* fewer / shorter windows"):
        AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=QuantConfig(
            **CASES["gptq"], spill_activations=True, spill_dir=str(tmp_path)))


def test_a_full_spill_filesystem_is_a_clear_error(tmp_path):
    """A real full disk: a 1 MiB tmpfs."""
    with small_tmpfs(tmp_path, "1m") as mnt:
        cfg = QuantConfig(**{**CASES["gptq"], "num_samples": 32}, spill_activations=True, spill_dir=str(mnt))
        with pytest.raises(SpillTooSmall, match="spill_dir"):  # 32 x 64 x 256 bf16 = 1 MiB, twice
            AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=cfg)
        (mnt / "filler").write_bytes(b"\0" * (1 << 19))
        with pytest.raises(SpillTooSmall):  # ENOSPC while writing (the check came before the filler)
            store = SpilledInputs(mnt, [((), {})] * 16)
            for _ in range(16):  # 16 x 64 KiB after the filler's 512 KiB
                store.append_hidden(torch.zeros(1, 64, 256))


def test_bad_spill_settings():
    with pytest.raises(ValueError, match="spill_activations='yes'"):
        QuantConfig(spill_activations="yes")
    with pytest.raises(ValueError, match="spill_dir='/no/such/dir' is not an existing directory"):
        QuantConfig(spill_dir="/no/such/dir")
    cfg = QuantConfig(spill_activations=True, spill_dir="/tmp")
    assert "spill_activations" not in cfg.to_dict() and "spill_dir" not in cfg.to_dict()  # runtime only


def test_streaming_with_spilled_activations_resumes_to_the_same_bytes(tmp_path):
    """Streaming spills into <dst>.partial; a SIGKILL after block k and a re-run give the uninterrupted bytes."""
    ref = in_memory(TINY_LLAMA, tmp_path / "mem" / "out", QuantConfig(**CASES["gptq"]))
    got = quantize_checkpoint(TINY_LLAMA, tmp_path / "a" / "out", QuantConfig(**CASES["gptq"], spill_activations=True))
    assert_same_files(ref, got)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dst = tmp_path / "killed" / "out"
    cmd = CLI + [str(dst)] + CLI_OPTIONS + ["--spill-activations", "always"]
    done = kill_after_a_random_block(cmd, dst, env)
    partial = dst.with_name("out.partial")
    assert (partial / f"inputs-{done:05d}.activations").is_file()
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = tmp_path / "whole" / "out"
    subprocess.run(CLI + [str(whole)] + CLI_OPTIONS, check=True, env=env, capture_output=True)
    assert_same_files(whole, dst)
    assert not partial.exists()


def test_windows_share_repeated_arguments():
    """Position embeddings and masks equal from window to window are one tensor in memory."""
    from hf_quant.calibration.blockwise import capture_block_inputs, find_blocks

    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    windows = torch.randint(0, 100, (4, 16))
    inputs = capture_block_inputs(model, find_blocks(model)[1][0], windows)
    cos = [kwargs["position_embeddings"][0] for _, kwargs in inputs]
    assert all(c is cos[0] for c in cos)
    assert not all(a[0] is inputs[0][0][0] for a, _ in inputs)
    copy.deepcopy(inputs)  # still plain data
