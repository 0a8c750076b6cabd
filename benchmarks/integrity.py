"""What the trust checks cost: opening a cache (fast path per shard), the one-time full check (MB/s), and the
per-read image digest check (ms per image against the decode it rides on).

    python benchmarks/integrity.py [--images DIR] [--rows 2048] [--shard-size 256]

A synthetic cache (random float16 rows shaped like a ViT-B-32 cache: 512-d embedding, 49 x 768 tokens) is
written with the real ShardWriter and opened with the real reader, so the numbers are those of `cskd align`'s
first and later opens. The image part decodes real photos (the shared set when present, else generated JPEGs)
with and without the digest. One process, one core, repeated; ratios are measured within the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cskd_cache.cache.manifest import SCHEMA_VERSION, fingerprint, write_json  # noqa: E402
from cskd_cache.cache.reader import open_cache  # noqa: E402
from cskd_cache.cache.shards import ShardWriter  # noqa: E402
from cskd_cache.data.images import file_digest, load_rgb  # noqa: E402


def synthetic_cache(out: Path, rows: int, shard_size: int, d: int = 512, t: int = 49, c: int = 768) -> dict:
    arrays = {"key": {"shape": [None], "dtype": "str"}, "source": {"shape": [None], "dtype": "str"},
              "digest": {"shape": [None], "dtype": "str"}, "size": {"shape": [None, 2], "dtype": "int32"},
              "views": {"shape": [None, 1, 5], "dtype": "float32"}, "embed": {"shape": [None, 1, d], "dtype": "float16"},
              "tokens": {"shape": [None, 1, t, c], "dtype": "float16"}}
    manifest = {"schema_version": SCHEMA_VERSION, "created_by": "benchmarks/integrity.py",
                "teacher": {"spec": "synthetic"}, "preprocess": {"size": [224, 224]},
                "views": {"n_views": 1}, "storage": {"tokens": True, "token_grid": [7, 7], "native_grid": [7, 7],
                                                       "layers": []},
                "arrays": arrays, "layout": {"shard_size": shard_size, "compression": None},
                "inputs": {"images": rows, "inputs_sha256": "0" * 64},
                "sources": [{"name": "synthetic", "kind": "images", "root": str(out), "arg": str(out), "files": rows,
                             "rows": rows}],
                "rows": rows, "skipped": 0, "duplicates": 0, "complete": True}
    manifest["fingerprint"] = fingerprint(manifest)
    rng = np.random.default_rng(0)
    shards = []
    for s, lo in enumerate(range(0, rows, shard_size)):
        n = min(shard_size, rows - lo)
        w = ShardWriter(out, s, arrays, planned_rows=n)
        box = np.tile(np.array([0, 0, 1, 1, 0], np.float32), (n, 1, 1))
        w.append({"key": [f"{lo + i:07d}.jpg" for i in range(n)], "source": ["synthetic"] * n,
                  "digest": ["0" * 64] * n, "size": np.full((n, 2), 224, np.int32), "views": box,
                  "embed": rng.standard_normal((n, 1, d)).astype(np.float16),
                  "tokens": rng.standard_normal((n, 1, t, c)).astype(np.float16)})
        rec = w.finish([], {"cskd_fingerprint": manifest["fingerprint"], "cskd_inputs_sha256": "0" * 64,
                            "cskd_shard_index": s}, {"fingerprint": manifest["fingerprint"]})
        shards.append({k: rec[k] for k in ("index", "file", "rows", "bytes", "sha256")})
    manifest["shards"] = shards
    write_json(out / "manifest.json", manifest)
    return manifest


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "photos")
    ap.add_argument("--max-images", type=int, default=120)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cskd-integrity-"))
    try:
        (tmp / "cache").mkdir()
        m = synthetic_cache(tmp / "cache", args.rows, args.shard_size)
        n_shards, total = len(m["shards"]), sum(s["bytes"] for s in m["shards"])
        cache = tmp / "cache"
        # First open: the full sha256 check of every shard. Drop the memo between repeats so each repeat checks.
        full = []
        for _ in range(args.repeat):
            (cache / ".verified.json").unlink(missing_ok=True)
            full.append(timed(lambda: open_cache(cache), 1)[0])
        later = timed(lambda: open_cache(cache), args.repeat)  # memo present: fast path only
        bare = timed(lambda: open_cache(cache, verify=False), args.repeat)
        t_full, t_later, t_bare = (statistics.median(x) for x in (full, later, bare))
        # The fast checks alone (what every open adds): size, sidecar, and the identity attributes of each shard.
        import h5py

        from cskd_cache.cache.integrity import check_shard_fast

        files = [h5py.File(cache / s["file"], "r") for s in m["shards"]]
        t_fast = statistics.median(timed(lambda: [check_shard_fast(cache, m, s, f.attrs)
                                                  for s, f in zip(m["shards"], files)], args.repeat * 4))
        for f in files:
            f.close()
        check_only = max(1e-9, t_full - t_bare)
        rows = {
            "cache": f"{args.rows} rows, {n_shards} shards, {total / 1e6:,.1f} MB (ViT-B-32-shaped float16)",
            "fast checks alone (every open)": f"{t_fast * 1e3 / n_shards:.3f} ms/shard",
            "open, --no-verify (reading keys and embeddings + fast checks)": f"{t_bare * 1e3:,.1f} ms = "
                                                                            f"{t_bare * 1e3 / n_shards:.2f} ms/shard",
            "open, already verified (memo hit)": f"{t_later * 1e3:,.1f} ms = {t_later * 1e3 / n_shards:.2f} ms/shard",
            "open, first time (full sha256)": f"{t_full * 1e3:,.1f} ms; the check alone {total / 1e6 / check_only:,.0f} MB/s",
        }
        # Per image: decode + resize as the loader does, with and without the digest check.
        photos = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[
            : args.max_images] if args.images.is_dir() else []
        if not photos:
            from PIL import Image

            (tmp / "jpg").mkdir()
            for i in range(40):
                a = np.random.default_rng(i).integers(0, 255, (375, 500, 3), np.uint8)
                Image.fromarray(a).save(tmp / "jpg" / f"{i}.jpg", quality=90)
                photos.append(tmp / "jpg" / f"{i}.jpg")
        digests = [file_digest(p) for p in photos]
        import hashlib

        plain, checked = [], []
        for _ in range(5):  # interleaved, so drift on a shared machine hits both alike
            plain += timed(lambda: [load_rgb(p) for p in photos], 1)
            checked += timed(lambda: [load_rgb(p, digest=d, row=0) for p, d in zip(photos, digests)], 1)
        hashing = timed(lambda: [hashlib.sha256(p.read_bytes()).hexdigest() for p in photos], 5)
        tp, tc = statistics.median(plain) / len(photos), statistics.median(checked) / len(photos)
        th = statistics.median(hashing) / len(photos)
        where = os.path.relpath(args.images, ROOT) if args.images.is_dir() else "generated"
        rows["image decode (load_rgb)"] = f"{tp * 1e3:.2f} ms/image over {len(photos)} photos ({where})"
        rows["image decode with digest check"] = f"{tc * 1e3:.2f} ms/image ({(tc / tp - 1) * 100:+.1f}%: the file is read whole, hashed, then decoded)"
        rows["sha256 of the file alone"] = f"{th * 1e3:.3f} ms/image = {th / tp * 100:.1f}% of the decode"
        from cskd_cache.data.images import quick_check

        tq = statistics.median(timed(lambda: [quick_check(p) for p in photos], 5)) / len(photos)
        rows["truncation check of a labelled image (before training)"] = f"{tq * 1e3:.3f} ms/image"
        width = max(map(len, rows))
        print("| measure | value |\n|---|---|")
        for k, v in rows.items():
            print(f"| {k:<{width}} | {v} |")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
