"""The answer first: what a run is, how well it scored, how long it took, and what it was built from.

`summarise_run(RUN_DIR)` reads the files a training run leaves (config.yaml, metrics.jsonl, and the metrics.json
of a `cskd evaluate` kept under it) into one plain dict; `card_html` draws it as the card at the top of a run's
report and the comparison page reads the same dict, so a number on either page is the number in the file.

Headline metrics: the test split's (or whichever split `cskd evaluate` scored) SRCC, PLCC and accuracy with
their bootstrap intervals when the run was evaluated, else the last validation record of metrics.jsonl (val
SRCC/PLCC for finetune and distill, held-out global cosine for align). Time and speed: the ``end`` record the
engine writes (wall seconds of the process that finished the run, its training images/s).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

__all__ = ["summarise_run", "card_html", "read_records", "fmt3", "HEADLINE"]

HEADLINE = ("srcc", "plcc", "acc", "global_cos", "token_cos", "knn_agreement")
NAMES = {"srcc": "SRCC", "plcc": "PLCC", "acc": "accuracy", "global_cos": "global cosine",
         "token_cos": "token cosine", "knn_agreement": "kNN agreement", "mae": "MAE", "emd": "EMD"}


def fmt3(v) -> str:
    """A number a person reads: 3 significant digits (thousands with separators), '-' for nothing."""
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records, a damaged line skipped (a report shows what is there, never fails on it)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _evaluation(run_dir: Path) -> tuple[Path, dict] | None:
    """The metrics.json of a `cskd evaluate` under RUN_DIR (test split first), if any."""
    found = sorted(run_dir.glob("*/metrics.json")) + sorted(run_dir.glob("*/*/metrics.json"))
    evals = []
    for path in found:
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(m, dict) and "srcc" in m:
            evals.append((path, m))
    evals.sort(key=lambda e: (e[1].get("split") != "test", str(e[0])))
    return evals[0] if evals else None


def _command(cfg: dict) -> str:
    command = (cfg.get("resolved") or {}).get("command")
    if command:
        return command
    if "labels" not in cfg:
        return "align" if cfg else "unknown"
    return "distill" if "cache" in cfg else "finetune"


def _run_of(spec) -> str | None:
    return spec[4:] if isinstance(spec, str) and spec.startswith("run:") else None


def summarise_run(run_dir: str | os.PathLike) -> dict:
    """What the card shows, as data (module docstring)."""
    run_dir = Path(run_dir)
    cfg = _yaml(run_dir / "config.yaml")
    resolved = cfg.get("resolved") or {}
    command = _command(cfg)
    records = read_records(run_dir / "metrics.jsonl")
    evals = [r for r in records if r.get("type") == "eval" and (r.get("epoch") or 0) > 0]
    end = next((r for r in reversed(records) if r.get("type") == "end"), None)
    model = cfg.get("student") or cfg.get("model")
    cache = cfg.get("cache")
    teacher = cfg.get("teacher") if command == "distill" else None
    feature_teacher = (resolved.get("cache") or {}).get("teacher")
    headline, source = {}, None
    found = _evaluation(run_dir)
    if found:
        path, m = found
        source = {"kind": "evaluate", "split": m.get("split"), "n": m.get("n"), "file": str(path),
                  "group_by": (m.get("bootstrap") or {}).get("group_by")}
        headline = {k: {"value": m[k], "ci": m.get(f"{k}_ci")} for k in HEADLINE if isinstance(m.get(k), (int, float))}
    elif evals:
        last = evals[-1]
        source = {"kind": "val" if command != "align" else "held-out", "split": last.get("split"), "n": last.get("n")
                  or last.get("eval_rows"), "epoch": last.get("epoch"), "file": str(run_dir / "metrics.jsonl")}
        headline = {k: {"value": last[k], "ci": None} for k in HEADLINE if isinstance(last.get(k), (int, float))}
    lineage = [{"what": "feature cache", "path": cache}] if cache else []
    if _run_of(model):
        lineage.append({"what": "aligned encoder", "path": _run_of(model)})
    if _run_of(teacher):
        lineage.append({"what": "teacher run", "path": _run_of(teacher)})
    lineage.append({"what": "this run", "path": str(run_dir)})
    return {"run_dir": str(run_dir), "command": command, "model": model, "teacher": teacher,
            "feature_teacher": feature_teacher, "cache": cache, "labels": cfg.get("labels"),
            "label_fraction": cfg.get("label_fraction"), "steps": (end or {}).get("step") or resolved.get("total_steps"),
            "seconds": (end or {}).get("seconds"), "img_s": (end or {}).get("img_s"), "headline": headline,
            "source": source, "lineage": lineage}


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _metric(name: str, m: dict) -> str:
    ci = m.get("ci")
    interval = f'<span class="ci">[{fmt3(ci[0])}, {fmt3(ci[1])}]</span>' if ci else ""
    return (f'<div class="metric" data-metric="{_e(name)}"><span class="mname">{_e(NAMES.get(name, name))}</span>'
            f'<span class="mval">{fmt3(m["value"])}</span>{interval}</div>')


def _link(path: str | None, page_dir: Path) -> str:
    if not path:
        return "-"
    target = Path(path).expanduser()
    report = target / "report.html"
    if report.is_file():
        href = Path(os.path.relpath(report.resolve(), page_dir.resolve())).as_posix()
        return f'<a href="{_e(href)}">{_e(target.name or path)}</a>'
    return f"<code>{_e(path)}</code>"


def card_html(s: dict, page_dir: Path, links: bool = True) -> str:
    """The summary card of ``s`` (from `summarise_run`), links relative to ``page_dir`` (none with ``links``
    False: an embedded page travels alone, and a link would be dead)."""
    src = s.get("source") or {}
    where = {"evaluate": f"{src.get('split') or 'test'} split, {fmt3(src.get('n'))} images, 95% bootstrap intervals",
             "val": f"validation, epoch {fmt3(src.get('epoch'))}, {fmt3(src.get('n'))} images",
             "held-out": f"held-out rows, epoch {fmt3(src.get('epoch'))}"}.get(src.get("kind"), "not evaluated")
    metrics = "".join(_metric(k, v) for k, v in s["headline"].items()) or '<p class="note">no metrics yet</p>'
    facts = [("stage", s["command"]), ("model", s["model"]), ("teacher", s["teacher"]),
             ("feature teacher", s["feature_teacher"]), ("cache", s["cache"]),
             ("labels", s["labels"] and f"{s['labels']} (fraction {fmt3(s['label_fraction'])})"),
             ("steps", fmt3(s["steps"])), ("wall time", s["seconds"] and f"{fmt3(s['seconds'])} s"),
             ("speed", s["img_s"] and f"{fmt3(s['img_s'])} img/s")]
    rows = "".join(f'<tr><th>{_e(k)}</th><td data-fact="{_e(k)}">{_e(v)}</td></tr>' for k, v in facts if v)
    chain = " &rarr; ".join(
        f'<span class="step">{_e(x["what"])}: '
        f'{_link(x["path"], page_dir) if links and x["what"] != "this run" else "<code>" + _e(x["path"]) + "</code>"}'
        "</span>" for x in s["lineage"])
    return (f'<section class="card" id="summary"><p class="title">{_e(s["command"])} run: {_e(Path(s["run_dir"]).name)}</p>'
            f'<div class="metrics">{metrics}</div><p class="note">{_e(where)}</p>'
            f'<table class="kv facts"><tbody>{rows}</tbody></table><p class="lineage">{chain}</p></section>')
