"""The `hf-quant` command line, run in-process on the bundled tiny-llama (and once as a program)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant.cli import main
from hf_quant.integrations.hub import model_card

from .conftest import TINY_LLAMA
from .test_hub import REPO, FakeHub


def run(capsys, *argv: str) -> dict:
    main(["-q", *map(str, argv)])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def refused(capsys, *argv: str) -> str:
    """Run a command line that must be refused; return its one stderr line (checked: exit status 2,
    `hf-quant COMMAND: ...`, nothing on stdout)."""
    with pytest.raises(SystemExit) as done:
        main(["-q", *map(str, argv)])
    captured = capsys.readouterr()
    assert done.value.code == 2, captured.err
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0] == str(done.value), captured.err
    assert lines[0].startswith(f"hf-quant {argv[0]}: "), lines[0]
    return lines[0]


@pytest.fixture()
def no_loading(monkeypatch):
    """Loading a model or tokenizer fails the test: the checks must come first."""
    def load(cls, *args, **kwargs):
        raise AssertionError(f"loaded {args} before the command line was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(load))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(load))
    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(load))  # which model class: read before loading


@pytest.fixture()
def logged_in(monkeypatch):
    """A Hub login that works (no network): a token, and whoami accepting it as a write token."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    whoami = {"name": "tester", "auth": {"accessToken": {"role": "write"}}}
    monkeypatch.setattr(HfApi, "whoami", lambda api, token=None, **kw: whoami)
    return whoami


@pytest.fixture()
def src(tmp_path):
    """A float checkpoint the test may write beside: a copy of tiny-llama."""
    return shutil.copytree(TINY_LLAMA, tmp_path / "src")


