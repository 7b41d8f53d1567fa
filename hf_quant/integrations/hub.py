"""Sharing on the Hugging Face Hub: atomic saves, a generated model card, and push_to_hub.

Every hf_quant model (quantized by `from_pretrained`/`hf_quant.quantize`, or loaded from an hf_quant
checkpoint) gets two instance methods in place of transformers' own:

- `save_pretrained(dir)` writes into a temporary directory beside `dir` and moves the files into
  place only once everything is written, so a failure never leaves a half-written checkpoint; it
  adds a model card (README.md) unless `dir` already holds one a person wrote.
- `push_to_hub(repo_id)` is `hf_quant.push_to_hub(model, repo_id)`: weights, config, tokenizer and
  model card in one commit, removing weight files of an earlier upload that the new one replaces.

The card is built from the saved directory alone (config.json and the safetensors headers), so a
directory saved earlier can be pushed with the same card (`hf-quant push DIR REPO`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import tempfile
import types
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import RevisionNotFoundError

from ..config import QUANT_METHOD, QuantConfig
from ..core import gguf, packed_bytes
from ..io.checkpoint import WEIGHT_FILE_PATTERNS, index_checkpoint
from ..io.native import write_checkpoint
from ..methods import get_method
from ..runtime import multimodal
from ..runtime.convert import mix_context

logger = logging.getLogger("hf_quant")

CARD_MARKER = "<!-- hf_quant:generated-card (hf_quant rewrites this card on save while this line is here) -->"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def describe_source(name: str | None) -> str | None:
    """A checkpoint's name for the card: a Hub repo id as is, a local path by its last component
    only (a local directory means nothing to readers and may be private)."""
    if not name:
        return None
    return name if _is_hub_id(name) else Path(name).name or None


def _card_name(name: str | os.PathLike | None) -> str | None:
    """The name a model card gives its checkpoint in the load snippet and the title: a Hub repo id
    (`org/name`, or a bare `name`) as is; a local path (absolute, `~`, `./`, `../`, or with more than
    one `/`) by its last component only, so a card never carries a private local path."""
    if not name:
        return None
    text = os.fspath(name)
    if re.fullmatch(r"[\w-][\w.-]*(/[\w-][\w.-]*)?", text):
        return text
    return Path(os.path.abspath(os.path.expanduser(text))).name or None


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def _quantization_config(directory: Path) -> tuple[dict, QuantConfig]:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory}: no config.json; save the model with save_pretrained first.")
    config = json.loads(path.read_text(encoding="utf-8"))
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{directory}: config.json has no hf_quant quantization_config; this is not an hf_quant "
                         "checkpoint (quantize it with hf_quant first).")
    return config, QuantConfig.from_dict(qc)


def checkpoint_summary(directory: str | os.PathLike) -> dict[str, Any]:
    """What a saved hf_quant checkpoint holds, from config.json and the safetensors headers only."""
    directory = Path(directory)
    config, qc = _quantization_config(directory)
    entries = index_checkpoint(sorted(str(p) for p in directory.glob("*.safetensors")))
    quantized, bf16 = [], 0
    n_layers, n_gqa = mix_context(config)
    for key, entry in entries.items():
        module, _, tensor = key.rpartition(".")
        if tensor == "qweight":
            quantized.append(module)
            out_f, cols = entry["shape"]
            spec = qc.layer_spec(module, n_layers, n_gqa) or qc.layer_spec(module.split(".", 1)[-1], n_layers, n_gqa)
            if spec.gguf is not None:  # qweight holds blocks: cols bytes per row (a mix may fall back by width)
                t = gguf.block_type(spec.gguf)
                fits = qc.layer_spec(module, n_layers, n_gqa, cols // t.nbytes * t.block)
                t = gguf.block_type(fits.gguf) if fits is not None and fits.gguf else t
                bf16 += 2 * out_f * (cols // t.nbytes * t.block)
            else:
                bf16 += 2 * out_f * cols * 8 // spec.bits
    packed = packed_bytes(entries)
    files = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return {"config": config, "quantization_config": qc, "quantized_layers": quantized, "packed_bytes": packed,
            "bf16_bytes": bf16, "safetensors_bytes": files}


# the Hub's pipeline tag for the auto class that loads a checkpoint (AutoModelForMultimodalLM: audio, video, ...)
_PIPELINE_TAGS = {"AutoModelForCausalLM": "text-generation", "AutoModelForImageTextToText": "image-text-to-text"}


def _auto_class_name(directory: str | os.PathLike) -> str:
    """The transformers auto class that loads the checkpoint in `directory` (`multimodal.auto_class`)."""
    from transformers import AutoConfig

    try:
        return multimodal.auto_class(AutoConfig.from_pretrained(directory)).__name__
    except Exception:  # a config this transformers cannot build: the card still names the usual class
        return "AutoModelForCausalLM"


def model_card(directory: str | os.PathLike, repo_id: str | None = None, *, base_model: str | None = None,
               evaluation: dict | None = None) -> ModelCard:
    """A model card for the hf_quant checkpoint saved in `directory`.

    It names the base model, method, bits, group size and calibration data (from the provenance
    hf_quant records when it quantizes), the measured perplexity when known (`evaluation`, else the
    one recorded in the config by `hf-quant quantize --eval`), and how to load the model — with
    `import hf_quant` first, which transformers silently needs. The load snippet and the title name
    `repo_id` (a local path given there is cut to its last component), else the directory's own name.
    """
    s = checkpoint_summary(directory)
    qc: QuantConfig = s["quantization_config"]
    prov = dict(qc.provenance or {})
    base = base_model or prov.get("base_model")
    evaluation = evaluation or prov.get("evaluation")
    name = _card_name(repo_id) or Path(os.path.abspath(directory)).name
    method = get_method(qc.method).description
    if get_method(qc.method).act_order and qc.desc_act:
        method += " with act-order" + (" (static groups)" if qc.static_groups else "")
    tags = ["hf_quant", *qc.method.split("+"), f"{qc.bits}-bit", "quantized"]
    auto = _auto_class_name(directory)
    data = ModelCardData(library_name="transformers", tags=tags, pipeline_tag=_PIPELINE_TAGS.get(auto, "any-to-any"),
                         base_model=base if _is_hub_id(base) else None,
                         base_model_relation="quantized" if _is_hub_id(base) else None)
    group = "per output channel" if qc.group_size == -1 else str(qc.group_size)
    skipped = ", ".join(f"`{m}`" for m in (qc.modules_to_not_convert or [])) or "none"
    size = (f"{s['packed_bytes'] / 2**20:.1f} MiB packed, against {s['bf16_bytes'] / 2**20:.1f} MiB in bf16 "
            f"({s['packed_bytes'] / max(s['bf16_bytes'], 1):.2f}x)")
    rows = [("Base model", f"`{base}`" if base else "unknown"), ("Method", method), ("Bits", str(qc.bits)),
            ("Group size", group), ("Zero point", "symmetric (fixed)" if qc.sym else "asymmetric (per group)"),
            ("Quantized layers", f"{len(s['quantized_layers'])} linear layers; kept in float: {skipped}"),
            ("Calibration data", prov.get("calibration", "not recorded")),
            ("Quantized weights", size),
            ("Checkpoint", f"{s['safetensors_bytes'] / 2**20:.1f} MiB of safetensors"),
            ("hf_quant", f"{prov.get('hf_quant_version', 'unknown')}, on-disk format_version {qc.format_version}")]
    if qc.dynamic:
        rows.insert(5, ("Per-module overrides", f"`{json.dumps(qc.dynamic)}`"))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    if evaluation:
        ev = evaluation
        baseline = f" (float model: {ev['baseline']:.3f})" if ev.get("baseline") else ""
        ev_text = (f"Perplexity **{ev['perplexity']:.3f}**{baseline} on {ev.get('text', 'held-out text')}, "
                   f"{ev.get('seq_len', '?')}-token windows scored independently.")
    else:
        ev_text = f"Not measured yet. `hf-quant eval {name}` measures held-out perplexity."
    body = f"""{CARD_MARKER}
