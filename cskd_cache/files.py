"""Files cskd writes: atomically, with ordinary permissions, into folders it owns, as plain JSON-able data.

Every writer in the library goes through these helpers, so a reader never sees half a file (write to a
temporary in the same folder, fsync, rename), shared folders keep the umask's mode, and no command writes into a
folder holding someone else's files.

Output folders: each command recognises its own folder by a file only it writes there (a run's ``config.yaml``,
a neighbours page's ``neighbors.json``, a cache's ``manifest.json`` or shards); an existing folder holding other
files and none of those is refused before any work, so nothing a user keeps there is overwritten, appended to or
deleted.

Imports nothing of cskd but `errors`: it is the floor every layer stands on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["default_file_mode", "atomic_write_text", "write_json", "read_json", "file_sha256", "json_safe", "claim_out_dir"]

_LOCK = re.compile(r"\.cskd\.lock")


def default_file_mode() -> int:
    """0o666 minus the process umask: the mode open() would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same directory and rename, so readers never see half a file."""
    path = Path(path)
    # The pid in the name lets a later run tell a dead writer's leftover from a live one's (lock.py).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files; give the ordinary umask-derived mode so shared caches stay readable
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
def json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj
def claim_out_dir(out: str | os.PathLike, marker: str | re.Pattern, what: str, error: type[Exception] = ConfigError,
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


def read_json(path: str | os.PathLike, error: type[Exception], fix: str) -> Any:
    """A JSON file cskd wrote, or ``error`` in one line naming it and ``fix`` (missing, unreadable, not JSON)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not found; {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: unreadable ({e}); {fix}") from None
