"""`cskd report RUN_DIR`: one static HTML page that gathers what the commands left for a run.

Outputs are found by file name, in RUN_DIR and up to two folder levels below it (and in any extra ``include``
folders, searched the same way), so they are found wherever `--out` put them. A section appears only when its
files exist; one folder may give several sections, and several folders may give one kind each:

- run (align / finetune / distill): config.yaml (shown as YAML), metrics.jsonl (train records summarised as
  first / last / min of each number; the newest ``last`` eval records as a table), loss_curve.png (drawn with
  `train.run_log.plot_losses` when missing), student.json or iaa_model.json (the model's description).
- evaluation (`cskd evaluate`): metrics.json read generically: every scalar field (nested objects flattened as
  ``a.b``) in a table, a field ``NAME_ci`` = [lo, hi] shown beside NAME as ``0.812 [0.79, 0.83]``;
  scatter.png; a link to predictions.csv.
- neighbours (`cskd neighbors`): neighbors.json summarised like metrics.json, a link to index.html and
  duplicates.csv, the contact sheets sheets/*.png.
- attention (`cskd attention`): attention.json (its ``models`` as a table, and per model a table of each layer's
  per-head values averaged over heads; any other JSON summarised like metrics.json), attention_*.png.

Any other image directly in a found folder is shown in its section too. checkpoints/, sheets/ and hidden folders
are not searched.

The page (RUN_DIR/report.html unless ``out`` says otherwise) has inline CSS, no script and no external URL.
Images are referenced by paths relative to the page (URL-quoted), so the page works wherever ``out`` is as long as
the run stays where it is; ``embed=True`` inlines them as base64 data URIs instead, for one file to share. All text
from the files is HTML-escaped. The page (and a re-drawn loss curve) are written to temporary names and renamed,
so bad input leaves nothing behind.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from ..errors import EvaluateError

__all__ = ["ReportError", "Output", "find_outputs", "build_report", "format_value", "REPORT_NAME"]

REPORT_NAME = "report.html"
RUN_FILES = ("config.yaml", "metrics.jsonl", "loss_curve.png", "student.json", "iaa_model.json")
EVAL_FILE, NEIGHBORS_FILE, ATTENTION_FILE = "metrics.json", "neighbors.json", "attention.json"
KNOWN_FILES = RUN_FILES + (EVAL_FILE, "scatter.png", NEIGHBORS_FILE, ATTENTION_FILE, "attention_*.png")
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp", ".svg": "image/svg+xml"}
SKIP_DIRS = {"checkpoints", "sheets", "__pycache__"}
KIND_ORDER = ("run", "evaluate", "neighbors", "attention")
KIND_TITLE = {"run": "Run", "evaluate": "Evaluation", "neighbors": "Neighbours", "attention": "Attention"}
MAX_ROWS = 200  # a summary table of a big JSON stays readable; the file itself is linked


class ReportError(EvaluateError):
    """Nothing to report, or a file the report needs cannot be read; the message names the file and the fix."""


@dataclass
class Output:
    kind: str  # run | evaluate | neighbors | attention
    dir: Path


@dataclass
class _Page:
    out_dir: Path
    embed: bool
    max_images: int
    images: list[Path] = field(default_factory=list)
    generated: dict[Path, bytes] = field(default_factory=dict)  # image written with the page (re-drawn curve)

    def src(self, path: Path) -> str:
        data = self.generated.get(path)
        if self.embed:
            data = path.read_bytes() if data is None else data
            mime = IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream")
            return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        return quote(Path(os.path.relpath(path, self.out_dir)).as_posix(), safe="/")

    def link(self, path: Path, text: str) -> str:
        if self.embed:  # a shared single file would carry dead links; name the file instead
            return f"<code>{_e(str(path))}</code>"
        return f'<a href="{_e(self.src(path))}">{_e(text)}</a>'

    def figure(self, path: Path, caption: str) -> str:
        self.images.append(path)
        return (f'<figure><img src="{_e(self.src(path))}" alt="{_e(caption)}">'
                f"<figcaption>{_e(caption)}</figcaption></figure>")


def _atomic_write(path: Path, data: bytes) -> None:
    """Temporary name, then rename; mode 0644 like a page anyone may open or serve (mkstemp alone gives 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def format_value(v, digits: int = 4) -> str:
    """Numbers to ``digits`` significant digits (thousands and up with separators), None as '-', the rest as text.
    Tables a person reads use 3; the raw JSON behind a click keeps 4."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.{digits}g}"
    return str(v)


def _is_interval(v) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))


def _show(v, digits: int = 4) -> str:
    """A table cell: scalars formatted, short lists of scalars inline, anything bigger by its size."""
    if isinstance(v, dict):
        return f"object of {len(v)} fields"
    if isinstance(v, (list, tuple)):
        if len(v) <= 8 and not any(isinstance(x, (dict, list, tuple)) for x in v):
            return "[" + ", ".join(format_value(x, digits) for x in v) + "]"
        return f"list of {len(v)}"
    return format_value(v, digits)


def _intervals(obj: dict) -> dict:
    """NAME -> [lo, hi] for every NAME_ci beside a NAME (shown in NAME's cell, not on its own)."""
    return {k[:-3]: v for k, v in obj.items() if k.endswith("_ci") and _is_interval(v) and k[:-3] in obj}


def _cell(obj: dict, key: str, cis: dict, digits: int = 4) -> str:
    v = obj.get(key)
    return _show(v, digits) + (" [{}, {}]".format(*(format_value(x, digits) for x in cis[key])) if key in cis else "")


def _flatten(obj: dict, prefix: str = "", depth: int = 3) -> list[tuple[str, str]]:
    """(name, shown value) for every field; nested objects as a.b; NAME_ci intervals merged into NAME's row."""
    rows: list[tuple[str, str]] = []
    cis = _intervals(obj)
    for k, v in obj.items():
        if k.endswith("_ci") and k[:-3] in cis:
            continue
        if isinstance(v, dict) and v and depth > 1:
            rows += _flatten(v, f"{prefix}{k}.", depth - 1)
        else:
            rows.append((f"{prefix}{k}", _cell(obj, k, cis)))
    return rows


def _kv_table(rows: list[tuple[str, str]], head: tuple[str, str] = ("field", "value")) -> str:
    more = len(rows) - MAX_ROWS
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows[:MAX_ROWS])
    note = f'<p class="note">{more} more fields not shown (see the file).</p>' if more > 0 else ""
    return (f'<table class="kv"><thead><tr><th>{_e(head[0])}</th><th>{_e(head[1])}</th></tr></thead>'
            f"<tbody>{body}</tbody></table>{note}")


def _grid_table(records: list[dict], first: tuple[str, ...] = ("step", "epoch"), digits: int = 3) -> str:
    cols: list[str] = []
    for r in records:
        cols += [k for k in r if k not in cols and k != "type"]
    cols = [c for c in cols if not (c.endswith("_ci") and c[:-3] in cols)]
    cols = [c for c in first if c in cols] + [c for c in cols if c not in first]
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    def td(r: dict, c: str) -> str:
        numeric = isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
        return ('<td class="n">' if numeric else "<td>") + _e(_cell(r, c, _intervals(r), digits)) + "</td>"

    body = "".join("<tr>" + "".join(td(r, c) for c in cols) + "</tr>" for r in records[:MAX_ROWS])
    return f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ReportError(f"{path}: cannot read it as JSON ({e}); re-run the command that wrote it, or delete the "
                          "file to leave its section out") from e


def _images_in(folder: Path, exclude: set[Path] = frozenset()) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_TYPES and p.is_file()
                  and not p.name.startswith(".") and not p.name.endswith(".loss_curve.png") and p not in exclude)


