"""`cskd export`: a trained IAA model as one self-contained ONNX or TorchScript file, checked against PyTorch.

The exported graph (`ScoreModule`)
----------------------------------
input   ``image``  float32 ``(B, 3, H, W)``: RGB images already preprocessed for the model, i.e. the eval view
                   (the centred square of the short side, resized to ``size`` = [H, W] with ``interpolation``),
                   scaled to 0..1 and normalised with ``(x - mean) / std``; `cskd_cache.evaluate.scoring.eval_tensor` does
                   exactly this. B is dynamic unless exported with a static batch.
outputs ``score``  float32 ``(B,)``: the score on the native scale of the training dataset (``labels.scale``);
        ``dist``   float32 ``(B, K)``: the K-bin score distribution (softmax), distribution heads only.
ONNX names the input and outputs as above; a TorchScript module's ``forward(image)`` returns the tuple
``(score,)`` or ``(score, dist)`` in that order.

Sidecar ``FILE.json`` (written last, only after the parity check passed; a TorchScript file also carries it,
less ``parity``, as the extra file ``cskd_export.json``): ``format`` ("cskd-export"), ``version``,
``export_format``, ``model`` (run dir), ``opset`` (ONNX), ``dynamic_batch``, ``inputs`` / ``outputs``
([{name, shape, dtype}], "batch" for a dynamic axis), ``input_cfg`` ({size, mean, std, interpolation,
resize_mode, crop_pct}: everything a deployer needs to preprocess), ``encoder`` (spec), ``head``, ``labels``
(name, scale, bins, threshold) and ``parity`` ({max_abs_diff, atol, runtime, inputs}).

Parity check: the exported file is loaded back (torch.jit.load, or an onnxruntime CPU session) and run on
seeded random normalised batches and on synthetic photographs put through the eval transform, at two batch
sizes when the batch is dynamic; the largest absolute difference from the PyTorch module over all outputs must
not exceed ``atol``. Export goes to a temporary name in the output folder: a file that fails is deleted, so a
file with the requested name is always one that passed (an existing one is left untouched on failure).

ONNX uses torch.onnx.export's TorchScript-based exporter (``dynamo=False``; the dynamo exporter needs the
onnxscript package) and needs onnxruntime for the check (``pip install onnxruntime``, or the ``export`` extra).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..cache.manifest import write_json
from ..errors import EvaluateError
from .scoring import EVAL_VIEW

__all__ = ["EXPORT_FORMATS", "ExportError", "ExportParityError", "ExportResult", "ScoreModule", "bake_pos_embed",
           "parity_inputs", "run_export", "sidecar_path"]

EXPORT_FORMATS = ("onnx", "torchscript")
FORMAT = "cskd-export"
VERSION = 1
EXTRA_FILE = "cskd_export.json"


class ExportError(EvaluateError):
    """Bad export request (format, opset, missing runtime); the message names the fix."""


class ExportParityError(ExportError):
    """The exported file disagrees with PyTorch by more than atol; the file was removed."""


class ScoreModule(nn.Module):
    """An `IAAScorer`'s model plus its native-scale mapping: image batch -> (score,) or (score, dist)."""

    def __init__(self, scorer, model: nn.Module | None = None):
        super().__init__()
        self.model = scorer.model if model is None else model
        self._scorer = [scorer]  # a list keeps the scorer (and its model, already registered) out of the tree
        self.dist_head = scorer.head_kind == "distribution"

    @property
    def output_names(self) -> list[str]:
        return ["score", "dist"] if self.dist_head else ["score"]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self._scorer[0].outputs(self.model(image))
        return (out["score"], out["dist"]) if self.dist_head else (out["score"],)


def bake_pos_embed(module: nn.Module, size) -> int:
    """Resample, once, the absolute position embedding of every timm ViT-like submodule built with
    ``dynamic_img_size`` (a student trained at a size other than its native one) to the grid of ``size``, and
    record that grid as its native one; returns how many were changed.

    Such a model resamples the embedding on every forward (bicubic with antialias, which has no ONNX operator);
    afterwards timm's size-match early return skips the resample when tracing, and the result is the same
    embedding the eager model computes each time, so outputs do not change (the parity check confirms it)."""
    from timm.layers import resample_abs_pos_embed

    h, w = (int(v) for v in size)
    changed = 0
    for m in module.modules():
        pe, pos = getattr(m, "patch_embed", None), getattr(m, "pos_embed", None)
        if not (getattr(m, "dynamic_img_size", False) and isinstance(pos, nn.Parameter) and pos.ndim == 3
                and hasattr(pe, "grid_size") and hasattr(pe, "dynamic_feat_size")):
            continue
        grid = tuple(int(v) for v in pe.dynamic_feat_size((h, w)))
        if tuple(pe.grid_size) == grid:
            continue
        prefix = 0 if getattr(m, "no_embed_class", False) else int(getattr(m, "num_prefix_tokens", 1))
        with torch.no_grad():
            new = resample_abs_pos_embed(pos.data, new_size=list(grid), old_size=list(pe.grid_size),
                                         num_prefix_tokens=prefix)
        m.pos_embed = nn.Parameter(new, requires_grad=False)
        pe.grid_size = grid
        pe.num_patches = grid[0] * grid[1]
        if getattr(pe, "img_size", None) is not None:
            pe.img_size = (h, w)
        changed += 1
    return changed


