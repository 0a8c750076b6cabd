"""An exclusive lock on a cache directory, and the clean-up of temporaries that dead processes left there.

Two `cskd extract` runs on one ``--out`` (or two distills labelling one predictions cache) would interleave their
shards and manifests; the second must be refused in one line instead. The lock is a file, ``.cskd.lock``,
created with O_CREAT|O_EXCL (atomic on local and NFS v3+ file systems) and holding the holder's pid, host and
start time as JSON. It is removed on release. A lock whose holder is gone (same host, pid no longer alive) is
stale and is reclaimed; a lock held from another host is only reclaimed when it is older than ``stale_after``
seconds, because a pid on another host cannot be probed.

Temporaries cskd writes carry the writer's pid in their names (``.NAME.PID-RANDOM.tmp``,
``.ID.tmp-PID-RANDOM``); `remove_dead_temporaries` deletes only names of those shapes whose pid is dead on
this host, so a live writer's file is never touched and nothing cskd did not create is ever removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from .manifest import CacheError

LOCK_NAME = ".cskd.lock"

# What cskd's writers name their temporaries (manifest.atomic_write_text, ShardWriter, predictions).
_TMP_FILE = re.compile(r"^\..+\.(?P<pid>\d+)-[0-9a-z_]+\.tmp$")
_TMP_DIR = re.compile(r"^\..+\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")
# Temporaries of earlier releases carried no pid; they are removed only while the directory's lock is held.
_LEGACY_TMP = re.compile(r"^(?:\.(?:manifest|shard-\d{5})\.json\.[0-9a-z_]+\.tmp|shard-\d{5}\.h5\.tmp)$")


class CacheLocked(CacheError):
    """Another live process holds the directory's lock."""


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class DirLock:
    """``with DirLock(path, "extract"):`` holds ``path/.cskd.lock`` for the block."""

    def __init__(self, directory: str | os.PathLike, what: str, stale_after: float = 24 * 3600,
                 name: str = LOCK_NAME):
        self.dir = Path(directory)
        self.path = self.dir / name
        self.what = what
        self.stale_after = stale_after
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a process killed between create and write: treat as stale

    def _stale(self, holder: dict) -> bool:
        if not holder:
            try:
                return time.time() - self.path.stat().st_mtime > 60
            except FileNotFoundError:
                return True
        if holder.get("host") == socket.gethostname():
            return not pid_alive(int(holder.get("pid", -1)))
        return time.time() - float(holder.get("time", 0)) > self.stale_after

    def acquire(self) -> "DirLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                             "what": self.what})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released between our open and our read
                if self._stale(holder):
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                raise CacheLocked(
                    f"{self.dir}: in use by {holder.get('what', 'cskd')} (pid {holder.get('pid')} on "
                    f"{holder.get('host')}); wait for it to finish, or delete {self.path} if that process is gone")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(record)
            self.held = True
            return self
        raise CacheLocked(f"{self.dir}: could not take {self.path} (another process keeps taking it)")

    def release(self) -> None:
        """Remove the lock file if this object took it (a no-op otherwise, e.g. on torchrun ranks > 0)."""
        if not self.held:
            return
        self.held = False
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_dead_temporaries(directory: str | os.PathLike, locked: bool = False) -> list[str]:
    """Delete cskd temporaries in ``directory`` whose writer is dead; with ``locked`` (the caller holds the
    directory's lock, so no other writer can be at work there) also the pid-less names of earlier releases.
    Returns the names removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        m = _TMP_FILE.match(p.name) or _TMP_DIR.match(p.name)
        if m:
            if pid_alive(int(m["pid"])):  # a live writer, this process included
                continue
        elif not (locked and _LEGACY_TMP.match(p.name)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except FileNotFoundError:
                continue
        removed.append(p.name)
    return sorted(removed)
