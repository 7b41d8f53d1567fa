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