def sidecar_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


def _synthetic_photo(w: int, h: int, rng: np.random.Generator):
    """Smooth colour gradients, a few flat shapes and sensor-like noise: pixel statistics of a real photo."""
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * rng.uniform(60, 220, 3) + rng.uniform(0, 30, 3)
    img = Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = int(rng.integers(x0 + 4, w)), int(rng.integers(y0 + 4, h))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def parity_inputs(input_cfg: dict, batches: list[int], seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Named check batches: random normalised tensors at each batch size, then synthetic photos through the
    eval transform (the inputs a deployed model really gets) at the largest one."""
    from .scoring import eval_tensor

    h, w = input_cfg["size"]
    g = torch.Generator().manual_seed(seed)
    out = [(f"random x{b}", torch.randn(b, 3, h, w, generator=g)) for b in batches]
    rng = np.random.default_rng(seed)
    b = max(batches)
    photos = [eval_tensor(_synthetic_photo(int(rng.integers(96, 400)), int(rng.integers(96, 400)), rng), input_cfg)
              for _ in range(b)]
    out.append((f"photos x{b}", torch.stack(photos)))
    return out


@dataclass
class ExportResult:
    out: Path
    sidecar: Path
    format: str
    max_abs_diff: float
    diffs: dict[str, float]
    atol: float
    runtime: str
    bytes: int
    seconds: float
    outputs: list[str]


def _io_spec(names: list[str], size, bins, batch) -> tuple[list[dict], list[dict]]:
    inputs = [{"name": "image", "shape": [batch, 3, int(size[0]), int(size[1])], "dtype": "float32"}]
    shapes = {"score": [batch], "dist": [batch, int(bins or 0)]}
    return inputs, [{"name": n, "shape": shapes[n], "dtype": "float32"} for n in names]


def _export_torchscript(module: ScoreModule, example: torch.Tensor, path: Path, meta: str) -> None:
    with warnings.catch_warnings():
        # TracerWarnings about Python ints in timm's shape code: the parity check at a second batch size
        # is what tells whether a traced shape was baked in
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: meta})


def _export_onnx(module: ScoreModule, example: torch.Tensor, path: Path, opset: int, dynamic: bool) -> None:
    names = module.output_names
    axes = {n: {0: "batch"} for n in ["image", *names]} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["image"],
                              output_names=names, dynamic_axes=axes, opset_version=opset, do_constant_folding=True)


def _runner(fmt: str, path: Path):
    """(callable image -> list of numpy outputs, runtime name) for the file as a deployer would load it."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
            loaded = torch.jit.load(str(path), map_location="cpu").eval()

        def run(x: torch.Tensor) -> list[np.ndarray]:
            with torch.no_grad():
                return [t.numpy() for t in loaded(x)]
        return run, f"torch.jit {torch.__version__}"
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> list[np.ndarray]:
        return sess.run(None, {"image": x.numpy()})
    return run, f"onnxruntime {ort.__version__}"


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _require_onnxruntime() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export checks the file with onnxruntime, which is not installed: "
                          "pip install onnxruntime (or pip install -e '.[export]')") from None


def _check_request(fmt: str, batch_size: int, atol: float, opset: int, out: Path) -> None:
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if batch_size < 1:
        raise ExportError(f"batch size must be >= 1, got {batch_size}")
    if not atol >= 0:
        raise ExportError(f"atol must be >= 0, got {atol}")
    if fmt == "onnx":
        if not 9 <= opset <= 20:
            raise ExportError(f"opset {opset} is outside what torch's ONNX exporter writes (9..20); "
                              "17 is a safe choice")
        _require_onnxruntime()
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; name the file to write, e.g. {out / ('model.' + fmt)}")