def _kinds(folder: Path) -> list[str]:
    kinds = []
    if any((folder / n).is_file() for n in RUN_FILES):
        kinds.append("run")
    if (folder / EVAL_FILE).is_file() or (folder / "scatter.png").is_file():
        kinds.append("evaluate")
    if (folder / NEIGHBORS_FILE).is_file():
        kinds.append("neighbors")
    if (folder / ATTENTION_FILE).is_file() or any(folder.glob("attention_*.png")):
        kinds.append("attention")
    return kinds


def _folders(root: Path, depth: int):
    yield root
    if depth <= 0:
        return
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()
                      and not p.name.startswith(".") and p.name not in SKIP_DIRS)
    except OSError:
        return
    for sub in subs:
        yield from _folders(sub, depth - 1)


def find_outputs(roots: list[str | os.PathLike], depth: int = 2) -> list[Output]:
    """Every (kind, folder) in the roots and up to ``depth`` levels below them, each folder once, in page order."""
    seen: set[Path] = set()
    found: list[Output] = []
    for root in roots:
        for folder in _folders(Path(root).resolve(), depth):
            if folder in seen:
                continue
            seen.add(folder)
            found += [Output(kind, folder) for kind in _kinds(folder)]
    return sorted(found, key=lambda o: KIND_ORDER.index(o.kind))  # stable: search order within a kind


