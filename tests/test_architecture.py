"""The layout is a contract: layers import only downwards, no import cycles, the library never imports the CLI,
no private name crosses a module boundary, and `--help` of every command keeps its options (renamed flags keep
their old spelling, hidden, with a notice).

Read from the source with `ast` (every import, lazy ones inside functions included), so a violation fails here,
not as a slow import or a cycle someone hits at run time.
"""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "cskd_cache"

# Lowest first. A module may import its own package and any package on its layer's left, never one to its right;
# packages on one layer do not import each other.
LAYERS = [
    {"errors", "files", "dist"},  # the floor: top-level modules
    {"data", "losses"},  # decode, views, datasets; pure-torch losses
    {"cache"},  # the cache format: manifest, shards, reader, verification, paths
    {"labels"},  # dataset readers, label targets, label <-> cache links
    {"models"},  # teachers, students, heads, scorers, the run loader
    {"train"},  # the engine, configs, checkpoints, run directories
    {"evaluate"},  # metrics, evaluate, predict, export, kNN index
    {"stages"},  # extract, align, finetune, distill, teacher predictions
    {"inspect"},  # neighbours, attention, report, proxy sets, samples
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# cskd_cache/__init__.py is the public facade, outside the layers: `__version__` (read by any layer) and lazy
# re-exports of `open_cache` and `load_encoder` (which reach up by design).
FACADE = "__init__"


def _modname(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, str, int]]:
    """(imported module or package, imported name, line) for every import of cskd_cache/cskd_cli in ``path``."""
    mod = _modname(path)
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[:len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out += [(target, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names]
    return [(t, n, ln) for t, n, ln in out if t.split(".")[0] in ("cskd_cache", "cskd_cli", "cli")]


MODULES = {_modname(p): p for p in sorted(PKG.rglob("*.py"))}


def _layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _resolve(target: str, name: str) -> str:
    """The module an import reaches: ``from pkg import mod`` names a module, ``from mod import f`` the module."""
    return f"{target}.{name}" if f"{target}.{name}" in MODULES else target


def test_top_level_holds_at_most_four_modules_and_every_subpackage_says_what_it_may_import():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 4, top
    packages = sorted(p.parent for p in PKG.glob("*/__init__.py"))
    assert {p.name for p in packages} == set().union(*LAYERS) - {"errors", "files", "dist"}
    for pkg in packages:
        doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text(encoding="utf-8"))) or ""
        assert len(doc) > 80 and "May import:" in doc, f"{pkg.name}/__init__.py: say what lives here and what it may import"


def test_layers_import_only_downwards_and_the_library_never_imports_the_cli():
    bad = []
    for mod, path in MODULES.items():
        for target, name, line in _imports(path):
            if not target.startswith("cskd_cache"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the CLI ({target})")
                continue
            src, dst = _layer_of(mod), _layer_of(_resolve(target, name))
            if src == FACADE or (dst == FACADE and name == "__version__"):
                continue
            if src != dst and dst != "errors" and RANK[dst] >= RANK[src]:  # errors: the one root every layer raises
                bad.append(f"{path.relative_to(ROOT)}:{line}: {src} (layer {RANK[src]}) imports {dst} "
                           f"(layer {RANK[dst]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules():
    edges = {m: {_resolve(t, n) for t, n, _ in _imports(p) if t.startswith("cskd_cache")} - {m}
             for m, p in MODULES.items()}
    edges = {m: {e for e in es if e in MODULES} for m, es in edges.items()}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for e in sorted(edges[m]):
            if state.get(e) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(e):] + [e]))
            if e not in state:
                visit(e, trail + [e])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])


def test_no_private_name_is_imported_across_modules():
    bad = [f"{p.relative_to(ROOT)}:{line}: {name} from {target}"
           for p in [*MODULES.values(), *sorted((ROOT / "cli").glob("*.py"))]
           for target, name, line in _imports(p)
           if name.startswith("_") and not name.startswith("__") and f"{target}.{name}" not in MODULES
           and target.split(".")[0] in ("cskd_cache", "cli")]
    assert not bad, "\n".join(bad)


def _option_sets() -> dict[str, list[str]]:
    import typer.main
    from cskd_cli.main import app

    out = {}

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in sorted(cmd.commands.items()):
                walk(sub, path + [name])
            return
        opts = []
        for p in cmd.params:
            if type(p).__name__.endswith("Option") and not p.hidden:
                opts += sorted(p.opts + p.secondary_opts)
            elif type(p).__name__.endswith("Argument"):
                opts.append(p.name.upper())
        out[" ".join(path)] = sorted(opts)

    walk(typer.main.get_command(app), [])
    return out


