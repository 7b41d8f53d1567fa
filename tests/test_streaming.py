"""Streaming calibration (`hf_quant.quantize_checkpoint`, `hf-quant quantize`): the same files as the
in-memory path, resume after SIGKILL, bad input."""

from __future__ import annotations

import contextlib
import copy
import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant import QuantConfig, quantize_checkpoint
from hf_quant import streaming

from conftest import REF_LLAMA, TINY_LLAMA, save_random_model


def _windows(n: int = 8, seq: int = 32, vocab: int = 256) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (seq,), generator=g) for _ in range(n)]


def in_memory(src: Path, dst: Path, cfg: QuantConfig, max_shard_size: str = "1GB") -> Path:
    """Today's path: the whole float model loaded, quantized, saved (with the tokenizer, if any)."""
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=copy.copy(cfg))
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError):
        tok = None
    model.save_pretrained(dst, max_shard_size=max_shard_size, tokenizer=tok)
    return dst


def assert_same_files(a: Path, b: Path) -> None:
    names_a, names_b = sorted(os.listdir(a)), sorted(os.listdir(b))
    assert names_a == names_b
    different = [n for n in names_a if not filecmp.cmp(a / n, b / n, shallow=False)]
    assert not different, f"files differ: {different}"


CASES = {
    "rtn": dict(method="rtn", bits=4, group_size=32),
    # mse=False: the clipping search is a third of GPTQ's time on tiny-llama and not what these tests check
    "gptq": dict(method="gptq", bits=4, group_size=32, num_samples=8, seq_len=64, mse=False),
    "gptq-act-order": dict(method="gptq", bits=4, group_size=32, desc_act=True, num_samples=8, seq_len=64,
                           mse=False),
    "awq": dict(method="awq", bits=4, group_size=32, num_samples=8, seq_len=64),
}


@pytest.mark.parametrize("case", ["rtn", "gptq", pytest.param("gptq-act-order", marks=pytest.mark.heavy),
                                  pytest.param("awq", marks=pytest.mark.heavy)])
def test_streaming_writes_the_in_memory_checkpoint(case, tmp_path):
    cfg = QuantConfig(**CASES[case])
    ref = in_memory(TINY_LLAMA, tmp_path / "a" / "out", cfg)
    got = quantize_checkpoint(TINY_LLAMA, tmp_path / "b" / "out", cfg)  # same directory name: same card
    assert_same_files(ref, got)
    assert not (tmp_path / "b" / "out.partial").exists()  # a finished run leaves no progress behind
    assert cfg.provenance is None  # the caller's config is not changed


def test_spilled_hessians_give_the_same_bytes_and_leave_no_file(tmp_path, monkeypatch):
    """Every Hessian sum spilled to the progress directory while its layers are quantized (the threshold
    lowered to 0): the same checkpoint as in memory, and no spill file left behind."""
    from hf_quant.calibration import blockwise

    cfg = QuantConfig(**CASES["gptq"])
    ref = in_memory(TINY_LLAMA, tmp_path / "a" / "out", cfg)
    spilled = []
    real = blockwise._SpilledHessian.__init__

    def counting(self, Hsum, directory):
        real(self, Hsum, directory)
        spilled.append(self.path)

    monkeypatch.setattr(blockwise._SpilledHessian, "MIN_BYTES", 0)
    monkeypatch.setattr(blockwise._SpilledHessian, "__init__", counting)
    got = quantize_checkpoint(TINY_LLAMA, tmp_path / "b" / "out", cfg)
    assert_same_files(ref, got)
    assert spilled and not any(os.path.exists(p) for p in spilled)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama-fp32", "gpt_neox", "gptj", "mixtral"])
