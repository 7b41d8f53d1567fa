"""Sharing: atomic saves, the model card, push_to_hub (no HTTP: the commit is captured), loading from
a Hub cache offline, and malformed configs refused before any weight is read."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, scan_cache_dir
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils.sha import git_hash
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant.integrations.hub import CARD_MARKER

from .conftest import TINY_LLAMA

REPO = "hf-quant-tests/tiny-llama-w4"


@pytest.fixture(scope="module")
def quantized():
    config = hf_quant.QuantConfig(method="gptq", bits=4, group_size=64, sym=True, num_samples=4, seq_len=64)
    return AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=config)


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(3))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


class FakeHub:
    """Stands in for the Hub's HTTP API: records create_repo / create_commit, serves a file list."""

    def __init__(self, monkeypatch, remote_files=()):
        self.remote_files = list(remote_files)
        self.commits: list[dict] = []
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.created = (repo_id, kwargs)
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def list_repo_files(api, repo_id, **kwargs):
            return list(hub.remote_files)

        def create_commit(api, repo_id, operations, **kwargs):
            added, deleted = {}, []
            for op in operations:
                if isinstance(op, CommitOperationAdd):
                    src = op.path_or_fileobj
                    added[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, str) else bytes(src)
                elif isinstance(op, CommitOperationDelete):
                    deleted.append(op.path_in_repo)
            hub.commits.append({"repo_id": repo_id, "added": added, "deleted": deleted, **kwargs})
            return "commit-info"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)


def test_save_writes_a_model_card_and_reloads(quantized, tmp_path, ids):
    quantized.save_pretrained(tmp_path / "q")
    card = (tmp_path / "q" / "README.md").read_text()
    assert card.startswith("---\n") and CARD_MARKER in card
    for fact in ("| Method | GPTQ |", "| Bits | 4 |", "| Group size | 64 |", "symmetric", "| Base model | `tiny-llama` |",
                 "packaged public-domain text", "4 windows of 64 tokens", "pip install hf_quant", "import hf_quant",
                 "28 linear layers", "Unknown quantization type"):
        assert fact in card, fact
    assert "hf_quant" in card.split("---")[1] and "4-bit" in card.split("---")[1]  # tags in the YAML header
    prov = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["provenance"]
    assert prov == {"base_model": "tiny-llama", "calibration": prov["calibration"], "hf_quant_version": hf_quant.__version__}
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(logits(again, ids), logits(quantized, ids))
    assert again.config.quantization_config.provenance == prov
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary directory left beside it


def test_a_card_written_by_a_person_is_kept(quantized, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "README.md").write_text("my own card\n")
    quantized.save_pretrained(tmp_path / "q")
    assert (tmp_path / "q" / "README.md").read_text() == "my own card\n"


def test_failed_save_leaves_nothing_half_written(quantized, tmp_path, monkeypatch, ids):
    import transformers.modeling_utils as mu

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    quantized.save_pretrained(tmp_path / "old")
    before = tree(tmp_path / "old")
    monkeypatch.setattr(mu, "safe_save_file", failing_save)
    for target in ("old", "new"):
        with pytest.raises(OSError, match="disk full"):
            quantized.save_pretrained(tmp_path / target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no "new", no temporary directories
    assert tree(tmp_path / "old") == before
    monkeypatch.undo()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "old"), ids), logits(quantized, ids))


def test_resaving_removes_stale_shards(quantized, tmp_path, ids):
    quantized.save_pretrained(tmp_path / "q", max_shard_size="2MB")
    assert (tmp_path / "q" / "model.safetensors.index.json").exists()
    (tmp_path / "q" / "tokenizer.json").write_text("{}")
    quantized.save_pretrained(tmp_path / "q")
    names = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), ids), logits(quantized, ids))


def _check_pushed(commit: dict) -> None:
    added = commit["added"]
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md", "tokenizer.json",
            "tokenizer_config.json"} <= set(added)
    assert json.loads(added["config.json"])["quantization_config"]["quant_method"] == "hf_quant"
    card = added["README.md"].decode()
    assert f'from_pretrained("{REPO}"' in card and "import hf_quant" in card and "| Bits | 4 |" in card


