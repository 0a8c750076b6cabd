"""One factory for every teacher / encoder spec.

Spec strings
------------
``open_clip:MODEL@PRETRAINED``
    MODEL is any name in ``open_clip.list_models()``. PRETRAINED is an open_clip
    pretrained tag (downloaded when online), a local checkpoint file, or ``none``
    (random init; a warning is emitted).
``timm:MODEL@PRETRAINED``
    ``true`` or a pretrained tag (``timm.create_model(MODEL[.TAG], pretrained=True)``),
    a local state_dict file (.pth/.pt/.bin/.safetensors, loaded via ``checkpoint_path``)
    or ``none`` (random init).

A teacher's ``@PRETRAINED`` part is required (`check_teacher_spec`): a spec without it would silently mean random
weights. Random-init teachers are seeded from the spec (`init_seed`, recorded in ``describe()`` and so in the cache
fingerprint), so two runs, or a killed run and its resume, build the same network.
``py:package.module:factory``
    ``factory()`` is called with no arguments and must return a *user teacher*.

User teacher interface (``py:`` specs)
--------------------------------------
The factory returns a ``torch.nn.Module`` with:

``preprocess_cfg`` (dict)
    Required keys ``size`` (int or ``[H, W]``), ``mean`` and ``std`` (3 floats each).
    Optional: ``resize_mode`` (``"shortest"`` default, ``"squash"`` or ``"longest"``),
    ``crop_pct`` (default 1.0), ``interpolation`` (default ``"bicubic"``).
    cskd builds the eval transform from it with torchvision:
    shortest = ``Resize(floor(max(size) / crop_pct)) + CenterCrop(size)``,
    squash = ``Resize(floor(size / crop_pct))`` (per side) ``+ CenterCrop(size)``,
    longest = open_clip's ``ResizeKeepRatio(longest) + CenterCropOrPad(size)``;
    each followed by ``ToTensor() + Normalize(mean, std)``.
``extract(x, layers=()) -> dict``
    ``x`` is a ``(B, 3, H, W)`` batch produced by that transform. Returns
    ``"embed"``: ``(B, D)`` global embedding (cskd L2-normalises it, do not bother);
    ``"tokens"``: ``(B, h, w, C)`` last-layer patch tokens, prefix/CLS tokens excluded;
    ``"prefix"`` (optional): ``(B, P, C)`` prefix tokens or ``None``;
    ``"layers"`` (optional unless ``layers`` is non-empty): ``{i: (B, h_i, w_i, C_i)}``
    keyed by exactly the indices passed in ``layers``.
``tokens_format`` (optional str)
    Set it to ``"NCHW"`` if ``tokens`` and ``layers`` come as ``(B, C, h, w)``.
``num_blocks`` (optional int)
    Reported by ``Teacher.describe()``; 0 when absent.

cskd calls ``extract`` under ``torch.no_grad()`` with the module in eval mode.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.metadata
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

SCHEMES = ("open_clip", "timm", "py")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


@dataclass(frozen=True)
class EncoderSpec:
    kind: str  # "open_clip" | "timm" | "py"
    name: str  # model name, or "package.module:factory"
    pretrained: str | None  # tag, path, or None for random init
    raw: str

    @property
    def weights_path(self) -> str | None:
        return self.pretrained if self.pretrained and os.path.isfile(self.pretrained) else None


def _closest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=5, cutoff=0.5)
    return ", ".join(close) if close else "none"


def _looks_like_path(s: str) -> bool:
    return "/" in s or os.sep in s or s.startswith("~") or s.lower().endswith(_WEIGHT_SUFFIXES)


def parse_spec(spec: str) -> EncoderSpec:
    """Parse and validate a spec string (see module docstring); ValueError names the spec and the fix."""
    raw = spec.strip() if isinstance(spec, str) else ""
    usage = "expected open_clip:MODEL[@PRETRAINED], timm:MODEL[@PRETRAINED] or py:package.module:factory"
    if ":" not in raw:
        raise ModelError(f"malformed encoder spec {spec!r}: {usage}")
    kind, rest = raw.split(":", 1)
    if kind not in SCHEMES:
        raise ModelError(f"unknown scheme {kind!r} in spec {raw!r} (closest: {_closest(kind, SCHEMES)}); {usage}")
    if kind == "py":
        module, _, attr = rest.partition(":")
        if not module or not attr or "@" in rest or not all(p.isidentifier() for p in module.split(".") + [attr]):
            raise ModelError(f"malformed py spec {raw!r}: expected py:package.module:factory (no @weights part)")
        return EncoderSpec("py", rest, None, raw)

    name, _, pretrained = rest.partition("@")  # model names never contain '@'; paths may
    if not name:
        raise ModelError(f"malformed spec {raw!r}: missing model name; {usage}")
    pretrained = os.path.expanduser(pretrained) if pretrained else None
    if pretrained is not None and pretrained.lower() == "none":
        pretrained = None
    if pretrained and not os.path.isfile(pretrained) and _looks_like_path(pretrained):
        raise ModelError(f"checkpoint file {pretrained!r} in spec {raw!r} does not exist; fix the path or use @none")
    (_check_open_clip if kind == "open_clip" else _check_timm)(name, pretrained, raw)
    return EncoderSpec(kind, name, pretrained, raw)


def init_seed(spec: EncoderSpec) -> int:
    """The torch seed a random-init teacher is built under: a function of the spec alone."""
    return int(hashlib.sha256(f"cskd-random-init:{spec.kind}:{spec.name}".encode()).hexdigest()[:8], 16)


def is_random_init(spec: EncoderSpec) -> bool:
    return spec.kind in ("open_clip", "timm") and spec.pretrained is None \
        and not spec.name.startswith(("hf-hub:", "local-dir:"))


def check_teacher_spec(spec: str) -> EncoderSpec:
    """Everything about a teacher spec that can be refused before any work: syntax, model name, tag, that random
    weights were asked for explicitly (``@none``), and that pretrained weights are in the local cache or the hub
    can be reached (so an offline machine fails in one line, not after minutes of download retries)."""
    parsed = parse_spec(spec)
    if parsed.kind in ("open_clip", "timm") and "@" not in parsed.raw \
            and not parsed.name.startswith(("hf-hub:", "local-dir:")):
        raise ModelError(f"teacher spec {parsed.raw!r} names no weights; add @TAG (a pretrained tag), @/path/to/"
                         f"checkpoint, or @none to really mean random weights (e.g. {parsed.raw}@none)")
    if parsed.kind in ("open_clip", "timm") and parsed.pretrained and not parsed.weights_path:
        from .hub import require_weights_reachable

        require_weights_reachable(parsed)
    return parsed


def _check_open_clip(name: str, pretrained: str | None, raw: str) -> None:
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        if pretrained:
            raise ModelError(f"spec {raw!r}: {name.split(':')[0]} models carry their own weights; drop '@{pretrained}'")
        return
    models = open_clip.list_models()
    if name.replace("/", "-") not in models:
        raise ModelError(f"unknown open_clip model {name!r} in spec {raw!r} (closest: {_closest(name, models)}); "
                         "run `python -c 'import open_clip; print(open_clip.list_models())'`")
    if pretrained and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ModelError(f"unknown open_clip pretrained tag {pretrained!r} in spec {raw!r}; "
                             f"tags for {name}: {', '.join(tags) or 'none'}; or give a local checkpoint path")


def _check_timm(name: str, pretrained: str | None, raw: str) -> None:
    import timm

    if not timm.is_model(name):
        raise ModelError(f"unknown timm model {name!r} in spec {raw!r} "
                         f"(closest: {_closest(name, timm.list_models())}); "
                         "run `python -c 'import timm; print(timm.list_models(\"*vit*\"))'`")
    if pretrained and not os.path.isfile(pretrained) and pretrained.lower() != "true":
        tagged = f"{name}.{pretrained}"
        if "." in name or not timm.list_pretrained(tagged):
            known = [k.split(".", 1)[1] for k in timm.list_pretrained(f"{name.split('.')[0]}.*")]
            raise ModelError(f"unknown timm pretrained tag {pretrained!r} in spec {raw!r}; "
                             f"use @true, a local file, or one of: {', '.join(known[:12]) or 'none'}")


def load_object(target: str):
    """Import ``package.module:attr`` (attr may be dotted) and return the object."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"malformed target {target!r}: expected package.module:attr")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import-time failure is a user-config problem
        raise ModelError(f"cannot import module {module_name!r} for {target!r}: {type(e).__name__}: {e} "
                         f"(is it on PYTHONPATH / sys.path?)") from e
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as e:
        raise ModelError(f"module {module_name!r} has no attribute {attr!r} (from {target!r})") from e
    return obj


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