# Flags renamed by the one-config-base change: new spelling per command, and the old one still accepted (hidden).
RENAMED = {
    "align": {"--image-root": "--cache-image-root", "--student-size": "--size", "--lr-student": "--lr-encoder",
              "--warmup-pct": "--warmup-fraction", "--min-lr-pct": "--min-lr-fraction", "--eval-pct": "--eval-fraction"},
    "finetune": {"--image-root": "--label-image-root", "--warmup-pct": "--warmup-fraction",
                 "--min-lr-pct": "--min-lr-fraction"},
    "distill": {"--image-root": "--label-image-root", "--warmup-pct": "--warmup-fraction",
                "--min-lr-pct": "--min-lr-fraction"},
    "evaluate": {"--image-root": "--label-image-root"},
    "neighbors": {"--image-root": "--cache-image-root"},
}


def test_every_command_keeps_its_options_and_takes_a_config_file():
    """tests/data/cli_options_before.json: every command's --help options before the redesign."""
    before = json.loads((Path(__file__).parent / "data" / "cli_options_before.json").read_text())
    now = _option_sets()
    assert set(before) <= set(now), sorted(set(before) - set(now))  # commands may be added, never lost
    for command, opts in before.items():
        renamed = RENAMED.get(command, {})
        want = {renamed.get(o, o) for o in opts}
        assert want <= set(now[command]), (command, sorted(want - set(now[command])))
    assert [c for c, opts in now.items() if "--config" not in opts] == []


@pytest.mark.parametrize("command", sorted(RENAMED))
def test_renamed_flags_keep_their_old_spelling_hidden(command):
    import typer.main
    from cskd_cli.main import app

    cmd = typer.main.get_command(app).commands[command]
    hidden = {o for p in cmd.params if p.hidden for o in p.opts}
    assert set(RENAMED[command]) <= hidden, command


def test_an_old_name_is_read_as_the_new_one_with_one_notice():
    from cskd_cache.stages.align import AlignConfig
    from cskd_cache.stages.finetune import FinetuneConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = AlignConfig.from_dict({"eval-pct": 20, "student_size": 48, "image_root": ["/a=/b"], "warmup_pct": 5})
    assert (cfg.eval_fraction, cfg.size, cfg.cache_image_root, cfg.warmup_fraction) == (0.2, 48, ["/a=/b"], 0.05)
    assert len(caught) == 4 and all(issubclass(w.category, FutureWarning) for w in caught)
    assert "--eval-pct / `eval_pct` is now --eval-fraction / `eval_fraction` (a fraction: read as 0.2)" in \
        str(caught[0].message)
    assert FinetuneConfig.from_dict({"image_root": "/imgs"}, notice=False).label_image_root == "/imgs"
    # an old run's config.yaml compares equal to today's spelling of the same run, so it resumes
    old = {**AlignConfig().to_dict(), "eval_pct": 20.0, "student_size": 48}
    del old["eval_fraction"], old["size"]
    assert AlignConfig(eval_fraction=0.2, size=48).changed(old) == []


def test_a_field_added_after_a_run_was_made_reads_as_its_default():
    from cskd_cache.stages.distill import DistillConfig

    saved = DistillConfig(teacher="run:t").to_dict()
    del saved["refine_teacher"], saved["attn_reference"]
    assert DistillConfig(teacher="run:t").changed(saved) == []
    # a value other than the default is still a change, so a resume cannot switch it on silently
    assert DistillConfig(teacher="run:t", rounds=2, refine_teacher=True).changed(saved) == ["refine_teacher",
                                                                                            "rounds"]


def test_every_exception_the_library_defines_is_a_cskd_error():
    import importlib
    import inspect

    from cskd_cache.errors import CskdError

    found = []
    for mod in MODULES:
        m = importlib.import_module(mod)
        for _, cls in inspect.getmembers(m, inspect.isclass):
            if cls.__module__ == mod and issubclass(cls, BaseException):
                found.append(cls)
                assert issubclass(cls, CskdError), f"{mod}.{cls.__name__} does not derive from CskdError"
    assert len(found) >= 20


def test_the_cli_catches_only_cskd_errors():
    """A command turns a `CskdError` into one line; any other exception is a bug and keeps its traceback."""
    bad = []
    for path in sorted((ROOT / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                names = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "")
                         for n in (node.type.elts if isinstance(node.type, ast.Tuple) else [node.type])}
                raises = [n for n in ast.walk(node) if isinstance(n, ast.Raise)]
                usage = bool(raises) and all("BadParameter" in ast.unparse(r) for r in raises)
                if names - {"CskdError"} and not (names == {"ValueError"} and usage):
                    bad.append(f"{path.name}:{node.lineno} catches {sorted(names)}")
    # the only exception: parsers of flag text (extract's --view-scale, --layers) turn the ValueError of
    # float()/int() into click's own usage error
    assert not bad, bad


def test_an_old_flag_works_with_one_notice_on_stderr(tmp_path):
    """Through the real command: the old spelling is read (the run goes on to its next check) and says so."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cskd_cli.main", "finetune", "--model", "timm:test_vit", "--out",
                        str(tmp_path / "run"), "--warmup-pct", "5"], capture_output=True, text=True)
    notice = "warning: --warmup-pct / `warmup_pct` is now --warmup-fraction / `warmup_fraction` (a fraction: read as 0.05)"
    assert r.returncode == 2 and notice in r.stderr and "--labels is required" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()