# {Path(name).name}: {qc.bits}-bit {qc.method.upper()} quantization{f' of {base}' if base else ''}

> **Load it with hf_quant.** `pip install hf_quant`, then `import hf_quant` **before** `from_pretrained`.
> Without that import, transformers only warns "Unknown quantization type" and loads the quantized
> layers as randomly initialised float layers.

```python
import hf_quant  # registers the quantization method with transformers
from transformers import {auto}, AutoTokenizer

model = {auto}.from_pretrained("{name}", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

## Quantization

{table}

## Evaluation

{ev_text}

## Fine-tuning

LoRA adapters train on this model with PEFT and `transformers.Trainer` (QLoRA-style);
`hf_quant.merge_lora(model)` merges them into a float model, optionally re-quantized.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _keep_existing_card(directory: Path) -> bool:
    readme = directory / "README.md"
    return readme.is_file() and CARD_MARKER not in readme.read_text(encoding="utf-8", errors="replace")


def _is_hf_quant_model(model: Any) -> bool:
    quantizer = getattr(model, "hf_quantizer", None)
    return quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == QUANT_METHOD


def save_pretrained(model: Any, save_directory: str | os.PathLike, *args: Any, is_main_process: bool = True,
                    push_to_hub: bool = False, tokenizer: Any = None, **kwargs: Any) -> None:
    """transformers' `save_pretrained`, all-or-nothing, plus a generated model card (see module doc)
    and, if given, the `tokenizer`, in the same transaction."""
    if not _is_hf_quant_model(model) or not is_main_process:
        type(model).save_pretrained(model, save_directory, *args, is_main_process=is_main_process,
                                    push_to_hub=push_to_hub, **kwargs)
        if tokenizer is not None and is_main_process:
            tokenizer.save_pretrained(save_directory)
        return
    hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private", "token", "revision")
           if k in kwargs}
    target = Path(save_directory)

    def add_card(tmp: Path) -> None:
        if not _keep_existing_card(target):
            # the Hub repo it is for, else the directory's own name: never the full local path
            model_card(tmp, hub.get("repo_id") or Path(os.path.abspath(save_directory)).name).save(tmp / "README.md")

    write_checkpoint(model, target, *args, tokenizer=tokenizer, add_files=add_card, **kwargs)
    if push_to_hub:
        push_to_hub_folder(target, hub.pop("repo_id", target.name), **hub)


def push_to_hub(model_or_dir: Any, repo_id: str, *, tokenizer: Any = None, commit_message: str | None = None,
                commit_description: str | None = None, private: bool | None = None, token: str | bool | None = None,
                revision: str | None = None, create_pr: bool = False, max_shard_size: int | str = "5GB",
                base_model: str | None = None, evaluation: dict | None = None, tags: list[str] | None = None):
    """Upload an hf_quant model, or a directory it was saved to, to the Hub in one commit.

    Uploads the safetensors shards, config.json with its quantization_config, the tokenizer
    (`tokenizer`, else the one saved beside the model's source checkpoint, if any; `False` for none)
    and a generated model card (a card already in the directory that a person wrote is kept).
    Weight files left in the repo by an earlier upload that this one does not overwrite are deleted
    in the same commit, so the repo never mixes two checkpoints. Returns huggingface_hub's CommitInfo.
    """
    upload = dict(commit_message=commit_message, commit_description=commit_description, private=private, token=token,
                  revision=revision, create_pr=create_pr, base_model=base_model, evaluation=evaluation, tags=tags)
    if isinstance(model_or_dir, (str, os.PathLike)):
        return push_to_hub_folder(Path(model_or_dir), repo_id, **upload)
    model = model_or_dir
    if not _is_hf_quant_model(model):
        raise ValueError("push_to_hub: this model is not an hf_quant model; quantize it with hf_quant first, "
                         "or use the model's own push_to_hub for float models.")
    with tempfile.TemporaryDirectory(prefix="hf_quant-push-") as tmp:
        folder = Path(tmp) / "model"
        save_pretrained(model, folder, max_shard_size=max_shard_size)
        if tokenizer is None:
            tokenizer = _source_tokenizer(model)
        if tokenizer:
            tokenizer.save_pretrained(folder)
        return push_to_hub_folder(folder, repo_id, **upload)


def _source_tokenizer(model: Any) -> Any:
    source = getattr(model.config, "name_or_path", None)
    if not source or not any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        logger.warning("hf_quant: not uploading a tokenizer: the one in %s did not load (%s).", source, e)
        return None


def push_to_hub_folder(folder: str | os.PathLike, repo_id: str, *, commit_message: str | None = None,
                       commit_description: str | None = None, private: bool | None = None,
                       token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                       base_model: str | None = None, evaluation: dict | None = None, tags: list[str] | None = None):
    """Upload a saved hf_quant checkpoint directory (see `push_to_hub`)."""
    folder = Path(folder)
    _, qc = _quantization_config(folder)  # refuse anything that is not a loadable hf_quant checkpoint
    weights = sorted(str(p) for p in folder.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{folder}: no .safetensors weights; hf_quant shares safetensors checkpoints only "
                         "(save_pretrained writes them).")
    index_checkpoint(weights)  # whole files, before uploading
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    card = None  # a card a person wrote is uploaded as is; a generated one is regenerated for this repo
    if not _keep_existing_card(folder):
        card = model_card(folder, repo_id, base_model=base_model, evaluation=evaluation)
        card.data.tags = card.data.tags + [t for t in tags or [] if t not in card.data.tags]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    ops: list = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                 for p in files if not (card is not None and p.relative_to(folder).as_posix() == "README.md")]
    if card is not None:
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    uploading = {op.path_in_repo for op in ops}
    try:
        remote = api.list_repo_files(repo_id, revision=revision)
    except RevisionNotFoundError:  # a new branch: nothing stale on it yet
        remote = []
    ops += [CommitOperationDelete(path_in_repo=f) for f in remote if f not in uploading and "/" not in f
            and any(fnmatch.fnmatch(f, pat) for pat in WEIGHT_FILE_PATTERNS)]
    message = commit_message or f"Upload {qc.bits}-bit {qc.method} model quantized with hf_quant"
    return api.create_commit(repo_id=repo_id, operations=ops, commit_message=message,
                             commit_description=commit_description, revision=revision, create_pr=create_pr)


def install(model: Any) -> None:
    """Give an hf_quant model the atomic `save_pretrained` and the card-writing `push_to_hub`."""
    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.push_to_hub = types.MethodType(_push_method, model)


def _push_method(model: Any, repo_id: str, **kwargs: Any):
    if not _is_hf_quant_model(model):  # e.g. after merge_lora/dequantize: a float model again
        return type(model).push_to_hub(model, repo_id, **kwargs)
    return push_to_hub(model, repo_id, **kwargs)