def _label(folder: Path, run_dir: Path) -> str:
    try:
        rel = folder.relative_to(run_dir)
    except ValueError:
        return str(folder)
    return run_dir.name if rel == Path(".") else str(rel)


def _loss_curve(folder: Path, records: list[dict], page: _Page, out: Path) -> Path | None:
    """The run's loss_curve.png, or a new one drawn from metrics.jsonl (kept in memory until the page is written)."""
    existing = folder / "loss_curve.png"
    if existing.is_file():
        return existing
    train = [r for r in records if r.get("type") == "train"]
    if not train or not all("loss" in r for r in train):  # what plot_losses draws
        return None
    from ..train.run_log import plot_losses

    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / folder.name / "loss_curve.png"  # plot_losses titles the plot with the folder name
        png.parent.mkdir()
        plot_losses(folder / "metrics.jsonl", png)
        data = png.read_bytes()
    target = existing if out.parent == folder else out.with_name(f"{out.stem}.loss_curve.png")
    page.generated[target] = data
    return target


def _run_section(folder: Path, page: _Page, out: Path, last: int) -> str:
    from ..train.run_log import read_metrics

    parts = []
    records: list[dict] = []
    metrics_path = folder / "metrics.jsonl"
    if metrics_path.is_file():
        try:
            records = read_metrics(metrics_path)
        except ValueError as e:
            raise ReportError(f"{metrics_path}: a line is not JSON ({e}); remove the damaged line (a run killed "
                              "mid-write leaves at most the last one)") from e
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if train:
        keys = [k for k in train[-1] if k not in ("type", "step", "epoch")
                and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in train)]
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(format_value(train[0][k], 3))}</td>"
                       f"<td>{_e(format_value(train[-1][k], 3))}</td>"
                       f"<td>{_e(format_value(min(r[k] for r in train), 3))}</td></tr>" for k in keys)
        parts.append(f"<h3>Training</h3><p>{len(train)} logged steps, step {_e(format_value(train[0].get('step')))} "
                     f"to {_e(format_value(train[-1].get('step')))}.</p>"
                     f'<table class="grid"><thead><tr><th></th><th>first</th><th>last</th><th>min</th></tr></thead>'
                     f"<tbody>{rows}</tbody></table>")
    curve = _loss_curve(folder, records, page, out)
    if curve is not None:
        parts.append(page.figure(curve, f"Loss curve of {folder.name}: training loss per step"
                                 + (" and held-out metric per epoch" if evals else "")))
    if evals:
        shown = evals[-last:] if last > 0 else evals
        note = f" (last {len(shown)} of {len(evals)})" if len(shown) < len(evals) else ""
        parts.append(f"<h3>Evaluation during training{_e(note)}</h3>{_grid_table(shown)}")
    # images the other sections show (scatter.png, attention_*.png) are not repeated here
    extra = [p for p in _images_in(folder, exclude={folder / "loss_curve.png", folder / "scatter.png"}
                                   | set(page.generated)) if not p.name.startswith("attention_")]
    parts.append(_capped([page.figure(p, f"{p.name} in {folder.name}") for p in extra[:page.max_images]],
                         len(extra), page, "images"))
    for name, title in (("iaa_model.json", "IAA model"), ("student.json", "Student encoder")):
        if (folder / name).is_file():
            meta = _read_json(folder / name)
            if isinstance(meta, dict):
                parts.append(f"<h3>{title}</h3>{_named_table(_model_rows(meta))}"
                             + _details(name, _kv_table(_flatten(meta))))
    if (folder / "config.yaml").is_file():
        text = (folder / "config.yaml").read_text(encoding="utf-8", errors="replace")
        parts.append(f"<h3>Configuration (config.yaml)</h3><pre>{_e(text)}</pre>")
    return "".join(parts)


