"""Distillation from the float teacher for quantization-aware training, as the 1-bit papers train.

`distillation_loss` is the loss (OneBit, sec. 3.4): KL(teacher || student) of the next-token
distributions at temperature T (times T^2), over the tokens the attention mask keeps, plus `hidden_weight` x
the mean over layers of the squared distance between the L2-normalised hidden states of student and
teacher (per token). `DistillationTrainer` is `transformers.Trainer` with that loss and the quantization
ramp (`QuantRamp`) built in; or pass `distillation_loss` to your own `compute_loss`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback


def distillation_loss(student_out: Any, teacher_out: Any, attention_mask: torch.Tensor | None = None,
                      temperature: float = 1.0, hidden_weight: float = 0.0) -> torch.Tensor:
    """KL(teacher || student) of the logits at `temperature` (scaled by T^2), averaged over the kept tokens;
    plus `hidden_weight` x the hidden-state term (both outputs need `hidden_states`, i.e.
    output_hidden_states=True)."""
    s = student_out.logits.float() / temperature
    t = teacher_out.logits.float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    keep = torch.ones_like(kl) if attention_mask is None else attention_mask.to(kl.dtype)
    loss = (kl * keep).sum() / keep.sum().clamp(min=1) * temperature**2
    if hidden_weight:
        hs, ht = student_out.hidden_states, teacher_out.hidden_states
        if hs is None or ht is None:
            raise ValueError("distillation_loss: hidden_weight > 0 needs hidden states from both models "
                             "(call them with output_hidden_states=True).")
        terms = [((F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).pow(2).sum(-1) * keep).sum()
                 / keep.sum().clamp(min=1) for a, b in zip(hs[1:], ht[1:])]
        loss = loss + hidden_weight * torch.stack(terms).mean()
    return loss


def set_ramp(model: nn.Module, value: float) -> None:
    """Set the quantization mix (lambda in [0, 1]) of every layer of `model` that ramps in (BitNet's)."""
    for m in model.modules():
        if isinstance(getattr(m, "ramp", None), float):
            m.ramp = float(value)


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
