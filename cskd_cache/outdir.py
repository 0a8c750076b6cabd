"""Output folders: cskd writes into a new or empty folder, or into one it made itself, never over someone's files.

Each command recognises its own folder by a file only it writes there (a run's ``config.yaml``, a neighbours
page's ``neighbors.json``, a cache's ``manifest.json`` or shards); an existing folder holding other files and
none of those is refused before any work, so nothing a user keeps there is overwritten, appended to or deleted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_LOCK = re.compile(r"\.cskd\.lock")


def claim_out_dir(out: str | os.PathLike, marker: str | re.Pattern, what: str, error: type[Exception] = ValueError,
                  own: re.Pattern = _LOCK) -> None:
    """Raise ``error`` unless ``out`` is absent, holds a file named ``marker`` (a name, or a pattern of names: this
    command's own folder), or holds nothing but names matching ``own`` (what the command may leave behind without
    its marker: its lock, its temporaries)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise error(f"--out {out} is a file; give a folder for the {what}")
    if not out.is_dir():
        return
    marker = marker if isinstance(marker, re.Pattern) else re.compile(re.escape(marker))
    names = sorted(p.name for p in out.iterdir())
    if any(marker.fullmatch(n) for n in names):
        return
    foreign = [n for n in names if not own.fullmatch(n)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise error(f"--out {out} is not empty ({shown}) and is not a cskd {what}; choose a new or empty folder")
