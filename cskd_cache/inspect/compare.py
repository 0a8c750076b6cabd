"""`cskd report RUN_A RUN_B ... --out compare.html`: runs side by side.

One page with, in this order: each run's headline (the numbers of its summary card, `run_summary`), a table of
the settings that differ between the runs (only those keys), the training loss and validation curves of every
run overlaid on shared axes, the attention profiles overlaid when the runs have `cskd attention` outputs, and,
for every run evaluated on the same test images as the first run, the paired SRCC difference to the first run
with a bootstrap interval (the same images resampled for both runs, so the interval reflects the difference,
not the two runs' separate uncertainties).

Figures are PNGs written beside the page (``NAME.curves.png``, ``NAME.attention.png``); the page itself has
inline CSS, no script and no external URL, like the run report.
"""

from __future__ import annotations

import csv
import html
import json
import os
from pathlib import Path

import numpy as np

from ..errors import EvaluateError
from .run_summary import NAMES, fmt3, read_records, summarise_run

__all__ = ["build_compare", "paired_srcc", "config_differences"]


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, yaml.YAMLError) as e:
        raise EvaluateError(f"{path}: cannot read it as YAML ({e})") from None
    return {k: v for k, v in (data or {}).items() if k not in ("resolved", "out")}


ENCODER_KEYS = ("student", "model")  # the encoder being trained: `student` in align and distill, `model` in finetune


def _unified(cfg: dict) -> dict:
    """One key per idea across stages: the trained encoder's spec is ``encoder`` whichever stage named it."""
    out = {k: v for k, v in cfg.items() if k not in ENCODER_KEYS}
    spec = next((cfg[k] for k in ENCODER_KEYS if cfg.get(k)), None)
    return {"encoder": spec, **out} if spec else out


def config_differences(configs: list[dict]) -> tuple[list[tuple[str, list]], list[list[str]]]:
    """([(key, [value per run])] for every setting all runs have whose value differs, [per run: the settings only
    some runs have, which this one has]): a finetune beside a distill differs by the distill options, listed once
    instead of a row of blanks each."""
    configs = [_unified(c) for c in configs]
    keys: list[str] = []
    for c in configs:
        keys += [k for k in c if k not in keys]
    shared = [k for k in keys if all(k in c for c in configs)]
    differ = [(k, [c[k] for c in configs]) for k in shared
              if len({json.dumps(c[k], sort_keys=True, default=str) for c in configs}) > 1]
    return differ, [[k for k in c if k not in shared] for c in configs]


def _predictions(summary: dict) -> dict[str, tuple[float, float, str | None]] | None:
    src = summary.get("source") or {}
    if src.get("kind") != "evaluate":
        return None
    path = Path(src["file"]).with_name("predictions.csv")
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {r["key"]: (float(r["true"]), float(r["pred"]), r.get("group")) for r in csv.DictReader(f)}
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise EvaluateError(f"{path}: not the key,path,true,pred table `cskd evaluate` writes ({type(e).__name__}: "
                            f"{e}); re-run the evaluation") from None


def paired_srcc(a: dict, b: dict, n_boot: int = 1000, seed: int = 0, group_by: str | None = None) -> dict | None:
    """SRCC(b) - SRCC(a) on the images both scored, with a paired bootstrap 95% interval (resampling whole groups
    of keys with ``group_by``, as `cskd evaluate --group-by`); None unless both scored the same images (same
    keys, same true scores)."""
    from ..evaluate.evaluate import group_keys
    from ..evaluate.metrics import resamples, srcc

    if not a or not b or set(a) != set(b):
        return None
    keys = sorted(a)
    truth = np.array([a[k][0] for k in keys])
    if not np.allclose(truth, [b[k][0] for k in keys]):
        return None
    pa, pb = np.array([a[k][1] for k in keys]), np.array([b[k][1] for k in keys])
    diff = srcc(truth, pb) - srcc(truth, pa)
    rng = np.random.default_rng(seed)
    groups = group_keys(keys, group_by, {k: a[k][2] for k in keys if a[k][2] is not None}) if group_by else None
    stats = []
    for i in resamples(len(keys), n_boot, rng, groups):
        d = srcc(truth[i], pb[i]) - srcc(truth[i], pa[i])
        if np.isfinite(d):
            stats.append(d)
    lo, hi = (np.percentile(stats, [2.5, 97.5]) if stats else (float("nan"), float("nan")))
    return {"n": len(keys), "diff": float(diff), "ci": [float(lo), float(hi)], "n_boot": n_boot,
            "groups": len(set(groups)) if groups else None, "group_by": group_by}


