"""Cosine nearest-neighbour search over L2-normalised embeddings: FAISS when installed, exact torch otherwise.

`build_index(x, ...)` picks the index:

- FAISS ``IndexFlatIP`` (exact inner product) up to ``ivf_threshold`` rows (default 50,000);
- FAISS ``IndexIVFFlat`` beyond it: ``nlist`` = round(4 * sqrt(N)) coarse cells (or as given), k-means trained
  on a seeded sample of ``min(N, 256 * nlist)`` rows, ``nprobe`` cells searched per query (approximate);
- on a GPU when faiss-gpu is installed and ``faiss.get_num_gpus() > 0`` (unless ``gpu=False``);
- without faiss (or with ``backend="torch"``): exact search as blocked matrix products in torch, on ``device``.
  It returns the same neighbours as ``IndexFlatIP`` on the same data (tested), except that two candidates whose
  similarities differ by float32 rounding (~1e-7) may swap places; ``note`` says the fallback ran.

faiss is imported lazily, so the rest of cskd never needs it. Inner product on L2-normalised rows is cosine
similarity; `normalise` makes rows unit length (zero rows stay zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import EvaluateError

__all__ = ["KnnIndex", "build_index", "faiss_available", "normalise", "neighbours_excluding_self"]

# Exact search over every row is quadratic: benchmarks/scale.py measured 0.06 s per 1k rows at 10k rows and
# 0.37 s at 100k (32-d), against IVF's 0.09 s at 100k finding the same near-duplicate pairs. Above 50k rows
# exact search is no longer worth its cost, so IVF takes over there.
DEFAULT_IVF_THRESHOLD = 50_000


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def normalise(x) -> np.ndarray:
    """float32, C-contiguous, rows scaled to unit L2 norm (what IndexFlatIP needs to rank by cosine)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))


# Pairs one block of a range search may hand on (~12 bytes each from faiss, ~60 through the duplicate report):
# benchmarks/scale.py measured 2.2 GB peak at 5k rows of collapsed features with blocks of rows x n pairs.
MAX_BLOCK_PAIRS = 1 << 20