# Runners: (module, x, take) -> (embed, tokens NHWC, prefix | None, [NHWC intermediate per index in take]).
# For library models `take` is None (all blocks) or a sorted list of absolute indices that always ends with
# the last block, so the last intermediate is the last block's output. For py teachers it is the caller's list.

def _run_open_clip_vit(visual, x, take):
    out = visual.forward_intermediates(x, indices=take, normalize_intermediates=False, output_fmt="NLC",
                                       output_extra_tokens=True)
    b, _, height, width = x.shape
    h, w = height // visual.patch_size[0], width // visual.patch_size[1]
    spatial, prefix = out["image_intermediates"], out["image_intermediates_prefix"]
    # ln_post only sees the token sequence when pooling happens after it; with attentional pooling it has
    # the pooler's width and with final_ln_after_pool it normalises the pooled vector, so keep raw tokens there.
    ln = visual.ln_post if visual.attn_pool is None and not visual.final_ln_after_pool else nn.Identity()
    inters = [t.reshape(b, h, w, -1) for t in spatial]
    return out["image_features"], ln(spatial[-1]).reshape(b, h, w, -1), ln(prefix[-1]), inters


def _run_open_clip_cnn(visual, x, take):
    # ModifiedResNet truncates its blocks to max(take)+1 even when not stopping early, so attnpool is only
    # right when the last block is requested - which every `take` here guarantees.
    out = visual.forward_intermediates(x, indices=take, output_fmt="NCHW")
    inters = [_nhwc(t) for t in out["image_intermediates"]]
    return out["image_features"], inters[-1], None, inters


