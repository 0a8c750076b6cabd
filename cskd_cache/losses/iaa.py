"""`IAALoss`: Stage II's objective (finetune and distill).

- ``sup`` on labelled items: distribution head, EMD to the label distribution; scalar head, MSE to the score on
  0..1 over the dataset's scale, + ``w_plcc`` x (1 - PLCC) when asked;
- ``distill`` on unlabelled items (weight ``lambda_u``): distribution, EMD between the softmaxed student and
  teacher logits, or KL(teacher || student) at a temperature (``distill_loss``); scalar, MSE to the teacher's
  0..1 score;
- ``feat`` (weight ``lambda_f``): 1 - cos(projected pooled feature, cached CLIP embedding of the shown view) on
  every item that has one;
- ``consistency`` (weight ``consistency``): the unlabelled items' prediction on a second jitter of their cached
  view against the first, stop-gradient (`consistency.ConsistencyLoss`).

The labelled items come first in the model's batch, the unlabelled ones after them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .consistency import ConsistencyLoss
from .cosine import CosineLoss
from .emd import EMDLoss
from .kl import DistillKLLoss
from .plcc_loss import PLCCLoss

__all__ = ["IAALoss"]


class IAALoss(nn.Module):
    """The Stage II objective (module docstring); returns unweighted parts and the weighted ``loss``."""

    def __init__(self, kind: str, w_plcc: float = 0.0, lambda_u: float = 0.0, lambda_f: float = 0.0,
                 distill_loss: str = "emd", temperature: float = 1.0, consistency: float = 0.0):
        super().__init__()
        self.kind, self.w_plcc, self.lambda_u, self.lambda_f = kind, w_plcc, lambda_u, lambda_f
        self.consistency = consistency
        self.agree = ConsistencyLoss(kind)
        self.distill_loss = distill_loss
        self.emd, self.plcc, self.cos = EMDLoss(), PLCCLoss(), CosineLoss()
        self.kl = DistillKLLoss(temperature, teacher="logits")

    def forward(self, out: torch.Tensor, emb: torch.Tensor | None, lab: dict, unl: dict | None,
                out2: torch.Tensor | None = None) -> dict:
        """``out``: predictions on the labelled then the unlabelled items; ``out2``: on the unlabelled items' second
        views (consistency only)."""
        n = lab["image"].shape[0]
        o_l = out[:n].float()
        parts = {}
        if self.kind == "distribution":
            parts["sup"] = self.emd(o_l.softmax(-1), lab["dist"])
        else:
            parts["sup"] = F.mse_loss(o_l, lab["unit"])
            if self.w_plcc:
                parts["plcc"] = self.plcc(o_l, lab["unit"])
        if unl is not None:
            o_u = out[n:].float()
            if self.kind == "distribution":
                parts["distill"] = (self.emd(o_u.softmax(-1), unl["logits"].softmax(-1)) if self.distill_loss == "emd"
                                    else self.kl(o_u, unl["logits"]))
            else:
                parts["distill"] = F.mse_loss(o_u, unl["score"])
        if self.lambda_f:
            batches = [lab] + ([unl] if unl is not None else [])
            mask = torch.cat([b["has_embed"] for b in batches])
            target = torch.cat([b["embed"] for b in batches])
            # no linked item in this batch: a zero that still touches proj, so DDP sees its gradient
            parts["feat"] = self.cos(emb[mask], target[mask]) if mask.any() else emb.sum() * 0.0
        if self.consistency and out2 is not None:
            parts["consistency"] = self.agree(out2, out[n:])
        weights = {"sup": 1.0, "plcc": self.w_plcc, "distill": self.lambda_u, "feat": self.lambda_f,
                   "consistency": self.consistency}
        parts["loss"] = sum(weights[k] * v for k, v in parts.items())
        return parts
