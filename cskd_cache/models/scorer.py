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

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .deploy import IAAModel
from .score_heads import DistributionHead, ScalarHead
from ..cache.manifest import default_file_mode, write_json
from .trust import check_spec_from_file

__all__ = ["IAA_JSON", "IAA_WEIGHTS", "IAAScorer", "build_head", "load_iaa_model", "save_iaa_model", "to_unit",
           "from_unit"]

IAA_JSON = "iaa_model.json"
IAA_WEIGHTS = "iaa_model.safetensors"
FORMAT = "cskd-iaa-model"
VERSION = 1


def to_unit(score, scale) -> torch.Tensor | float:
    """Native score -> 0..1 over the dataset's scale (the scalar head's target)."""
    lo, hi = scale
    return (score - lo) / (hi - lo)


def from_unit(u, scale):
    lo, hi = scale
    return lo + u * (hi - lo)


def build_head(kind: str, in_dim: int, bins: int | None = None, dropout: float = 0.0) -> nn.Module:
    if kind == "distribution":
        if not bins:
            raise ValueError("a distribution head needs the number of bins (the dataset publishes no votes: "
                             "use the scalar head)")
        return DistributionHead(in_dim, bins, dropout)
    if kind == "scalar":
        return ScalarHead(in_dim, dropout)
    raise ValueError(f"unknown head kind {kind!r}; use 'distribution' or 'scalar'")


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
        """Head output -> ``score`` (B,) on the native scale, ``std`` (B,) and ``dist`` (B, K) for a distribution
        head (None for a scalar head); std is in native units too."""
        lo, hi = self.scale
        if self.head_kind == "distribution":
            dist = head_out.float().softmax(-1)
            k = dist.shape[-1]
            values = torch.arange(1, k + 1, dtype=dist.dtype, device=dist.device)
            mean = dist @ values
            std = (dist @ values.square() - mean.square()).clamp_min(0).sqrt()
            unit = (hi - lo) / (k - 1)
            return {"score": lo + (mean - 1) * unit, "std": std * unit, "dist": dist}
        return {"score": from_unit(head_out.float(), (lo, hi)), "std": None, "dist": None}

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

    def forward(self, x):
        return self._encoder[0](x)


def load_iaa_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
                   trust_code: bool = False) -> IAAScorer:
    """The scorer a `cskd finetune` / `cskd distill` run wrote to RUN_DIR, in eval mode. A ``py:`` encoder spec in
    its iaa_model.json is imported only with ``trust_code`` (`trust`)."""
    from safetensors.torch import load_model

    from .students import build_student

    run_dir = Path(os.path.expanduser(str(run_dir)))
    meta_path, weights = run_dir / IAA_JSON, run_dir / IAA_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{run_dir}: no {IAA_JSON} + {IAA_WEIGHTS} here; point --model at the --out of a "
                                "finished `cskd finetune` or `cskd distill` run")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')} is not "
                         f"{FORMAT!r} v{VERSION}; re-run the training with this cskd version")
    enc_meta = meta["encoder"]
    check_spec_from_file(enc_meta.get("spec"), meta_path, trust_code)
    encoder = build_student(enc_meta["spec"], pretrained_ok=False, size=enc_meta.get("size_override"),
                            trust_code=trust_code)
    encoder.input_cfg = dict(enc_meta["input_cfg"])
    encoder.size_override = enc_meta.get("size_override")
    h = meta["head"]
    head = build_head(h["kind"], int(h["in_dim"]), h.get("bins"))
    model = IAAModel(_Enc(encoder), head, normalize=bool(h.get("normalize", False)))
    load_model(model, str(weights), strict=True)
    return IAAScorer(model.to(device).eval(), meta)
