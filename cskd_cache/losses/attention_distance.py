"""The attention-distance constraint of Stage II (`cskd distill --attn-distance WEIGHT`).

A ViT's mean attention distance per layer (how far, in input pixels, each patch looks on average) shrinks when
IAA fine-tuning collapses what alignment gave it. The constraint keeps the student's per-layer profile near a
reference: ``mean over layers of ((d_l - ref_l) / ref_l)^2``, a relative error so that early (local) and late
(global) layers weigh alike. ``d_l`` comes from the attention weights of the same forward pass that the other
losses use (`models.attention_probe`), so the constraint costs no second pass, only the unfused attention.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["mean_distance", "AttentionDistanceLoss"]


def mean_distance(probs: torch.Tensor, num_prefix: int, dist: torch.Tensor) -> torch.Tensor:
    """Mean attention distance of one layer, a differentiable scalar: ``probs`` (B, heads, P + T, P + T) with the
    P prefix tokens first, restricted to patch queries and keys (renormalised); ``dist`` (T, T) in pixels."""
    p = int(num_prefix)
    a = probs[:, :, p:, p:].float()
    a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return (a * dist.to(a.device)).sum(-1).mean()


class AttentionDistanceLoss(nn.Module):
    def __init__(self, reference: torch.Tensor):
        super().__init__()
        self.register_buffer("reference", reference.detach().float().clone(), persistent=False)

    def forward(self, profile: torch.Tensor) -> torch.Tensor:
        """profile: (L,) the current per-layer mean distances; 0 when it equals the reference."""
        ref = self.reference.to(profile.device)
        return (((profile.float() - ref) / ref.clamp_min(1e-6)) ** 2).mean()