def tree(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


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
    assert 'from_pretrained("q"' in card and str(out) not in card  # the directory's name, not its local path


def test_eval_prints_and_records(cli_quantized, capsys, tmp_path):
    import shutil

    out, result = cli_quantized
    copy = tmp_path / "q"
    shutil.copytree(out, copy)
    res = run(capsys, "eval", copy, "--max-windows", "1", "--record")
    assert res["quantized_layers"] == 28 and res["recorded"] == str(copy)
    recorded = json.loads((copy / "config.json").read_text())["quantization_config"]["provenance"]["evaluation"]
    assert recorded["perplexity"] == res["perplexity"] and recorded["text"].endswith("first 1 windows")
    card = (copy / "README.md").read_text()
    assert f"Perplexity **{res['perplexity']:.3f}**" in card
    assert 'from_pretrained("q"' in card and str(copy) not in card  # never the local path
    (copy / "README.md").write_text("mine\n")  # a card a person wrote is left alone
    run(capsys, "eval", copy, "--max-windows", "1", "--record")
    assert (copy / "README.md").read_text() == "mine\n"


def test_eval_record_refuses_a_float_checkpoint_before_loading(capsys, no_loading):
    line = refused(capsys, "eval", TINY_LLAMA, "--max-windows", "1", "--record")
    assert line.startswith("hf-quant eval: --record: ") and "not a local hf_quant checkpoint directory" in line


def test_push_uploads_the_directory(cli_quantized, capsys, monkeypatch, logged_in):
    out, _ = cli_quantized
    hub = FakeHub(monkeypatch)
    res = run(capsys, "push", out, REPO, "--private", "--commit-message", "first")
    assert res["pushed"] == REPO and hub.created == (REPO, {"private": True, "exist_ok": True})
    commit = hub.commits[0]
    assert commit["commit_message"] == "first"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(commit["added"])
    assert f'from_pretrained("{REPO}"' in commit["added"]["README.md"].decode()


@pytest.mark.parametrize("argv,start", [
    (["--bits", "5"], "--bits: QuantConfig.bits=5 is not supported; use one of"),
    (["--group-size", "0"], "--group-size: QuantConfig.group_size=0 is not supported; use -1"),
    (["--method", "nope"], "--method: QuantConfig.method='nope' is unknown"),
    (["--dataset", "/nonexistent.txt"], "--dataset /nonexistent.txt: no such file"),
    (["--eval-seq-len", "0"], "--eval-seq-len/--seq-len-eval: 0 is out of range; give a positive integer"),
    (["--max-windows", "0"], "--max-windows: 0 is out of range; give a positive integer"),
    (["--num-samples", "0"], "--num-samples: 0 is out of range"),
    (["--seq-len", "-4"], "--seq-len: -4 is out of range"),
    (["--num-samples", "many"], "--num-samples: 'many' is not an integer"),
    (["--device", "gpu0"], "--device: 'gpu0' is not a device; use e.g. cpu, cuda or cuda:0"),
])
def test_bad_options_exit_with_one_line_naming_the_option(tmp_path, capsys, no_loading, argv, start):
    line = refused(capsys, "quantize", TINY_LLAMA, tmp_path / "q", *argv)
    assert line.startswith("hf-quant quantize: " + start), line
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("argv,start", [
    (["eval", "M", "--eval-seq-len", "0"], "hf-quant eval: --eval-seq-len/--seq-len-eval: 0 is out of range"),
    (["eval", "M", "--max-windows", "0"], "hf-quant eval: --max-windows: 0 is out of range"),
])
def test_eval_ranges_are_checked(capsys, no_loading, argv, start):
    argv = [str(TINY_LLAMA) if a == "M" else a for a in argv]
    assert refused(capsys, *argv).startswith(start)


def _no_cuda(monkeypatch, count=0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("command", ["quantize", "eval", "export-gptq", "calibration"])
def test_a_device_this_machine_lacks_is_refused_before_loading(tmp_path, capsys, monkeypatch, no_loading, command):
    argv = {"quantize": ["quantize", TINY_LLAMA, tmp_path / "q", "--device"],
            "calibration": ["quantize", TINY_LLAMA, tmp_path / "q", "--calibration-device"],
            "eval": ["eval", TINY_LLAMA, "--device"],
            "export-gptq": ["export-gptq", TINY_LLAMA, tmp_path / "q", "--device"]}[command]
    option = argv[-1]
    _no_cuda(monkeypatch)
    line = refused(capsys, *argv, "cuda")
    assert f": {option}: cuda is not available: torch sees no cuda device on this machine; use cpu" in line
    _no_cuda(monkeypatch, count=1)
    line = refused(capsys, *argv, "cuda:3")
    assert line.endswith(f"{option}: cuda:3 does not exist: this machine has cuda:0; use one of them")


def test_missing_paths_and_files_are_named_in_one_line(tmp_path, capsys, monkeypatch, no_loading, src):
    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"\x80\x04not a checkpoint")  # once: an UnpicklingError traceback
    monkeypatch.chdir(tmp_path)
    for missing in ("./nope", str(tmp_path / "nope"), "models/llama/7b", "~/hf-quant-no-such-dir"):
        line = refused(capsys, "quantize", missing, tmp_path / "q")
        assert line.startswith("hf-quant quantize: MODEL ") and line.endswith(
            ": no such directory; give a local checkpoint directory, or a Hub repo id as org/name"), line
    assert refused(capsys, "eval", afile) == (f"hf-quant eval: MODEL {afile}: is a file, not a checkpoint directory; "
                                              "give the directory that holds config.json")
    assert "MODEL weights.bin: is a file" in refused(capsys, "export-gptq", "weights.bin", "x")
    assert "SRC ./nope: no such directory" in refused(capsys, "import-gptq", "./nope", "x")
    assert refused(capsys, "eval", tmp_path).endswith(": has no config.json; give a transformers checkpoint "
                                                      "directory (as written by save_pretrained)")
    assert "not a valid Hub repo id" in refused(capsys, "eval", "not a repo!")
    assert refused(capsys, "push", "./nope", REPO) == ("hf-quant push: DIRECTORY ./nope: no such directory; give "
                                                       "the directory the checkpoint was saved to")
    assert "DIRECTORY weights.bin: is a file" in refused(capsys, "push", "weights.bin", REPO)
    assert "is not an hf_quant checkpoint" in refused(capsys, "push", src, REPO)
    assert "--dataset missing.txt: no such file" in refused(capsys, "quantize", src, "q", "--dataset", "missing.txt")
    assert "--eval-text src: is not a file" in refused(capsys, "eval", src, "--eval-text", "src")
    assert not (tmp_path / "q").exists() and not (tmp_path / "x").exists()


def test_a_hub_repo_id_is_not_taken_for_a_path(tmp_path, capsys, monkeypatch):
    def load(cls, name, *args, **kwargs):
        raise OSError(f"{name} is not a local folder and is not a valid model identifier\nsecond line")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(load))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(load))
    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(load))
    assert refused(capsys, "eval", "org/no-such-model") == (
        "hf-quant eval: MODEL org/no-such-model: could not be loaded (OSError: org/no-such-model is not a local "
        "folder and is not a valid model identifier)")
    assert "MODEL org/name: could not be loaded" in refused(capsys, "quantize", "org/name", tmp_path / "q")


