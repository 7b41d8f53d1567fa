"""Run by test_qat.py under `torchrun --nproc_per_node 2`: OneBit distillation of tiny-llama with
`hf_quant.training.DistillationTrainer`; every rank writes its trained parameters (latent weights, g, h) to
OUT/qat_rank{rank}.safetensors."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, TrainingArguments

import hf_quant
from hf_quant import training

TINY_LLAMA = Path(__file__).resolve().parent / "assets" / "tiny-llama"


def state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters()
            if n.endswith((".h", ".g", "proj.weight"))}


def main(out: Path, method: str) -> None:
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32)
    student = training.prepare(AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32),
                               hf_quant.QuantConfig(method=method))
    ids = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(32, dtype=torch.long)} for i in range(8)]
    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             seed=0, data_seed=0, ddp_broadcast_buffers=False)
    trainer = training.DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data,
                                           hidden_weight=1.0, ramp_steps=2)
    if trainer.args.process_index == 0:
        save_file(state(student), out / "qat_start.safetensors")
    trainer.train()
    assert trainer.args.world_size == 2, trainer.args.world_size
    save_file(state(student), out / f"qat_rank{trainer.args.process_index}.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