def _json_summary(path: Path, title: str, curated=None) -> str:
    """A curated table of named rows (``curated(data)``), the whole file flattened one click away."""
    data = _read_json(path)
    if isinstance(data, dict):
        rows = _flatten(data)
    else:
        rows = [("(top level)", f"list of {len(data)}" if isinstance(data, list) else format_value(data))]
    named = curated(data) if curated and isinstance(data, dict) else []
    if not named:
        return f"<h3>{_e(title)} ({_e(path.name)})</h3>{_kv_table(rows)}"
    return f"<h3>{_e(title)}</h3>{_named_table(named)}" + _details(path.name, _kv_table(rows))


def _details(name: str, body: str) -> str:
    return f"<details><summary>all fields of {_e(name)}</summary>{body}</details>"


def _named_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv named"><tbody>{body}</tbody></table>'


def _with_ci(obj: dict, key: str) -> str | None:
    from .run_summary import fmt3

    v = obj.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    ci = obj.get(f"{key}_ci")
    return fmt3(v) + (f" [{fmt3(ci[0])}, {fmt3(ci[1])}]" if _is_interval(ci) else "")


def _model_rows(meta: dict) -> list[tuple[str, str]]:
    enc = meta.get("encoder") if isinstance(meta.get("encoder"), dict) else meta
    head, labels, val = (meta.get(k) if isinstance(meta.get(k), dict) else {} for k in ("head", "labels", "val"))
    size = (enc.get("input_cfg") or {}).get("size")
    bins = f", {head['bins']} bins" if head.get("bins") else ""
    rows = [("encoder", enc.get("spec")), ("input size", size and "x".join(map(str, size)) + " px"),
            ("pooled features", enc.get("pooled_dim")), ("head", head.get("kind") and f"{head['kind']}{bins}"),
            ("label set", labels.get("name") and f"{labels['name']}, scale {labels.get('scale')}"),
            ("kept", meta.get("keep") and f"{meta['keep']} (epoch {meta.get('epoch')}, step {meta.get('step')})"),
            ("val SRCC", _with_ci(val, "srcc")), ("trained by", meta.get("trained_by"))]
    return [(k, str(v)) for k, v in rows if v not in (None, "", [])]


def _eval_rows(m: dict) -> list[tuple[str, str]]:
    rows = [("dataset, split", m.get("dataset") and f"{m['dataset']}, {m.get('split')}"),
            ("images scored", m.get("n") is not None and f"{m['n']} of {m.get('n_labels', m['n'])}")]
    rows += [(name, _with_ci(m, key)) for key, name in (("srcc", "SRCC"), ("plcc", "PLCC"), ("acc", "accuracy"),
                                                         ("mae", "MAE"), ("emd", "EMD"))]
    return [(k, str(v)) for k, v in rows if v]


def _neighbors_rows(d: dict) -> list[tuple[str, str]]:
    feats, index = d.get("features") or {}, d.get("index") or {}
    dups, probe = d.get("duplicates") or {}, d.get("probe") or {}
    source = f"{feats.get('source', '')} {feats.get('model') or feats.get('teacher') or ''}".strip()
    queries = d.get("queries")
    rows = [("cache rows", d.get("rows")), ("features", source),
            ("search", index.get("kind") and f"{index['kind']} ({index.get('backend')})"),
            ("neighbours per query", d.get("k")), ("query images", len(queries) if isinstance(queries, list) else None),
            ("kNN probe SRCC", _with_ci(probe, "srcc")), ("near-duplicate pairs", dups.get("pairs")),
            ("of them across splits", dups.get("cross_split"))]
    return [(k, str(v)) for k, v in rows if v not in (None, "")]


def _files_line(folder: Path, names: tuple[str, ...], page: _Page) -> str:
    links = [page.link(folder / n, n) for n in names if (folder / n).is_file()]
    return f'<p class="files">Files: {", ".join(links)}</p>' if links else ""


def _capped(figures: list[str], total: int, page: _Page, what: str) -> str:
    more = total - page.max_images
    note = f'<p class="note">{more} more {_e(what)} not shown (raise --max-images).</p>' if more > 0 else ""
    return "".join(figures) + note