@pytest.mark.parametrize("how", ["function", "method", "directory", "save_pretrained"])
def test_push_to_hub_sends_one_commit_with_weights_config_tokenizer_and_card(quantized, tmp_path, monkeypatch, how):
    stale = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    hub = FakeHub(monkeypatch, remote_files=["README.md", ".gitattributes", "notes/model-x.safetensors"] + stale)
    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)
    if how == "function":
        assert hf_quant.push_to_hub(quantized, REPO, tokenizer=tok, private=True) == "commit-info"
    elif how == "method":  # the model's own push_to_hub; the tokenizer comes from the source checkpoint
        quantized.push_to_hub(REPO, private=True, commit_message="w4")
        assert hub.commits[0]["commit_message"] == "w4"
    elif how == "directory":
        quantized.save_pretrained(tmp_path / "q")
        tok.save_pretrained(tmp_path / "q")
        hf_quant.push_to_hub(tmp_path / "q", REPO, private=True)
    else:  # transformers' save_pretrained(..., push_to_hub=True): saved locally, then the directory uploaded
        tok.save_pretrained(tmp_path / "q")
        quantized.save_pretrained(tmp_path / "q", push_to_hub=True, repo_id=REPO, private=True)
        assert (tmp_path / "q" / "model.safetensors").exists()
    assert hub.created == (REPO, {"private": True, "exist_ok": True})
    assert len(hub.commits) == 1 and hub.commits[0]["repo_id"] == REPO
    _check_pushed(hub.commits[0])
    assert sorted(hub.commits[0]["deleted"]) == stale  # old weights go; other files stay


def test_push_refuses_what_is_not_an_hf_quant_checkpoint(tmp_path, monkeypatch):
    FakeHub(monkeypatch)
    float_model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    with pytest.raises(ValueError, match="not an hf_quant model"):
        hf_quant.push_to_hub(float_model, REPO)
    float_model.save_pretrained(tmp_path / "f")
    with pytest.raises(ValueError, match="no hf_quant quantization_config"):
        hf_quant.push_to_hub(tmp_path / "f", REPO)


def _lay_out_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str) -> None:
    """The layout huggingface_hub's downloads produce: blobs named by etag (sha256 for LFS files,
    the git blob sha1 otherwise), snapshots/<commit>/ of relative symlinks, refs/main."""
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for path, data in files.items():
        etag = hashlib.sha256(data).hexdigest() if path.endswith(".safetensors") else git_hash(data)
        (repo / "blobs" / etag).write_bytes(data)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / etag, link.parent))


def test_pushed_model_loads_offline_from_the_hub_cache(quantized, tmp_path, monkeypatch, ids):
    hub = FakeHub(monkeypatch)
    hf_quant.push_to_hub(quantized, REPO, max_shard_size="2MB")  # shards + index: the loader's sharded path
    assert "model.safetensors.index.json" in hub.commits[0]["added"]
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    _lay_out_hub_cache(cache, REPO, hub.commits[0]["added"], commit)
    info = scan_cache_dir(cache)  # huggingface_hub's own reader of the cache accepts the layout
    assert not info.warnings and [r.repo_id for r in info.repos] == [REPO]
    cached = {f.file_name for r in info.repos for rev in r.revisions for f in rev.files}
    assert cached == set(hub.commits[0]["added"]) and "model-00002-of-00002.safetensors" in cached
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch, hf_quant\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({REPO!r})\n"
        f"tok = AutoTokenizer.from_pretrained({REPO!r})\n"
        "assert isinstance(m.model.layers[0].mlp.down_proj, hf_quant.QuantLinear)\n"
        "with torch.no_grad():\n"
        "    torch.save(m(torch.load(sys.argv[1])).logits, sys.argv[2])\n"
        "print('OK', m.name_or_path, len(tok))\n"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HOME", None)
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"OK {REPO}" in res.stdout
    assert torch.equal(torch.load(tmp_path / "out.pt"), logits(quantized, ids))


@pytest.mark.parametrize("field,value,match", [
    ("bits", -4, "bits=-4"),
    ("bits", "4", "bits='4'"),
    ("group_size", 1.5, "group_size=1.5"),
    ("sym", "yes", "sym='yes' must be True or False"),
    ("method", "awq-from-the-future", "method='awq-from-the-future' is unknown"),
    ("modules_to_not_convert", "lm_head", "modules_to_not_convert=.lm_head. must be a list"),
    ("dynamic", {"q_proj": {"bits": 5}}, r"dynamic\['q_proj'\]\['bits'\]=5"),
    ("dynamic", ["q_proj"], "dynamic must be a dict"),
    ("provenance", ["x"], "provenance=.'x'. must be None or a JSON object"),
    ("colour", "blue", r"unknown field\(s\) \['colour'\]"),
])
def test_malformed_quantization_config_fails_before_any_weight_is_read(quantized, tmp_path, field, value, match):
    quantized.save_pretrained(tmp_path / "q")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"][field] = value
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "q" / "model.safetensors").write_bytes(b"\x00" * 16)  # reading any weight would fail differently
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_pickle_checkpoints_are_never_loaded(quantized, tmp_path):
    quantized.save_pretrained(tmp_path / "q")
    (tmp_path / "q" / "model.safetensors").unlink()
    torch.save({}, tmp_path / "q" / "pytorch_model.bin")
    with pytest.raises((ValueError, OSError), match="safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
