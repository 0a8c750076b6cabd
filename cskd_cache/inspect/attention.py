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

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import EvaluateError, MissingFile
from ..models.attention_stats import (
    AttentionModel,
    AttentionRecorder,
    NotAttentionModel,
    UnsupportedAttention,
    attention_probs,
    attention_stats,
    depth_matched,
    distance_matrix,
    from_module,
    stats_storage,
    uniform_values,
)

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


@torch.no_grad()
def measure(model: AttentionModel, images: Sequence[str | os.PathLike], batch_size: int = 16,
            device: str | torch.device = "cpu", max_pixels: int | None = None,
            on_progress: Callable[[int, int], None] | None = None) -> dict:
    """The MODEL record of attention.json for ``model`` over ``images`` (unreadable files are counted, skipped)."""
    from ..data.images import DEFAULT_MAX_PIXELS, BadImage, load_rgb

    device = torch.device(device)
    skipped, done = 0, 0
    with AttentionRecorder(model) as rec:
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
    ud, ue = uniform_values(rec.dist)
    layers = [{"layer": i, **{k: [float(v) for v in (s[k] / rec.images)] for k in ("distance", "entropy",
                                                                                   "prefix_mass")}}
              for i, s in enumerate(rec.sums)]
    return {"label": model.label, "spec": model.spec, "family": model.family, "input_size": list(model.input_size),
            "patch_size": list(model.patch_size), "grid": list(model.grid),
            "num_prefix_tokens": model.num_prefix_tokens, "num_layers": len(model.sites),
            "num_heads": model.num_heads, "images": rec.images, "skipped_images": skipped,
            "uniform_distance": ud, "uniform_entropy": ue, "layers": layers}


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