def test_the_output_never_touches_the_source(tmp_path, capsys, no_loading, src):
    before = tree(src)
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    cases = [
        (["quantize", src, src], f"OUT {src}: is the source checkpoint {src}; write to another directory"),
        (["quantize", src, src, "--overwrite"], "is the source checkpoint"),
        (["quantize", link, src], "is the source checkpoint"),  # symlinks resolved
        (["quantize", src, link / ".", "--overwrite"], "is the source checkpoint"),
        (["quantize", src, src / "q"], f"OUT {src / 'q'}: is inside the source checkpoint {src}; write outside it"),
        (["quantize", src, link / "sub" / "q"], "is inside the source checkpoint"),
        (["quantize", src, tmp_path, "--overwrite"], f"OUT {tmp_path}: contains the source checkpoint {src}"),
        (["export-gptq", src, src / "gptq"], "is inside the source checkpoint"),
        (["import-gptq", src, src, "--overwrite"], "is the source checkpoint"),
        (["import-gptq", link, tmp_path], "contains the source checkpoint"),
    ]
    for argv, expected in cases:
        assert expected in refused(capsys, *argv)
    assert tree(src) == before and not (src / "q").exists() and not (src / "gptq").exists()


def test_an_existing_output_needs_overwrite_and_a_file_is_refused(tmp_path, capsys, no_loading, src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"the user's shard")
    for command in ("quantize", "export-gptq", "import-gptq"):
        assert refused(capsys, command, src, out) == (
            f"hf-quant {command}: OUT {out}: already exists and is not empty; pass --overwrite to replace the "
            "checkpoint in it, or choose a new directory")
    assert (out / "model-00001-of-00002.safetensors").read_bytes() == b"the user's shard"
    (tmp_path / "empty").mkdir()  # an empty directory is not in the way: the check passes, loading starts
    with pytest.raises(AssertionError, match="before the command line was checked"):
        main(["-q", "quantize", str(src), str(tmp_path / "empty")])
    (tmp_path / "file").write_text("mine\n")
    assert refused(capsys, "quantize", src, tmp_path / "file", "--overwrite") == (
        f"hf-quant quantize: OUT {tmp_path / 'file'}: is a file; give a directory to write the checkpoint into")
    assert "is a file; choose another path" in refused(capsys, "import-gptq", src, tmp_path / "file" / "sub")
    assert (tmp_path / "file").read_text() == "mine\n"


def test_overwrite_replaces_the_checkpoint_and_the_card_never_names_the_local_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "some" / "dir" / "tl-w4"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine\n")
    res = run(capsys, "quantize", TINY_LLAMA, "some/dir/tl-w4", "--method", "rtn", "--bits", "8", "--overwrite")
    assert res["saved"] == "some/dir/tl-w4" and (out / "notes.txt").read_text() == "mine\n"
    card = (out / "README.md").read_text()
    assert 'from_pretrained("tl-w4"' in card and "\n# tl-w4: 8-bit RTN" in card
    assert "some/dir" not in card and str(tmp_path) not in card
    assert AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.up_proj.spec.bits == 8


def test_model_card_names_a_hub_repo_or_the_directory_only(cli_quantized):
    out, _ = cli_quantized
    for name in (str(out), out, f"{out}/", None):
        card = str(model_card(out, name))
        assert 'from_pretrained("q"' in card and "\n# q: 4-bit GPTQ" in card and str(out) not in card
    assert f'from_pretrained("{REPO}"' in str(model_card(out, REPO))


def _http_error(status: int) -> HfHubHTTPError:
    return HfHubHTTPError(f"HTTP {status}", response=SimpleNamespace(status_code=status, headers={}, request=None))


def _raise(error):
    def whoami(api, token=None, **kwargs):
        raise error
    return whoami


HUB_FAILURES = {
    "offline": ("offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); unset it to upload",
                lambda mp: mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)),
    "offline-error": ("offline mode is on",
                      lambda mp: mp.setattr(HfApi, "whoami", _raise(OfflineModeIsEnabled("offline")))),
    "no-token": ("no Hugging Face token; run `hf auth login` or set HF_TOKEN",
                 lambda mp: mp.setattr(huggingface_hub, "get_token", lambda: None)),
    "bad-token": ("the Hugging Face token was refused (invalid or expired); run `hf auth login --force` or set "
                  "HF_TOKEN", lambda mp: mp.setattr(HfApi, "whoami", _raise(_http_error(401)))),
    "read-only": ("the Hugging Face token is read-only",
                  lambda mp: mp.setattr(HfApi, "whoami", lambda api, token=None, **kw: {
                      "auth": {"accessToken": {"role": "read"}}})),
    "no-network": ("cannot reach the Hugging Face Hub (ConnectionError: [Errno -3] name resolution failed); "
                   "check the network", lambda mp: mp.setattr(HfApi, "whoami", _raise(ConnectionError(
                       "[Errno -3] name resolution failed\nmore")))),
    "hub-down": ("the Hub answered HTTP 503 when checking the token; retry later",
                 lambda mp: mp.setattr(HfApi, "whoami", _raise(_http_error(503)))),
}


