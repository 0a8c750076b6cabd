"""Attention statistics of ViT-family encoders: mean attention distance and attention entropy per layer and head.

Models
------
``open_clip:NAME[@PRETRAINED|none]`` (open_clip VisionTransformer towers, or a timm ViT trunk),
``timm:NAME[@...]`` (timm VisionTransformer family: DeiT, registers, ...), ``run:DIR`` (an aligned run's student,
`models.runs.load_run_encoder`: an align run's student, or the encoder of a finetune/distill run). A bare directory
is read as ``run:DIR``. Supported attention modules: timm's ``Attention`` (``qkv``, ``q_norm``/``k_norm``,
``scale``), torch ``nn.MultiheadAttention`` (open_clip's default block) and open_clip's own ``Attention`` (with or
without qk-norm). A model without any (a CNN) raises `NotAttentionModel`; a ViT whose attention is another kind
(windowed, relative-position bias, rope) raises `UnsupportedAttention`, because recomputing it would be wrong.

How the probabilities are obtained
----------------------------------
A forward pre-hook on each block's attention module captures its input (the normed tokens, B x N x C) and the
probabilities are recomputed from the module's own weights: ``softmax(scale * q k^T)`` per head, with q/k
normalisation where the module has it. The model itself runs unchanged (fused attention kernels included), so
nothing is patched; tests check the recomputation against timm's unfused path and torch's ``need_weights``.

Definitions (per image, layer and head; the model's own eval preprocessing)
----------------------------------------------------------------------------
Let P be the prefix tokens (CLS, registers) and T = h*w the patch tokens. Prefix tokens are dropped as queries and
as keys, and each patch query's row over patch keys is renormalised to sum 1: ``a_qk = A_qk / sum_k' A_qk'``.
This measures how a patch spreads its attention *over the image*; the share a patch gives to prefix tokens is
reported separately as ``prefix_mass`` (mean over queries of ``sum_{k in P} A_qk``), so nothing is hidden.

- mean attention distance (pixels): ``mean_q sum_k a_qk * d(q, k)``, where d is the Euclidean distance between
  the two patches' positions in input pixels, ``sqrt((dr * patch_h)^2 + (dc * patch_w)^2)`` for a grid offset
  (dr, dc) (the ViT paper's Fig. 7 measure).
- attention entropy (nats): ``mean_q -sum_k a_qk ln a_qk`` (natural log, 0 ln 0 = 0); 0 for one-hot attention,
  ``ln T`` for uniform attention.

Both are then averaged over images. ``uniform_distance`` / ``uniform_entropy`` record the values of uniform
attention on the same grid, the natural reference lines.

attention.json
--------------
``{"format": "cskd-attention", "version": 1, "definitions": {...}, "models": [MODEL, ...]}`` with MODEL =
``{"label", "spec", "family", "input_size": [H, W], "patch_size": [ph, pw], "grid": [h, w],
"num_prefix_tokens", "num_layers", "num_heads", "images", "skipped_images", "uniform_distance",
"uniform_entropy", "layers": [{"layer": i, "distance": [per head], "entropy": [per head],
"prefix_mass": [per head]}]}`` (layers in depth order, 0-based).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EvaluateError, MissingFile

__all__ = ["NotAttentionModel", "UnsupportedAttention", "AttentionModel", "from_module", "load_attention_model",
           "attention_probs", "distance_matrix", "attention_stats", "measure", "select_images", "plot_attention",
           "run_attention", "stats_storage", "stored_record", "depth_matched",
           "FORMAT", "VERSION"]

FORMAT = "cskd-attention"
VERSION = 1
DEFINITIONS = {
    "distance": "mean over patch queries of sum_k a_qk * d(q, k), d = Euclidean distance of the patch positions "
                "in input pixels; a = attention over patch keys only, renormalised to sum 1 per query",
    "entropy": "mean over patch queries of -sum_k a_qk ln a_qk (nats), same a",
    "prefix_mass": "mean over patch queries of the raw attention given to prefix (CLS/register) tokens",
    "average": "per image, then the mean over images",
}


class NotAttentionModel(EvaluateError):
    """The model has no self-attention over patch tokens (a CNN, say)."""


class UnsupportedAttention(EvaluateError):
    """A ViT whose attention modules cskd cannot recompute faithfully."""


# --- probabilities, recomputed from a block's attention module and its input -------------------------------


def _timm_attention_type():
    try:
        from timm.layers import Attention
    except ImportError:
        return None
    return Attention


def _open_clip_attention_type():
    try:
        from open_clip.transformer import Attention
    except ImportError:
        return None
    return Attention


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def attention_probs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, N) attention probabilities of ``module`` for its input ``x`` (B, N, C), in float32.

    ``x`` is batch-first; `_Recorder` transposes sequence-first nn.MultiheadAttention inputs before calling."""
    x = x.float()
    timm_attn, oc_attn = _timm_attention_type(), _open_clip_attention_type()
    if timm_attn is not None and type(module) is timm_attn:
        b, n, _ = x.shape
        qkv = F.linear(x, module.qkv.weight.float(), None if module.qkv.bias is None else module.qkv.bias.float())
        q, k, _v = qkv.reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = module.q_norm(q), module.k_norm(k)
        return ((q * module.scale) @ k.transpose(-2, -1)).softmax(-1)
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            raise UnsupportedAttention("nn.MultiheadAttention with separate q/k/v projections (kdim/vdim) is "
                                       "cross-attention, not a ViT block")
        bias = module.in_proj_bias
        q, k, _v = F.linear(x, module.in_proj_weight.float(), None if bias is None else bias.float()).chunk(3, -1)
        q, k = _heads(q, module.num_heads), _heads(k, module.num_heads)
        return ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(-1)
    if oc_attn is not None and type(module) is oc_attn:
        bias = module.in_proj_bias
        q, k, _v = F.linear(x, module.in_proj_weight.float(), None if bias is None else bias.float()).chunk(3, -1)
        q, k = _heads(q, module.num_heads), _heads(k, module.num_heads)
        if module.logit_scale is not None:
            # open_clip 3.x's scaled-cosine branch calls torch.bmm on 4-D tensors and cannot run; nothing to measure
            raise UnsupportedAttention("open_clip Attention with scaled cosine attention is not supported")
        q, k = module.ln_q(q), module.ln_k(k)
        return ((q * module.scale) @ k.transpose(-2, -1)).softmax(-1)
    raise UnsupportedAttention(f"cannot recompute the attention of {type(module).__module__}.{type(module).__name__}")


