"""`hf-quant`: quantize, evaluate, share and convert models from the command line.

    hf-quant quantize MODEL OUT --method gptq --bits 4 --group-size 128 [--eval] [--push org/name]
                                (methods and their options: hf-quant quantize --help)
    hf-quant eval MODEL [--text FILE] [--record]
    hf-quant push DIR org/name [--private]
    hf-quant export-gptq MODEL OUT          # to the GPTQ checkpoint layout vLLM / TGI / GPTQModel load
    hf-quant import-gptq SRC OUT            # a GPTQ checkpoint (directory or Hub repo) to hf_quant
    hf-quant export-bnb8 MODEL OUT          # an llm_int8 / w8a8 model to bitsandbytes' load_in_8bit layout
    hf-quant import-bnb8 SRC OUT            # a bitsandbytes load_in_8bit checkpoint to hf_quant llm_int8
    hf-quant export-bitnet MODEL OUT        # a bitnet model to transformers' BitNet layout (BitLinear, offline)
    hf-quant import-bitnet SRC OUT          # a transformers BitNet offline checkpoint to hf_quant bitnet
    hf-quant export-gguf MODEL OUT.gguf     # one GGUF file for llama.cpp (GGUF-grid layers exactly; --type for the rest)
    hf-quant import-gguf SRC.gguf OUT       # a GGUF file to an hf_quant checkpoint (blocks kept exactly)
    hf-quant export-onnx MODEL OUT          # an ONNX Runtime directory: MatMulNBits with hf_quant's codes
                                            # (--dynamic-int8: a float model through onnxruntime's quantize_dynamic)

A thin layer over the library API (`QuantConfig` + `from_pretrained`, `hf_quant.eval`,
`hf_quant.push_to_hub`, `hf_quant.export_gptq` / `import_gptq`, `export_bnb8` / `import_bnb8`); progress goes to stderr through
transformers' progress bars and hf_quant's log lines, results to stdout.

The arguments are checked before anything is loaded: a local path that does not exist or is a file,
an output directory that is, holds or lies inside the source, an existing non-empty output
directory without --overwrite, a device this machine does not have, a number out of range, and for
--push / push the Hub token and connection. Each refusal is one line on stderr,
`hf-quant COMMAND: ARGUMENT: what is wrong and the fix`, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

_DTYPES = ("auto", "bfloat16", "float16", "float32")
_quiet = False


class CliError(SystemExit):
    """A refused command line: one line for stderr (`str()` of it), exit status 2 like argparse's."""

    def __init__(self, line: str):
        super().__init__(2)
        self.line = " ".join(line.split())  # one line, whatever the message was made of

    def __str__(self) -> str:
        return self.line


