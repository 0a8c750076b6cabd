"""Trained IAA scorers on disk: what `cskd finetune` and `cskd distill` leave for evaluate/predict/export.

RUN_DIR/iaa_model.json          {"format", "version", "encoder": {spec, input_cfg, size_override, ...},
                                 "head": {"kind": "distribution"|"scalar", "bins", "in_dim", "normalize"},
                                 "labels": {"name", "scale": [lo, hi], "bins", "threshold"}, ...extra}
RUN_DIR/iaa_model.safetensors   encoder (``encoder.model.*``) and head (``head.*``) weights

Scores: a distribution head predicts K bins over the values 1..K; a scalar head predicts the score normalised to
0..1 over the dataset's scale. `IAAScorer.score` maps both to the dataset's native scale ``[lo, hi]`` (AVA 1..10:
identical to the bin mean; KonIQ 5 bins over 1..100: lo + (mean - 1) / (K - 1) * (hi - lo)), so metrics and
predictions always speak the dataset's own units. The architecture is rebuilt from the encoder spec with random
weights (nothing is fetched) and these weights are loaded strictly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MissingFile, ModelError
from ..files import default_file_mode, read_json, write_json
from ..labels.targets import from_unit, to_unit  # noqa: F401 (re-exported)
from .score_heads import DistributionHead, ScalarHead
from .weights import load_weights

__all__ = ["IAA_JSON", "IAA_WEIGHTS", "IAAModel", "IAAScorer", "build_head", "head_to_scores", "load_iaa_model",
           "save_iaa_model", "to_unit", "from_unit", "count_params"]

IAA_JSON = "iaa_model.json"
IAA_WEIGHTS = "iaa_model.safetensors"
FORMAT = "cskd-iaa-model"
VERSION = 1


def build_head(kind: str, in_dim: int, bins: int | None = None, dropout: float = 0.0) -> nn.Module:
    if kind == "distribution":
        if not bins:
            raise ModelError("a distribution head needs the number of bins (the dataset publishes no votes: "
                             "use the scalar head)")
        return DistributionHead(in_dim, bins, dropout)
    if kind == "scalar":
        return ScalarHead(in_dim, dropout)
    raise ModelError(f"unknown head kind {kind!r}; use 'distribution' or 'scalar'")


def head_to_scores(head_out: torch.Tensor, kind: str, scale) -> dict[str, torch.Tensor | None]:
    """Head output -> ``score`` (B,) on the native scale, ``std`` (B,) and ``dist`` (B, K) for a distribution
    head (None for a scalar head); std is in native units too. The one mapping validation, evaluation,
    prediction, export and the teacher's val metrics share."""
    lo, hi = (float(v) for v in scale)
    if kind == "distribution":
        dist = head_out.float().softmax(-1)
        k = dist.shape[-1]
        values = torch.arange(1, k + 1, dtype=dist.dtype, device=dist.device)
        mean = dist @ values
        std = (dist @ values.square() - mean.square()).clamp_min(0).sqrt()
        unit = (hi - lo) / (k - 1)
        return {"score": lo + (mean - 1) * unit, "std": std * unit, "dist": dist}
    return {"score": from_unit(head_out.float(), (lo, hi)), "std": None, "dist": None}


