"""Behaviour is pinned by golden checkpoints written before the architecture step
(`tests/make_golden.py`): quantizing again must give byte-identical safetensors, and loading the
golden files must give bit-identical logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import make_golden as golden


@pytest.mark.parametrize("case", list(golden.CASES))
def test_golden_checkpoint_loads_to_identical_logits(case):
    path = golden.GOLDEN / case
    expected = load_file(str(path / "logits.safetensors"))["logits"]
    assert torch.equal(golden.logits_of(path), expected)


@pytest.mark.parametrize("case", list(golden.CASES))
def test_quantizing_again_writes_identical_bytes(case, tmp_path):
    golden.quantize_case(case, tmp_path / case)
    for name in ("model.safetensors",):
        assert (tmp_path / case / name).read_bytes() == (golden.GOLDEN / case / name).read_bytes(), name
    ours = json.loads((tmp_path / case / "config.json").read_text())
    theirs = json.loads((golden.GOLDEN / case / "config.json").read_text())
    assert ours["quantization_config"] == theirs["quantization_config"]