def _first_line(e: Exception) -> str:
    # torch appends the whole IR graph to some messages; the first line says what failed
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _parity(fmt: str, tmp: Path, reference: nn.Module, cfg: dict, batches: list[int], seed: int, model, out: Path,
            atol: float) -> tuple[dict, str]:
    """({check input: max |exported - PyTorch|}, runtime); raises ExportParityError above ``atol``."""
    run, runtime = _runner(fmt, tmp)
    diffs = {}
    for name, x in parity_inputs(cfg, batches, seed):
        with torch.no_grad():
            ref = [t.numpy() for t in reference(x)]
        try:
            got = run(x)
        except Exception as e:  # noqa: BLE001 - e.g. a batch size baked into the graph
            raise ExportParityError(f"the {fmt} export of {model} fails on the check input {name!r} "
                                    f"({type(e).__name__}: {_first_line(e)}); {out} was not written") from e
        d = max(float(np.max(np.abs(np.asarray(g, dtype=np.float64) - r))) for g, r in zip(got, ref))
        diffs[name] = d if np.isfinite(d) else float("inf")
    worst = max(diffs.values())
    if not worst <= atol:
        detail = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        raise ExportParityError(f"{fmt} export of {model} differs from PyTorch by {worst:.3g} > --atol {atol:g} "
                                f"({detail}); {out} was not written. Loosen --atol if this is float noise, "
                                "or export the other format")
    return diffs, runtime


def run_export(model: str | os.PathLike, fmt: str, out: str | os.PathLike, dynamic_batch: bool = True,
               batch_size: int = 1, opset: int = 17, atol: float = 1e-4, seed: int = 0,
               on_status=None, trust_code: bool = False) -> ExportResult:
    """Export the IAA model in RUN_DIR ``model`` to ``out`` and check it (see the module docstring).

    ``batch_size`` is the batch the graph is traced at, and the only one it accepts when ``dynamic_batch`` is
    False. Raises ExportParityError (file removed) when the check fails."""
    from ..models.scorer import load_iaa_model

    out = Path(out)
    _check_request(fmt, batch_size, atol, opset, out)
    t0 = time.perf_counter()
    scorer = load_iaa_model(model, device="cpu", trust_code=trust_code)
    cfg = scorer.input_cfg
    reference = ScoreModule(scorer).eval()
    # the exported graph is traced from a copy whose ViT position embedding is fixed at the input size (see
    # bake_pos_embed); the parity check compares it with the untouched model
    frozen = copy.deepcopy(scorer.model).eval()
    bake_pos_embed(frozen, cfg["size"])
    module = ScoreModule(scorer, frozen).eval()
    # trace at one batch size and check at another, so a batch baked into the graph cannot pass unnoticed
    trace_b = max(batch_size, 2) if dynamic_batch else batch_size
    batches = sorted({1, trace_b + 1}) if dynamic_batch else [batch_size]
    example = torch.randn(trace_b, 3, *cfg["size"], generator=torch.Generator().manual_seed(seed + 1))
    names = module.output_names
    inputs, outputs = _io_spec(names, cfg["size"], scorer.meta["head"].get("bins"),
                               "batch" if dynamic_batch else batch_size)
    input_cfg = {"size": list(cfg["size"]), "mean": list(cfg["mean"]), "std": list(cfg["std"]),
                 "interpolation": cfg.get("interpolation", "bicubic"), **EVAL_VIEW}
    meta = {"format": FORMAT, "version": VERSION, "export_format": fmt, "model": str(model),
            "opset": opset if fmt == "onnx" else None, "dynamic_batch": dynamic_batch, "inputs": inputs,
            "outputs": outputs, "input_cfg": input_cfg, "head": scorer.meta["head"], "labels": scorer.meta["labels"],
            "encoder": scorer.meta["encoder"].get("spec")}

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if on_status:
            on_status(f"exporting {scorer.meta['encoder']['spec']} ({scorer.head_kind} head) to {fmt}")
        try:
            if fmt == "torchscript":
                _export_torchscript(module, example, tmp, json.dumps(meta))
            else:
                _export_onnx(module, example, tmp, opset, dynamic_batch)
        except Exception as e:  # noqa: BLE001 - tracer/exporter failures come in many types
            other = "torchscript" if fmt == "onnx" else "onnx"
            raise ExportError(f"{fmt} export of {scorer.meta['encoder']['spec']} from {model} failed "
                              f"({type(e).__name__}: {_first_line(e)}); try --format {other}") from e
        diffs, runtime = _parity(fmt, tmp, reference, cfg, batches, seed, model, out, atol)
        meta["parity"] = {"max_abs_diff": max(diffs.values()), "atol": atol, "runtime": runtime, "inputs": diffs}
        os.chmod(tmp, _file_mode())  # mkstemp made it private; the result is an ordinary file
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sidecar = sidecar_path(out)
    write_json(sidecar, meta)
    os.chmod(sidecar, _file_mode())
    return ExportResult(out, sidecar, fmt, max(diffs.values()), diffs, atol, runtime, out.stat().st_size,
                        time.perf_counter() - t0, names)