def _evaluate_section(folder: Path, page: _Page) -> str:
    parts = []
    if (folder / EVAL_FILE).is_file():
        parts.append(_json_summary(folder / EVAL_FILE, "Metrics", _eval_rows))
    parts.append(_files_line(folder, ("predictions.csv",), page))
    imgs = ([folder / "scatter.png"] if (folder / "scatter.png").is_file() else []) + \
        [p for p in _images_in(folder) if p.name != "scatter.png" and not p.name.startswith("attention_")]
    names = {"scatter.png": "Predicted against true score, with both scores' histograms",
             "confusion.png": "Per-bin confusion of the score distributions (rows: true bin)"}
    figs = [page.figure(p, names.get(p.name, p.name) + f" ({folder.name})") for p in imgs[:page.max_images]]
    return "".join(parts) + _capped(figs, len(imgs), page, "images")


def _neighbors_section(folder: Path, page: _Page) -> str:
    parts = [_json_summary(folder / NEIGHBORS_FILE, "Neighbours summary", _neighbors_rows),
             _files_line(folder, ("index.html", "duplicates.csv"), page)]
    sheets = sorted(p for p in (folder / "sheets").glob("*") if p.suffix.lower() in IMAGE_TYPES) \
        if (folder / "sheets").is_dir() else []
    imgs = sheets + _images_in(folder)
    figs = [page.figure(p, _sheet_caption(p) if p.parent.name == "sheets" else p.name) for p in imgs[:page.max_images]]
    return "".join(parts) + _capped(figs, len(imgs), page, "sheets")


def _sheet_caption(path: Path) -> str:
    """query-000.png is the sheet `cskd neighbors` titles "query 1": one numbering, from 1, everywhere."""
    stem = path.stem
    if stem.startswith("query-") and stem[6:].isdigit():
        return f"Neighbour sheet: query {int(stem[6:]) + 1}"
    return f"Neighbour sheet: {stem.replace('-', ' ')}"


def _head_means(layer: dict) -> dict:
    """A layer record with every per-head list of numbers replaced by its mean over heads, and its layer numbered
    from 1 as the attention plots number it (attention.json counts from 0)."""
    out = {k: (sum(v) / len(v) if v and isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)
               else v) for k, v in layer.items()}
    if isinstance(out.get("layer"), int):
        out["layer"] += 1
    return out


