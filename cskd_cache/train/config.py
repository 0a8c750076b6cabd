"""The one config base: every command's options as a dataclass that reads YAML, validates and compares itself.

`CommandConfig` holds the behaviour (``from_dict`` / ``from_yaml`` / ``to_dict`` / ``validate`` / ``changed``);
`TrainConfig` declares, once, the fields every training command shares (schedule, optimiser, run directory,
devices), with one spelling per idea: fractions, never percents; ``size`` for the input size of the model being
trained; ``lr_encoder`` for the encoder's learning rate; ``cache_image_root`` for a remap of the cache's image
roots and ``label_image_root`` for the folder a label file's images live in.

Names from earlier releases (``eval_pct``, ``student_size``, ``lr_student``, ``image_root``, ...) are still read,
from YAML and from the hidden old flags, with one notice each: `renamed` maps them to today's field (a percent
becomes a fraction). A run's own ``config.yaml`` is a valid ``--config`` (its ``resolved`` part is ignored), and
an old run's config.yaml, read through the same renames, resumes under today's names.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..data.images import DEFAULT_MAX_PIXELS
from ..errors import ConfigError, CskdError
from ..files import json_safe

__all__ = ["CommandConfig", "TrainConfig", "read_config_file", "RESUMABLE", "VIEW_PIXELS"]

# Settings a resumed run may change: they decide how, not what, is computed.
RESUMABLE = frozenset({"resume", "num_workers", "device", "log_every", "keep_checkpoints", "eval_batch_size",
                       "trust_code", "no_verify", "view_pixels"})
# A store and the originals show the same views up to the store's JPEG coding, so a run may switch on resume
# (a store made after the run started): the run log says which source each start used.
VIEW_PIXELS = ("auto", "store", "originals", "exact")

# old name -> (new name, divisor applied to the old value: a percent becomes a fraction)
_PCT = 100
TRAIN_RENAMES = {"warmup_pct": ("warmup_fraction", _PCT), "min_lr_pct": ("min_lr_fraction", _PCT)}


def read_config_file(path: str | os.PathLike, error: type[CskdError] = ConfigError) -> dict:
    """A YAML mapping of option: value, keys with ``_`` (dashes accepted); a run's ``resolved`` part dropped."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise error(f"--config {path}: cannot read it ({e})") from e
    if not isinstance(data, dict):
        raise error(f"--config {path}: expected a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items() if k != "resolved"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class CommandConfig:
    """Behaviour shared by every command's config dataclass (subclasses are ``@dataclass``es)."""

    command: ClassVar[str] = "cskd"
    error: ClassVar[type[CskdError]] = ConfigError
    required: ClassVar[tuple[str, ...]] = ()
    renamed: ClassVar[dict[str, tuple[str, float]]] = {}

    @classmethod
    def normalise(cls, d: dict | None, notice: bool = True) -> dict:
        """Dashes to underscores, ``resolved`` dropped, renamed keys mapped to today's names (with a notice)."""
        out = {}
        for key, value in (d or {}).items():
            key = str(key).replace("-", "_")
            if key == "resolved":
                continue
            if key in cls.renamed:
                new, factor = cls.renamed[key]
                if value is not None and factor != 1:
                    value = value / factor
                if notice:
                    how = f" (a fraction: read as {value:g})" if factor != 1 and value is not None else ""
                    warnings.warn(f"{_flag(key)} / `{key}` is now {_flag(new)} / `{new}`{how}; the old name goes "
                                  "in the next release", FutureWarning, stacklevel=3)
                key = new
            out[key] = value
        return out

    @classmethod
    def from_dict(cls, d: dict | None, notice: bool = True):
        """Keys are field names (dashes allowed, old names read with a notice); a run's config.yaml works too."""
        d = cls.normalise(d, notice)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise cls.error(f"unknown {cls.command} config keys {unknown}; valid keys: {', '.join(sorted(names))}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None, **overrides):
        """Defaults <- YAML file <- overrides (the CLI passes only the flags given on its command line)."""
        base = cls.normalise(read_config_file(path, cls.error)) if path else {}
        return cls.from_dict({**base, **cls.normalise(overrides)}, notice=False)

    def to_dict(self) -> dict:
        return json_safe(dataclasses.asdict(self))

    def validate(self) -> None:
        for name in self.required:
            if not getattr(self, name):
                raise self.error(f"{_flag(name)} is required")

    def changed(self, saved: dict) -> list[str]:
        """Fields whose value differs from a saved config (old names read as today's), ignoring `RESUMABLE`.

        A field the saved config lacks was added after that run was made; the run behaved as its default, so it
        counts as the default (a run made before ``refine_teacher`` existed resumes without it).
        """
        old, new = self.as_saved(saved), self.to_dict()
        return sorted(k for k in new if k not in RESUMABLE and json_safe(old.get(k)) != new[k])

    def as_saved(self, saved: dict) -> dict:
        """A saved config under today's names, every field it lacks filled with its default (`changed`)."""
        made = {f.name: _default(f) for f in dataclasses.fields(self)}
        return json_safe(made) | self.normalise(saved, notice=False)


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


@dataclass
class TrainConfig(CommandConfig):
    """The fields align, finetune and distill share (each adds its own)."""

    out: str = ""
    epochs: int = 10
    max_steps: int | None = None
    eval_every: int | None = None  # steps between evaluations/checkpoints (None: one pass over the main stream)
    batch_size: int = 32
    size: int | None = None  # input size of the model being trained (None: its own)
    lr: float = 1e-3
    lr_encoder: float | None = None  # None: same as lr
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.01
    clip_grad: float = 1.0
    ema: float = 0.0  # > 0: validate and save an exponential moving average of the weights (`ema`)
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"
    amp: bool = True
    resume: bool = False
    trust_code: bool = False  # allow py: specs found inside run: directories (`models.trust`)
    keep_checkpoints: int = 2
    log_every: int = 10
    max_pixels: int = DEFAULT_MAX_PIXELS
    # where cached views' pixels come from (`stages.view_pixels`): auto = a view store covering the input size,
    # else the originals in JPEG draft mode; store = the store or an error; originals; exact = full decodes
    view_pixels: str = "auto"

    renamed: ClassVar[dict[str, tuple[str, float]]] = TRAIN_RENAMES

    def validate(self) -> None:
        super().validate()
        err = self.error
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise err("--epochs and --max-steps must be >= 1")
        if self.eval_every is not None and self.eval_every < 1:
            raise err(f"--eval-every must be >= 1 step, got {self.eval_every}")
        if self.batch_size < 1:
            raise err("--batch-size must be >= 1")
        if not 0 <= self.warmup_fraction <= 1 or not 0 <= self.min_lr_fraction <= 1:
            raise err("--warmup-fraction and --min-lr-fraction are fractions in [0, 1]")
        if self.lr <= 0 or (self.lr_encoder is not None and self.lr_encoder < 0):
            raise err("--lr must be > 0 and --lr-encoder >= 0")
        if not 0 <= self.ema < 1:
            raise err(f"--ema must be in [0, 1) (0 = off; e.g. 0.998), got {self.ema}")
        if self.view_pixels not in VIEW_PIXELS:
            raise err(f"--view-pixels must be one of {', '.join(VIEW_PIXELS)}, got {self.view_pixels!r}")
