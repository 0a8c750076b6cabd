"""Read a ViT student's attention weights from its own forward pass, for the attention-distance constraint.

Every timm attention block (``qkv``, ``attn_drop``, ``fused_attn``) is switched to its unfused path, which
computes the softmaxed weights explicitly, and a hook on ``attn_drop`` keeps them (with their gradient) for the
forward that follows `start`. A student without such blocks (a CNN) gets a clear error instead of a silent zero.
"""

from __future__ import annotations

import torch

from ..errors import ModelError
from ..losses.attention_distance import mean_distance

__all__ = ["AttentionProbe", "patch_distances"]


def patch_distances(grid: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    """(T, T) Euclidean distances in input pixels between the patches of an h x w grid, row-major."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                                indexing="ij")
    pos = torch.stack([rows.reshape(-1) * patch[0], cols.reshape(-1) * patch[1]], -1)
    return torch.cdist(pos, pos).float()


class AttentionProbe:
    def __init__(self, encoder):
        model = getattr(encoder, "model", encoder)
        self.sites = [m for m in model.modules()
                      if hasattr(m, "qkv") and hasattr(m, "attn_drop") and hasattr(m, "fused_attn")]
        patch_embed = getattr(model, "patch_embed", None)
        if not self.sites or patch_embed is None:
            raise ModelError(f"{getattr(encoder, 'spec', type(model).__name__)}: --attn-distance needs a ViT-family "
                             "student (timm attention blocks with a patch embedding); this one has none, e.g. a CNN. "
                             "Use a ViT student or leave --attn-distance at 0")
        for site in self.sites:
            site.fused_attn = False  # the fused kernel never materialises the weights
        size = encoder.input_cfg["size"]
        patch = tuple(int(v) for v in patch_embed.patch_size)
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 1))
        self.dist = patch_distances((int(size[0]) // patch[0], int(size[1]) // patch[1]), patch)
        self._probs: list[torch.Tensor] = []
        self._on = False
        for site in self.sites:
            site.attn_drop.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        if self._on:
            self._probs.append(inputs[0])  # before dropout: the weights the block computed

    def start(self) -> None:
        self._probs, self._on = [], True

    def profile(self) -> torch.Tensor:
        """(L,) mean attention distance per layer (pixels) of the forward since `start`; stops recording."""
        self._on = False
        if len(self._probs) != len(self.sites):
            raise ModelError(f"captured {len(self._probs)} attention maps for {len(self.sites)} blocks; the student "
                             "ran no (or a partial) forward since the probe started")
        out = torch.stack([mean_distance(p, self.num_prefix, self.dist) for p in self._probs])
        self._probs = []
        return out