def _block_rows(n: int, budget: int = 1 << 26) -> int:
    # Rows of queries per block so one (rows x n) float32 similarity block stays near 256 MiB.
    return max(1, min(4096, budget // max(n, 1)))


@dataclass
class KnnIndex:
    """A built index over ``n`` rows. ``kind`` is "flat" or "ivf"; ``backend`` "faiss" or "torch"."""

    data: np.ndarray
    kind: str
    backend: str
    device: str
    nlist: int | None = None
    nprobe: int | None = None
    note: str | None = None
    _index: object = field(default=None, repr=False)
    _cpu_index: object = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return int(self.data.shape[0])

    @property
    def exact(self) -> bool:
        return self.kind == "flat" or (self.nprobe is not None and self.nlist is not None
                                       and self.nprobe >= self.nlist)

    def describe(self) -> dict:
        return {"kind": self.kind, "backend": self.backend, "device": self.device, "rows": self.n,
                "dim": int(self.data.shape[1]), "metric": "inner product on L2-normalised rows (cosine)",
                "exact": self.exact, "nlist": self.nlist, "nprobe": self.nprobe, "note": self.note}

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (Q, k) float32, ids (Q, k) int64), best first; ids -1 where fewer than k were found."""
        q = normalise(queries)
        k = int(k)
        if k < 1 or q.shape[0] == 0:
            return np.zeros((q.shape[0], max(k, 0)), np.float32), np.zeros((q.shape[0], max(k, 0)), np.int64)
        kk = min(k, self.n)
        if self.backend == "faiss":
            sims, ids = self._index.search(q, kk)
            sims, ids = sims.astype(np.float32), ids.astype(np.int64)
        else:
            sims, ids = self._torch_search(q, kk)
        if kk < k:
            sims = np.pad(sims, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
        return sims, ids

    def _torch_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dev = torch.device(self.device if self.device != "gpu" else "cuda")
        base = torch.from_numpy(self.data).to(dev)
        out_s, out_i = [], []
        step = _block_rows(self.n)
        for start in range(0, q.shape[0], step):
            sim = torch.from_numpy(q[start:start + step]).to(dev) @ base.T
            s, i = sim.topk(k, dim=1)
            out_s.append(s.cpu())
            out_i.append(i.cpu())
        return torch.cat(out_s).numpy().astype(np.float32), torch.cat(out_i).numpy().astype(np.int64)

    def range_pairs(self, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair (i < j) of indexed rows with similarity >= threshold: (i, j, similarity), by i then j.

        Exact for flat indexes; an IVF index finds pairs within its ``nprobe`` cells only. FAISS range search
        runs on the CPU copy of the index (GPU indexes have none). All pairs in memory at once: for features
        where most pairs may pass (a collapsed encoder), stream them with `iter_range_pairs`."""
        blocks = list(self.iter_range_pairs(threshold))
        i, j, s = (np.concatenate(a) if a else np.zeros(0) for a in zip(*blocks)) if blocks else (np.zeros(0),) * 3
        order = np.lexsort((j, i))
        return i[order].astype(np.int64), j[order].astype(np.int64), s[order].astype(np.float32)

    def iter_range_pairs(self, threshold: float, max_block_pairs: int = MAX_BLOCK_PAIRS):
        """`range_pairs` one block of query rows at a time: (i, j, similarity) arrays with i < j, so memory holds
        one block's pairs whatever share of all pairs passes the threshold. A block of b query rows can return up
        to b x n pairs, so blocks start at ``max_block_pairs / n`` rows (at most 64), double while they return under
        a quarter of ``max_block_pairs`` (up to 8x the start, so a block never holds more than 8 x
        ``max_block_pairs``), and shrink to fit when they return more: a collapsed encoder (every pair passes) gets
        blocks of about ``max_block_pairs`` pairs."""
        base = max(1, max_block_pairs // max(1, self.n))
        cap, step, start = min(_block_rows(self.n), 8 * base), min(64, base), 0
        while start < self.n:
            step = max(1, min(step, cap))
            q = self.data[start:start + step]
            if self.backend == "faiss":
                lims, d, idx = self._cpu_index.range_search(q, float(threshold))
                rows = np.repeat(np.arange(len(q), dtype=np.int64), np.diff(lims).astype(np.int64)) + start
                cols, sims = idx.astype(np.int64), d.astype(np.float32)
                del lims, d, idx
            else:
                dev = torch.device(self.device if self.device != "gpu" else "cuda")
                sim = torch.from_numpy(q).to(dev) @ torch.from_numpy(self.data).to(dev).T
                r, c = torch.nonzero(sim >= threshold, as_tuple=True)
                rows, cols, sims = (r.cpu().numpy() + start, c.cpu().numpy(), sim[r, c].cpu().numpy())
                del sim, r, c
            start += len(q)
            found = len(cols)
            if found > max_block_pairs:
                step = int(step * max_block_pairs / found)
            elif found < max_block_pairs // 4:
                step *= 2
            keep = cols > rows
            yield rows[keep].astype(np.int64), cols[keep].astype(np.int64), sims[keep].astype(np.float32)


def build_index(x, backend: str = "auto", ivf_threshold: int = DEFAULT_IVF_THRESHOLD, nlist: int | None = None,
                nprobe: int = 32, seed: int = 0, gpu: bool = True, device: str = "cpu") -> KnnIndex:
    """Index the rows of ``x`` (normalised here) for cosine search; see the module docstring for the policy.

    ``backend``: auto (faiss if importable, else torch), faiss or torch. ``device`` is where the torch fallback
    multiplies ("cpu", "cuda"). ``ivf_threshold`` above which IVF is used (a test can force IVF on small data)."""
    data = normalise(x)
    n, d = data.shape
    if backend not in ("auto", "faiss", "torch"):
        raise EvaluateError(f"unknown index backend {backend!r}: auto, faiss or torch")
    if n == 0:
        raise EvaluateError("cannot index zero rows")
    have = faiss_available()
    if backend == "faiss" and not have:
        raise EvaluateError("backend faiss asked for but faiss is not installed (pip install faiss-cpu)")
    if backend == "torch" or not have:
        note = None if backend == "torch" else "faiss not installed: exact torch search (pip install faiss-cpu)"
        return KnnIndex(data, "flat", "torch", str(device), note=note)

    import faiss

    if n > ivf_threshold:
        nl = int(nlist) if nlist else int(round(4 * math.sqrt(n)))
        nl = max(1, min(nl, n))
        quantizer = faiss.IndexFlatIP(d)
        cpu = faiss.IndexIVFFlat(quantizer, d, nl, faiss.METRIC_INNER_PRODUCT)
        cpu.cp.seed = int(seed)
        sample = min(n, 256 * nl)
        rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False)) if sample < n else None
        cpu.train(data if rows is None else data[rows])
        cpu.add(data)
        cpu.nprobe = max(1, min(int(nprobe), nl))
        kind, nprobe_used = "ivf", cpu.nprobe
    else:
        cpu = faiss.IndexFlatIP(d)
        cpu.add(data)
        kind, nl, nprobe_used = "flat", None, None
    index, where = cpu, "cpu"
    if gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, cpu)
        index._cskd_resources = res  # the GPU index must not outlive its resources
        if kind == "ivf":
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe_used)
        where = "gpu"
    return KnnIndex(data, kind, "faiss", where, nl, nprobe_used, None, index, cpu)


def neighbours_excluding_self(index: KnnIndex, k: int, rows: np.ndarray | None = None
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Each indexed row's (or each of ``rows``'s) k nearest other rows: (similarities, ids), best first.

    Self is normally first, but an exact duplicate may outrank it: drop self wherever it is, else the last."""
    rows = np.arange(index.n) if rows is None else np.asarray(rows, dtype=np.int64)
    k = min(int(k), index.n - 1)
    if k < 1:
        return np.zeros((len(rows), 0), np.float32), np.zeros((len(rows), 0), np.int64)
    sims, ids = index.search(index.data[rows], k + 1)
    keep = ids != rows[:, None]
    # Rows where self was not found keep their first k; elsewhere the k non-self entries, in order.
    keep[keep.sum(1) > k, k] = False
    return sims[keep].reshape(len(rows), k), ids[keep].reshape(len(rows), k)
