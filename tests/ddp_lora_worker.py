"""Run by test_peft.py under `torchrun --nproc_per_node 2`: LoRA on the quantized tiny-llama with the
example's Trainer; every rank writes its adapter weights to OUT/adapter_rank{rank}.safetensors."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import lora_finetune as ex  # noqa: E402


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if "lora_" in n}


def main(out: Path) -> None:
    args = ex.parse_args(["--steps", "4", "--batch-size", "2", "--seq-len", "64", "--rank", "4", "--lr", "1e-3"])
    tok = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    model = ex.add_lora(args, ex.load_quantized(args))
    trainer = ex.make_trainer(args, model, tok, ex.texts(args)[0], str(out / "trainer"))
    if trainer.args.process_index == 0:
        save_file(adapter_state(model), out / "adapter_start.safetensors")
    trainer.train()
    assert trainer.args.world_size == 2, trainer.args.world_size
    save_file(adapter_state(model), out / f"adapter_rank{trainer.args.process_index}.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