def _run_timm(model, x, take, head=None):
    # timm 1.0.x returns (final_features, [intermediates]); final_features == forward_features(x)
    # (final norm applied, prefix tokens included for ViTs), intermediates are raw block outputs.
    final, inters = model.forward_intermediates(x, indices=take, norm=False, output_fmt="NCHW",
                                                intermediates_only=False)
    embed = head(final) if head is not None else model.forward_head(final, pre_logits=True)
    inters = [_nhwc(t) for t in inters]
    prefix = None
    if final.ndim == 3:  # token models: (B, P + h*w, C)
        p = getattr(model, "num_prefix_tokens", 0)
        h, w = inters[-1].shape[1:3]
        tokens = final[:, p:].reshape(final.shape[0], h, w, -1)
        prefix = final[:, :p] if p else None
    else:
        tokens = final if getattr(model, "output_fmt", "NCHW") == "NHWC" else _nhwc(final)
    return embed, tokens, prefix, inters


def _run_open_clip_timm(visual, x, take):
    # Same head as open_clip's TimmModel.forward: the trunk's own pooling, then open_clip's projection.
    return _run_timm(visual.trunk, x, take, head=lambda f: visual.head(visual.trunk.forward_head(f)))


def _run_py(module, x, take):
    out = module.extract(x, layers=tuple(take or ()))
    if not isinstance(out, dict) or "embed" not in out or "tokens" not in out:
        raise ModelError(f"{type(module).__name__}.extract must return a dict with 'embed' and 'tokens'")
    fix = _nhwc if getattr(module, "tokens_format", "NHWC") == "NCHW" else (lambda t: t)
    got = out.get("layers") or {}
    missing = [i for i in take or () if i not in got]
    if missing:
        raise ModelError(f"{type(module).__name__}.extract did not return requested layers {missing}")
    return out["embed"], fix(out["tokens"]), out.get("prefix"), [fix(got[i]) for i in take or ()]