def _fail(command: str, argument: str, problem: str) -> CliError:
    return CliError(f"hf-quant {command}: {argument}: {problem}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors, in the same one-line form
        if message.startswith(("the following arguments are required", "unrecognized arguments")):
            message += f" (see `{self.prog} --help`)"
        raise CliError(f"{self.prog}: {message.removeprefix('argument ')}")


def _stage(message: str) -> None:
    if not _quiet:
        print(f"hf-quant: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- argument types and checks

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range; give a positive integer (1 or more)")
    return value


def _device(text: str) -> str:
    """A torch device this machine has: `cpu`, `cuda`, `cuda:1`, `mps`, ..."""
    import torch

    from .core.devices import device_count

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use e.g. cpu, cuda or cuda:0") from None
    if device.type == "cpu":
        return text
    count = device_count(device)
    if count == 0:
        raise argparse.ArgumentTypeError(f"{text} is not available: torch sees no {device.type} device on this "
                                         "machine; use cpu, or leave the option out")
    if device.index is not None and device.index >= count:
        have = ", ".join(f"{device.type}:{i}" for i in range(count))
        raise argparse.ArgumentTypeError(f"{text} does not exist: this machine has {have}; use one of them")
    return text


def _looks_local(value: str) -> bool:
    """A local path rather than a Hub repo id: starts with `.`, `/` or `~`, has more than one `/`
    (or the OS's own separator), or exists. A plain `org/name` (or `name`) is a Hub repo id."""
    return (value.startswith((".", "/", "~")) or value.count("/") > 1 or (os.sep != "/" and os.sep in value)
            or os.path.isabs(value) or os.path.lexists(value))


def _check_repo_id(command: str, argument: str, repo_id: str, source: bool = False) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        problem = "no such local directory, and not a valid Hub repo id" if source else "not a valid Hub repo id"
        raise _fail(command, argument, f"{problem}; give " + ("an existing directory or " if source else "")
                    + "org/name (letters, digits, '-', '_', '.')") from None


def _check_directory(command: str, argument: str, value: str) -> Path:
    path = Path(value)
    if not path.exists():
        raise _fail(command, argument, "no such directory; give the directory the checkpoint was saved to")
    if not path.is_dir():
        raise _fail(command, argument, "is a file, not a checkpoint directory; give the directory that holds "
                    "config.json")
    return path


def _check_source(command: str, name: str, args: argparse.Namespace) -> Path | None:
    """`args.<name>`, a checkpoint: a local directory holding config.json (returned), or a Hub repo id (None)."""
    value = os.path.expanduser(getattr(args, name))
    setattr(args, name, value)
    argument = f"{name.upper()} {value}"
    if not _looks_local(value):
        _check_repo_id(command, argument, value, source=True)
        return None
    path = Path(value)
    if not path.exists():
        raise _fail(command, argument, "no such directory; give a local checkpoint directory, or a Hub repo id "
                    "as org/name")
    if not path.is_dir():
        raise _fail(command, argument, "is a file, not a checkpoint directory; give the directory that holds "
                    "config.json")
    if not (path / "config.json").is_file():
        raise _fail(command, argument, "has no config.json; give a transformers checkpoint directory "
                    "(as written by save_pretrained)")
    return path


def _hf_quant_config(path: Path) -> dict | None:
    from .config import QUANT_METHOD

    try:
        qc = json.loads((path / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


def _check_output_file(command: str, args: argparse.Namespace) -> None:
    """`args.out` may be written as one file: not a directory, in an existing directory, new unless --overwrite."""
    value = args.out = os.path.expanduser(args.out)
    out = Path(value)
    if out.is_dir():
        raise _fail(command, f"OUT {value}", "is a directory; give the path of the .gguf file to write")
    if not out.parent.resolve().is_dir():
        raise _fail(command, f"OUT {value}", f"is in {out.parent}, which does not exist; create it first")
    if out.exists() and not args.overwrite:
        raise _fail(command, f"OUT {value}", "exists; pass --overwrite to replace it")


def _check_output(command: str, args: argparse.Namespace, sources: list[Path | None]) -> None:
    """`args.out` may be written: not a file, not the source / inside it / holding it, creatable,
    and empty unless --overwrite."""
    value = args.out = os.path.expanduser(args.out)
    argument = f"OUT {value}"
    out = Path(value)
    if out.exists() and not out.is_dir():
        raise _fail(command, argument, "is a file; give a directory to write the checkpoint into")
    resolved = out.resolve()
    for source in sources:
        if source is None:
            continue
        src = source.resolve()
        if resolved == src:
            raise _fail(command, argument, f"is the source checkpoint {source}; write to another directory "
                        "(the source is never overwritten)")
        if src in resolved.parents:
            raise _fail(command, argument, f"is inside the source checkpoint {source}; write outside it")
        if resolved in src.parents:
            raise _fail(command, argument, f"contains the source checkpoint {source}; write to a directory "
                        "that does not hold it")
    existing = resolved
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise _fail(command, argument, f"cannot be created: {existing} is a file; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _fail(command, argument, f"cannot be written: no write permission in {existing}; choose another path")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise _fail(command, argument, "already exists and is not empty; pass --overwrite to replace the "
                    "checkpoint in it, or choose a new directory")


def _check_text_files(command: str, option: str, files: list[str] | None) -> None:
    for f in files or []:
        if not Path(f).exists():
            raise _fail(command, f"{option} {f}", "no such file; give a UTF-8 text file")
        if not Path(f).is_file():
            raise _fail(command, f"{option} {f}", "is not a file; give a UTF-8 text file")


def _check_hub_access(command: str, argument: str) -> None:
    """Refuse an upload that cannot succeed (offline mode, no token, a refused token, no network)
    before anything is quantized or sent."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    offline = ("Hugging Face offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); unset it to "
               "upload")
    if constants.HF_HUB_OFFLINE:
        raise _fail(command, argument, offline)
    token = huggingface_hub.get_token()
    if token is None:
        raise _fail(command, argument, "no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    try:
        info = huggingface_hub.HfApi().whoami(token=token)
    except OfflineModeIsEnabled:
        raise _fail(command, argument, offline) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise _fail(command, argument, "the Hugging Face token was refused (invalid or expired); run "
                        "`hf auth login --force` or set HF_TOKEN to a valid write token") from None
        if status == 429:  # whoami's own rate limit: the token and the network were fine a moment ago
            return
        raise _fail(command, argument, f"the Hub answered HTTP {status} when checking the token; retry later") \
            from None
    except Exception as e:  # noqa: BLE001 (no network: the HTTP client's own error types vary)
        raise _fail(command, argument, f"cannot reach the Hugging Face Hub ({_one_line(e)}); check the network "
                    "(and HF_ENDPOINT) and retry") from None
    role = (((info or {}).get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise _fail(command, argument, "the Hugging Face token is read-only; run `hf auth login --force` with a "
                    "write token, or set HF_TOKEN to one")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading: run by `main` before the command."""
    command = args.command
    if command == "quantize":
        source = _check_source(command, "model", args)
        _check_output(command, args, [source])
        _check_text_files(command, "--dataset", args.dataset)
        _check_text_files(command, "--eval-text", [args.eval_text] if args.eval_text else None)
        if args.push:
            _check_repo_id(command, f"--push {args.push}", args.push)
    elif command == "eval":
        source = _check_source(command, "model", args)
        _check_text_files(command, "--eval-text", [args.eval_text] if args.eval_text else None)
        if args.record and (source is None or _hf_quant_config(source) is None):
            raise _fail(command, "--record", f"{args.model} is not a local hf_quant checkpoint directory, and "
                        "--record writes into one; give such a directory, or drop --record")
    elif command == "push":
        args.directory = os.path.expanduser(args.directory)
        argument = f"DIRECTORY {args.directory}"
        _check_directory(command, argument, args.directory)
        if _hf_quant_config(Path(args.directory)) is None:
            raise _fail(command, argument, "is not an hf_quant checkpoint (no hf_quant quantization_config in "
                        "config.json); save one with `hf-quant quantize` or save_pretrained first")
        _check_repo_id(command, f"REPO_ID {args.repo_id}", args.repo_id)
    elif command in ("export-gptq", "export-bnb8", "export-bitnet", "export-onnx"):
        source = _check_source(command, "model", args)
        _check_output(command, args, [source])
    elif command == "export-gguf":
        _check_source(command, "model", args)
        _check_output_file(command, args)
    elif command == "import-gguf":
        args.src = os.path.expanduser(args.src)
        if not Path(args.src).is_file():
            raise _fail(command, f"SRC {args.src}", "is not a file; give the path of a .gguf file")
        _check_output(command, args, [])
    elif command in ("import-gptq", "import-bnb8", "import-bitnet"):
        source = _check_source(command, "src", args)
        if source is not None and args.revision is not None:
            raise _fail(command, f"--revision {args.revision}", f"applies to Hub repo ids; {args.src} is a local "
                        "directory (drop --revision)")
        _check_output(command, args, [source])


# ---------------------------------------------------------------- loading

def _load(model: str, args: argparse.Namespace, **kwargs: Any):
    import torch
    from transformers import AutoConfig

    from .runtime.multimodal import auto_class

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    if getattr(args, "device", None):
        kwargs["device_map"] = {"": args.device}
    try:  # a vision-language model loads with its own auto class (AutoModelForImageTextToText)
        return auto_class(AutoConfig.from_pretrained(model)).from_pretrained(model, dtype=dtype, **kwargs)
    except OSError as e:  # a Hub repo that does not exist / is not cached offline, a missing weight file
        raise _fail(args.command, f"MODEL {model}", f"could not be loaded ({_one_line(e)})") from None


def _tokenizer(model: str, command: str, required: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        if required:
            raise _fail(command, f"MODEL {model}", f"no tokenizer could be loaded ({_one_line(e)}); perplexity "
                        "needs one: save the tokenizer beside the model") from None
        return None


def _read_texts(files: list[str] | None) -> list[str] | None:
    return [Path(f).read_text(encoding="utf-8") for f in files] if files else None


def _evaluate(model, tokenizer, args: argparse.Namespace) -> dict:
    from . import eval as hf_eval

    texts = _read_texts([args.eval_text] if args.eval_text else None)
    _stage("measuring perplexity")
    ppl = hf_eval.perplexity(model, tokenizer, texts[0] if texts else None, seq_len=args.eval_seq_len,
                             max_windows=args.max_windows)
    source = Path(args.eval_text).name if args.eval_text else "hf_quant's bundled held-out text"
    windows = f", first {args.max_windows} windows" if args.max_windows else ""
    return {"perplexity": round(ppl, 4), "text": source + windows, "seq_len": args.eval_seq_len}


def _upload(command: str, argument: str, directory: Path, repo_id: str, **kwargs: Any):
    import hf_quant

    try:
        return hf_quant.push_to_hub(directory, repo_id, **kwargs)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 (network and Hub errors: reported in one line, the files are kept)
        raise _fail(command, argument, f"the upload failed ({_one_line(e)}); {directory} is complete: retry with "
                    f"`hf-quant push {directory} {repo_id}`") from None


# ---------------------------------------------------------------- commands

def cmd_quantize(args: argparse.Namespace) -> None:
    import hf_quant
    from .io import get_format
    from .methods import option_fields

    options = {name: getattr(args, name) for name in option_fields() if getattr(args, name) is not None}
    config = hf_quant.QuantConfig(
        method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
        modules_to_not_convert=args.modules_to_not_convert, dataset=_read_texts(args.dataset),
        num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
        calibration_device=args.calibration_device, gguf=args.gguf, hessian_dtype=args.hessian_dtype,
        calibration_dtype=args.calibration_dtype,
        spill_activations={"auto": "auto", "always": True, "never": False}[args.spill_activations],
        spill_dir=args.spill_dir, **options)
    if args.push:
        _check_hub_access(args.command, f"--push {args.push}")
    tokenizer = _tokenizer(args.model, args.command, required=args.eval or args.eval_baseline)
    baseline = None
    if args.eval_baseline:
        _stage(f"loading {args.model} in float for the baseline perplexity")
        baseline = _evaluate(_load(args.model, args), tokenizer, args)["perplexity"]
    out = Path(args.out)
    card = {"repo_id": args.push} if args.push and args.format == "hf_quant" else {}
    stream = args.format == "hf_quant" and not args.in_memory and args.device is None
    start = time.perf_counter()
    if stream:
        from .streaming import NoSafetensors, SourceNotFound, quantize_checkpoint
        from .calibration import distributed as ddp

        ddp.init_from_env()  # launched by torchrun / accelerate launch: calibrate data-parallel
        _stage(f"quantizing {args.model} block by block from disk into {out}: {args.method}, {config.bits}-bit, "
               f"group size {config.group_size} (streaming; --in-memory loads the whole model instead)")
        try:
            quantize_checkpoint(args.model, out, config, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                tokenizer=tokenizer, resume=not args.no_resume, repo_id=args.push)
        except SourceNotFound as e:
            raise _fail(args.command, f"MODEL {args.model}", f"could not be loaded ({_one_line(e)})") from None
        except NoSafetensors:
            stream = False
            _stage(f"{args.model} has no safetensors weights to stream from: loading it whole instead")
    if stream and not ddp.is_main():
        return  # rank 0 wrote the checkpoint and reports
    if stream:
        seconds = time.perf_counter() - start
        result: dict[str, Any] = {"seconds": round(seconds, 1)}
        if args.eval or args.eval_baseline:
            model = _load(str(out), args)
    else:
        _stage(f"loading {args.model} and quantizing: {args.method}, {config.bits}-bit, group size {config.group_size}")
        model = _load(args.model, args, quantization_config=config)
        seconds = time.perf_counter() - start
        result = {"seconds": round(seconds, 1)}
    if not stream or args.eval or args.eval_baseline:
        result["quantized_layers"] = sum(isinstance(m, hf_quant.QuantLinear) for m in model.modules())
    else:
        result["quantized_layers"] = _count_quantized(out)
    if args.eval or args.eval_baseline:
        evaluation = _evaluate(model, tokenizer, args)
        if baseline is not None:
            evaluation["baseline"] = result["baseline_perplexity"] = baseline
        result["perplexity"] = evaluation["perplexity"]
        if stream:
            record_evaluation(out, evaluation, args.push)
        else:
            model.config.quantization_config.provenance["evaluation"] = evaluation
    if not stream:
        _stage(f"saving to {out} ({args.format} format)")
        # The card names the Hub repo the model goes to, else only the directory's own name (never the local path).
        if args.format == "hf_quant":
            card["max_shard_size"] = args.max_shard_size
        get_format(args.format).export(model, out, tokenizer=tokenizer, **card)
    result["saved"] = str(out)
    if args.push:
        _stage(f"uploading to {args.push}")
        _upload(args.command, f"--push {args.push}", out, args.push, private=args.private or None)
        result["pushed"] = args.push
    print(json.dumps(result))


def record_evaluation(directory: Path, evaluation: dict, repo_id: str | None = None) -> None:
    """Write `evaluation` into a saved hf_quant checkpoint's config (provenance) and its generated model card."""
    from .io.atomic import atomic_write_text
    from .integrations.hub import CARD_MARKER, model_card

    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"].setdefault("provenance", {})["evaluation"] = evaluation
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    readme = directory / "README.md"
    if not readme.exists() or CARD_MARKER in readme.read_text(encoding="utf-8", errors="replace"):
        # the Hub repo it goes to, else the directory's own name: a local path means nothing to readers
        atomic_write_text(readme, str(model_card(directory, repo_id or Path(os.path.abspath(directory)).name)))


def _count_quantized(directory: Path) -> int:
    from .io.checkpoint import index_checkpoint

    files = [str(p) for p in sorted(directory.glob("*.safetensors"))]
    return sum(name.endswith(".qweight") for name in index_checkpoint(files))


def cmd_eval(args: argparse.Namespace) -> None:
    import hf_quant

    model = _load(args.model, args)
    evaluation = _evaluate(model, _tokenizer(args.model, args.command, required=True), args)
    layers = [m for m in model.modules() if isinstance(m, hf_quant.QuantLinear)]
    result = {"model": args.model, **evaluation, "quantized_layers": len(layers)}
    if args.record:
        directory = Path(args.model)
        if not layers:
            raise _fail(args.command, "--record", f"{args.model} has no quantized layers, and --record writes into "
                        "an hf_quant checkpoint; drop --record")
        record_evaluation(directory, evaluation)
        result["recorded"] = str(directory)
    print(json.dumps(result))


def cmd_push(args: argparse.Namespace) -> None:
    argument = f"REPO_ID {args.repo_id}"
    _check_hub_access(args.command, argument)
    _stage(f"uploading {args.directory} to {args.repo_id}")
    info = _upload(args.command, argument, Path(args.directory), args.repo_id, private=args.private or None,
                   revision=args.revision, commit_message=args.commit_message, create_pr=args.create_pr)
    print(json.dumps({"pushed": args.repo_id, "commit": str(getattr(info, "commit_url", info))}))


def cmd_export_gptq(args: argparse.Namespace) -> None:
    import torch

    import hf_quant

    _stage(f"loading {args.model}")
    model = _load(args.model, argparse.Namespace(command=args.command, dtype="auto", device=args.device))
    _stage(f"writing the GPTQ checkpoint ({args.checkpoint_format}, {args.dtype}) to {args.out}")
    hf_quant.export_gptq(model, Path(args.out), tokenizer=_tokenizer(args.model, args.command),
                         checkpoint_format=args.checkpoint_format, dtype=getattr(torch, args.dtype))
    print(json.dumps({"saved": args.out, "checkpoint_format": args.checkpoint_format}))


def _convert(args: argparse.Namespace, importer: str, what: str) -> None:
    """`hf-quant import-*`: convert SRC (a directory or Hub repo) into an hf_quant checkpoint at OUT."""
    import hf_quant

    _stage(f"converting {args.src} to an hf_quant {what} in {args.out}")
    try:
        getattr(hf_quant, importer)(args.src, Path(args.out), revision=args.revision)
    except OSError as e:  # a Hub repo that does not exist, or offline and not cached
        raise _fail(args.command, f"SRC {args.src}", f"could not be read ({_one_line(e)})") from None
    print(json.dumps({"saved": args.out}))


def cmd_import_gptq(args: argparse.Namespace) -> None:
    _convert(args, "import_gptq", "checkpoint")


_TRANSFORMERS_LAYOUTS = {"export-bnb8": ("export_bnb8", "bitsandbytes load_in_8bit"),
                         "export-bitnet": ("export_bitnet", "transformers BitNet (BitLinear, offline)")}


def cmd_export_transformers_layout(args: argparse.Namespace) -> None:
    """`hf-quant export-bnb8` / `export-bitnet`: an hf_quant model in a layout transformers loads by itself."""
    import hf_quant

    exporter, layout = _TRANSFORMERS_LAYOUTS[args.command]
    _stage(f"loading {args.model}")
    model = _load(args.model, argparse.Namespace(command=args.command, dtype="auto", device=args.device))
    _stage(f"writing the {layout} checkpoint to {args.out}")
    getattr(hf_quant, exporter)(model, Path(args.out), tokenizer=_tokenizer(args.model, args.command))
    print(json.dumps({"saved": args.out, "format": layout}))


def cmd_import_bnb8(args: argparse.Namespace) -> None:
    _convert(args, "import_bnb8", "llm_int8 checkpoint")


def cmd_import_bitnet(args: argparse.Namespace) -> None:
    _convert(args, "import_bitnet", "bitnet checkpoint")


def cmd_export_gguf(args: argparse.Namespace) -> None:
    import hf_quant

    _stage(f"loading {args.model}")
    model = _load(args.model, argparse.Namespace(command=args.command, dtype="auto", device=None))
    _stage(f"writing {args.out}" + (f" (other matrices rounded onto {args.type})" if args.type else ""))
    hf_quant.export_gguf(model, Path(args.out), _tokenizer(args.model, args.command), type=args.type,
                         ternary=None if args.ternary == "none" else args.ternary)
    print(json.dumps({"saved": args.out, "format": "gguf"}))


def cmd_export_onnx(args: argparse.Namespace) -> None:
    import hf_quant

    _stage(f"loading {args.model}")
    model = _load(args.model, argparse.Namespace(command=args.command, dtype="float32", device=None))
    _stage(f"exporting {args.out}" + (" (dynamic int8)" if args.dynamic_int8 else ""))
    hf_quant.export_onnx(model, Path(args.out), _tokenizer(args.model, args.command),
                         quantize="dynamic-int8" if args.dynamic_int8 else None, accuracy_level=args.accuracy_level,
                         external_data=True if args.external_data else None, overwrite=args.overwrite,
                         reduce_range=not args.full_range)
    print(json.dumps({"saved": args.out, "format": "onnx", "quantize": "dynamic-int8" if args.dynamic_int8 else None}))


def cmd_import_gguf(args: argparse.Namespace) -> None:
    import hf_quant

    from transformers import AutoTokenizer

    src = Path(args.src)
    _stage(f"reading {src}")
    try:  # transformers builds the tokenizer from the file's tokenizer.ggml.* metadata
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    except Exception:  # noqa: BLE001 - a file without a vocabulary, or one transformers cannot convert
        tokenizer = None
    hf_quant.import_gguf(src, Path(args.out), requantize=args.requantize, tokenizer=tokenizer)
    print(json.dumps({"saved": args.out, "tokenizer": tokenizer is not None}))


# ---------------------------------------------------------------- the parser

def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-text", "--text", dest="eval_text", help="text file for perplexity "
                   "(default: hf_quant's bundled held-out text)")
    p.add_argument("--eval-seq-len", "--seq-len-eval", dest="eval_seq_len", type=_positive_int, default=512)
    p.add_argument("--max-windows", type=_positive_int, default=None, help="score at most this many windows")


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it is an existing non-empty "
                   "directory (its checkpoint files are replaced, stale weight shards removed, other files kept)")


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """One option per method option in the registry (`hf_quant.methods`); unset = the method's default."""
    from .methods import methods_taking, option_fields

    for name, f in option_fields().items():
        flag = "--" + name.replace("_", "-")
        extra = f"{f.metadata['help'] or name} (methods: {', '.join(methods_taking(name))})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=extra)
        else:
            p.add_argument(flag, type=f.metadata.get("type") or type(f.default), default=None, help=extra)


def build_parser() -> argparse.ArgumentParser:
    from .config import CALIBRATION_DTYPES
    from .io import available_formats, get_format
    from .methods import available_methods

    ap = _Parser(prog="hf-quant", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-q", "--quiet", action="store_true", help="no stage lines, progress bars or per-block log lines")
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a float model and save it")
    q.add_argument("model", help="float checkpoint: local directory or Hub repo id")
    q.add_argument("out", help="directory to write the quantized checkpoint to (not the source, nor inside it)")
    _add_overwrite(q)
    q.add_argument("--method", default="gptq", help=f"one of {available_methods()}")
    q.add_argument("--bits", type=int, default=None, help="code width (default 4; fixed by llm_int8, onebit, bitnet)")
    q.add_argument("--group-size", type=int, default=None, help="input channels per scale (default 128; -1: per row)")
    q.add_argument("--sym", action="store_true", default=None, help="symmetric grid (default: asymmetric)")
    q.add_argument("--gguf", default=None, metavar="TYPE", help="quantize onto a GGUF block type or llama.cpp mix "
                   "(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K; Q4_K_M, Q5_K_M, Q3_K_M, Q2_K_M): bits, "
                   "--group-size and --sym follow the type; export with --format gguf or export-gguf")
    _add_method_options(q)
    q.add_argument("--modules-to-not-convert", nargs="+", default=None, metavar="NAME")
    q.add_argument("--dataset", nargs="+", metavar="FILE", help="calibration text files "
                   "(default: hf_quant's packaged text)")
    q.add_argument("--num-samples", type=_positive_int, default=128)
    q.add_argument("--seq-len", type=_positive_int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--hessian-dtype", choices=("float32", "float64"), default="float32",
                   help="what the calibration statistics are summed in; float64 makes a torchrun data-parallel run "
                   "give the same codes as one process (twice the memory of the largest layer's Hessian)")
    q.add_argument("--calibration-device", type=_device, default=None,
                   help="e.g. cuda; default: a GPU if there is one")
    q.add_argument("--calibration-dtype", choices=CALIBRATION_DTYPES, default="auto",
                   help="what each block computes in while calibrated: auto = float32 on a CPU without native "
                   "bf16/fp16 matrix instructions, the model's dtype elsewhere (the saved format is the same)")
    q.add_argument("--spill-activations", choices=("auto", "always", "never"), default="auto",
                   help="keep the cached calibration activations in a file, read back a window at a time: auto = "
                   "when they would take more than a quarter of the available memory")
    q.add_argument("--spill-dir", default=None, help="where spilled activations go (default: the output's .partial "
                   "progress directory when streaming, else TMPDIR); needs room for twice the activations")
    q.add_argument("--device", type=_device, default=None, help="where the model is loaded (default: CPU)")
    q.add_argument("--dtype", choices=_DTYPES, default="auto")
    q.add_argument("--format", choices=available_formats(exporting=True), default="hf_quant",
                   help="; ".join(f"{n}: {get_format(n).description}" for n in available_formats(exporting=True)))
    q.add_argument("--in-memory", action="store_true", help="load the whole float model, then quantize it (default "
                   "for --format hf_quant: stream block by block from the safetensors shards, resumable)")
    q.add_argument("--no-resume", action="store_true", help="start over even if OUT.partial holds an earlier run's "
                   "progress (default: continue after its last finished block)")
    q.add_argument("--max-shard-size", default="1GB", help="largest output weight file (default 1GB; each shard is "
                   "held in memory while it is written)")
    q.add_argument("--eval", action="store_true", help="measure held-out perplexity; recorded in the card")
    q.add_argument("--eval-baseline", action="store_true", help="--eval, and the float model's perplexity too")
    _add_eval_options(q)
    q.add_argument("--push", metavar="REPO_ID", help="upload the result to this Hub repo (the token and the "
                   "connection are checked before quantizing)")
    q.add_argument("--private", action="store_true")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="held-out perplexity of a (quantized) model")
    e.add_argument("model", help="checkpoint: local directory or Hub repo id")
    _add_eval_options(e)
    e.add_argument("--device", type=_device, default=None)
    e.add_argument("--dtype", choices=_DTYPES, default="auto")
    e.add_argument("--record", action="store_true",
                   help="write the result into the checkpoint's config and model card")
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("push", help="upload a saved hf_quant checkpoint directory to the Hub")
    p.add_argument("directory")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None)
    p.add_argument("--commit-message", default=None)
    p.add_argument("--create-pr", action="store_true")
    p.set_defaults(func=cmd_push)

    x = sub.add_parser("export-gptq", help="write an hf_quant GPTQ model in the GPTQ checkpoint layout")
    x.add_argument("model")
    x.add_argument("out")
    _add_overwrite(x)
    x.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default="gptq")
    x.add_argument("--device", type=_device, default=None)
    x.add_argument("--dtype", choices=_DTYPES[1:], default="float16",
                   help="dtype of the scales and float tensors written (GPTQ kernels expect float16)")
    x.set_defaults(func=cmd_export_gptq)

    i = sub.add_parser("import-gptq", help="convert a GPTQ checkpoint (directory or Hub repo) to hf_quant")
    i.add_argument("src")
    i.add_argument("out")
    _add_overwrite(i)
    i.add_argument("--revision", default=None)
    i.set_defaults(func=cmd_import_gptq)

    for name, what in (("export-bnb8", "an hf_quant llm_int8 / w8a8 model as a bitsandbytes 8-bit (load_in_8bit)"),
                       ("export-bitnet", "an hf_quant bitnet model as a transformers BitNet (BitLinear, offline)")):
        xb = sub.add_parser(name, help=f"write {what} checkpoint")
        xb.add_argument("model")
        xb.add_argument("out")
        _add_overwrite(xb)
        xb.add_argument("--device", type=_device, default=None)
        xb.set_defaults(func=cmd_export_transformers_layout)

    for name, what, func in (("import-bnb8", "a bitsandbytes load_in_8bit checkpoint (directory or Hub repo) to "
                              "hf_quant llm_int8", cmd_import_bnb8),
                             ("import-bitnet", "a transformers BitNet (BitLinear, offline) checkpoint (directory or "
                              "Hub repo) to hf_quant bitnet", cmd_import_bitnet)):
        ib = sub.add_parser(name, help=f"convert {what}")
        ib.add_argument("src")
        ib.add_argument("out")
        _add_overwrite(ib)
        ib.add_argument("--revision", default=None)
        ib.set_defaults(func=func)

    xg = sub.add_parser("export-gguf", help="write a model (float, or hf_quant with or without a GGUF grid) as one "
                        "GGUF file for llama.cpp")
    xg.add_argument("model")
    xg.add_argument("out", help="the .gguf file to write")
    _add_overwrite(xg)
    xg.add_argument("--type", default=None, help="round matrices not already on a GGUF grid onto this type "
                    "(data-free; default: keep them in float)")
    xg.add_argument("--ternary", choices=("TQ2_0", "TQ1_0", "none"), default="TQ2_0",
                    help="GGUF type of ternary (BitNet b1.58) layers, their codes and scale written exactly "
                    "(default TQ2_0; none: treat them like other layers, --type or float)")
    xg.set_defaults(func=cmd_export_gguf)

    xo = sub.add_parser("export-onnx", help="write a model as an ONNX Runtime directory (MatMulNBits with hf_quant's "
                        "codes; optimum's ORTModelForCausalLM loads it)")
    xo.add_argument("model")
    xo.add_argument("out", help="the directory to write")
    _add_overwrite(xo)
    xo.add_argument("--dynamic-int8", action="store_true", help="a float model: quantize it with onnxruntime's "
                    "quantize_dynamic (int8 per-channel weights, dynamic activations)")
    xo.add_argument("--full-range", action="store_true", help="with --dynamic-int8: 8-bit weights instead of the "
                    "default 7-bit ones (exact only on CPUs with VNNI / AMX, or ARM: onnxruntime's AVX2 int8 "
                    "kernel saturates with them)")
    xo.add_argument("--accuracy-level", type=int, choices=range(5), default=0, metavar="{0..4}",
                    help="MatMulNBits' accuracy_level: 0 fp32 compute (default, exact), 4 int8 compute (faster)")
    xo.add_argument("--external-data", action="store_true", help="keep the tensors in model.onnx_data beside the "
                    "graph (default: only above 1.5 GiB)")
    xo.set_defaults(func=cmd_export_onnx)

    ig = sub.add_parser("import-gguf", help="convert a GGUF file to an hf_quant checkpoint (Llama / Qwen2 / Qwen3)")
    ig.add_argument("src", help="the .gguf file")
    ig.add_argument("out")
    _add_overwrite(ig)
    ig.add_argument("--requantize", default=None, metavar="TYPE", help="round tensors of types hf_quant cannot "
                    "hold onto this GGUF type (default: refuse them)")
    ig.set_defaults(func=cmd_import_gguf)
    return ap


def _field_option(message: str) -> str | None:
    """`--bits` for "QuantConfig.bits=5 is not supported ...": the option a library message is about."""
    m = re.match(r"QuantConfig\.(\w+)=", message)
    return "--" + m.group(1).replace("_", "-") if m else None


def main(argv: list[str] | None = None) -> None:
    try:
        _run(argv)
    except CliError as e:
        print(e.line, file=sys.stderr, flush=True)
        raise


def _run(argv: list[str] | None) -> None:
    global _quiet
    args = build_parser().parse_args(argv)
    _check_args(args)  # before anything is loaded, computed or written
    from transformers.utils import logging as hf_logging

    _quiet = args.quiet
    if args.quiet:
        hf_logging.disable_progress_bar()
    else:
        hf_logging.enable_progress_bar()
        log = logging.getLogger("hf_quant")
        if not log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
    try:
        args.func(args)
    except ValueError as e:  # hf_quant's errors name the field and the fix: show them without a traceback
        message = " ".join(str(e).split())
        option = _field_option(message)
        raise CliError(f"hf-quant {args.command}: {option + ': ' if option else ''}{message}") from None


if __name__ == "__main__":
    main()
