"""1-bit and ternary models on ref-llama: held-out perplexity before and after quantization-aware distillation.

    python benchmarks/bench_qat.py [--model ../shared/models/ref-llama] [--minutes 30] [--methods onebit bitnet]
        [--batch 8] [--seq-len 256] [--lr 1e-3] [--curve-every 50] [--curve-windows 16] [--skip-reference]
        [--plant 32 --methods --skip-reference]   # the untrained rows on a copy with planted outlier channels

Rows, each evaluated on the held-out text (the last 3% of each book of ../shared/data/corpus, bundled as
hf_quant/data/heldout.txt; all 512-token windows), bf16 measured in the same run:
  - bf16;
  - RTN 1-bit (sign x absmean per row, no training: QuantConfig(method="rtn", bits=1, sym=True, group_size=-1));
  - OneBit with SVID value vectors and with absmean ones, no training, with the paper's output LayerNorm and
    without it (output_norm=False);
  - BitNet b1.58, no training;
  - OneBit (SVID, output LayerNorm) and BitNet b1.58 after distillation from the bf16 model
    (`hf_quant.training.DistillationTrainer`: KL on the logits + normalised hidden-state MSE; BitNet's
    quantization ramped in over the first --ramp-steps steps), trained for at most --minutes minutes of training
    time on 256-token windows of the text the model was trained on (the first 97% of each book), then converted
    (`training.convert`) and evaluated as packed layers;
  - RTN w2 g64 and GPTQ w2 g64 for reference (--skip-reference to skip).
Every --curve-every steps the training loss and the perplexity on the first --curve-windows held-out windows are
printed (the curve; evaluation time is not counted in the training budget). The stored size of the quantized
layers against bf16 is reported for the trained models.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

import hf_quant
from hf_quant import training
from hf_quant.eval import bundled_text, perplexity

SHARED = Path(__file__).resolve().parents[2] / "shared"


def training_windows(tok, corpus: Path, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """Non-overlapping `seq_len`-token windows of the first 97% of each book, shuffled."""
    windows = []
    for f in sorted(corpus.glob("*.txt")):
        text = f.read_text(encoding="utf-8")
        ids = tok(text[: int(len(text) * 0.97)], return_tensors="pt").input_ids[0]
        n = ids.numel() // seq_len
        windows += list(ids[: n * seq_len].reshape(n, seq_len))
    random.Random(seed).shuffle(windows)
    return windows


class Budget(TrainerCallback):
    """Stops training after `seconds` of training time (evaluations excluded); logs the curve."""

    def __init__(self, seconds: float, every: int, curve) -> None:
        self.seconds, self.every, self.curve = seconds, every, curve
        self.spent, self.start, self.rows, self.losses = 0.0, None, [], []

    def on_step_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kw):
        self.spent += time.perf_counter() - self.start
        if state.global_step % self.every == 0:
            recent = [h["loss"] for h in state.log_history if "loss" in h][-self.every:]
            ppl = self.curve(model)
            self.rows.append((state.global_step, self.spent, sum(recent) / max(len(recent), 1), ppl))
            print(f"  step {state.global_step:5d}  {self.spent:7.0f} s  loss {self.rows[-1][2]:.4f}  "
                  f"curve ppl {ppl:.2f}", flush=True)
        if self.spent >= self.seconds:
            control.should_training_stop = True


def quantized_fraction(model, directory: Path) -> float:
    """Bytes of the quantized layers' tensors in the saved checkpoint / their bf16 weights' bytes."""
    from safetensors import safe_open

    stored = bf16 = 0
    names = {n for n, m in model.named_modules() if isinstance(m, hf_quant.QuantLinear)}
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if k.rpartition(".")[0] in names:
                    stored += st.get_tensor(k).nbytes
    for n, m in model.named_modules():
        if n in names:
            bf16 += m.in_features * m.out_features * 2
    return stored / bf16


METHODS = {  # --methods name -> (row label, QuantConfig of the prepared student)
    "onebit": ("OneBit (SVID, output LN)", dict(method="onebit")),
    "onebit-noln": ("OneBit (SVID, no output LN)", dict(method="onebit", output_norm=False)),
    "bitnet": ("BitNet b1.58", dict(method="bitnet")),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHARED / "models" / "ref-llama"))
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--methods", nargs="*", default=["onebit", "bitnet"], choices=sorted(METHODS),
                    help="onebit (SVID, the paper's output LayerNorm), onebit-noln (SVID, no output LayerNorm), bitnet; "
                         "none (`--methods` alone): no training")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--ramp-steps", type=int, default=50)
    ap.add_argument("--curve-every", type=int, default=50)
    ap.add_argument("--curve-windows", type=int, default=16)
    ap.add_argument("--skip-reference", action="store_true", help="skip the RTN / GPTQ w2 g64 rows")
    ap.add_argument("--skip-untrained", action="store_true", help="skip the untrained 1-bit / ternary rows")
    ap.add_argument("--plant", type=float, default=0.0, metavar="FACTOR",
                    help="run on a copy of --model with planted outlier channels: --plant-channels hidden channels of "
                         "every RMSNorm weight times FACTOR, the next linears' input columns divided by it (the same "
                         "float function; a power of two is exact in bf16). Input columns of very different size are "
                         "what SVID's second value vector represents and a per-row scale cannot")
    ap.add_argument("--plant-channels", type=int, default=4)
    args = ap.parse_args()
    if args.plant:
        with tempfile.TemporaryDirectory() as tmp:
            args.model = plant_copy(args.model, args.plant, args.plant_channels, Path(tmp) / "planted")
            run(args)
    else:
        run(args)


def plant_copy(model_dir: str, factor: float, n: int, out: Path) -> str:
    """A copy of model_dir in `out` with `n` planted outlier channels (`eval_outliers.plant_outliers`)."""
    from hf_quant.eval_outliers import plant_outliers

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    channels = torch.randperm(model.config.hidden_size, generator=torch.Generator().manual_seed(0))[:n].tolist()
    plant_outliers(model, sorted(channels), factor)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    print(f"planted copy of {model_dir}: channels {sorted(channels)} x{factor:g} in every RMSNorm", flush=True)
    return str(out)


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    flags = sorted(hf_quant.core.devices.cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"})
    print(f"ref-llama QAT, {os.cpu_count()} CPUs ({' '.join(flags)}), torch {torch.__version__}", flush=True)

    tok = AutoTokenizer.from_pretrained(args.model)
    heldout = bundled_text()
    ppl = lambda m, n=None: perplexity(m, tok, heldout, max_windows=n)  # noqa: E731
    rows = []

    def row(name, model, seconds=None, extra=""):
        t = time.perf_counter()
        p = ppl(model)
        rows.append((name, p, seconds, extra))
        print(f"{name}: held-out ppl {p:.3f} ({time.perf_counter() - t:.0f} s to evaluate)", flush=True)
        return p

    def load(**kw):
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, **kw)

    teacher = load()
    row("bf16", teacher)
    for name, cfg in [("RTN 1-bit (sign x absmean per row), no training", dict(method="rtn", bits=1, sym=True, group_size=-1)),
                      ("OneBit, SVID, output LN, no training", dict(method="onebit")),
                      ("OneBit, absmean, output LN, no training", dict(method="onebit", init="absmean")),
                      ("OneBit, SVID, no output LN, no training", dict(method="onebit", output_norm=False)),
                      ("OneBit, absmean, no output LN, no training", dict(method="onebit", init="absmean",
                                                                          output_norm=False)),
                      ("BitNet b1.58, no training", dict(method="bitnet"))]:
        if args.skip_untrained:
            break
        row(name, load(quantization_config=hf_quant.QuantConfig(**cfg)))
    if not args.skip_reference:
        from ppl_ref_llama import calibration_text

        for name, cfg in [("RTN w2 g64", dict(method="rtn")), ("GPTQ w2 g64", dict(method="gptq"))]:
            t = time.perf_counter()
            m = load(quantization_config=hf_quant.QuantConfig(
                bits=2, group_size=64, dataset=calibration_text(SHARED / "data" / "corpus"), seq_len=512, **cfg))
            row(name, m, time.perf_counter() - t)

    windows = training_windows(tok, SHARED / "data" / "corpus", args.seq_len)
    print(f"training text: {len(windows)} windows of {args.seq_len} tokens", flush=True)
    data = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]
    curves = {}
    for method in args.methods:
        label, kw = METHODS[method]
        qc = hf_quant.QuantConfig(**kw)
        student = training.prepare(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), qc)
        budget = Budget(args.minutes * 60, args.curve_every, lambda m: ppl(m, args.curve_windows))
        with tempfile.TemporaryDirectory() as out:
            targs = TrainingArguments(output_dir=out, max_steps=10**6, per_device_train_batch_size=args.batch,
                                      learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                                      weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
                                      use_cpu=True, bf16=True, disable_tqdm=True, seed=0, data_seed=0,
                                      dataloader_drop_last=True)
            trainer = training.DistillationTrainer(
                model=student, teacher=teacher, args=targs, train_dataset=data, callbacks=[budget],
                hidden_weight=args.hidden_weight, ramp_steps=args.ramp_steps if qc.method == "bitnet" else 0)
            print(f"{method}: distilling for {args.minutes:.0f} minutes", flush=True)
            trainer.train()
            curves[method] = budget.rows
            training.convert(student)
            student.eval()
            steps = trainer.state.global_step
            student.save_pretrained(Path(out) / "frozen")
            frac = quantized_fraction(student, Path(out) / "frozen")
        row(f"{label} after distillation ({steps} steps)", student, budget.spent,
            f"quantized layers {frac:.4f}x bf16")

    base = rows[0][1]
    print("\n| model | held-out ppl | x bf16 | time (s) | note |\n|---|---:|---:|---:|---|")
    for name, p, s, extra in rows:
        print(f"| {name} | {p:.3f} | {p / base:.2f}x | {'' if s is None else f'{s:.0f}'} | {extra} |")
    for method, rows_ in curves.items():
        print(f"\n{method} curve (loss: mean training loss of the last {args.curve_every} steps; ppl: first "
              f"{args.curve_windows} held-out windows)\n| step | training s | loss | ppl |\n|---:|---:|---:|---:|")
        for step, spent, loss, p in rows_:
            print(f"| {step} | {spent:.0f} | {loss:.4f} | {p:.2f} |")


if __name__ == "__main__":
    main()