def test_streaming_other_architectures_and_shards(arch, tiny_models, tmp_path):
    """GPT-2's Conv1D, OPT's model.decoder.layers, fp32 weights, GPT-NeoX's renamed lm_head (`embed_out` in
    the files), GPT-J's rotary table (computed while the model is built: from_pretrained computes it again
    outside the bf16 context, and so must the streaming skeleton), Mixtral's experts (per-expert `w1` / `w3` / `w2`
    in the files, which transformers stacks into 3-D weights, quantized per expert); several output shards with
    their index."""
    src = tiny_models[arch] if arch in tiny_models else save_random_model(tmp_path / "src", arch)
    cfg = QuantConfig(method="gptq", bits=4, group_size=32, dataset=_windows(), num_samples=8, seq_len=32)
    ref = in_memory(src, tmp_path / "a" / "out", cfg, max_shard_size="100KB")
    got = quantize_checkpoint(src, tmp_path / "b" / "out", cfg, max_shard_size="100KB")
    assert_same_files(ref, got)
    assert (got / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(got)
    ids = _windows(1)[0][None]
    assert torch.isfinite(model(ids).logits).all()


def test_streaming_reads_a_sharded_source(tiny_models, tmp_path):
    src = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).save_pretrained(src, max_shard_size="60KB")
    assert (src / "model.safetensors.index.json").is_file()
    cfg = QuantConfig(method="rtn", bits=4, group_size=32)
    assert_same_files(in_memory(src, tmp_path / "a" / "out", cfg), quantize_checkpoint(src, tmp_path / "b" / "out", cfg))


def _progress(dst: Path) -> int:
    try:
        return json.loads((Path(str(dst) + ".partial") / "progress.json").read_text())["next_block"]
    except (OSError, ValueError, KeyError):
        return -1


CLI = [sys.executable, "-m", "hf_quant", "-q", "quantize", str(TINY_LLAMA)]
# --no-mse: as CASES["gptq"] (the clipping search is a third of GPTQ's time and not what the CLI tests check)
CLI_OPTIONS = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--num-samples", "8", "--seq-len", "64",
               "--no-mse"]


def kill_after_a_random_block(cmd: list[str], dst: Path, env: dict) -> int:
    """Run `cmd` (writing `dst`), SIGKILL it once block k finished (k random in 1..3: tiny-llama has 4 blocks);
    returns the blocks it finished."""
    k = random.Random(os.getpid()).randint(1, 3)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _progress(dst) < k and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _progress(dst)
    assert 1 <= done < 4, f"the run was not killed between blocks (progress {done})"
    return done


