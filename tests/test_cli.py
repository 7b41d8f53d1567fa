"""The `hf-quant` command line, run in-process on the bundled tiny-llama (and once as a program)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant.cli import main

from .conftest import TINY_LLAMA
from .test_hub import REPO, FakeHub


def run(capsys, *argv: str) -> dict:
    main(["-q", *map(str, argv)])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cli_quantized(tmp_path_factory):
    """`hf-quant quantize` with --eval-baseline, once for the module (its stdout is returned)."""
    out = tmp_path_factory.mktemp("cli") / "q"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        main(["-q", "quantize", str(TINY_LLAMA), str(out), "--method", "gptq", "--bits", "4", "--group-size", "64",
              "--sym", "--num-samples", "4", "--seq-len", "64", "--eval-baseline", "--max-windows", "2"])
    return out, json.loads(buf.getvalue().strip().splitlines()[-1])


def test_quantize_saves_a_loadable_checkpoint_with_tokenizer_card_and_perplexity(cli_quantized):
    out, result = cli_quantized
    assert result["quantized_layers"] == 28 and result["saved"] == str(out)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "README.md", "tokenizer.json"}
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    qc = model.config.quantization_config
    assert (qc.method, qc.bits, qc.group_size, qc.sym) == ("gptq", 4, 64, True)
    ppl = hf_quant.eval.perplexity(model, tok, max_windows=2)
    assert result["perplexity"] == pytest.approx(ppl, abs=1e-4)  # what was recorded is what this model scores
    assert qc.provenance["evaluation"] == {"perplexity": result["perplexity"], "baseline": result["baseline_perplexity"],
                                           "text": "hf_quant's bundled held-out text, first 2 windows", "seq_len": 512}
    float_ppl = hf_quant.eval.perplexity(AutoModelForCausalLM.from_pretrained(TINY_LLAMA), tok, max_windows=2)
    assert result["baseline_perplexity"] == pytest.approx(float_ppl, abs=1e-4)
    card = (out / "README.md").read_text()
    assert f"Perplexity **{result['perplexity']:.3f}** (float model: {result['baseline_perplexity']:.3f})" in card
    assert f'from_pretrained("{out}"' in card


def test_eval_prints_and_records(cli_quantized, capsys, tmp_path):
    import shutil

    out, result = cli_quantized
    copy = tmp_path / "q"
    shutil.copytree(out, copy)
    res = run(capsys, "eval", copy, "--max-windows", "1", "--record")
    assert res["quantized_layers"] == 28 and res["recorded"] == str(copy)
    recorded = json.loads((copy / "config.json").read_text())["quantization_config"]["provenance"]["evaluation"]
    assert recorded["perplexity"] == res["perplexity"] and recorded["text"].endswith("first 1 windows")
    assert f"Perplexity **{res['perplexity']:.3f}**" in (copy / "README.md").read_text()
    (copy / "README.md").write_text("mine\n")  # a card a person wrote is left alone
    run(capsys, "eval", copy, "--max-windows", "1", "--record")
    assert (copy / "README.md").read_text() == "mine\n"
    with pytest.raises(SystemExit, match="--record writes into a local hf_quant checkpoint"):
        run(capsys, "eval", TINY_LLAMA, "--max-windows", "1", "--record")


def test_push_uploads_the_directory(cli_quantized, capsys, monkeypatch):
    out, _ = cli_quantized
    hub = FakeHub(monkeypatch)
    res = run(capsys, "push", out, REPO, "--private", "--commit-message", "first")
    assert res["pushed"] == REPO and hub.created == (REPO, {"private": True, "exist_ok": True})
    commit = hub.commits[0]
    assert commit["commit_message"] == "first"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(commit["added"])
    assert f'from_pretrained("{REPO}"' in commit["added"]["README.md"].decode()


@pytest.mark.parametrize("argv,match", [
    (["--bits", "5"], "QuantConfig.bits=5 is not supported"),
    (["--method", "nope"], "QuantConfig.method='nope' is unknown"),
    (["--dataset", "/nonexistent.txt"], "--dataset /nonexistent.txt: no such file"),
])
def test_bad_options_exit_with_the_library_message(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit, match=match):
        run(capsys, "quantize", TINY_LLAMA, tmp_path / "q", *argv)
    assert not (tmp_path / "q").exists()


def test_the_command_runs_as_a_program(tmp_path, capsys):
    from hf_quant.cli import main

    with pytest.raises(SystemExit) as done:
        main(["quantize", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    assert "--group-size" in help_text and "--push" in help_text and "--desc-act" in help_text
    res = subprocess.run([sys.executable, "-m", "hf_quant", "-q", "quantize", str(TINY_LLAMA), str(tmp_path / "q"),
                          "--method", "rtn", "--bits", "8", "--group-size", "-1"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["quantized_layers"] == 28
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert model.model.layers[0].mlp.up_proj.spec.bits == 8
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_gptq_export_and_import_commands_round_trip(cli_quantized, capsys, tmp_path):
    out, _ = cli_quantized
    res = run(capsys, "export-gptq", out, tmp_path / "gptq", "--checkpoint-format", "gptq_v2", "--dtype", "bfloat16")
    assert res == {"saved": str(tmp_path / "gptq"), "checkpoint_format": "gptq_v2"}
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"], qc["group_size"], qc["sym"]) == \
        ("gptq", "gptq_v2", 4, 64, True)
    assert (tmp_path / "gptq" / "tokenizer.json").exists()
    assert run(capsys, "import-gptq", tmp_path / "gptq", tmp_path / "back") == {"saved": str(tmp_path / "back")}
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "back")(ids).logits,
                           AutoModelForCausalLM.from_pretrained(out)(ids).logits)


def test_quantize_can_write_the_gptq_layout(capsys, tmp_path):
    res = run(capsys, "quantize", TINY_LLAMA, tmp_path / "g", "--method", "rtn", "--sym", "--format", "gptq")
    assert res["saved"] == str(tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq" and (tmp_path / "g" / "quantize_config.json").exists()