def _is_site(module: nn.Module) -> bool:
    timm_attn, oc_attn = _timm_attention_type(), _open_clip_attention_type()
    return ((timm_attn is not None and type(module) is timm_attn) or isinstance(module, nn.MultiheadAttention)
            or (oc_attn is not None and type(module) is oc_attn))


# --- statistics ---------------------------------------------------------------------------------------------


def distance_matrix(grid: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """(T, T) Euclidean distances in input pixels between the patches of an h x w grid, row-major."""
    h, w = (int(v) for v in grid)
    ph, pw = (float(v) for v in patch_size)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    pos = torch.stack([rows.reshape(-1) * ph, cols.reshape(-1) * pw], -1)
    return torch.cdist(pos, pos).float()


def attention_stats(probs: torch.Tensor, num_prefix: int, dist: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image and head (B, heads): ``distance``, ``entropy`` and ``prefix_mass`` (see the module docstring).

    ``probs`` is (B, heads, P + T, P + T) with the P prefix tokens first; ``dist`` is (T, T)."""
    p = int(num_prefix)
    patch_q = probs[:, :, p:, :].float()
    prefix_mass = patch_q[..., :p].sum(-1)
    a = patch_q[..., p:]
    a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    if a.shape[-1] != dist.shape[0]:
        raise EvaluateError(f"attention over {a.shape[-1]} patch keys but a distance matrix for {dist.shape[0]} patches")
    distance = (a * dist.to(a.device)).sum(-1).mean(-1)
    entropy = -torch.special.xlogy(a, a).sum(-1).mean(-1)
    return {"distance": distance, "entropy": entropy, "prefix_mass": prefix_mass.mean(-1)}


# --- models -------------------------------------------------------------------------------------------------


@dataclass
class AttentionModel:
    """A ViT ready to measure: ``forward`` runs every block, ``transform`` maps a PIL image to its input."""

    label: str
    spec: str
    family: str
    module: nn.Module  # where the attention sites live
    forward: Callable[[torch.Tensor], object]
    transform: Callable
    input_size: tuple[int, int]
    patch_size: tuple[int, int]
    num_prefix_tokens: int
    sites: list[nn.Module] = field(default_factory=list)

    @property
    def grid(self) -> tuple[int, int]:
        return self.input_size[0] // self.patch_size[0], self.input_size[1] // self.patch_size[1]

    @property
    def num_heads(self) -> int:
        return int(self.sites[0].num_heads)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (int, float)):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def _geometry(spec: str, module: nn.Module) -> tuple[str, tuple[int, int], int, nn.Module]:
    """(family, patch size, prefix tokens, the module holding the blocks) of a timm or open_clip ViT."""
    try:
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer as OpenClipViT
    except ImportError:
        OpenClipViT = TimmModel = ()  # noqa: N806 - isinstance(x, ()) is False
    if isinstance(module, OpenClipViT):
        # open_clip's VisionTransformer always prepends one class token
        return "open_clip", _pair(module.patch_size), 1, module
    if isinstance(module, TimmModel):
        module = module.trunk
    pe = getattr(module, "patch_embed", None)
    if pe is not None and hasattr(pe, "patch_size") and hasattr(module, "num_prefix_tokens"):
        return "timm", _pair(pe.patch_size), int(module.num_prefix_tokens), module
    _unsupported(spec, module)
    raise NotAttentionModel(f"{spec} ({type(module).__name__}) is not a ViT-family model: only ViT-family models "
                            "have attention (open_clip VisionTransformer, timm VisionTransformer, or a run: of one)")


def _unsupported(spec: str, module: nn.Module) -> None:
    """Raise UnsupportedAttention when the model attends in a way cskd does not recompute (Swin, MaxViT, ...)."""
    others = sorted({type(m).__name__ for m in module.modules()
                     if "attention" in type(m).__name__.lower() and not _is_site(m)})
    if others:
        raise UnsupportedAttention(f"{spec}: its attention modules ({', '.join(others)}) are not supported; cskd "
                                   "recomputes global self-attention of timm Attention, nn.MultiheadAttention and "
                                   "open_clip Attention only")


def _sites(spec: str, module: nn.Module) -> list[nn.Module]:
    # Only the trunk's blocks: attention pooling heads (timm "map", open_clip's AttentionalPooler) attend from
    # learned queries, not between patches.
    trunk = getattr(module, "transformer", None) or getattr(module, "blocks", None) or module
    sites = [m for m in trunk.modules() if _is_site(m)]
    if sites:
        return sites
    _unsupported(spec, module)
    raise NotAttentionModel(f"{spec} ({type(module).__name__}) has no attention layers: only ViT-family models "
                            "have attention")


def _run_dir(spec: str) -> Path | None:
    if spec.startswith("run:"):
        return Path(os.path.expanduser(spec[4:]))
    if ":" not in spec.split("/", 1)[0] and os.path.isdir(os.path.expanduser(spec)):
        return Path(os.path.expanduser(spec))
    return None


def _student_transform(input_cfg: dict):
    from ..models.teachers import make_preprocess_cfg, py_transform

    # The student's eval view: what `cskd align` shows it for view 0 of a shortest-side teacher (resize the short
    # side, centre crop), at the student's own size and normalisation.
    cfg = make_preprocess_cfg(input_cfg["size"], "shortest", 1.0, input_cfg.get("interpolation", "bicubic"),
                  input_cfg["mean"], input_cfg["std"])
    return py_transform(cfg), tuple(cfg["size"])


def from_module(module: nn.Module, transform: Callable, input_size: Sequence[int], spec: str = "module",
                forward: Callable | None = None, label: str | None = None, family_prefix: str = "") -> AttentionModel:
    """An AttentionModel for an already built timm or open_clip ViT (eval mode is set here). ``forward`` defaults
    to running the blocks (timm ``forward_features``, the open_clip tower itself)."""
    module.eval()
    family, patch, prefix, holder = _geometry(spec, module)
    if forward is None:
        forward = holder.forward_features if family == "timm" else module.__call__
    sites = _sites(spec, holder)
    h, w = _pair(input_size)
    return AttentionModel(label or spec, spec, family_prefix + family, holder, forward, transform, (h, w), patch,
                          prefix, sites)


def load_attention_model(spec: str, device: str | torch.device = "cpu", label: str | None = None,
                         trust_code: bool = False) -> AttentionModel:
    """Build the model of ``spec`` (see the module docstring) in eval mode, with its attention sites located."""
    spec = spec.strip()
    run_dir = _run_dir(spec)
    if run_dir is not None:
        from ..models.runs import load_run_encoder

        encoder, _ = load_run_encoder(run_dir, device=device, trust_code=trust_code)
        transform, size = _student_transform(encoder.input_cfg)
        return from_module(encoder.model, transform, size, spec, forward=encoder.__call__, label=label,
                           family_prefix="run/")
    from ..models.teachers import build_teacher, parse_spec

    parsed = parse_spec(spec)
    if parsed.kind == "py":
        raise EvaluateError(f"{spec}: py: models have no known patch geometry; use an open_clip:, timm: or run: spec "
                         "(or cskd_cache.inspect.attention.from_module from Python)")
    teacher = build_teacher(parsed, device=device)
    return from_module(teacher.model, teacher.preprocess, teacher.preprocess_cfg["size"], spec, label=label)


# --- measuring ----------------------------------------------------------------------------------------------


class _Recorder:
    """Forward pre-hooks that turn each site's input into per-head sums of the statistics."""

    def __init__(self, model: AttentionModel, per_image: bool = False):
        self.model = model
        self.dist = distance_matrix(model.grid, model.patch_size)
        self.sums = [None] * len(model.sites)
        self.per_image = per_image
        self.last: list[dict | None] = [None] * len(model.sites)
        self.images = 0
        self.handles = []

    def take(self) -> dict[str, np.ndarray]:
        """With ``per_image``: (B, layers, heads) float32 ``distance`` and ``entropy`` of the last forward."""
        if any(v is None for v in self.last):
            raise UnsupportedAttention(f"{self.model.spec}: some attention modules never ran in the last forward")
        out = {k: torch.stack([v[k] for v in self.last], 1).numpy().astype(np.float32) for k in ("distance", "entropy")}
        self.last = [None] * len(self.model.sites)
        return out

    def __enter__(self):
        for i, site in enumerate(self.model.sites):
            self.handles.append(site.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("query", kwargs.get("x"))
            masks = [kwargs.get("attn_mask"), kwargs.get("key_padding_mask"), kwargs.get("is_causal")]
            if any(m is not None and m is not False for m in masks):
                raise UnsupportedAttention(f"{self.model.spec}: block {i} attends with a mask; cskd measures "
                                           "unmasked image self-attention only")
            if isinstance(module, nn.MultiheadAttention):
                key = args[1] if len(args) > 1 else kwargs.get("key", x)
                if key is not x and not torch.equal(key, x):
                    raise UnsupportedAttention(f"{self.model.spec}: block {i} is cross-attention")
                if not module.batch_first:
                    x = x.transpose(0, 1)
            expected = self.model.num_prefix_tokens + self.model.grid[0] * self.model.grid[1]
            if x.shape[1] != expected:
                raise UnsupportedAttention(
                    f"{self.model.spec}: block {i} attends over {x.shape[1]} tokens, expected {expected} "
                    f"({self.model.num_prefix_tokens} prefix + {self.model.grid[0]}x{self.model.grid[1]} patches); "
                    "windowed or pooled attention is not supported")
            with torch.no_grad():
                stats = attention_stats(attention_probs(module, x), self.model.num_prefix_tokens, self.dist)
            if self.per_image:
                self.last[i] = {k: v.float().cpu() for k, v in stats.items()}
                return
            sums = {k: v.double().sum(0).cpu() for k, v in stats.items()}
            self.sums[i] = sums if self.sums[i] is None else {k: self.sums[i][k] + v for k, v in sums.items()}
        return hook


def _uniform(dist: torch.Tensor) -> tuple[float, float]:
    return float(dist.double().mean()), math.log(dist.shape[0])


@torch.no_grad()
def measure(model: AttentionModel, images: Sequence[str | os.PathLike], batch_size: int = 16,
            device: str | torch.device = "cpu", max_pixels: int | None = None,
            on_progress: Callable[[int, int], None] | None = None) -> dict:
    """The MODEL record of attention.json for ``model`` over ``images`` (unreadable files are counted, skipped)."""
    from ..data.images import DEFAULT_MAX_PIXELS, BadImage, load_rgb

    device = torch.device(device)
    skipped, done = 0, 0
    with _Recorder(model) as rec:
        for start in range(0, len(images), batch_size):
            xs = []
            for path in images[start:start + batch_size]:
                try:
                    xs.append(model.transform(load_rgb(path, max_pixels or DEFAULT_MAX_PIXELS)))
                except (BadImage, OSError):
                    skipped += 1
            if xs:
                x = torch.stack(xs).to(device)
                if tuple(x.shape[-2:]) != model.input_size:
                    raise EvaluateError(f"{model.spec}: preprocessing gave {tuple(x.shape[-2:])}, expected "
                                     f"{model.input_size}")
                model.forward(x)
                rec.images += len(xs)
            done = min(start + batch_size, len(images))
            if on_progress:
                on_progress(done, len(images))
    if rec.images == 0:
        raise MissingFile(f"none of the {len(images)} images could be read")
    if any(s is None for s in rec.sums):
        raise UnsupportedAttention(f"{model.spec}: some attention modules never ran in a forward pass")
    ud, ue = _uniform(rec.dist)
    layers = [{"layer": i, **{k: [float(v) for v in (s[k] / rec.images)] for k in ("distance", "entropy",
                                                                                   "prefix_mass")}}
              for i, s in enumerate(rec.sums)]
    return {"label": model.label, "spec": model.spec, "family": model.family, "input_size": list(model.input_size),
            "patch_size": list(model.patch_size), "grid": list(model.grid),
            "num_prefix_tokens": model.num_prefix_tokens, "num_layers": len(model.sites),
            "num_heads": model.num_heads, "images": rec.images, "skipped_images": skipped,
            "uniform_distance": ud, "uniform_entropy": ue, "layers": layers}


def stats_storage(model: AttentionModel) -> dict:
    """The manifest's ``storage.attention_stats`` for a teacher measured at extract time."""
    ud, ue = _uniform(distance_matrix(model.grid, model.patch_size))
    return {"num_layers": len(model.sites), "num_heads": model.num_heads, "input_size": list(model.input_size),
            "patch_size": list(model.patch_size), "grid": list(model.grid),
            "num_prefix_tokens": model.num_prefix_tokens, "family": model.family, "uniform_distance": ud,
            "uniform_entropy": ue, "definitions": "cskd_cache.inspect.attention (docs/cache-format.md)"}


def stored_record(cache, label: str | None = None) -> dict:
    """The MODEL record of attention.json from a cache's stored teacher statistics (`cskd extract
    --attention-stats`): every row's every view, averaged, without running the teacher again."""
    info = cache.manifest.get("storage", {}).get("attention_stats")
    if not info:
        raise EvaluateError(f"{cache.path}: the cache holds no attention statistics; extract it with "
                            "`cskd extract --attention-stats` (ViT teachers), or measure with --model")
    dist, ent = cache.read_all("attn_distance").astype(np.float64), cache.read_all("attn_entropy").astype(np.float64)
    d, e = dist.reshape(-1, *dist.shape[2:]).mean(0), ent.reshape(-1, *ent.shape[2:]).mean(0)
    teacher = cache.manifest["teacher"]["spec"]
    return {"label": label or f"{teacher} (stored in {cache.path.name})", "spec": teacher, "family": info["family"],
            "input_size": info["input_size"], "patch_size": info["patch_size"], "grid": info["grid"],
            "num_prefix_tokens": info["num_prefix_tokens"], "num_layers": info["num_layers"],
            "num_heads": info["num_heads"], "images": int(dist.shape[0] * dist.shape[1]), "skipped_images": 0,
            "uniform_distance": info["uniform_distance"], "uniform_entropy": info["uniform_entropy"],
            "source": "cache", "layers": [{"layer": i, "distance": [float(v) for v in d[i]],
                                           "entropy": [float(v) for v in e[i]]} for i in range(d.shape[0])]}


def depth_matched(values: Sequence[float], n: int) -> list[float]:
    """A per-layer profile of len(values) layers resampled to ``n`` layers by relative depth (layer i of n at
    i / (n - 1) of the way through), linearly interpolated: how a 12-layer teacher's profile meets a 6-layer
    student."""
    v = np.asarray(values, dtype=np.float64)
    if n == 1 or len(v) == 1:
        return [float(v.mean())] * n
    return [float(x) for x in np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(v)), v)]


# --- plots and the whole command ----------------------------------------------------------------------------


def plot_attention(models: Sequence[dict], stat: str, path: str | os.PathLike) -> None:
    """Per-head scatter of ``stat`` (distance or entropy) against depth, one colour per model (ViT Fig. 7)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n = len(models)
    for j, m in enumerate(models):
        color = colors[j % len(colors)]
        # Side-by-side offsets keep models on the same layer apart.
        offset = (j - (n - 1) / 2) * (0.5 / max(n, 1))
        xs = [lay["layer"] + 1 + offset for lay in m["layers"] for _ in lay[stat]]
        ys = [v for lay in m["layers"] for v in lay[stat]]
        ax.scatter(xs, ys, s=14, alpha=0.75, color=color, label=m["label"])
        ref = m["uniform_distance"] if stat == "distance" else m["uniform_entropy"]
        ax.axhline(ref, color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)" if stat == "distance" else "attention entropy (nats)")
    ax.set_title(("Mean attention distance" if stat == "distance" else "Attention entropy")
                 + " per head (dotted: uniform attention)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _labels(specs: Sequence[str]) -> list[str]:
    out = []
    for s in specs:
        label = s if len(s) <= 48 else "..." + s[-45:]
        while label in out:
            label += "'"
        out.append(label)
    return out


def select_images(folder: str | os.PathLike, max_images: int | None, seed: int = 0) -> list[str]:
    """Image files under ``folder`` (recursive, sorted); a seeded sample of ``max_images`` when there are more."""
    from ..data.sources import scan_images

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFile(f"{folder}: not a folder of images")
    paths = [str(p) for p in scan_images(folder)]
    if not paths:
        raise MissingFile(f"{folder}: no image files found (looked for .jpg, .png, .webp, ...)")
    if max_images and len(paths) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(paths), max_images, replace=False))
        paths = [paths[i] for i in keep]
    return paths


def run_attention(specs: Sequence[str], images: str | os.PathLike | None, out: str | os.PathLike,
                  max_images: int | None = 64, batch_size: int = 16, device: str = "cpu", seed: int = 0,
                  max_pixels: int | None = None, on_progress: Callable[[str, int, int], None] | None = None,
                  trust_code: bool = False, caches: Sequence[str | os.PathLike] = ()) -> dict:
    """Measure every model over the same images, and read the stored teacher statistics of every cache in
    ``caches`` (no teacher is run for those); write OUT/attention.json, attention_distance.png and
    attention_entropy.png (temp names renamed at the end, so a failure leaves no partial output)."""
    from ..cache.manifest import write_json
    from ..cache.reader import open_cache

    if not specs and not caches:
        raise EvaluateError("no model given")
    if specs and images is None:
        raise EvaluateError("measuring a model needs --images (a folder of images)")
    from ..files import claim_out_dir

    claim_out_dir(out, "attention.json", "attention report")
    # Stored statistics are read first: a cache without them is refused before any model is loaded.
    records = [stored_record(open_cache(c)) for c in caches]
    paths = select_images(images, max_images, seed) if specs else []
    dev = torch.device(device)
    for spec, label in zip(specs, _labels(specs)):
        model = load_attention_model(spec, device=dev, label=label, trust_code=trust_code)
        cb = (lambda d, t, _l=label: on_progress(_l, d, t)) if on_progress else None
        records.append(measure(model, paths, batch_size, dev, max_pixels, cb))
        del model
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"format": FORMAT, "version": VERSION, "definitions": DEFINITIONS,
              "images_dir": str(images) if images is not None else None,
              "seed": seed, "models": records}
    pngs = {"distance": out / "attention_distance.png", "entropy": out / "attention_entropy.png"}
    tmps = {k: p.with_name(f".{p.name}.tmp") for k, p in pngs.items()}
    try:
        for stat, tmp in tmps.items():
            plot_attention(records, stat, tmp)
        for stat, tmp in tmps.items():
            os.replace(tmp, pngs[stat])
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()
    write_json(out / "attention.json", result)
    return result