def _plot_curves(runs: list[tuple[str, Path]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    drawn = False
    for label, run_dir in runs:
        recs = read_records(run_dir / "metrics.jsonl")
        train = [r for r in recs if r.get("type") == "train" and isinstance(r.get("loss"), (int, float))]
        evals = [r for r in recs if r.get("type") == "eval"]
        metric = "srcc" if any(r.get("srcc") is not None for r in evals) else "global_cos"
        evals = [r for r in evals if isinstance(r.get(metric), (int, float))]
        if train:
            left.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
            drawn = True
        if evals:
            right.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-", label=f"{label} ({metric})")
            drawn = True
    left.set(xlabel="step", ylabel="training loss", title="training loss")
    right.set(xlabel="step", ylabel="validation metric", title="validation (val SRCC, or held-out global cos)")
    for ax in (left, right):
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    if drawn:
        _save(fig, path)
    plt.close(fig)
    return drawn


def _attention_profiles(run_dir: Path) -> list[tuple[str, list[int], list[float]]]:
    out = []
    for path in sorted(run_dir.glob("*/attention.json")) + sorted(run_dir.glob("*/*/attention.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for m in data.get("models", []) if isinstance(data, dict) else []:
            layers = [x for x in m.get("layers", []) if isinstance(x.get("distance"), list) and x["distance"]]
            if layers:
                out.append((str(m.get("label", m.get("spec", path.parent.name))),
                            [int(x["layer"]) + 1 for x in layers],  # 1 = the first block, as every plot numbers it
                            [float(np.mean(x["distance"])) for x in layers]))
    return out


def _plot_attention(runs: list[tuple[str, Path]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = [(f"{label}: {model}", xs, ys) for label, run_dir in runs for model, xs, ys in
                _attention_profiles(run_dir)]
    if not profiles:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, xs, ys in profiles:
        ax.plot(xs, ys, "o-", label=name)
    ax.set(xlabel="layer (1 = the first block)", ylabel="mean attention distance (px)",
           title="attention distance per layer, mean over heads and images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def _metric_cell(s: dict, key: str) -> str:
    m = s["headline"].get(key)
    if not m:
        return "-"
    ci = m.get("ci")
    return fmt3(m["value"]) + (f" [{fmt3(ci[0])}, {fmt3(ci[1])}]" if ci else "")


def _value(v) -> str:
    return "-" if v is None else (fmt3(v) if isinstance(v, float) else str(v))


def _tables(labels: list[str], summaries: list[dict], diffs, only, paired) -> str:
    keys = [k for k in NAMES if any(k in s["headline"] for s in summaries)]
    head = "".join(f"<th>{_e(NAMES[k])}</th>" for k in keys)
    rows = "".join(
        f"<tr><th>{_e(lab)}</th><td>{_e(s['command'])}</td><td>{_e((s.get('source') or {}).get('kind', '-'))}</td>"
        + "".join(f'<td data-run="{i}" data-metric="{k}">{_e(_metric_cell(s, k))}</td>' for k in keys)
        + f"<td>{_e(fmt3(s.get('seconds')))}</td></tr>" for i, (lab, s) in enumerate(zip(labels, summaries)))
    metrics = (f'<table class="grid"><thead><tr><th>run</th><th>stage</th><th>measured on</th>{head}'
               f"<th>wall s</th></tr></thead><tbody>{rows}</tbody></table>")
    cols = "".join(f"<th>{_e(lab)}</th>" for lab in labels)
    body = "".join(f"<tr><th>{_e(k)}</th>" + "".join(f"<td>{_e(_value(v))}</td>" for v in vals) + "</tr>"
                   for k, vals in diffs)
    body += "".join(f"<tr><th>only in {_e(lab)}</th><td colspan=\"{len(labels)}\">{_e(', '.join(keys))}</td></tr>"
                    for lab, keys in zip(labels, only) if keys)
    settings = (f'<table class="grid"><thead><tr><th>setting</th>{cols}</tr></thead><tbody>{body}</tbody></table>'
                if body else '<p class="note">the runs share every setting</p>')
    prow = "".join(f"<tr><th>{_e(labels[i])} - {_e(labels[0])}</th><td data-paired=\"{i}\">{fmt3(p['diff'])} "
                   f"[{fmt3(p['ci'][0])}, {fmt3(p['ci'][1])}]</td><td>{p['n']}</td></tr>"
                   for i, p in paired.items())
    pairs = (f'<table class="grid"><thead><tr><th>SRCC difference</th><th>paired 95% interval</th><th>images</th>'
             f"</tr></thead><tbody>{prow}</tbody></table>" if paired else
             '<p class="note">no two runs were evaluated on the same test images</p>')
    return (f"<h2>Metrics</h2>{metrics}<h2>Settings that differ</h2>{settings}"
            f"<h2>Paired SRCC difference to {_e(labels[0])}</h2>{pairs}")


def build_compare(run_dirs: list[str | os.PathLike], out: str | os.PathLike, n_boot: int = 1000, seed: int = 0,
                  labels: list[str] | None = None) -> dict:
    """Write the comparison page; returns {out, runs, differences, paired, figures}."""
    from ..files import atomic_write_text
    from .report import CSS

    dirs = [Path(os.path.expanduser(str(d))).resolve() for d in run_dirs]
    for d in dirs:
        if not (d / "config.yaml").is_file():
            raise EvaluateError(f"{d}: no config.yaml here; pass the --out folders of align, finetune or distill runs")
    out = Path(out).resolve()
    if out.is_dir():
        raise EvaluateError(f"--out {out} is a directory; name the HTML file to write, e.g. {out / 'compare.html'}")
    labels = labels or [d.name if [x.name for x in dirs].count(d.name) == 1 else str(d) for d in dirs]
    summaries = [summarise_run(d) for d in dirs]
    diffs, only = config_differences([_config(d) for d in dirs])
    preds = [_predictions(s) for s in summaries]
    group_by = (summaries[0].get("source") or {}).get("group_by")  # resample the groups its evaluation did
    paired = {i: p for i in range(1, len(dirs)) if (p := paired_srcc(preds[0], preds[i], n_boot, seed, group_by))}
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = []
    for suffix, draw, caption in ((".curves.png", _plot_curves, "Training loss and validation metric per step"),
                                  (".attention.png", _plot_attention, "Attention distance per layer")):
        png = out.with_name(out.stem + suffix)
        if draw(list(zip(labels, dirs)), png):
            figures.append((png.name, caption))
    figs = "".join(f'<figure><img src="{_e(name)}" alt="{_e(cap)}"><figcaption>{_e(cap)}</figcaption></figure>'
                   for name, cap in figures)
    runs = "".join(f"<li>{_e(lab)}: <code>{_e(str(d))}</code></li>" for lab, d in zip(labels, dirs))
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
           f"<title>cskd comparison: {_e(', '.join(labels))}</title><style>{CSS}</style></head><body>"
           f"<h1>cskd comparison: {len(dirs)} runs</h1><ul>{runs}</ul>{_tables(labels, summaries, diffs, only, paired)}"
           f"<h2>Curves</h2>{figs or '<p class=note>no curves to draw</p>'}</body></html>\n")
    atomic_write_text(out, doc)
    return {"out": str(out), "runs": [str(d) for d in dirs], "differences": [k for k, _ in diffs],
            "paired": {labels[i]: p for i, p in paired.items()}, "figures": [n for n, _ in figures],
            "summaries": summaries}
