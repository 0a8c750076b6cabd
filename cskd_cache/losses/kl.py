"""KL(teacher || student) between score distributions, softened by a temperature, for distillation.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015): both sides are softmaxed at
temperature T and the KL is multiplied by T^2, so the gradient scale does not shrink as T grows and the
term's weight can be tuned independently of T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DistillKLLoss(nn.Module):
    """teacher="logits" takes teacher logits; teacher="probs" takes probabilities (e.g. cached vote
    histograms or softmax outputs), which are softened as softmax(log(p) / T), the same thing for T = 1."""

    def __init__(self, temperature: float = 1.0, teacher: str = "logits", eps: float = 1e-8):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if teacher not in ("logits", "probs"):
            raise ValueError(f"teacher must be 'logits' or 'probs', got {teacher!r}")
        self.t, self.teacher, self.eps = float(temperature), teacher, eps

    def forward(self, student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """student_logits, teacher: (B, K); returns the batch-mean KL times T^2."""
        if student_logits.shape != teacher.shape:
            raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher.shape)} differ in shape")
        # the teacher is a fixed target: no gradient should reach it even if it is a live model's output
        t_logits = teacher.detach().float()
        if self.teacher == "probs":
            t_logits = t_logits.clamp_min(self.eps).log()
        log_p = F.log_softmax(t_logits / self.t, dim=-1)
        log_q = F.log_softmax(student_logits.float() / self.t, dim=-1)
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * self.t**2
