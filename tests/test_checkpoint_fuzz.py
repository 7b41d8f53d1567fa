"""Property: a tiny hf_quant checkpoint with a mutated config field, safetensors header or shard index
either fails to load with a documented error (ValueError / OSError from hf_quant or transformers,
safetensors' SafetensorError, torch's RuntimeError on a size mismatch) or loads to logits
`torch.equal` to the original's. It never hangs, never gives NaN, never silently gives other numbers."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

import hf_quant

from .conftest import save_random_model

DOCUMENTED = (ValueError, OSError, RuntimeError, SafetensorError)
IDS = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    float_dir = save_random_model(root / "float", "llama", dtype=torch.float32, num_hidden_layers=1)
    cfg = hf_quant.QuantConfig(method="rtn", bits=4, group_size=32)
    AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg).save_pretrained(
        root / "q", max_shard_size="200KB")
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(root / "q")(input_ids=IDS).logits
    return root / "q", logits


CONFIG_EDITS = st.sampled_from([
    ("bits", 8), ("bits", 2), ("bits", 5), ("group_size", 64), ("group_size", -1), ("group_size", 100),
    ("sym", True), ("desc_act", True), ("static_groups", True), ("method", "gptq"), ("method", "nope"),
    ("format_version", 99), ("format_version", "2"), ("modules_to_not_convert", ["model.layers.0.mlp.up_proj"]),
    ("modules_to_not_convert", "lm_head"), ("dynamic", {"^(.+)+!": {"bits": 8}}), ("dynamic", {"up_proj": {"bits": 8}}),
    ("dynamic", {"-:down_proj": {}}), ("dynamic", {"(": {}}), ("dynamic", [1]), ("on_incompatible", "skip"),
    ("provenance", 3), ("bogus", 1),  # (quant_method "gptq" hands the checkpoint to transformers' GPTQ loader)
])


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header = edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def _header_edit(kind: str, pick: int):
    def edit(header):
        keys = sorted(k for k in header if k != "__metadata__")
        key = keys[pick % len(keys)]
        if kind == "drop":
            del header[key]
        elif kind == "shape":
            header[key]["shape"] = [d + 1 for d in header[key]["shape"]]
        elif kind == "dtype":
            header[key]["dtype"] = {"U8": "I8", "F32": "F16", "I32": "I64"}.get(header[key]["dtype"], "U8")
        elif kind == "offsets":
            header[key]["data_offsets"] = [0, 10**12]
        elif kind == "list":
            return [header]
        elif kind == "rename":
            header[key.replace("qweight", "qzeros").replace("weight", "bias") + "x"] = header.pop(key)
        return header
    return edit


MUTATIONS = st.one_of(
    st.tuples(st.just("config"), CONFIG_EDITS),
    st.tuples(st.just("header"), st.tuples(st.sampled_from(["drop", "shape", "dtype", "offsets", "list", "rename"]),
                                           st.integers(0, 1000), st.integers(0, 10))),
    st.tuples(st.just("index"), st.tuples(st.sampled_from(["escape", "missing", "notjson", "swap"]),
                                          st.integers(0, 1000))),
)


def _mutate(path: Path, mutation) -> None:
    kind, arg = mutation
    if kind == "config":
        cfg = json.loads((path / "config.json").read_text())
        field, value = arg
        cfg["quantization_config"][field] = value
        (path / "config.json").write_text(json.dumps(cfg))
    elif kind == "header":
        what, pick, shard = arg
        shards = sorted(path.glob("*.safetensors"))
        _rewrite_header(shards[shard % len(shards)], _header_edit(what, pick))
    else:
        what, pick = arg
        index_path = path / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        keys = sorted(index["weight_map"])
        key = keys[pick % len(keys)]
        if what == "escape":
            index["weight_map"][key] = "../" + index["weight_map"][key]
        elif what == "missing":
            index["weight_map"][key] = "model-00099-of-00099.safetensors"
        elif what == "swap":
            other = keys[(pick + 1) % len(keys)]
            index["weight_map"][key], index["weight_map"][other] = index["weight_map"][other], index["weight_map"][key]
        index_path.write_text("{not json" if what == "notjson" else json.dumps(index))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=MUTATIONS)
def test_mutated_checkpoints_fail_clearly_or_load_exactly(original, tmp_path_factory, mutation):
    src, expected = original
    path = tmp_path_factory.mktemp("m") / "q"
    shutil.copytree(src, path)
    _mutate(path, mutation)
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            logits = model(input_ids=IDS).logits
    except DOCUMENTED:
        return
    assert not torch.isnan(logits).any(), mutation
    assert torch.equal(logits, expected), mutation