class Teacher(nn.Module):
    """A frozen image encoder with one output contract for every spec kind (see ``forward``)."""

    def __init__(self, spec: EncoderSpec, model: nn.Module, runner: Callable, preprocess: Callable,
                 preprocess_cfg: dict, device: str | torch.device = "cpu"):
        super().__init__()
        self.spec = spec
        self.model = model.to(device).eval().requires_grad_(False)
        self._runner = runner
        self.preprocess = preprocess
        self.preprocess_cfg = {**preprocess_cfg, "repr": repr(preprocess)}
        self.weights_sha256 = _sha256(spec.weights_path) if spec.weights_path else None
        self.init_seed = init_seed(spec) if is_random_init(spec) else None
        # One dummy pass tells every shape; requesting all blocks also counts them.
        h, w = self.preprocess_cfg["size"]
        with torch.no_grad():
            dummy = torch.zeros(1, 3, h, w, device=device)
            embed, tokens, prefix, inters = runner(self.model, dummy, () if spec.kind == "py" else None)
        self.num_blocks = int(getattr(model, "num_blocks", 0)) if spec.kind == "py" else len(inters)
        self.embed_dim = int(embed.shape[-1])
        self.token_dim = int(tokens.shape[-1])
        self.grid = (int(tokens.shape[1]), int(tokens.shape[2]))
        self.num_prefix_tokens = int(prefix.shape[1]) if prefix is not None else 0
        self.eval()

    def train(self, mode: bool = True):
        # A teacher inside a student wrapper must not flip into train mode (dropout, BN stats).
        return super().train(False)

    def _absolute(self, i: int) -> int:
        if not -self.num_blocks <= i < self.num_blocks:
            raise ModelError(f"layer index {i} out of range for {self.spec.raw} ({self.num_blocks} blocks)")
        return i % self.num_blocks

    @torch.no_grad()
    def forward(self, x: torch.Tensor, layers: Sequence[int] = ()) -> dict:
        """Return ``embed`` (B, D) float32 L2-normalised, ``tokens`` (B, h, w, C) last-layer patch tokens
        (prefix excluded), ``prefix`` (B, P, C) or None, ``layers`` {i: (B, h_i, w_i, C_i)} raw block outputs
        keyed by the requested (possibly negative) indices."""
        layers = [int(i) for i in layers]
        if self.spec.kind == "py":
            keys, take = layers, list(dict.fromkeys(layers))
        else:
            keys = [self._absolute(i) for i in layers]
            take = sorted(set(keys) | {self.num_blocks - 1})
        embed, tokens, prefix, inters = self._runner(self.model, x, take)
        by_index = dict(zip(take, inters))
        return {
            "embed": F.normalize(embed.float(), dim=-1),
            "tokens": tokens,
            "prefix": prefix,
            "layers": {i: by_index[k] for i, k in zip(layers, keys)},
        }

    def describe(self) -> dict:
        versions = {"torch": torch.__version__}
        for dist, key in (("open_clip_torch", "open_clip"), ("timm", "timm")):
            try:
                versions[key] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[key] = None
        return {
            "spec": self.spec.raw, "kind": self.spec.kind, "name": self.spec.name,
            "pretrained": self.spec.pretrained, "weights_sha256": self.weights_sha256, "init_seed": self.init_seed,
            "embed_dim": self.embed_dim, "token_dim": self.token_dim, "grid": list(self.grid),
            "num_prefix_tokens": self.num_prefix_tokens, "num_blocks": self.num_blocks,
            "preprocess": dict(self.preprocess_cfg), "versions": versions,
        }