def _attention_section(folder: Path, page: _Page) -> str:
    parts = []
    if (folder / ATTENTION_FILE).is_file():
        data = _read_json(folder / ATTENTION_FILE)
        models = data.get("models") if isinstance(data, dict) else None
        if isinstance(models, list) and models and all(isinstance(m, dict) for m in models):
            # attention.json (cskd_cache.inspect.attention): one record per model, per-layer lists of per-head values
            rest = {k: v for k, v in data.items() if k != "models"}
            parts.append(f"<h3>Attention summary ({ATTENTION_FILE})</h3>{_kv_table(_flatten(rest))}")
            summary = [{k: v for k, v in m.items() if k != "layers"} for m in models]
            parts.append(f"<h3>Models</h3>{_grid_table(summary, ('label',))}")
            for m in models:
                layers = m.get("layers")
                if isinstance(layers, list) and layers and all(isinstance(x, dict) for x in layers):
                    heads = f", mean of {m['num_heads']} heads" if isinstance(m.get("num_heads"), int) else ""
                    parts.append(f"<h3>Per layer: {_e(m.get('label', m.get('spec', '')))}{_e(heads)} (layer 1 = the "
                                 "first block)</h3>"
                                 + _grid_table([_head_means(x) for x in layers], ("layer",)))
        else:
            parts.append(_json_summary(folder / ATTENTION_FILE, "Attention summary"))
    imgs = sorted(folder.glob("attention_*.png"))
    figs = [page.figure(p, "Attention " + p.stem[len("attention_"):].replace("_", " ") + f" ({folder.name})")
            for p in imgs[:page.max_images]]
    return "".join(parts) + _capped(figs, len(imgs), page, "images")


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;
padding:1.2em 1.5em 3em;color:#1d232b;background:#fff}
h1{font-size:1.6em;margin:.2em 0}h2{border-bottom:2px solid #d6dde6;padding-bottom:.2em;margin-top:2em}
h3{margin:1.4em 0 .5em;font-size:1.05em}
.meta,.note,.files{color:#5a6572;font-size:.92em}
nav ul{padding-left:1.2em;margin:.3em 0}
table{border-collapse:collapse;margin:.4em 0;font-size:.9em}
th,td{border:1px solid #d6dde6;padding:.25em .6em;text-align:left;vertical-align:top}
thead th{background:#eef2f6}table.kv tbody th{font-weight:600;background:#f7f9fb;white-space:nowrap}
table.grid td{font-variant-numeric:tabular-nums}table.grid td.n{text-align:right}
table{max-width:100%}th,td{overflow-wrap:anywhere}
pre{background:#f7f9fb;border:1px solid #d6dde6;padding:.7em;overflow-x:auto;font-size:.85em;line-height:1.35}
figure{margin:1em 1.5em 1em 0;display:inline-block;max-width:100%;vertical-align:top}
figure img{max-width:100%;height:auto;border:1px solid #d6dde6}
figcaption{color:#5a6572;font-size:.88em;margin-top:.25em}
.card{border:1px solid #c9d3de;border-radius:8px;padding:.6em 1.2em 1em;background:#f7f9fb;margin:1em 0}
.card .title{font-size:1.35em;font-weight:600;margin:.3em 0}.metrics{display:flex;flex-wrap:wrap;gap:1.5em;margin:.5em 0}
.metric{display:flex;flex-direction:column}.mname{color:#5a6572;font-size:.85em}
.mval{font-size:1.9em;font-weight:600;font-variant-numeric:tabular-nums}.ci{color:#5a6572;font-size:.9em}
.lineage{font-size:.92em}.lineage .step{white-space:nowrap}
details{margin:.5em 0}summary{cursor:pointer;color:#34506e}
"""


def build_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                 include: list[str | os.PathLike] | None = None, embed: bool = False, last: int = 20,
                 max_images: int = 60) -> dict:
    """Write the report page; returns {out, sections: [(kind, folder)], images, bytes}."""
    run_dir = Path(os.path.expanduser(str(run_dir)))
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such directory; pass the --out folder of a cskd command "
                          "(align, finetune, distill, evaluate, neighbors, attention)")
    for extra in include or []:
        if not Path(extra).is_dir():
            raise ReportError(f"--include {extra}: no such directory")
    run_dir = run_dir.resolve()
    outputs = find_outputs([run_dir, *(include or [])])
    if not outputs:
        raise ReportError(f"{run_dir}: nothing to report: none of {', '.join(KNOWN_FILES)} is here or up to two "
                          "folders below; pass a run's --out folder, or add --include DIR for outputs elsewhere")
    out = Path(out).resolve() if out else run_dir / REPORT_NAME
    if out.is_dir():
        raise ReportError(f"--out {out} is a directory; name the HTML file to write, e.g. {out / REPORT_NAME}")
    page = _Page(out_dir=out.parent, embed=embed, max_images=max_images)

    bodies, toc, sections, counts = [], [], [], {}
    for o in outputs:
        if o.kind == "run":
            body = _run_section(o.dir, page, out, last)
        elif o.kind == "evaluate":
            body = _evaluate_section(o.dir, page)
        elif o.kind == "neighbors":
            body = _neighbors_section(o.dir, page)
        else:
            body = _attention_section(o.dir, page)
        counts[o.kind] = counts.get(o.kind, 0) + 1
        anchor = f"{o.kind}-{counts[o.kind]}"
        title = f"{KIND_TITLE[o.kind]}: {_label(o.dir, run_dir)}"
        toc.append(f'<li><a href="#{anchor}">{_e(title)}</a></li>')
        bodies.append(f'<section id="{anchor}"><h2>{_e(title)}</h2>'
                      f'<p class="meta">{_e(str(o.dir))}</p><div>{body}</div></section>')
        sections.append((o.kind, str(o.dir)))

    card = ""
    if (run_dir / "config.yaml").is_file():  # a training run: the answer first
        from .run_summary import card_html, summarise_run

        card = card_html(summarise_run(run_dir), out.parent, links=not embed)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
           f"<title>cskd report: {_e(run_dir.name)}</title><style>{CSS}</style></head><body>"
           f"<h1>cskd report: {_e(run_dir.name)}</h1><p class=\"meta\">{_e(str(run_dir))} &middot; generated {stamp}"
           f"</p>{card}<nav><ul>{''.join(toc)}</ul></nav>{''.join(bodies)}</body></html>\n")

    out.parent.mkdir(parents=True, exist_ok=True)
    if not embed:
        for path, data in page.generated.items():
            _atomic_write(path, data)
    _atomic_write(out, doc.encode("utf-8"))
    return {"out": str(out), "sections": sections, "images": len(page.images), "bytes": len(doc.encode("utf-8")),
            "generated": [] if embed else [str(p) for p in page.generated]}
