"""`DistillationTrainer` and `QuantRamp`: transformers' Trainer with `distillation_loss` and the quantization ramp.

Kept apart from `distill.py` and imported on first use (`hf_quant.training.DistillationTrainer`): importing
transformers' Trainer pulls in peft, bitsandbytes and more, which `import hf_quant` must not pay for.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from .distill import distillation_loss, set_ramp


class QuantRamp(TrainerCallback):
    """lambda = min(1, step / steps) at each optimizer step (from 0 at the first step to 1 at `steps`): the
    quantization is ramped in over the first steps. Derived from the step counter, so a resumed run ramps as
    the uninterrupted one."""

    def __init__(self, steps: int) -> None:
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"QuantRamp: steps={steps!r} must be a non-negative integer.")
        self.steps = steps

    def value(self, step: int) -> float:
        return 1.0 if self.steps == 0 else min(1.0, step / self.steps)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            set_ramp(model, self.value(state.global_step))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step < self.steps:
            set_ramp(model, self.value(state.global_step))  # stopped inside the ramp: convert will say so


class DistillationTrainer(Trainer):
    """`Trainer` whose loss is `distillation_loss` against `teacher` (the float model, frozen, in eval mode),
    with the quantization ramped in over `ramp_steps` (`QuantRamp`; 0 = fully quantized from the start).
    `ce_weight` adds the student's own language-modelling loss on the batch's labels."""

    def __init__(self, *args: Any, teacher: nn.Module, temperature: float = 1.0, hidden_weight: float = 0.0,
                 ce_weight: float = 0.0, ramp_steps: int = 0, **kwargs: Any) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if ramp_steps:
            callbacks.append(QuantRamp(ramp_steps))
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.hidden_weight, self.ce_weight = temperature, hidden_weight, ce_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        want_hidden = self.hidden_weight > 0
        out = model(**inputs, output_hidden_states=want_hidden)
        with torch.no_grad():
            teacher = self.teacher(**inputs, output_hidden_states=want_hidden)
        loss = distillation_loss(out, teacher, inputs.get("attention_mask"), self.temperature, self.hidden_weight)
        if self.ce_weight and labels is not None:
            shift = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                    ignore_index=-100)
            loss = loss + self.ce_weight * shift
        return (loss, out) if return_outputs else loss
