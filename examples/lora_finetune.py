"""QLoRA-style fine-tuning on an hf_quant model with PEFT and transformers.Trainer, then the
adapter round trip and the merge.

    python examples/lora_finetune.py                      # tiny-llama shipped in tests/assets, RTN w4 g128
    python examples/lora_finetune.py --model ../shared/models/ref-llama --method gptq --steps 30

    # data-parallel, the same script (CPU: gloo; on GPUs add nothing, Trainer picks nccl):
    torchrun --nproc_per_node 2 examples/lora_finetune.py --steps 10
    accelerate launch --num_processes 2 examples/lora_finetune.py --steps 10

Steps:
1. Quantize `--model` (a float checkpoint) in `from_pretrained`, or load it if it is already an
   hf_quant checkpoint.
2. `peft.prepare_model_for_kbit_training` + LoRA on all linears; `Trainer` runs `--steps` steps on
   windows of the training text, with gradient checkpointing. By default that is every other tenth
   of the packaged held-out text (which the bundled models never saw); `--text` takes other files.
3. Held-out perplexity of the quantized base and of the adapted model, on the other tenths (or the
   held-out part of the `--text` files).
4. Saves the adapter, reloads it onto a freshly loaded quantized base, checks identical logits.
5. `hf_quant.merge_lora`: a float model with the adapter merged, and the same merged model
   re-quantized with the base's config; perplexity of each.
Under torchrun / accelerate, steps 3-5 run on the main process only.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import hf_quant
from hf_quant import compat

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "tests" / "assets" / "tiny-llama"
SLICES = 10


class TokenWindows(torch.utils.data.Dataset):
    """Non-overlapping `seq_len`-token windows of a text, as causal-LM examples."""

    def __init__(self, tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> None:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        n = ids.numel() // seq_len
        if max_windows is not None:
            n = min(n, max_windows)
        self.windows = ids[: n * seq_len].reshape(n, seq_len)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="float checkpoint to quantize, or an hf_quant one")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=8, help="per process")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--text", nargs="+", help="plain-text files: from each, the part after --skip is split into "
                    "training text (its first --train-fraction) and held-out text (the rest). Default: the "
                    "packaged held-out text (which the bundled models never saw), cut in tenths: the even "
                    "tenths train, the odd ones evaluate")
    ap.add_argument("--skip", type=float, default=0.0, help="fraction of each --text file to leave out first")
    ap.add_argument("--train-fraction", type=float, default=0.97)
    ap.add_argument("--eval-windows", type=int, default=None, help="cap on 512-token held-out windows")
    ap.add_argument("--out", help="output directory (default: a temporary one)")
    ap.add_argument("--no-merge", action="store_true", help="skip the merge / re-quantize step")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def load_quantized(args: argparse.Namespace):
    """The quantized model: loaded if `--model` is an hf_quant checkpoint, else quantized on load."""
    if getattr(AutoConfig.from_pretrained(args.model), "quantization_config", None) is not None:
        return AutoModelForCausalLM.from_pretrained(args.model)
    config = hf_quant.QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size)
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, quantization_config=config)


def texts(args: argparse.Namespace) -> tuple[str, str]:
    """(training text, held-out text)."""
    if args.text is None:  # text the model never saw: alternate tenths of the packaged held-out text
        text = hf_quant.eval.bundled_text()
        n = len(text) // SLICES
        parts = [text[i * n:(i + 1) * n if i < SLICES - 1 else len(text)] for i in range(SLICES)]
        return "\n\n".join(parts[0::2]), "\n\n".join(parts[1::2])
    train, heldout = [], []
    for path in args.text:
        text = Path(path).read_text(encoding="utf-8")
        text = text[int(len(text) * args.skip):]
        cut = int(len(text) * args.train_fraction)
        train.append(text[:cut])
        heldout.append(text[cut:])
    return "\n\n".join(train), "\n\n".join(heldout)


def add_lora(args: argparse.Namespace, model) -> PeftModel:
    """PEFT's QLoRA recipe on the quantized model: LoRA on every linear layer."""
    model = prepare_model_for_kbit_training(model)  # freezes the base, norms/embeddings to fp32
    return get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def make_trainer(args: argparse.Namespace, model: PeftModel, tokenizer, train_text: str, output_dir: str) -> Trainer:
    """A plain transformers Trainer: `args.steps` steps on `train_text` with gradient checkpointing;
    under torchrun / accelerate launch it runs data-parallel (gloo on CPU, nccl on GPUs) unchanged."""
    data = TokenWindows(tokenizer, train_text, args.seq_len)
    targs = TrainingArguments(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        **compat.activation_checkpointing_arguments(use_reentrant=False),
        save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed, use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False, ddp_broadcast_buffers=False,  # packed weights are frozen buffers
        dataloader_drop_last=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=data)
    trainer.remove_callback(PrinterCallback)  # one summary line below instead of a dict per step
    return trainer


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    was_training = model.training
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() * len(b) for b in windows.split(batch_size)]
    model.train(was_training)
    return sum(losses) / len(windows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        start = time.perf_counter()
        model = load_quantized(args)
        q = model.config.quantization_config
        print(f"{Path(args.model).name}: {q.method} w{q.bits} g{q.group_size}, loaded/quantized in "
              f"{time.perf_counter() - start:.1f} s")
        base_dir = out / "quantized"
        if int(os.environ.get("RANK", "0")) == 0:  # one writer when --out is shared by torchrun's processes
            model.save_pretrained(base_dir)
            tok.save_pretrained(base_dir)
        train_text, heldout = texts(args)
        probe = TokenWindows(tok, train_text, args.seq_len, max_windows=32).windows  # fixed training windows
        loss_before = mean_loss(model, probe)
        ppl_base = hf_quant.eval.perplexity(model, tok, heldout, max_windows=args.eval_windows)

        start = time.perf_counter()
        peft_model = add_lora(args, model)
        trainer = make_trainer(args, peft_model, tok, train_text, str(out / "trainer"))
        trainer.train()
        seconds = time.perf_counter() - start
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if not trainer.is_world_process_zero():
            return
        head, tail = losses[: max(1, len(losses) // 5)], losses[-max(1, len(losses) // 5):]
        print(f"trained {len(losses)} steps in {seconds:.1f} s: loss {sum(head) / len(head):.4f} (first steps) -> "
              f"{sum(tail) / len(tail):.4f} (last steps)")
        print("loss per step: " + " ".join(f"{x:.3f}" for x in losses))

        peft_model.eval()
        loss_after = mean_loss(peft_model, probe)
        ppl_lora = hf_quant.eval.perplexity(peft_model, tok, heldout, max_windows=args.eval_windows)
        adapter_dir = out / "adapter"
        peft_model.save_pretrained(adapter_dir)
        fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
        fresh.eval()
        ids = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids
        with torch.no_grad():
            # the trained model runs its norms in fp32 (prepare_model_for_kbit_training); compare like with like
            same = torch.equal(fresh.to(torch.float32)(input_ids=ids).logits.float(),
                               peft_model(input_ids=ids).logits.float())
        print(f"training loss on {len(probe)} fixed training windows: {loss_before:.4f} -> {loss_after:.4f}")
        print(f"held-out perplexity: quantized base {ppl_base:.3f} -> with adapter {ppl_lora:.3f} "
              f"({ppl_lora / ppl_base - 1:+.2%})")
        print(f"adapter saved to {adapter_dir} and reloaded onto a fresh quantized base: logits "
              f"{'identical' if same else 'DIFFER'}")
        if not args.no_merge:
            merged = hf_quant.merge_lora(peft_model)
            ppl_merged = hf_quant.eval.perplexity(merged, tok, heldout, max_windows=args.eval_windows)
            requant = hf_quant.merge_lora(
                PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir),
                requantize=True)
            ppl_requant = hf_quant.eval.perplexity(requant, tok, heldout, max_windows=args.eval_windows)
            print(f"merged into a float model ({merged.dtype}): perplexity {ppl_merged:.3f}; "
                  f"re-quantized ({q.method} w{q.bits} g{q.group_size}): {ppl_requant:.3f}")
        if not same or not losses or not all(math.isfinite(x) for x in losses):
            raise SystemExit("adapter round trip or training failed")


if __name__ == "__main__":
    main()