def make_preprocess_cfg(size, resize_mode, crop_pct, interpolation, mean, std) -> dict:
    size = [int(size), int(size)] if isinstance(size, (int, float)) else [int(s) for s in size]
    return {"size": size, "resize_mode": resize_mode, "crop_pct": float(crop_pct), "interpolation": interpolation,
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _creation_error(spec: EncoderSpec, e: Exception, example: str) -> Exception:
    if spec.weights_path:
        return ValueError(f"checkpoint {spec.weights_path!r} does not fit {spec.name} ({spec.raw}): {e}")
    return RuntimeError(f"{spec.raw}: could not create/fetch {spec.kind} weights ({e}); offline? "
                        f"pass a local file instead: {example}")


@contextlib.contextmanager
def _quiet_root_log(prefix: str):
    """Drop root-logger records starting with ``prefix`` for the duration of the block."""
    import logging

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(prefix)

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _build_open_clip(spec: EncoderSpec, device):
    import open_clip
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if spec.pretrained is None and not spec.name.startswith(("hf-hub:", "local-dir:")):
        warnings.warn(f"{spec.raw}: open_clip model with RANDOM weights (@none) - its features are meaningless "
                      f"for real use; pass a pretrained tag or checkpoint path", UserWarning, stacklevel=3)
    try:
        with _quiet_root_log("No pretrained weights loaded"):  # open_clip's own notice repeats the warning above
            model, _, preprocess = open_clip.create_model_and_transforms(spec.name, pretrained=spec.pretrained,
                                                                         device=device)
    except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError/KeyError/... for bad weights
        raise _creation_error(spec, e, f"open_clip:{spec.name}@/path/to/ckpt.pt") from e
    visual = model.visual  # keep only the image tower; the text tower is freed with `model`
    if isinstance(visual, VisionTransformer):
        runner = _run_open_clip_vit
    elif isinstance(visual, ModifiedResNet):
        runner = _run_open_clip_cnn
    elif isinstance(visual, TimmModel):
        runner = _run_open_clip_timm
    else:
        raise ModelError(f"{spec.raw}: unsupported open_clip image tower {type(visual).__name__}")
    pp = visual.preprocess_cfg
    # open_clip's eval transform resizes straight to the crop size, i.e. crop_pct 1.0
    cfg = make_preprocess_cfg(pp["size"], pp.get("resize_mode", "shortest"), 1.0, pp.get("interpolation", "bicubic"),
                  pp["mean"], pp["std"])
    return visual, runner, preprocess, cfg


def _build_timm(spec: EncoderSpec, device, role: str):
    import timm
    from timm.data import create_transform, resolve_model_data_config

    name, kwargs = spec.name, {}
    if spec.weights_path:
        kwargs["checkpoint_path"] = spec.weights_path
    elif spec.pretrained:
        name = name if spec.pretrained.lower() == "true" else f"{name}.{spec.pretrained}"
        kwargs["pretrained"] = True
    elif role == "teacher":
        warnings.warn(f"{spec.raw}: timm teacher with RANDOM weights - its features are meaningless for real use; "
                      f"use @true, a pretrained tag or a checkpoint path", UserWarning, stacklevel=3)
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise _creation_error(spec, e, f"timm:{spec.name}@/path/to/model.pth") from e
    if not hasattr(model, "forward_intermediates"):
        raise ModelError(f"{spec.raw}: timm model {spec.name} has no forward_intermediates; pick another model")
    data_cfg = resolve_model_data_config(model)
    preprocess = create_transform(**data_cfg, is_training=False)
    modes = {"center": "shortest", "squash": "squash", "border": "longest"}
    cfg = make_preprocess_cfg(data_cfg["input_size"][1:], modes[data_cfg.get("crop_mode") or "center"], data_cfg["crop_pct"],
                  data_cfg["interpolation"], data_cfg["mean"], data_cfg["std"])
    return model, _run_timm, preprocess, cfg


def py_transform(cfg: dict):
    from torchvision import transforms as T

    size, crop_pct = cfg["size"], cfg["crop_pct"]
    interp = T.InterpolationMode(cfg["interpolation"])
    if cfg["resize_mode"] == "shortest":
        resize = [T.Resize(math.floor(max(size) / crop_pct), interpolation=interp), T.CenterCrop(size)]
    elif cfg["resize_mode"] == "squash":
        resize = [T.Resize([math.floor(s / crop_pct) for s in size], interpolation=interp), T.CenterCrop(size)]
    elif cfg["resize_mode"] == "longest":
        from open_clip.transform import CenterCropOrPad, ResizeKeepRatio

        resize = [ResizeKeepRatio(size, interpolation=cfg["interpolation"], longest=1), CenterCropOrPad(size)]
    else:
        raise ModelError(f"resize_mode must be shortest, squash or longest, got {cfg['resize_mode']!r}")
    return T.Compose(resize + [T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])


def _build_py(spec: EncoderSpec, device):
    factory = load_object(spec.name)
    model = factory()
    where = f"{spec.raw}: factory returned {type(model).__name__}"
    if not isinstance(model, nn.Module):
        raise ModelError(f"{where}, expected a torch.nn.Module (see cskd_cache.models.teachers docstring)")
    if not callable(getattr(model, "extract", None)):
        raise ModelError(f"{where} without an extract(x, layers=()) method (see cskd_cache.models.teachers docstring)")
    user_cfg = getattr(model, "preprocess_cfg", None)
    if not isinstance(user_cfg, dict) or not {"size", "mean", "std"} <= user_cfg.keys():
        raise ModelError(f"{where} without a preprocess_cfg dict holding size, mean and std")
    cfg = make_preprocess_cfg(user_cfg["size"], user_cfg.get("resize_mode", "shortest"), user_cfg.get("crop_pct", 1.0),
                  user_cfg.get("interpolation", "bicubic"), user_cfg["mean"], user_cfg["std"])
    return model, _run_py, py_transform(cfg), cfg


def build_teacher(spec: str | EncoderSpec, device: str | torch.device = "cpu", role: str = "teacher") -> Teacher:
    """Build a frozen (eval, requires_grad=False) Teacher from a spec string or parsed EncoderSpec."""
    spec = spec if isinstance(spec, EncoderSpec) else (check_teacher_spec(spec) if role == "teacher" else parse_spec(spec))
    if spec.kind == "py":
        return Teacher(spec, *_build_py(spec, device), device=device)
    build = _build_open_clip if spec.kind == "open_clip" else (lambda s, d: _build_timm(s, d, role))
    if not is_random_init(spec):
        return Teacher(spec, *build(spec, device), device=device)
    # Random weights are drawn under a seed of the spec, inside a forked RNG so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(spec))
        return Teacher(spec, *build(spec, device), device=device)
