"""Saves are transactions: a process killed (SIGKILL) at any step of a save over an existing
checkpoint leaves the old checkpoint or the new one, never a mix; `recover` (run by the next save)
removes what the dead process left beside it; directory modes follow the umask.

The crash tests run one subprocess. It loads checkpoint B once, then for every scenario and every N
forks a child that saves B over a fresh copy of checkpoint A and SIGKILLs itself on its N-th call to
os.rename / os.replace / shutil.rmtree / os.fsync / the directory exchange (and, in one scenario,
os.unlink / os.rmdir, i.e. half-way through a removal), until a child completes. The directory each
child left is checked here: every distinct state is loaded once, before and after `recover`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_quant
from hf_quant.io import atomic
from hf_quant.integrations.hub import CARD_MARKER
from hf_quant.io.atomic import atomic_directory, atomic_write_text, recover

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="os.fork, SIGKILL, /proc/self/fd")

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)

CRASH_SCRIPT = r'''
import json, os, shutil, signal, sys
from pathlib import Path

import torch
torch.set_num_threads(1)  # nothing multi-threaded before os.fork
import hf_quant
from hf_quant.io import atomic
from transformers import AutoModelForCausalLM

spec = json.loads(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(spec["new"])
root = Path(spec["root"])
COUNTED = [(os, "rename"), (os, "replace"), (os, "fsync"), (shutil, "rmtree"), (atomic, "_exchange")]
INSIDE_RMTREE = [(os, "unlink"), (os, "rmdir")]  # "deep" cases also die half-way through a removal


def save_and_die_at(n, case, work):
    calls = {"n": 0}

    def counted(real):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call

    if case["mode"] == "rename":
        atomic._exchange = lambda a, b: False  # as on a system without renameat2(RENAME_EXCHANGE)
    for mod, name in COUNTED + (INSIDE_RMTREE if case["deep"] else []):
        setattr(mod, name, counted(getattr(mod, name)))
    model.save_pretrained(work / "ckpt", **case["kwargs"])


results = []
for case in spec["cases"]:
    for n in range(1, 200):
        work = root / "work"  # the same path every time: the generated card names it
        shutil.copytree(case["old"], work / "ckpt", symlinks=True)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                save_and_die_at(n, case, work)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if not killed and os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{case['name']}: the save failed at n={n} (status {status})")
        dest = root / f"{case['name']}-{n:03d}"
        os.rename(work, dest)
        results.append({"case": case["name"], "mode": case["mode"], "n": n, "killed": killed, "dir": str(dest)})
        if not killed:
            break
print("RESULTS " + json.dumps(results))
'''


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def logits_of(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        return model(ids).logits


def leftovers(directory: Path) -> list[str]:
    """Temporary / backup names in `directory` and inside it."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if ".hf_quant-" in p.name)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A (single file; sharded, with a hand-written card) and B: two different tiny RTN checkpoints,
    each A with files of the user's own that a save over it must keep."""
    root = tmp_path_factory.mktemp("atomic")
    config = hf_quant.QuantConfig(method="rtn", bits=4, group_size=32)
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(**TINY)).to(torch.bfloat16).save_pretrained(root / f"float-{name}")
        model = AutoModelForCausalLM.from_pretrained(root / f"float-{name}", quantization_config=config)
        model.save_pretrained(root / name)
        if name == "a":
            model.save_pretrained(root / "a-sharded", max_shard_size="100KB")
    assert (root / "a-sharded" / "model.safetensors.index.json").exists()
    (root / "a-sharded" / "README.md").write_text("my own card\n")
    for name in ("a", "a-sharded"):
        (root / name / "tokenizer.json").write_text('{"kept": true}')
        (root / name / "extra").mkdir()
        (root / name / "extra" / "notes.txt").write_text("notes")
        out[name] = root / name
    out["b"] = root / "b"
    out["root"] = root
    return out


