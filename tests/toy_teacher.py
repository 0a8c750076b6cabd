"""A `py:` teacher for subprocess tests: a tiny seeded CNN meeting the user-teacher interface.

CSKD_TOY_TEACHER_SLEEP (seconds per batch) slows it down so a test can kill a run mid-way.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn


class ToyTeacher(nn.Module):
    preprocess_cfg = {"size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                      "interpolation": "bilinear", "crop_pct": 1.0}
    num_blocks = 2

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.block = nn.Conv2d(8, 12, 3, padding=1)
        self.head = nn.Linear(12, 6)

    def extract(self, x, layers=()):
        time.sleep(float(os.environ.get("CSKD_TOY_TEACHER_SLEEP", "0")))
        a = torch.relu(self.stem(x))
        b = torch.relu(self.block(a))
        feats = {0: a.permute(0, 2, 3, 1), 1: b.permute(0, 2, 3, 1)}
        return {"embed": self.head(b.mean((2, 3))), "tokens": feats[1], "prefix": None,
                "layers": {i: feats[i] for i in layers}}


def make() -> ToyTeacher:
    torch.manual_seed(0)
    return ToyTeacher().eval()
