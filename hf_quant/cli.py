"""`hf-quant`: quantize, evaluate, share and convert models from the command line.

    hf-quant quantize MODEL OUT --method gptq --bits 4 --group-size 128 [--eval] [--push org/name]
                                (methods and their options: hf-quant quantize --help)
    hf-quant eval MODEL [--text FILE] [--record]
    hf-quant push DIR org/name [--private]
    hf-quant export-gptq MODEL OUT          # to the GPTQ checkpoint layout vLLM / TGI / GPTQModel load
    hf-quant import-gptq SRC OUT            # a GPTQ checkpoint (directory or Hub repo) to hf_quant

A thin layer over the library API (`QuantConfig` + `from_pretrained`, `hf_quant.eval`,
`hf_quant.push_to_hub`, `hf_quant.export_gptq` / `import_gptq`); progress goes to stderr through
transformers' progress bars and hf_quant's log lines, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

_DTYPES = ("auto", "bfloat16", "float16", "float32")
_quiet = False


def _stage(message: str) -> None:
    if not _quiet:
        print(f"hf-quant: {message}", file=sys.stderr, flush=True)


def _load(model: str, args: argparse.Namespace, **kwargs: Any):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    if getattr(args, "device", None):
        kwargs["device_map"] = {"": args.device}
    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **kwargs)


def _tokenizer(model: str, required: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        if required:
            raise SystemExit(f"hf-quant: no tokenizer could be loaded from {model} ({e}).") from None
        return None


def _read_texts(files: list[str] | None, option: str) -> list[str] | None:
    if not files:
        return None
    texts = []
    for f in files:
        if not Path(f).is_file():
            raise SystemExit(f"hf-quant: {option} {f}: no such file.")
        texts.append(Path(f).read_text(encoding="utf-8"))
    return texts


def _evaluate(model, tokenizer, args: argparse.Namespace) -> dict:
    from . import eval as hf_eval

    texts = _read_texts([args.eval_text] if args.eval_text else None, "--eval-text")
    _stage("measuring perplexity")
    ppl = hf_eval.perplexity(model, tokenizer, texts[0] if texts else None, seq_len=args.eval_seq_len,
                             max_windows=args.max_windows)
    source = Path(args.eval_text).name if args.eval_text else "hf_quant's bundled held-out text"
    windows = f", first {args.max_windows} windows" if args.max_windows else ""
    return {"perplexity": round(ppl, 4), "text": source + windows, "seq_len": args.eval_seq_len}


def cmd_quantize(args: argparse.Namespace) -> None:
    import hf_quant
    from .io import get_format
    from .methods import option_fields

    options = {name: getattr(args, name) for name in option_fields() if getattr(args, name) is not None}
    config = hf_quant.QuantConfig(
        method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
        modules_to_not_convert=args.modules_to_not_convert, dataset=_read_texts(args.dataset, "--dataset"),
        num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
        calibration_device=args.calibration_device, **options)
    tokenizer = _tokenizer(args.model, required=args.eval or args.eval_baseline)
    baseline = None
    if args.eval_baseline:
        _stage(f"loading {args.model} in float for the baseline perplexity")
        baseline = _evaluate(_load(args.model, args), tokenizer, args)["perplexity"]
    _stage(f"loading {args.model} and quantizing: {args.method}, {args.bits}-bit, group size {args.group_size}")
    start = time.perf_counter()
    model = _load(args.model, args, quantization_config=config)
    seconds = time.perf_counter() - start
    layers = sum(isinstance(m, hf_quant.QuantLinear) for m in model.modules())
    result: dict[str, Any] = {"quantized_layers": layers, "seconds": round(seconds, 1)}
    if args.eval or args.eval_baseline:
        evaluation = _evaluate(model, tokenizer, args)
        if baseline is not None:
            evaluation["baseline"] = result["baseline_perplexity"] = baseline
        model.config.quantization_config.provenance["evaluation"] = evaluation
        result["perplexity"] = evaluation["perplexity"]
    out = Path(args.out)
    _stage(f"saving to {out} ({args.format} format)")
    get_format(args.format).export(model, out, tokenizer=tokenizer)
    result["saved"] = str(out)
    if args.push:
        _stage(f"uploading to {args.push}")
        hf_quant.push_to_hub(out, args.push, private=args.private or None)
        result["pushed"] = args.push
    print(json.dumps(result))


def cmd_eval(args: argparse.Namespace) -> None:
    import hf_quant
    from .io.atomic import atomic_write_text
    from .integrations.hub import CARD_MARKER, model_card

    model = _load(args.model, args)
    evaluation = _evaluate(model, _tokenizer(args.model, required=True), args)
    layers = [m for m in model.modules() if isinstance(m, hf_quant.QuantLinear)]
    result = {"model": args.model, **evaluation, "quantized_layers": len(layers)}
    if args.record:
        directory = Path(args.model)
        if not layers or not directory.is_dir():
            raise SystemExit("hf-quant: --record writes into a local hf_quant checkpoint directory; "
                             f"{args.model} is not one.")
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        config["quantization_config"].setdefault("provenance", {})["evaluation"] = evaluation
        atomic_write_text(directory / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        readme = directory / "README.md"
        if not readme.exists() or CARD_MARKER in readme.read_text(encoding="utf-8", errors="replace"):
            atomic_write_text(readme, str(model_card(directory, str(directory))))
        result["recorded"] = str(directory)
    print(json.dumps(result))


def cmd_push(args: argparse.Namespace) -> None:
    import hf_quant

    _stage(f"uploading {args.directory} to {args.repo_id}")
    info = hf_quant.push_to_hub(Path(args.directory), args.repo_id, private=args.private or None,
                                revision=args.revision, commit_message=args.commit_message,
                                create_pr=args.create_pr)
    print(json.dumps({"pushed": args.repo_id, "commit": str(getattr(info, "commit_url", info))}))


def cmd_export_gptq(args: argparse.Namespace) -> None:
    import torch

    import hf_quant

    _stage(f"loading {args.model}")
    model = _load(args.model, argparse.Namespace(dtype="auto", device=args.device))
    _stage(f"writing the GPTQ checkpoint ({args.checkpoint_format}, {args.dtype}) to {args.out}")
    hf_quant.export_gptq(model, Path(args.out), tokenizer=_tokenizer(args.model),
                         checkpoint_format=args.checkpoint_format, dtype=getattr(torch, args.dtype))
    print(json.dumps({"saved": args.out, "checkpoint_format": args.checkpoint_format}))


def cmd_import_gptq(args: argparse.Namespace) -> None:
    import hf_quant

    _stage(f"converting {args.src} to an hf_quant checkpoint in {args.out}")
    hf_quant.import_gptq(args.src, Path(args.out), revision=args.revision)
    print(json.dumps({"saved": args.out}))


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-text", "--text", dest="eval_text", help="text file for perplexity "
                   "(default: hf_quant's bundled held-out text)")
    p.add_argument("--eval-seq-len", "--seq-len-eval", dest="eval_seq_len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """One option per method option in the registry (`hf_quant.methods`); unset = the method's default."""
    from .methods import methods_taking, option_fields

    for name, f in option_fields().items():
        flag = "--" + name.replace("_", "-")
        extra = f"{f.metadata['help'] or name} (methods: {', '.join(methods_taking(name))})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=extra)
        else:
            p.add_argument(flag, type=type(f.default), default=None, help=extra)