def _exchange_works(tmp_path: Path) -> bool:
    (tmp_path / "x1").mkdir()
    (tmp_path / "x2").mkdir()
    (tmp_path / "x1" / "f").write_text("")
    ok = atomic._exchange(tmp_path / "x1", tmp_path / "x2")
    shutil.rmtree(tmp_path / "x1")
    shutil.rmtree(tmp_path / "x2")
    return ok


def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(checkpoints, tmp_path):
    modes = ["rename"] + (["exchange"] if _exchange_works(tmp_path) else [])
    scenarios = {"single-over-single": ("a", {}), "sharded-over-single": ("a", {"max_shard_size": "100KB"}),
                 "single-over-sharded": ("a-sharded", {})}
    cases = [{"name": f"{name}-{mode}", "mode": mode, "old": str(checkpoints[old]), "kwargs": kwargs,
              "deep": name == "single-over-single" and mode == modes[-1]}
             for mode in modes for name, (old, kwargs) in scenarios.items()]
    root = tmp_path / "runs"
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    spec = {"new": str(checkpoints["b"]), "root": str(root), "cases": cases}
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])

    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    reference = {"old": logits_of(checkpoints["a"], ids), "new": logits_of(checkpoints["b"], ids)}
    loaded: dict[int, torch.Tensor] = {}

    def load(ckpt: Path, state: dict[str, bytes]) -> torch.Tensor:
        """The logits of `ckpt` (in `state`), loaded once per distinct state: loading is deterministic."""
        key = hash(tuple(sorted(state.items())))
        if key not in loaded:
            loaded[key] = logits_of(ckpt, ids)
        return loaded[key]

    assert not torch.equal(reference["old"], reference["new"])
    assert torch.equal(logits_of(checkpoints["a-sharded"], ids), reference["old"])
    final = {r["case"]: Path(r["dir"]) / "ckpt" for r in results if not r["killed"]}
    assert sorted(final) == sorted(c["name"] for c in cases)

    for case in cases:
        runs = [r for r in results if r["case"] == case["name"]]
        assert len(runs) > 5 and all(r["killed"] for r in runs[:-1])
        old = tree(Path(case["old"]))
        new_dir = final[case["name"]]
        assert leftovers(new_dir.parent) == []  # the completed save left nothing beside or inside it
        new = tree(new_dir)
        # The new checkpoint keeps the user's files and none of the old weight files.
        assert new["tokenizer.json"] == old["tokenizer.json"] and new["extra/notes.txt"] == b"notes"
        if case["old"].endswith("sharded"):
            assert new["README.md"] == b"my own card\n"
        else:
            assert CARD_MARKER in new["README.md"].decode()  # the generated card is regenerated
        weights = sorted(k for k in new if k.startswith("model"))
        if "max_shard_size" in case["kwargs"]:
            assert weights == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                               "model.safetensors.index.json"]
        else:
            assert weights == ["model.safetensors"]
        outcomes, target_was_missing = [], 0
        for r in runs:
            ckpt = Path(r["dir"]) / "ckpt"
            # A load straight after the crash, before anything is recovered.
            if ckpt.exists():
                state = tree(ckpt)
                assert state in (old, new), (r, sorted(state))
                assert torch.equal(load(ckpt, state), reference["old" if state == old else "new"]), r
            else:  # only between the two renames of the fallback; the backup is there to restore
                assert case["mode"] == "rename", r
                assert any(".hf_quant-bak-" in p.name for p in ckpt.parent.iterdir()), r
                target_was_missing += 1
            recover(ckpt)
            assert leftovers(ckpt.parent) == [], r
            state = tree(ckpt)
            assert state in (old, new), (r, sorted(state))
            outcome = "old" if state == old else "new"
            assert torch.equal(load(ckpt, state), reference[outcome]), r
            outcomes.append(outcome)
        # Old until the commit, new from then on: every step of the save was crossed.
        k = outcomes.index("new")
        assert outcomes[:k] == ["old"] * k and outcomes[k:] == ["new"] * (len(outcomes) - k) and k >= 3, outcomes
        if case["mode"] == "rename":
            assert target_was_missing == 1, case["name"]


