"""One factory for every student spec: the trainable image encoder of `cskd align` and the later stages.

Spec strings
------------
``timm:MODEL[@PRETRAINED]``
    Any ``timm.list_models()`` name, CNN or ViT, any size. PRETRAINED is ``true`` or a timm pretrained tag
    (downloaded when online), a local state_dict file (.pth/.pt/.bin/.safetensors), or ``none`` (random init,
    the default and a normal choice for a student).
``py:package.module:factory``
    ``factory()`` is called with no arguments and returns a *user student* (below).
``run:RUN_DIR``
    The student a finished ``cskd align`` run wrote to RUN_DIR, resolved by `runs.build_encoder` (the one loader
    of run directories), which hands the ``timm:``/``py:`` spec recorded there back to this module.

User student interface (``py:`` specs)
--------------------------------------
The factory returns a ``torch.nn.Module`` with:

``input_cfg`` (dict)
    ``size`` (int or ``[H, W]``), ``mean`` and ``std`` (3 floats each); optional ``interpolation``
    (``"bicubic"`` default; any name `cskd_cache.data.views.render_view` accepts).
``forward_features(x) -> (pooled, grid)``
    ``x`` is a ``(B, 3, H, W)`` batch normalised with ``mean``/``std``; ``pooled`` is ``(B, Cp)``, ``grid`` is
    ``(B, C, h, w)`` (NCHW). Every parameter should take part in ``pooled`` or ``grid`` (DDP expects it).

A ``--size`` override only changes ``input_cfg["size"]`` of a py student; the module must accept it.

Every student is wrapped in `StudentEncoder`, whose ``forward(x)`` returns ``(pooled (B, Cp), grid (B, C, h, w))``
for all three kinds, and whose ``input_cfg`` is ``{size [H, W], mean, std, interpolation}``: exactly what
`cskd_cache.data.views.render_tensor` needs to rebuild a cached view at the student's own resolution.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..data.views import INTERPOLATIONS
from ..errors import ModelError
from .teachers import load_object, parse_spec
from .trust import check_spec_from_file

__all__ = ["StudentEncoder", "build_student", "STUDENT_SCHEMES"]

STUDENT_SCHEMES = ("timm", "py", "run")


def size_hw(size) -> list[int]:
    if isinstance(size, (int, float)):
        return [int(size), int(size)]
    h, w = size
    return [int(h), int(w)]


def _input_cfg(size, mean, std, interpolation) -> dict:
    interpolation = interpolation if interpolation in INTERPOLATIONS else "bicubic"
    return {"size": size_hw(size), "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "interpolation": interpolation}


class StudentEncoder(nn.Module):
    """A student image encoder with one output contract for every spec kind: ``forward(x) -> (pooled, grid)``.

    ``spec`` is what rebuilds the architecture (never ``run:``); ``pooled_dim``, ``grid_dim`` and ``grid_size``
    come from one dummy pass at ``input_cfg["size"]``.
    """

    def __init__(self, model: nn.Module, features: Callable, input_cfg: dict, spec: str):
        super().__init__()
        self.model = model
        self._features = features
        self.input_cfg = input_cfg
        self.spec = spec
        self.size_override = None  # set by build_student; saved so load_encoder rebuilds the same module
        was_training = model.training
        model.eval()
        with torch.no_grad():
            pooled, grid = self(torch.zeros(1, 3, *input_cfg["size"]))
        model.train(was_training)
        if pooled.ndim != 2 or grid.ndim != 4:
            raise ModelError(f"{spec}: student must give pooled (B, C) and grid (B, C, h, w), got "
                             f"{tuple(pooled.shape)} and {tuple(grid.shape)}")
        self.pooled_dim = int(pooled.shape[1])
        self.grid_dim = int(grid.shape[1])
        self.grid_size = (int(grid.shape[2]), int(grid.shape[3]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._features(self.model, x)

    def describe(self) -> dict:
        return {"spec": self.spec, "input_cfg": dict(self.input_cfg), "pooled_dim": self.pooled_dim,
                "grid_dim": self.grid_dim, "grid_size": list(self.grid_size),
                "params": sum(p.numel() for p in self.parameters())}


def _timm_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = model.forward_features(x)
    pooled = model.forward_head(f, pre_logits=True)
    if f.ndim == 3:  # token models: (B, prefix + h*w, C); the grid is the patch tokens only
        p = int(getattr(model, "num_prefix_tokens", 0))
        patches = f[:, p:]
        h, w = _patch_grid(model, x, patches.shape[1])
        grid = patches.transpose(1, 2).reshape(f.shape[0], f.shape[2], h, w)
    elif getattr(model, "output_fmt", "NCHW") == "NHWC":  # e.g. Swin, MambaOut
        grid = f.permute(0, 3, 1, 2)
    else:
        grid = f
    if pooled.ndim > 2:
        pooled = pooled.flatten(1)
    return pooled, grid


def _patch_grid(model: nn.Module, x: torch.Tensor, n: int) -> tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    if pe is not None and hasattr(pe, "dynamic_feat_size"):
        h, w = pe.dynamic_feat_size(x.shape[-2:])
        if h * w == n:
            return int(h), int(w)
    side = math.isqrt(n)
    if side * side != n:
        raise ModelError(f"cannot lay {n} patch tokens out as a grid for {type(model).__name__}")
    return side, side


def _py_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.forward_features(x)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ModelError(f"{type(model).__name__}.forward_features must return (pooled, grid)")
    return out[0], out[1]


class _SizeError(ModelError):
    pass


def _create_at_size(timm, name: str, kwargs: dict, size) -> nn.Module:
    """timm.create_model that runs at ``size``. ViTs first try dynamic_img_size (the position embedding is
    resampled per forward, so a local checkpoint still loads as saved); models without it but with a fixed
    img_size (relative-position ViTs) are built at that size; CNNs take any size as they are."""
    if size is None:
        return timm.create_model(name, **kwargs)
    hw = size_hw(size)
    last = None
    for extra in ({"dynamic_img_size": True}, {"img_size": hw}, {}):
        try:
            model = timm.create_model(name, **kwargs, **extra)
        except TypeError as e:  # this model has no such argument
            last = e
            continue
        try:
            with torch.no_grad():
                model.eval().forward_features(torch.zeros(1, 3, *hw))
        except Exception as e:  # noqa: BLE001 - the variant does not run at this size; try the next
            last = e
            continue
        return model.train()
    raise _SizeError(f"timm model {name} does not run at input size {hw} ({type(last).__name__}: {last}); "
                     "pick another --size")


def _build_timm(spec, pretrained_ok: bool, size, raw: str) -> StudentEncoder:
    import timm
    from timm.data import resolve_model_data_config

    name, kwargs = spec.name, {}
    if pretrained_ok and spec.weights_path:
        kwargs["checkpoint_path"] = spec.weights_path
    elif pretrained_ok and spec.pretrained:
        from .hub import require_weights_reachable

        require_weights_reachable(spec)  # offline: one line now, not a minute of hub retries
        name = name if spec.pretrained.lower() == "true" else f"{name}.{spec.pretrained}"
        kwargs["pretrained"] = True
    try:
        model = _create_at_size(timm, name, kwargs, size)
    except _SizeError:
        raise
    except Exception as e:  # noqa: BLE001 - timm raises many kinds for bad weights / offline fetches
        if spec.weights_path:
            raise ModelError(f"checkpoint {spec.weights_path!r} does not fit {spec.name} ({spec.raw}): {e}") from e
        raise ModelError(f"{spec.raw}: could not create/fetch timm weights ({e}); offline? pass a local file "
                           f"(timm:{spec.name}@/path/to/model.pth) or @none for random init") from e
    # The classifier is never used (pooled features come from forward_head(pre_logits=True)); dropping it keeps
    # DDP from seeing parameters without gradients.
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
    data = resolve_model_data_config(model)
    cfg = _input_cfg(size if size is not None else data["input_size"][1:], data["mean"], data["std"],
                     data.get("interpolation", "bicubic"))
    try:
        return StudentEncoder(model, _timm_features, cfg, raw)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{raw}: the student does not run at input size {cfg['size']} ({type(e).__name__}: {e}); "
                         "pick another --size") from e


def _build_py(spec, size) -> StudentEncoder:
    model = load_object(spec.name)()
    where = f"{spec.raw}: factory returned {type(model).__name__}"
    if not isinstance(model, nn.Module):
        raise ModelError(f"{where}, expected a torch.nn.Module (see cskd_cache.models.students docstring)")
    if not callable(getattr(model, "forward_features", None)):
        raise ModelError(f"{where} without forward_features(x) -> (pooled, grid) (see cskd_cache.models.students)")
    user = getattr(model, "input_cfg", None)
    if not isinstance(user, dict) or not {"size", "mean", "std"} <= user.keys():
        raise ModelError(f"{where} without an input_cfg dict holding size, mean and std")
    cfg = _input_cfg(size if size is not None else user["size"], user["mean"], user["std"],
                     user.get("interpolation", "bicubic"))
    return StudentEncoder(model, _py_features, cfg, spec.raw)


def rebuild_student(meta: dict, meta_path, trust_code: bool = False) -> StudentEncoder:
    """The architecture a run recorded (``meta``: its ``spec``, ``size_override``, ``input_cfg``), with random weights
    and nothing fetched, for its saved weights to be loaded into. A ``py:`` spec read from ``meta_path`` is imported
    only with ``trust_code`` (`trust`)."""
    check_spec_from_file(meta.get("spec"), meta_path, trust_code)
    encoder = build_student(meta["spec"], pretrained_ok=False, size=meta.get("size_override"), trust_code=trust_code)
    trained = list(meta["input_cfg"]["size"])
    if list(encoder.input_cfg["size"]) != trained:
        raise ModelError(f"{meta_path}: the rebuilt encoder expects input {encoder.input_cfg['size']}, the run "
                         f"trained at {trained}")
    encoder.input_cfg = dict(meta["input_cfg"])
    encoder.size_override = meta.get("size_override")
    return encoder


def build_student(spec: str, pretrained_ok: bool = True, size: int | list[int] | None = None,
                  trust_code: bool = False) -> StudentEncoder:
    """Build a StudentEncoder (train mode, trainable) from a spec string (see module docstring).

    ``pretrained_ok=False`` builds the architecture with random weights, ignoring ``@PRETRAINED``: for callers
    that load trained weights next (``run:``, resuming) and must not fetch anything. ``size`` (int or [H, W])
    overrides the model's own input size. ``trust_code`` allows a ``py:`` spec found inside a ``run:`` directory
    (a ``py:`` spec passed here directly is the caller's own choice).
    """
    raw = spec.strip() if isinstance(spec, str) else ""
    kind = raw.split(":", 1)[0] if ":" in raw else ""
    if kind == "run":
        raise ModelError(f"{spec!r}: a run: spec names a trained run; build it with `models.runs.build_encoder`, "
                         "the one loader of run directories")
    if kind not in ("timm", "py"):
        raise ModelError(f"malformed student spec {spec!r}: expected timm:MODEL[@PRETRAINED], "
                         "py:package.module:factory or run:RUN_DIR")
    # Without pretrained weights the @ part is never read, so a weights file deleted since training must not
    # stop a run: student from being rebuilt; the full spec is still what gets recorded.
    parsed = parse_spec(raw if pretrained_ok or kind != "timm" else raw.split("@", 1)[0])
    module = _build_timm(parsed, pretrained_ok, size, raw) if kind == "timm" else _build_py(parsed, size)
    module.size_override = size_hw(size) if size is not None else None
    return module.train()
