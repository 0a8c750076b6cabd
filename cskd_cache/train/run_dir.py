"""A training run's directory: claimed before any work, never mixed with another run, resumed only as itself.

A fresh ``--out`` must be absent or empty (`files.claim_out_dir`); an existing run continues only with
``--resume``, only as the same command, and only with the same settings (`config.CommandConfig.changed`; the
settings in `config.RESUMABLE` decide how, not what, is computed and may change).
"""

from __future__ import annotations

from pathlib import Path

from ..files import claim_out_dir
from .checkpoint import latest_checkpoint
from .engine import CKPT_DIR, CONFIG_NAME

__all__ = ["prepare_run_dir"]


def prepare_run_dir(cfg, run_dir: Path, own=None) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to mix two runs in one directory. ``own``:
    a pattern of names the command itself may have left in a fresh --out (default: its lock)."""
    import yaml

    run_dir = Path(run_dir)
    saved = run_dir / CONFIG_NAME
    claim_out_dir(run_dir, CONFIG_NAME, f"{cfg.command} run", cfg.error, **({"own": own} if own else {}))
    if not saved.exists():
        return None
    if not cfg.resume:
        raise cfg.error(f"{run_dir} already holds {_a(cfg.command)} {cfg.command} run; pass --resume to continue it, "
                        "or choose a new --out")
    old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    # Runs from before the one engine recorded no command for align: an align config has a `cache` and a
    # `student` and no `labels`.
    command = old.get("resolved", {}).get("command") or ("align" if "labels" not in old else cfg.command)
    if command != cfg.command:
        raise cfg.error(f"{run_dir} holds a `{command}` run, not `{cfg.command}`; choose a new --out")
    diff = cfg.changed(old)
    if diff:
        old = cfg.as_saved(old)
        new = cfg.to_dict()
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff)
        raise cfg.error(f"{run_dir}: --resume with different settings ({shown}); repeat the original options "
                        "or start a new --out")
    return latest_checkpoint(run_dir / CKPT_DIR)


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