def test_the_next_save_removes_leftovers_of_dead_processes_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        target = tmp_path / "ckpt"
        with atomic_directory(target) as d:
            (d / "model.safetensors").write_bytes(b"old")
            (d / "config.json").write_text("{}")
        stale = [tmp_path / f".ckpt.hf_quant-tmp-{dead.pid}-abc_1234", tmp_path / f".ckpt.hf_quant-bak-{dead.pid}-0f1e2d3c"]
        for p in stale:
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"x" * 1000)
        (target / f".config.json.hf_quant-tmp-{dead.pid}-zz9").write_text("half")
        kept = [tmp_path / f".ckpt.hf_quant-tmp-{live.pid}-def45678",  # a concurrent save, still running
                tmp_path / f".other.hf_quant-tmp-{dead.pid}-q1w2e3r4"]  # another target's
        for p in kept:
            p.mkdir()
        with atomic_directory(target) as d:
            (d / "model.safetensors").write_bytes(b"new")
            (d / "config.json").write_text("{}")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", *(p.name for p in kept)])
        assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
        assert (target / "model.safetensors").read_bytes() == b"new"
    finally:
        live.kill()
        live.wait()


def test_recover_puts_a_moved_aside_checkpoint_back(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    backup = tmp_path / f".ckpt.hf_quant-bak-{dead.pid}-a1b2c3d4"
    backup.mkdir()
    (backup / "model.safetensors").write_bytes(b"old")
    half = tmp_path / f".ckpt.hf_quant-tmp-{dead.pid}-e5f6g7h8"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"new")
    recover(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == b"old"
    recover(tmp_path / "ckpt")  # idempotent
    assert tree(tmp_path / "ckpt") == {"model.safetensors": b"old"}


def test_a_backup_of_a_live_save_is_left_alone(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        backup = tmp_path / f".ckpt.hf_quant-bak-{live.pid}-a1b2c3d4"
        backup.mkdir()
        recover(tmp_path / "ckpt")
        assert sorted(p.name for p in tmp_path.iterdir()) == [backup.name]
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_new_directories_and_files_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    old_umask = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "ckpt") as d:
            (d / "config.json").write_text("{}")
        atomic_write_text(tmp_path / "ckpt" / "README.md", "card")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "ckpt").stat().st_mode & 0o7777 == dir_mode
    assert (tmp_path / "ckpt" / "config.json").stat().st_mode & 0o7777 == file_mode
    assert (tmp_path / "ckpt" / "README.md").stat().st_mode & 0o7777 == file_mode


def test_a_replaced_directory_and_a_rewritten_file_keep_their_modes(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as d:
        (d / "config.json").write_text("{}")
    os.chmod(target, 0o700)
    os.chmod(target / "config.json", 0o600)
    atomic_write_text(target / "config.json", '{"a": 1}')
    with atomic_directory(target) as d:
        (d / "model.safetensors").write_bytes(b"w")
    assert target.stat().st_mode & 0o7777 == 0o700
    assert (target / "config.json").stat().st_mode & 0o7777 == 0o600  # carried over, not rewritten
    assert (target / "config.json").read_text() == '{"a": 1}'


def test_a_failing_save_leaves_the_old_checkpoint_byte_identical(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as d:
        (d / "model.safetensors").write_bytes(b"old")
        (d / "config.json").write_text("{}")
    (target / "tokenizer.json").write_text("tok")
    before, inode = tree(target), target.stat().st_ino
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(target) as d:
            (d / "model.safetensors").write_bytes(b"new")
            raise OSError("disk full")
    assert tree(target) == before and target.stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_write_text_fsyncs_and_is_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text("old")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert any(".config.json.hf_quant-tmp-" in s for s in synced) and str(tmp_path) in synced  # the data, then the directory

    def failing_replace(src, dst):
        raise OSError("no space")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="no space"):
        atomic_write_text(path, "newer")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