def build_parser() -> argparse.ArgumentParser:
    from .io import available_formats, get_format
    from .methods import available_methods

    ap = argparse.ArgumentParser(prog="hf-quant", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-q", "--quiet", action="store_true", help="no stage lines, progress bars or per-block log lines")
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a float model and save it")
    q.add_argument("model", help="float checkpoint: local directory or Hub repo id")
    q.add_argument("out", help="directory to write the quantized checkpoint to")
    q.add_argument("--method", default="gptq", help=f"one of {available_methods()}")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric)")
    _add_method_options(q)
    q.add_argument("--modules-to-not-convert", nargs="+", default=None, metavar="NAME")
    q.add_argument("--dataset", nargs="+", metavar="FILE", help="calibration text files "
                   "(default: hf_quant's packaged text)")
    q.add_argument("--num-samples", type=int, default=128)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--calibration-device", default=None, help="e.g. cuda; default: a GPU if there is one")
    q.add_argument("--device", default=None, help="where the model is loaded (default: CPU)")
    q.add_argument("--dtype", choices=_DTYPES, default="auto")
    q.add_argument("--format", choices=available_formats(exporting=True), default="hf_quant",
                   help="; ".join(f"{n}: {get_format(n).description}" for n in available_formats(exporting=True)))
    q.add_argument("--eval", action="store_true", help="measure held-out perplexity; recorded in the card")
    q.add_argument("--eval-baseline", action="store_true", help="--eval, and the float model's perplexity too")
    _add_eval_options(q)
    q.add_argument("--push", metavar="REPO_ID", help="upload the result to this Hub repo")
    q.add_argument("--private", action="store_true")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="held-out perplexity of a (quantized) model")
    e.add_argument("model", help="checkpoint: local directory or Hub repo id")
    _add_eval_options(e)
    e.add_argument("--device", default=None)
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
    x.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default="gptq")
    x.add_argument("--device", default=None)
    x.add_argument("--dtype", choices=_DTYPES[1:], default="float16",
                   help="dtype of the scales and float tensors written (GPTQ kernels expect float16)")
    x.set_defaults(func=cmd_export_gptq)

    i = sub.add_parser("import-gptq", help="convert a GPTQ checkpoint (directory or Hub repo) to hf_quant")
    i.add_argument("src")
    i.add_argument("out")
    i.add_argument("--revision", default=None)
    i.set_defaults(func=cmd_import_gptq)
    return ap


def main(argv: list[str] | None = None) -> None:
    global _quiet
    args = build_parser().parse_args(argv)
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
        raise SystemExit(f"hf-quant {args.command}: {e}") from None


if __name__ == "__main__":
    main()
