"""Output folders: cskd writes into a new or empty folder, or into one it made itself, never over someone's files.

Each command recognises its own folder by a file only it writes there (a run's ``config.yaml``, a neighbours
page's ``neighbors.json``); an existing, non-empty folder without that file is refused before any work, so
nothing a user keeps there is overwritten, appended to or deleted.
"""

from __future__ import annotations

import os
from pathlib import Path


def claim_out_dir(out: str | os.PathLike, marker: str, what: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` unless ``out`` is absent, empty, or already holds ``marker`` (this command's own folder)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise error(f"--out {out} is a file; give a folder for the {what}")
    if not out.is_dir() or (out / marker).exists():
        return
    names = sorted(p.name for p in out.iterdir() if p.name != ".cskd.lock")
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise error(f"--out {out} is not empty ({shown}) and holds no {marker}, so it is not a {what} cskd made; "
                    "choose a new or empty folder")
