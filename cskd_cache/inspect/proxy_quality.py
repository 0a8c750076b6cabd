"""A proxy quality set from real photographs: graded synthetic degradations with severity-derived labels.

No labelled aesthetics images are needed: like KADID-10k, every source photo is kept pristine and degraded at
known severities, so the label is known by construction. It is a proxy for "the method learns a quality
ranking", not a substitute for human aesthetics scores.

    python -m cskd_cache.inspect.proxy_quality --src ../shared/data/photos/imagenet-sample --out proxy --per-image 4

`build_proxy_set(src_images, out_dir, ...)` writes, per source image (resized so its shorter side is ``size``,
256 by default):

- ``images/<source>__pristine.png`` and ``per_image`` degraded versions ``images/<source>__<kind><level>.png``
  (``.jpg`` for the jpeg kind: the file *is* the compressed image). The (kind, level) pairs of a source are
  drawn without repetition from the kinds x levels grid by an RNG seeded with (seed, source name), and each
  degradation's own randomness (noise, direction) with (seed, source, kind, level): a source's versions
  never depend on which other sources are in the set or in which order they come;
- ``labels.csv``: ``path,score,dist,split,source,kind,level,param``, one row per image, sorted by source,
  pristine first. ``path`` is relative to the CSV's folder; this is the generic ``csv:FILE`` label format, so
  ``cskd_cache.labels.load_labels("csv:OUT/labels.csv")`` reads it (scale 1..10, 10 bins).

Degradation levels (1 = mildest, 5 = strongest), at the working size:

| kind     | parameter per level 1..5                      | how                                               |
|----------|-----------------------------------------------|---------------------------------------------------|
| blur     | sigma 0.8, 1.5, 2.5, 4, 6 px                  | PIL GaussianBlur                                  |
| noise    | std 6, 12, 20, 32, 48 (of 255)                | additive Gaussian per pixel and channel, clipped  |
| jpeg     | quality 50, 30, 18, 10, 5                     | PIL JPEG encoder, 4:2:0                           |
| exposure | gain x1.3, 1.65, 2.1, 2.7, 3.5 or its inverse | multiply (direction drawn per image), clipped     |
| colour   | saturation 0.6, 0.4, 0.25, 0.1, 0 or a cast   | blend with grey, or per-channel gains 1 +- a with |
|          | of strength a 0.1, 0.2, 0.3, 0.45, 0.6        | a cast direction drawn per image                  |

Labels. score = ``10 - 1.8 * level``: pristine 10, then 8.2, 6.4, 4.6, 2.8, 1.0, the same for every kind (the
ladders above are chosen to look roughly equally bad across kinds at a given level; that equivalence is a
design assumption, not a measurement). dist = a Gaussian of fixed std ``DIST_STD`` (1.0) centred on the score,
integrated over the 10 unit bins 1..10 with the tails folded into the end bins; its mean is pulled inside the
scale at the ends (pristine: 9.62, level 5: 1.38), as real vote histograms are.

Unlabelled extras (``unlabelled_per_image`` K > 0): every *train* source also gets K more degraded versions,
drawn without repetition from the grid pairs its labelled versions did not use (RNG seeded with (seed, source,
"unlabelled")), written to ``unlabelled/`` and listed in ``unlabelled.csv`` (``path,source,kind,level,param``,
no score: they are never labels). They are the semi-supervised pool a teacher labels; val and test sources get
none, so no version of a held-out photo is ever trained on.

Content variant (``content_weight`` W > 0). The degradation recipe asks a student to see distortions an ImageNet
network's features are trained to ignore; real aesthetic scores also depend on content, which a pretrained
teacher's features do encode. With W > 0 every score becomes ``(1 - W) x quality + W x preference(group)``: the
sorted source names are cut into ``content_groups`` contiguous blocks (for ImageNet-sample's ``nXXXXXXXX_name``
files that is blocks of adjacent ImageNet classes: fish and birds, dogs, insects, tools...), and each block gets a
preference drawn once from 1 + 9 x k / (G - 1), k a permutation of 0..G-1 seeded with (seed, "content"). The
groups are written to ``content.csv`` (``source,group,preference``). Unlike the degradations, the groups depend
on which sources are in the set (they are blocks of its sorted names).

Split by source photo (every version of a photo in the same split, so no near-duplicate leaks between splits):
the sorted source names are shuffled by ``seed`` and cut 70/10/20 into train/val/test (exact counts, rounded).

Deterministic: the same sources, arguments and library versions give a byte-identical labels.csv and
identical image files.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from ..data.images import BadImage, load_rgb
from ..data.sources import scan_images
from ..errors import DataError

__all__ = ["KINDS", "LEVELS", "build_proxy_set", "degrade", "level_score", "score_dist", "summarise"]

KINDS = ("blur", "noise", "jpeg", "exposure", "colour")
LEVELS = 5
BINS = 10
DIST_STD = 1.0
SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.1), ("test", 0.2))
COLUMNS = ("path", "score", "dist", "split", "source", "kind", "level", "param")
UNLABELLED_COLUMNS = ("path", "source", "kind", "level", "param")
CONTENT_COLUMNS = ("source", "group", "preference")
CONTENT_GROUPS = 8

# parameter ladders, index = level - 1 (see the module docstring)
BLUR_SIGMA = (0.8, 1.5, 2.5, 4.0, 6.0)
NOISE_STD = (6.0, 12.0, 20.0, 32.0, 48.0)
JPEG_QUALITY = (50, 30, 18, 10, 5)
EXPOSURE_GAIN = (1.3, 1.65, 2.1, 2.7, 3.5)
SATURATION = (0.6, 0.4, 0.25, 0.1, 0.0)
CAST_STRENGTH = (0.1, 0.2, 0.3, 0.45, 0.6)
CASTS = {"warm": (1.0, 0.0, -1.0), "cool": (-1.0, 0.0, 1.0), "green": (-0.5, 1.0, -0.5), "magenta": (0.5, -1.0, 0.5)}


def level_score(level: int) -> float:
    """Severity level (0 = pristine .. 5) -> quality score on 1..10: ``10 - 1.8 * level``."""
    if not 0 <= level <= LEVELS:
        raise DataError(f"level must be in 0..{LEVELS}, got {level}")
    return round(10.0 - 1.8 * level, 6)


def score_dist(score: float, std: float = DIST_STD, bins: int = BINS) -> np.ndarray:
    """A Gaussian N(score, std) integrated over unit bins centred on 1..bins, tails folded into the end bins."""
    edges = (np.arange(1, bins) + 0.5 - score) / (std * math.sqrt(2.0))
    cdf = np.array([0.0] + [0.5 * (1.0 + math.erf(e)) for e in edges] + [1.0])
    return np.diff(cdf)


def _rng(seed: int, *parts) -> np.random.Generator:
    """A generator fixed by (seed, parts): blake2b, not Python's per-process salted hash()."""
    text = "\0".join([str(seed), *map(str, parts)])
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big"))


