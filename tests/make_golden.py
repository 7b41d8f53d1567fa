"""Write the golden checkpoints of `tests/test_golden.py` (run once, with the hf_quant that defines
"today's behaviour"; the test then checks that later code quantizes to the same bytes and loads
them to the same logits).

    python tests/make_golden.py            # writes tests/assets/golden/<case>/

Each case directory holds the saved hf_quant checkpoint (config.json + model.safetensors) and
`logits.safetensors`: the loaded model's fp32 logits on `golden_input_ids()`. The float source of
the GPT-2 case (a tiny random GPT-2, whose initialisation could change between torch releases) is
saved as `gpt2-float/`, so re-quantizing never depends on torch's random init.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

import hf_quant  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel  # noqa: E402

GOLDEN = HERE / "assets" / "golden"
TINY_LLAMA = HERE / "assets" / "tiny-llama"

# case -> (float source, load dtype, QuantConfig kwargs). Calibration is kept small (bf16 matmuls are
# slow on CPUs without AVX-512 bf16) so that the test re-runs it fast.
CASES = {
    "llama-rtn-w4g128": ("tiny-llama", torch.bfloat16, dict(method="rtn", bits=4, group_size=128)),
    "llama-gptq-w3g128-act": ("tiny-llama", torch.bfloat16, dict(method="gptq", bits=3, group_size=128,
                                                                  desc_act=True, num_samples=8, seq_len=64)),
    "llama-awq-w4g128": ("tiny-llama", torch.bfloat16, dict(method="awq", bits=4, group_size=128, num_samples=4,
                                                             seq_len=64)),
    "gpt2-gptq-w4g32": ("gpt2-float", torch.bfloat16, dict(method="gptq", bits=4, group_size=32, num_samples=8,
                                                           seq_len=64)),
}


# The CPU features that pick torch's bf16/fp32 matmul and Cholesky code paths: bit-identity holds
# only between machines that share them (README "What is reproducible").
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16")
MACHINE_FILE = GOLDEN / "machine.json"


def machine() -> dict:
    """What the goldens' bytes depend on besides the code: the matmul ISA and the thread count."""
    from hf_quant.core.devices import cpu_flags

    flags = cpu_flags()
    if not flags:  # not Linux: the platform stands in for the flags
        import platform
        return {"isa": [platform.machine()], "threads": THREADS}
    return {"isa": [f for f in ISA_FLAGS if f in flags], "threads": THREADS}


def same_machine() -> bool:
    """Whether this machine computes bit for bit as the one that wrote the goldens."""
    return MACHINE_FILE.exists() and json.loads(MACHINE_FILE.read_text()) == machine()


def golden_input_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


def gpt2_dataset() -> list[torch.Tensor]:
    """Token ids for the GPT-2 case (the tiny random GPT-2 has no tokenizer)."""
    return [torch.randint(0, 256, (1024,), generator=torch.Generator().manual_seed(4))]


def source_path(source: str) -> Path:
    return TINY_LLAMA if source == "tiny-llama" else GOLDEN / source


def config_for(case: str) -> hf_quant.QuantConfig:
    source, _, kwargs = CASES[case]
    dataset = gpt2_dataset() if source == "gpt2-float" else None
    # the goldens were written with blocks computing in the model's dtype; "auto" would compute in fp32 on
    # the AVX2 machine that wrote them (QuantConfig.calibration_dtype)
    return hf_quant.QuantConfig(**kwargs, dataset=dataset, calibration_dtype="model")


# GPTQ's codes depend on the CPU thread count (torch's Cholesky rounds differently; README "What is
# reproducible"): the goldens were made with 2 threads, and re-quantizing uses 2 as well.
THREADS = 2


def quantize_case(case: str, out: Path) -> None:
    source, dtype, _ = CASES[case]
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        model = AutoModelForCausalLM.from_pretrained(source_path(source), dtype=dtype,
                                                     quantization_config=config_for(case))
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # the card is not part of the golden bytes


@torch.no_grad()
def logits_of(path: Path, dtype: torch.dtype | None = None) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, **({} if dtype is None else {"dtype": dtype}))
    with torch.no_grad():
        return model(input_ids=golden_input_ids()).logits.float()


def float_logits(case: str) -> torch.Tensor:
    """The float source model's logits on the golden inputs (what the quantized ones approximate)."""
    source, dtype, _ = CASES[case]
    return logits_of(source_path(source), dtype)


def main() -> None:
    gpt2 = GOLDEN / "gpt2-float"
    if not gpt2.exists():
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=128)
        GPT2LMHeadModel(cfg).to(torch.bfloat16).save_pretrained(gpt2)
    for case in CASES:
        out = GOLDEN / case
        shutil.rmtree(out, ignore_errors=True)
        quantize_case(case, out)
        save_file({"logits": logits_of(out)}, str(out / "logits.safetensors"))
        print(case, sorted(p.name for p in out.iterdir()))
    MACHINE_FILE.write_text(json.dumps(machine()) + "\n")


if __name__ == "__main__":
    main()