@pytest.mark.parametrize("failure", HUB_FAILURES)
def test_push_checks_the_token_and_the_connection_first(tmp_path, capsys, monkeypatch, no_loading, logged_in,
                                                        failure):
    message, breaks = HUB_FAILURES[failure]
    breaks(monkeypatch)
    hub = FakeHub(monkeypatch)
    line = refused(capsys, "quantize", TINY_LLAMA, tmp_path / "q", "--push", REPO)  # no_loading: before quantizing
    assert line.startswith(f"hf-quant quantize: --push {REPO}: ") and message in line, line
    saved = tmp_path / "saved"  # `hf-quant push` of a saved checkpoint: refused before anything is sent
    saved.mkdir()
    (saved / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "hf_quant"}}))
    line = refused(capsys, "push", saved, REPO)
    assert line.startswith(f"hf-quant push: REPO_ID {REPO}: ") and message in line, line
    assert hub.commits == [] and not hasattr(hub, "created") and not (tmp_path / "q").exists()


def test_quantize_and_push_names_the_repo_in_the_card(tmp_path, capsys, monkeypatch, logged_in):
    hub = FakeHub(monkeypatch)
    res = run(capsys, "quantize", TINY_LLAMA, tmp_path / "q", "--method", "rtn", "--bits", "8", "--push", REPO)
    assert res["pushed"] == REPO and len(hub.commits) == 1
    for card in ((tmp_path / "q" / "README.md").read_text(), hub.commits[0]["added"]["README.md"].decode()):
        assert f'from_pretrained("{REPO}"' in card and str(tmp_path) not in card


def test_a_failed_upload_is_one_line_and_keeps_the_saved_checkpoint(cli_quantized, capsys, monkeypatch, logged_in):
    out, _ = cli_quantized
    FakeHub(monkeypatch)
    monkeypatch.setattr(HfApi, "create_commit", lambda api, *a, **kw: (_ for _ in ()).throw(_http_error(500)))
    line = refused(capsys, "push", out, REPO)
    assert line == (f"hf-quant push: REPO_ID {REPO}: the upload failed (HfHubHTTPError: HTTP 500); {out} is complete: "
                    f"retry with `hf-quant push {out} {REPO}`")


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
    # A refused command line, as a program: one line on stderr, exit status 2, no traceback.
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04not a checkpoint")  # once: an UnpicklingError traceback
    res = subprocess.run([sys.executable, "-m", "hf_quant", "quantize", str(tmp_path / "weights.bin"),
                          str(tmp_path / "q2")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == (f"hf-quant quantize: MODEL {tmp_path / 'weights.bin'}: is a file, not a checkpoint "
                          "directory; give the directory that holds config.json\n")


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


def test_gguf_commands_round_trip(tmp_path, capsys):
    """quantize --gguf, export-gguf, import-gguf (with the tokenizer transformers builds from the file), and
    export-gguf again: the linear tensors come back byte for byte."""
    gguf = pytest.importorskip("gguf")
    q = tmp_path / "q"
    assert run(capsys, "quantize", TINY_LLAMA, q, "--method", "rtn", "--gguf", "Q4_K")["quantized_layers"] == 28
    first = tmp_path / "a.gguf"
    assert run(capsys, "export-gguf", q, first)["format"] == "gguf"
    assert "exists; pass --overwrite" in refused(capsys, "export-gguf", q, first)
    assert "is a directory" in refused(capsys, "export-gguf", q, tmp_path)
    assert "is not a file" in refused(capsys, "import-gguf", tmp_path / "none.gguf", tmp_path / "x")
    back = tmp_path / "imported"
    assert run(capsys, "import-gguf", first, back)["tokenizer"] is True
    assert AutoTokenizer.from_pretrained(back)("Hello world").input_ids == AutoTokenizer.from_pretrained(TINY_LLAMA)(
        "Hello world").input_ids
    second = tmp_path / "b.gguf"
    run(capsys, "export-gguf", back, second)
    a, b = gguf.GGUFReader(first), gguf.GGUFReader(second)
    assert [(t.name, t.tensor_type) for t in a.tensors] == [(t.name, t.tensor_type) for t in b.tensors]
    assert all(bytes(x.data) == bytes(y.data) for x, y in zip(a.tensors, b.tensors))
    assert (run(capsys, "quantize", TINY_LLAMA, tmp_path / "dir", "--method", "rtn", "--gguf", "Q8_0", "--format",
                "gguf")["saved"]) and (tmp_path / "dir" / "model.gguf").is_file()