@contextlib.contextmanager
def small_tmpfs(tmp_path: Path, size: str):
    """A real small file system (a tmpfs of `size`), where this machine lets the test mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        import gc

        gc.collect()  # files the test left open (an exception's frames) close with their objects
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # still busy: detach it now, freed when closed


def torchrun(args: list[str], env: dict, port_offset: int = 0) -> subprocess.CompletedProcess:
    """`hf-quant -q quantize ARGS` under torchrun with 2 processes; asserts it succeeded."""
    pytest.importorskip("torch.distributed.run")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29500 + (os.getpid() + port_offset) % 1000), "-m", "hf_quant", "-q", "quantize"] + args,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def one_and_two_processes(tmp_path: Path, method: str, port_offset: int = 0, extra: list[str] = ()
                          ) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """tiny-llama quantized with `method` (w4 g32, 8 x 64, fp64 Hessian sums, then `extra` options) by one process
    and by torchrun with two: (one's output, two's output, the torchrun process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    options = ["--method", method, "--group-size", "32", "--num-samples", "8", "--seq-len", "64",
               "--hessian-dtype", "float64", *extra]
    one, two = tmp_path / "one" / "out", tmp_path / "two" / "out"
    subprocess.run(CLI + [str(one)] + options, check=True, env=env, capture_output=True)
    return one, two, torchrun([str(TINY_LLAMA), str(two)] + options, env, port_offset)


def test_resume_after_sigkill_gives_the_same_bytes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole" / "out"
    subprocess.run(CLI + [str(whole)] + CLI_OPTIONS, check=True, env=env, capture_output=True)
    dst = tmp_path / "killed" / "out"
    done = kill_after_a_random_block(CLI + [str(dst)] + CLI_OPTIONS, dst, env)
    assert not dst.exists()  # nothing half-written: the target appears only at the final rename
    # a changed config does not resume (and leaves the progress as it was)
    changed = subprocess.run(CLI + [str(dst)] + CLI_OPTIONS[:3] + ["3"] + CLI_OPTIONS[4:], env=env,
                             capture_output=True, text=True)
    assert changed.returncode != 0
    assert "different run" in changed.stderr and "QuantConfig" in changed.stderr
    assert _progress(dst) == done
    resumed = subprocess.run(CLI + [str(dst)] + CLI_OPTIONS, env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_files(whole, dst)
    assert not Path(str(dst) + ".partial").exists()


def test_no_resume_starts_over(tmp_path):
    cfg = QuantConfig(method="rtn", bits=4, group_size=32)
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "progress.json").write_text(json.dumps({"format": 1, "key": {"source": "x"}, "next_block": 2}))
    with pytest.raises(ValueError, match="different run .*source"):
        quantize_checkpoint(TINY_LLAMA, tmp_path / "out", cfg)
    quantize_checkpoint(TINY_LLAMA, tmp_path / "out", cfg, resume=False)
    assert (tmp_path / "out" / "model.safetensors").is_file() and not partial.exists()


def test_missing_shard_and_non_safetensors_sources(tiny_models, tmp_path):
    src = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).save_pretrained(src, max_shard_size="60KB")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    cfg = QuantConfig(method="rtn", bits=4, group_size=32)
    with pytest.raises(ValueError, match=f"shard {shard.name} listed in model.safetensors.index.json is missing"):
        quantize_checkpoint(src, tmp_path / "out", cfg)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", bare)
    with pytest.raises(streaming.NoSafetensors, match="no model.safetensors"):
        quantize_checkpoint(bare, tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_source_modified_during_the_run(tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(TINY_LLAMA, src)
    save = streaming._save_tensors

    def touch_source_after_first_block(tensors, path):
        save(tensors, path)
        os.utime(src / "model.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))

    monkeypatch.setattr(streaming, "_save_tensors", touch_source_after_first_block)
    with pytest.raises(ValueError, match="source checkpoint changed while it was being quantized .*model.safetensors"):
        quantize_checkpoint(src, tmp_path / "out", QuantConfig(method="rtn", bits=4, group_size=32))
    assert not (tmp_path / "out").exists()


def test_cli_streams_by_default_and_records_evaluation(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([c for c in CLI if c != "-q"] + [str(out), "--method", "rtn", "--group-size", "32", "--eval", "--max-windows", "2"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "streaming" in run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["quantized_layers"] == 28
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["provenance"]["evaluation"]["perplexity"] == result["perplexity"]
    assert f"Perplexity **{result['perplexity']:.3f}**" in (out / "README.md").read_text()  # the card's 3 decimals
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(m, hf_quant.QuantLinear) for m in model.modules()) == 28


@pytest.mark.slow
@pytest.mark.parametrize("case", ["rtn", "gptq", "gptq-act-order", "awq"])
def test_streaming_ref_llama_matches_in_memory(case, tmp_path):
    if not REF_LLAMA.is_dir():
        pytest.skip(f"{REF_LLAMA} not present")
    cfg = QuantConfig(**{**CASES[case], "group_size": 128, "num_samples": 16, "seq_len": 256})
    assert_same_files(in_memory(REF_LLAMA, tmp_path / "a" / "out", cfg),
                      quantize_checkpoint(REF_LLAMA, tmp_path / "b" / "out", cfg))


def test_a_full_disk_is_a_clear_error_and_the_run_resumes(tmp_path, monkeypatch):
    cfg = QuantConfig(method="rtn", bits=4, group_size=32)
    save, calls = streaming._save_tensors, []

    def full_at_block_2(tensors, path):
        calls.append(path.name)
        if path.name == "block-00002.safetensors" and calls.count(path.name) == 1:
            raise OSError(28, "No space left on device")
        save(tensors, path)

    monkeypatch.setattr(streaming, "_save_tensors", full_at_block_2)
    dst = tmp_path / "out"
    with pytest.raises(streaming.NoSpace, match=r"no space left while writing block 2 .*resumes"):
        quantize_checkpoint(TINY_LLAMA, dst, cfg)
    assert not dst.exists() and _progress(dst) == 2
    quantize_checkpoint(TINY_LLAMA, dst, cfg)  # the same call resumes after block 1
    assert calls.count("block-00000.safetensors") == 1
    monkeypatch.setattr(streaming, "_save_tensors", save)
    assert_same_files(quantize_checkpoint(TINY_LLAMA, tmp_path / "again" / "out", cfg), dst)


def test_a_small_filesystem_for_the_output(tmp_path):
    """A real full disk: a 1 MiB tmpfs."""
    with small_tmpfs(tmp_path, "1m") as mnt:
        with pytest.raises(streaming.NoSpace, match="no space left"):
            quantize_checkpoint(TINY_LLAMA, mnt / "out", QuantConfig(method="rtn", bits=4, group_size=32))
        assert not (mnt / "out").exists()


def test_data_parallel_two_processes_give_the_one_process_checkpoint(tmp_path):
    """torchrun with 2 gloo processes: windows split, Hessians summed over ranks in fp64, layers spread and
    broadcast, rank 0 writes; with --hessian-dtype float64 the checkpoint is byte-identical to one process."""
    one, two, run = one_and_two_processes(tmp_path, "gptq")
    assert_same_files(one, two)
    assert len(run.stdout.strip().splitlines()) == 1  # one rank reports


def _nibbles(t: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of a packed int32 tensor."""
    return torch.stack([(t >> (4 * k)) & 15 for k in range(8)])


def test_data_parallel_awq_chooses_as_one_process(tmp_path):
    """AWQ's scale search under torchrun: each rank searches on its share of the run's reference windows, the
    observed activation means and the candidates' errors summed over ranks; the choices, and so the codes, are
    one process's (up to the order of the additions)."""
    from safetensors.torch import load_file

    one, two, _ = one_and_two_processes(tmp_path, "awq", port_offset=7)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert sorted(a) == sorted(b)
    same = total = 0
    for k in a:
        if k.endswith("qweight"):
            same += (_nibbles(a[k]) == _nibbles(b[k])).sum().item()
            total += _nibbles(a[k]).numel()
        else:  # scales, zeros, the folded norms: within float rounding of the summed statistics
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=2e-2, atol=1e-3, msg=k)
    assert same / total >= 0.999, f"{same / total:.5f} of the codes identical"


@pytest.mark.parametrize("per_step", [1, pytest.param(2, marks=pytest.mark.heavy)])
def test_data_parallel_omniquant_trains_as_one_process(tmp_path, per_step):
    """OmniQuant's clipping training under torchrun: each step's windows spread over the ranks, their gradients
    summed. One window per step: the owner's gradient alone, so the steps, and the checkpoint, are one process's
    bit for bit; two per step: each rank one window, summed in fp64 (the order of the addition differs)."""
    from safetensors.torch import load_file

    one, two, _ = one_and_two_processes(tmp_path, "omniquant", port_offset=13 + per_step,
                                        extra=["--epochs", "1", "--windows-per-step", str(per_step)])
    if per_step == 1:
        assert_same_files(one, two)
        return
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    same = total = 0
    for k in a:
        if k.endswith("qweight"):
            same += (_nibbles(a[k]) == _nibbles(b[k])).sum().item()
            total += _nibbles(a[k]).numel()
        else:
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=2e-2, atol=1e-3, msg=k)
    assert same / total >= 0.999, f"{same / total:.5f} of the codes identical"


def test_each_rank_takes_its_share_of_the_first_windows(monkeypatch):
    """Rank r holds windows r, r + N, ...: its share of the run's first n windows, for N = 1..5 and any n."""
    from hf_quant.calibration import distributed

    assert distributed.first_windows(16, 40) == 16 and distributed.first_windows(16, 5) == 5
    monkeypatch.setattr(distributed, "active", lambda: True)
    for world in range(2, 6):
        for total in (3, 16, 40):
            for n in (1, 7, 16):
                shares = []
                for r in range(world):
                    monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                    monkeypatch.setattr(distributed, "world", lambda w=world: w)
                    local = len(range(r, total, world))
                    shares.append(distributed.first_windows(n, local))
                    assert list(range(r, total, world))[:shares[-1]] == [w for w in range(r, total, world) if w < n]
                assert sum(shares) == min(n, total)


def test_data_parallel_refuses_a_stage_not_marked_data_parallel(monkeypatch, caplog):
    import dataclasses
    import logging

    from hf_quant.calibration import blockwise, distributed

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    for method in ("gptq", "awq", "omniquant", "omniquant+gptq"):  # every built-in stage sums over ranks
        blockwise.check_data_parallel(QuantConfig(method=method, windows_per_step=2) if "omni" in method
                                      else QuantConfig(method=method))
    with caplog.at_level(logging.WARNING, logger="hf_quant"):
        blockwise.check_data_parallel(QuantConfig(method="omniquant"))
    assert "windows_per_step=1 is not a multiple of the 2 processes" in caplog.text

    def my_stage(ctx):
        return {}

    real = blockwise.get_method
    monkeypatch.setattr(blockwise, "get_method", lambda name: dataclasses.replace(real(name), stage=my_stage))
    with pytest.raises(ValueError, match=r"method='gptq' has a block stage \(my_stage\) that is not data-parallel"):
        blockwise.check_data_parallel(QuantConfig(method="gptq"))


def test_fp64_hessian_sum_is_the_fp32_product_summed_in_fp64():
    from hf_quant.methods import accumulate_hessian

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(37, 2100, generator=g) for _ in range(3)]
    H32, H64 = torch.zeros(2100, 2100), torch.zeros(2100, 2100, dtype=torch.float64)
    for x in xs:
        accumulate_hessian(H32, x)
        accumulate_hessian(H64, x)
    exact = sum((x.double().t() @ x.double()) for x in xs)
    assert (H64 - exact).abs().max() <= (H32.double() - exact).abs().max()
    torch.testing.assert_close(H64.float(), H32, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="hessian_dtype='float16'"):
        QuantConfig(method="gptq", hessian_dtype="float16")


def test_calibration_runs_without_autograd(monkeypatch, tmp_path):
    """Parameters loaded from the shards require grad; calibrating them with autograd on kept a graph per layer
    (2.5 GB for a 4096x4096 layer) before quantize_checkpoint ran under no_grad."""
    seen = []
    calibrate = streaming.calibrate_block

    def spy(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(streaming, "calibrate_block", spy)
    quantize_checkpoint(TINY_LLAMA, tmp_path / "out", QuantConfig(**CASES["gptq"]))
    assert seen and not any(seen)


def test_compute_dtype_follows_the_cpu(monkeypatch):
    """calibration_dtype "auto": fp32 on an x86 CPU without native matrix instructions for the model's 16-bit
    dtype, the model's dtype otherwise (and on CUDA); "float32" / "model" choose; a bad value names the field."""
    from hf_quant.calibration import blockwise

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto, fp32, model = (QuantConfig(method="gptq", calibration_dtype=d) for d in ("auto", "float32", "model"))
    for flags, bf16_native in (({"avx2", "fma"}, False), ({"avx2", "avx512f", "avx512_bf16"}, True),
                               ({"avx2", "amx_bf16"}, True), (set(), True)):  # no flags read: keep the model's
        monkeypatch.setattr(blockwise, "cpu_flags", lambda f=frozenset(flags): f)
        assert blockwise.compute_dtype(auto, torch.bfloat16, cpu) == (torch.bfloat16 if bf16_native else torch.float32)
        assert blockwise.compute_dtype(model, torch.bfloat16, cpu) == torch.bfloat16
        assert blockwise.compute_dtype(fp32, torch.bfloat16, cpu) == torch.float32
        assert blockwise.compute_dtype(auto, torch.bfloat16, cuda) == torch.bfloat16
        assert blockwise.compute_dtype(auto, torch.float32, cpu) == torch.float32
    monkeypatch.setattr(blockwise, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert blockwise.compute_dtype(auto, torch.float16, cpu) == torch.float32  # bf16 native, fp16 not
    with pytest.raises(ValueError, match="QuantConfig.calibration_dtype='fp32' is not supported"):
        QuantConfig(method="gptq", calibration_dtype="fp32")
    assert "calibration_dtype" not in fp32.to_dict()  # how this run calibrates, not what is saved


@pytest.mark.parametrize("case", ["gptq", pytest.param("awq", marks=pytest.mark.heavy)])
def test_fp32_calibration_keeps_the_format_and_streams_like_in_memory(case, tmp_path):
    """A bf16 model calibrated in fp32: every saved tensor has the name, shape and dtype of a run in bf16
    (scales and float parts in bf16), the codes are nearly the same, and streaming writes the in-memory bytes."""
    from safetensors.torch import load_file

    cfg = QuantConfig(**CASES[case], calibration_dtype="float32")
    ref = in_memory(TINY_LLAMA, tmp_path / "a" / "out", cfg)
    got = quantize_checkpoint(TINY_LLAMA, tmp_path / "b" / "out", cfg)
    assert_same_files(ref, got)
    bf16 = in_memory(TINY_LLAMA, tmp_path / "c" / "out", QuantConfig(**CASES[case], calibration_dtype="model"))
    a, b = load_file(ref / "model.safetensors"), load_file(bf16 / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
    assert any(k.endswith(".scales") and a[k].dtype == torch.bfloat16 for k in a)
    words = [k for k in a if k.endswith(".qweight")]
    same = sum((a[k] == b[k]).sum().item() for k in words) / sum(a[k].numel() for k in words)
    assert same > 0.5, same  # a word holds 8 codes: any of them rounded the other way differs