def _fit_short_side(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    s = size / min(w, h)
    new = (max(1, round(w * s)), max(1, round(h * s)))
    return im if new == (w, h) else im.resize(new, Image.Resampling.LANCZOS)


def _u8(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")


def degrade(im: Image.Image, kind: str, level: int, rng: np.random.Generator) -> tuple[Image.Image | bytes, str]:
    """Apply one degradation to an RGB image; returns (image, or the JPEG file's bytes for 'jpeg', param text)."""
    if kind not in KINDS:
        raise DataError(f"unknown degradation {kind!r}; use one of {', '.join(KINDS)}")
    if not 1 <= level <= LEVELS:
        raise DataError(f"level must be in 1..{LEVELS}, got {level}")
    i = level - 1
    if kind == "blur":
        return im.filter(ImageFilter.GaussianBlur(BLUR_SIGMA[i])), f"sigma={BLUR_SIGMA[i]:g}"
    if kind == "jpeg":
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=JPEG_QUALITY[i], subsampling=2, optimize=False)
        return buf.getvalue(), f"quality={JPEG_QUALITY[i]}"
    a = np.asarray(im, dtype=np.float64)
    if kind == "noise":
        return _u8(a + rng.normal(0.0, NOISE_STD[i], a.shape)), f"std={NOISE_STD[i]:g}"
    if kind == "exposure":
        gain = EXPOSURE_GAIN[i] if rng.random() < 0.5 else 1.0 / EXPOSURE_GAIN[i]
        return _u8(a * gain), f"gain={gain:.3f}"
    # colour: desaturation or a colour cast, drawn per image
    if rng.random() < 0.5:
        grey = a @ np.array([0.299, 0.587, 0.114])
        s = SATURATION[i]
        return _u8(grey[..., None] + s * (a - grey[..., None])), f"saturation={s:g}"
    name = sorted(CASTS)[int(rng.integers(len(CASTS)))]
    gains = 1.0 + CAST_STRENGTH[i] * np.array(CASTS[name])
    return _u8(a * gains), f"cast={name}:{CAST_STRENGTH[i]:g}"


def _source_names(paths: Sequence[Path]) -> list[str]:
    names = [p.stem for p in paths]
    dup = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup:
        raise DataError(f"source file names must be unique (they name the outputs); repeated: {', '.join(dup[:5])}")
    bad = [n for n in names if "__" in n or "/" in n or n.startswith(".")]
    if bad:
        raise DataError(f"source file names must not contain '__' or start with '.': {', '.join(bad[:5])}")
    return names


def split_sources(names: Sequence[str], seed: int) -> dict[str, str]:
    """Shuffle the sorted names by seed and cut them 70/10/20 (exact counts) into train/val/test."""
    order = sorted(names)
    perm = np.random.default_rng(seed).permutation(len(order))
    n = len(order)
    n_val = round(n * SPLIT_FRACTIONS[1][1])
    n_test = round(n * SPLIT_FRACTIONS[2][1])
    n_train = n - n_val - n_test
    out = {}
    for rank, j in enumerate(perm):
        out[order[j]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return out


def _draw_versions(name: str, seed: int, n: int, kinds: Sequence[str], levels: int, tag: str = "versions",
                   taken: Sequence[tuple[str, int]] = ()) -> list[tuple[str, int]]:
    """n distinct (kind, level) pairs of the grid minus ``taken``, by an RNG seeded with (seed, name, tag)."""
    grid = [(k, lv) for k in kinds for lv in range(1, levels + 1) if (k, lv) not in set(taken)]
    pick = _rng(seed, name, tag).choice(len(grid), size=n, replace=False)
    return sorted((grid[j] for j in pick), key=lambda kl: (kinds.index(kl[0]), kl[1]))


def content_preferences(names: Sequence[str], groups: int, seed: int) -> dict[str, tuple[int, float]]:
    """{source: (group, preference)}: contiguous blocks of the sorted names, a seeded preference per block."""
    order = sorted(names)
    perm = _rng(seed, "content").permutation(groups)
    pref = [1.0 + 9.0 * int(k) / max(1, groups - 1) for k in perm]
    return {n: (i * groups // len(order), pref[i * groups // len(order)]) for i, n in enumerate(order)}


def _write_version(im: Image.Image, name: str, kind: str, level: int, seed: int, out_dir: Path,
                   folder: str) -> tuple[str, str]:
    out, param = degrade(im, kind, level, _rng(seed, name, kind, level))
    rel = Path(folder) / f"{name}__{kind}{level}.{'jpg' if isinstance(out, bytes) else 'png'}"
    (_write_bytes if isinstance(out, bytes) else _write_png)(out, out_dir / rel)
    return rel.as_posix(), param


def _claim(out_dir: Path) -> None:
    """A rebuild prunes images/ and unlabelled/, so it may only run in a folder this builder made: one holding its
    labels.csv (with its own header), or an empty or new folder."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    labels = out_dir / "labels.csv"
    try:
        header = labels.read_text(encoding="utf-8").split("\n", 1)[0].strip().split(",")
    except (OSError, UnicodeDecodeError):
        header = []
    if header != list(COLUMNS):
        raise DataError(f"--out {out_dir} is not empty and is not a proxy set made by `cskd proxy-set` (no labels.csv "
                         "of its own); a rebuild deletes files there, so choose a new or empty folder")


def _prune(out_dir: Path, folder: str, keep: set[str]) -> None:
    """Delete the files of ``out_dir/folder`` (this builder's own output folder) that ``keep`` does not list;
    the folder itself when nothing is left."""
    d = out_dir / folder
    if not d.is_dir():
        return
    for f in d.iterdir():
        if f.is_file() and f"{folder}/{f.name}" not in keep:
            f.unlink()
    if not any(d.iterdir()):
        d.rmdir()


def _fmt_dist(d: np.ndarray) -> str:
    return ";".join(f"{v:.6f}" for v in d)


def _write_png(im: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    im.save(tmp, "PNG", compress_level=6)
    os.replace(tmp, path)


def _write_bytes(data: bytes, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _process(src: Path, name: str, split: str, out_dir: Path, size: int, seed: int, per_image: int,
             kinds: Sequence[str], levels: int, unlabelled_per_image: int = 0,
             content: tuple[float, float] = (0.0, 0.0)) -> tuple[list[dict], list[dict]]:
    """(labelled rows, unlabelled rows) of one source; ``content`` = (weight, this source's preference)."""
    im = _fit_short_side(load_rgb(src), size)
    rows = []
    rel = Path("images") / f"{name}__pristine.png"
    _write_png(im, out_dir / rel)
    rows.append({"path": rel.as_posix(), "level": 0, "kind": "pristine", "param": ""})
    versions = _draw_versions(name, seed, per_image, kinds, levels)
    for kind, level in versions:
        path, param = _write_version(im, name, kind, level, seed, out_dir, "images")
        rows.append({"path": path, "level": level, "kind": kind, "param": param})
    weight, pref = content
    for r in rows:
        score = round((1.0 - weight) * level_score(r["level"]) + weight * pref, 6)
        r.update(score=f"{score:.2f}", dist=_fmt_dist(score_dist(score)), split=split, source=name)
    extra = []
    if split == "train" and unlabelled_per_image:
        for kind, level in _draw_versions(name, seed, unlabelled_per_image, kinds, levels, "unlabelled", versions):
            path, param = _write_version(im, name, kind, level, seed, out_dir, "unlabelled")
            extra.append({"path": path, "source": name, "kind": kind, "level": level, "param": param})
    return rows, extra


def _check_request(kinds: tuple[str, ...], levels: int, per_image: int, unlabelled_per_image: int, size: int) -> None:
    if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise DataError(f"kinds must be distinct names from {', '.join(KINDS)}; got {kinds}")
    if not 1 <= levels <= LEVELS:
        raise DataError(f"levels must be in 1..{LEVELS}, got {levels}")
    if not 0 <= per_image <= levels * len(kinds):
        raise DataError(f"per_image must be in 0..{levels * len(kinds)} (levels x kinds), got {per_image}")
    if not 0 <= unlabelled_per_image <= levels * len(kinds) - per_image:
        raise DataError(f"unlabelled_per_image must be in 0..{levels * len(kinds) - per_image} (the pairs left "
                        f"after per_image), got {unlabelled_per_image}")
    if size < 8:
        raise DataError(f"size must be >= 8, got {size}")


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows({k: r[k] for k in columns} for r in rows)
    os.replace(tmp, path)


def build_proxy_set(src_images: Sequence[str | os.PathLike], out_dir: str | os.PathLike, levels: int = LEVELS,
                    kinds: Sequence[str] = KINDS, per_image: int = 4, seed: int = 0, size: int = 256,
                    workers: int = 1, unlabelled_per_image: int = 0, content_weight: float = 0.0,
                    content_groups: int = CONTENT_GROUPS) -> Path:
    """Write the pristine + ``per_image`` degraded versions of every source image and ``labels.csv`` (and, with
    ``unlabelled_per_image`` > 0, the train sources' unlabelled extras and ``unlabelled.csv``).

    src_images: image files; their file names (without extension) must be unique, they name the outputs.
    levels: severity levels 1..levels (at most 5) drawn from; kinds: a subset of `KINDS`.
    content_weight, content_groups: the content variant (module docstring; 0 = quality only).
    Returns the path of ``labels.csv``. Undecodable sources are skipped and listed in ``skipped.txt``.
    workers > 1 processes sources in parallel; the output does not depend on it.
    """
    kinds = tuple(kinds)
    _check_request(kinds, levels, per_image, unlabelled_per_image, size)
    srcs = [Path(p) for p in src_images]
    if not srcs:
        raise DataError("no source images")
    names = _source_names(srcs)
    if not 0.0 <= content_weight <= 1.0 or content_groups < 2:
        raise DataError(f"content_weight must be in [0, 1] and content_groups >= 2, got {content_weight}, "
                        f"{content_groups}")
    splits = split_sources(names, seed)
    prefs = content_preferences(names, content_groups, seed) if content_weight > 0 else {}
    out_dir = Path(out_dir)
    _claim(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    if unlabelled_per_image:
        (out_dir / "unlabelled").mkdir(exist_ok=True)
    jobs = sorted(zip(names, srcs))
    args = [(src, name, splits[name], out_dir, size, seed, per_image, kinds, levels, unlabelled_per_image,
             (content_weight, prefs[name][1]) if prefs else (0.0, 0.0)) for name, src in jobs]
    results: list[tuple[list[dict], list[dict]] | str] = []
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as ex:
            futs = [ex.submit(_safe_process, *a) for a in args]
            results = [f.result() for f in futs]
    else:
        results = [_safe_process(*a) for a in args]
    rows, extra, skipped = [], [], []
    for (name, src), res in zip(jobs, results):
        if isinstance(res, str):
            skipped.append(f"{src}\t{res}")
        else:
            rows.extend(res[0])
            extra.extend(res[1])
    if not rows:
        raise DataError(f"none of the {len(srcs)} source images could be decoded")
    labels = out_dir / "labels.csv"
    _write_csv(labels, COLUMNS, rows)
    unl = out_dir / "unlabelled.csv"
    if unlabelled_per_image:
        _write_csv(unl, UNLABELLED_COLUMNS, extra)
    elif unl.exists():  # a rebuild without extras must not leave the last build's list behind
        unl.unlink()
    groups_csv = out_dir / "content.csv"
    if prefs:
        _write_csv(groups_csv, CONTENT_COLUMNS, [{"source": n, "group": g, "preference": f"{p:.2f}"}
                                                 for n, (g, p) in sorted(prefs.items())])
    elif groups_csv.exists():
        groups_csv.unlink()
    # Nor its images: a folder scan (`cskd extract --images OUT/unlabelled`) would otherwise pick up versions no
    # list names any more (another per_image, seed or source set).
    _prune(out_dir, "images", {r["path"] for r in rows})
    _prune(out_dir, "unlabelled", {r["path"] for r in extra})
    skip_file = out_dir / "skipped.txt"
    if skipped:
        skip_file.write_text("\n".join(skipped) + "\n", encoding="utf-8")
    elif skip_file.exists():
        skip_file.unlink()
    return labels


def _safe_process(*args) -> list[dict] | str:
    """The rows of one source, or why it could not be decoded (a str: it crosses process boundaries)."""
    try:
        return _process(*args)
    except BadImage as e:
        return str(e)


def summarise(labels_csv: str | os.PathLike) -> str:
    """Counts per split, per kind and per level of a labels.csv written by `build_proxy_set`."""
    with open(labels_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    sources = {}
    for r in rows:
        sources.setdefault(r["source"], r["split"])
    by_split = Counter(r["split"] for r in rows)
    src_split = Counter(sources.values())
    by_kind = Counter(r["kind"] for r in rows)
    by_level = Counter(int(r["level"]) for r in rows)
    score_by_level = {lv: next(r["score"] for r in rows if int(r["level"]) == lv) for lv in sorted(by_level)}
    lines = [f"{labels_csv}: {len(rows)} images from {len(sources)} source photos",
             "split:  " + ", ".join(f"{s} {by_split.get(s, 0)} images / {src_split.get(s, 0)} sources"
                                    for s, _ in SPLIT_FRACTIONS),
             "kind:   " + ", ".join(f"{k} {by_kind[k]}" for k in ("pristine", *KINDS) if k in by_kind),
             "level:  " + ", ".join(f"{lv} {by_level[lv]} (score {score_by_level[lv]})" for lv in sorted(by_level))]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cskd_cache.inspect.proxy_quality",
                                description="Build a proxy quality set (graded synthetic degradations) from photos.")
    p.add_argument("--src", required=True, help="folder of source photos (searched recursively)")
    p.add_argument("--out", required=True, help="output folder (images/ and labels.csv)")
    p.add_argument("--n", type=int, default=None, help="use N source photos, a seeded sample (default all)")
    p.add_argument("--per-image", type=int, default=4, help="degraded versions per photo (default 4)")
    p.add_argument("--unlabelled-per-image", type=int, default=0,
                   help="extra unlabelled versions per train photo, in unlabelled/ (default 0)")
    p.add_argument("--levels", type=int, default=LEVELS, help=f"severity levels (default {LEVELS})")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated (default {','.join(KINDS)})")
    p.add_argument("--size", type=int, default=256, help="working size: shorter side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes (default 1); the output does not depend on it")
    a = p.parse_args(argv)
    src = Path(a.src)
    if not src.is_dir():
        p.error(f"--src {src} is not a folder")
    paths = scan_images(src)
    if not paths:
        p.error(f"no images under {src}")
    if a.n is not None:
        if a.n < 1:
            p.error("--n must be >= 1")
        if a.n < len(paths):
            pick = np.random.default_rng(a.seed).choice(len(paths), size=a.n, replace=False)
            paths = [paths[i] for i in sorted(pick)]
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    t = time.perf_counter()
    try:
        labels = build_proxy_set(paths, a.out, levels=a.levels, kinds=kinds, per_image=a.per_image, seed=a.seed,
                                 size=a.size, workers=a.workers, unlabelled_per_image=a.unlabelled_per_image)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summarise(labels))
    skipped = Path(a.out) / "skipped.txt"
    if skipped.exists():
        print(f"skipped {len(skipped.read_text().splitlines())} undecodable sources: see {skipped}")
    print(f"built in {time.perf_counter() - t:.1f} s; load with load_labels('csv:{labels}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
