"""Loading saved weights: safetensors only (never a pickle), strictly, with a one-line error naming the file.

A file whose tensors do not fit the architecture rebuilt from its spec (edited json, weights of another model,
a truncated download) is a `ModelError`, not a traceback: torch's own message (missing and unexpected keys,
shape mismatches) is kept, shortened to its first lines.
"""

from __future__ import annotations

import os

from torch import nn

from ..errors import ModelError

__all__ = ["load_weights"]


def load_weights(module: nn.Module, path: str | os.PathLike, what: str = "model") -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(module, str(path), strict=True)
    except (RuntimeError, SafetensorError, OSError) as e:
        detail = " ".join(str(e).split())[:400]
        raise ModelError(f"{path}: these {what} weights do not fit the architecture recorded beside them "
                         f"({detail}); the run directory is damaged or mixed, re-run the training") from None