class IAAModel(nn.Module):
    """``encoder`` + ``head``: ``(B, 3, H, W)`` -> the head's output.

    encoder: a module returning a ``(B, C)`` tensor, or a tuple/list whose first item is ``(B, C)`` pooled
        features (a `StudentEncoder`'s ``(pooled, grid)``).
    head: a module taking ``(B, C)``; e.g. `DistributionHead` (``(B, K)`` logits) or `ScalarHead` (``(B,)``).
    normalize: L2-normalise the features before the head.
    scores: return the expected score ``(B,)`` instead of the raw head output, through ``head.scores(logits)``
        when the head has that method (a distribution head); a head without it already returns scores.
    proj: training only (``cskd distill --lambda-f``): a projection of the features to the cached-embedding
        width; with it, forward returns ``(head output, projected features)``. Never saved or exported.

    The one wrapper of an IAA model: Stage II trains it (the trainable module DDP wraps), `IAAScorer` scores
    with it, `cskd export` writes it, and the latency benchmark times it.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, normalize: bool = False, scores: bool = False,
                 proj: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.proj = proj
        self.normalize = normalize
        self.scores = scores

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder(x)
        if isinstance(f, (tuple, list)):
            f = f[0]
        if f.ndim != 2:
            raise ModelError(f"{type(self.encoder).__name__} gave features of shape {tuple(f.shape)}; "
                             "IAAModel needs pooled (B, C) features (or a tuple starting with them)")
        return F.normalize(f, dim=-1) if self.normalize else f

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        out = self.head(f)
        if self.scores and callable(getattr(self.head, "scores", None)):
            out = self.head.scores(out)
        return out if self.proj is None else (out, self.proj(f))


def count_params(module: nn.Module) -> int:
    """Parameters that take part in inference (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@dataclass
class IAAScorer:
    """A loaded scorer: ``model`` (an `IAAModel`, image batch -> head output), its input config and metadata."""

    model: IAAModel
    meta: dict

    @property
    def input_cfg(self) -> dict:
        return self.model.encoder.input_cfg

    @property
    def head_kind(self) -> str:
        return self.meta["head"]["kind"]

    @property
    def scale(self) -> tuple[float, float]:
        lo, hi = self.meta["labels"]["scale"]
        return float(lo), float(hi)

    def outputs(self, head_out: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return head_to_scores(head_out, self.head_kind, self.scale)

    @torch.inference_mode()
    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return self.outputs(self.model(x))


def save_iaa_model(run_dir: str | os.PathLike, encoder, head: nn.Module, head_meta: dict, labels_meta: dict,
                   extra: dict | None = None) -> None:
    """Write encoder + head so that `load_iaa_model` rebuilds them exactly (weights first, then the json)."""
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = IAAModel(_Enc(encoder), head, normalize=bool(head_meta.get("normalize", False)))
    tmp = run_dir / (IAA_WEIGHTS + ".tmp")
    save_model(model, str(tmp))
    os.chmod(tmp, default_file_mode())  # safetensors writes owner-only files; a run's model is shared
    os.replace(tmp, run_dir / IAA_WEIGHTS)
    write_json(run_dir / IAA_JSON, {"format": FORMAT, "version": VERSION,
                                    "encoder": {**encoder.describe(), "size_override": encoder.size_override},
                                    "head": dict(head_meta), "labels": dict(labels_meta), **(extra or {})})


class _Enc(nn.Module):
    """Holds the StudentEncoder under ``model`` so the weight names are ``encoder.model.*`` on disk."""

    def __init__(self, encoder):
        super().__init__()
        self.model = encoder.model
        self._encoder = [encoder]  # a list keeps it out of the module tree (its params are already under model)
        self.input_cfg = encoder.input_cfg

    @property
    def student(self):
        """The StudentEncoder itself (its weights are this module's), e.g. to train it on without the head."""
        return self._encoder[0]

    def forward(self, x):
        return self._encoder[0](x)


def load_iaa_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
                   trust_code: bool = False) -> IAAScorer:
    """The scorer a `cskd finetune` / `cskd distill` run wrote to RUN_DIR, in eval mode. A ``py:`` encoder spec in
    its iaa_model.json is imported only with ``trust_code`` (`trust`)."""

    from .students import rebuild_student

    run_dir = Path(os.path.expanduser(str(run_dir)))
    meta_path, weights = run_dir / IAA_JSON, run_dir / IAA_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise MissingFile(f"{run_dir}: no {IAA_JSON} + {IAA_WEIGHTS} here; point --model at the --out of a "
                                "finished `cskd finetune` or `cskd distill` run")
    meta = read_json(meta_path, ModelError, "re-run the training")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ModelError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')} is not "
                         f"{FORMAT!r} v{VERSION}; re-run the training with this cskd version")
    encoder = rebuild_student(meta["encoder"], meta_path, trust_code)
    h = meta["head"]
    head = build_head(h["kind"], int(h["in_dim"]), h.get("bins"))
    model = IAAModel(_Enc(encoder), head, normalize=bool(h.get("normalize", False)))
    load_weights(model, str(weights), "IAA model")
    return IAAScorer(model.to(device).eval(), meta)
