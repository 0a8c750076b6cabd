"""Input sources: image folders and list files, merged into one de-duplicated, ordered item list.

Every row of a cache maps back to its image through (source, key): `key` is the path relative to the
source's root, so a moved dataset is found again by remapping one root (clip-retrieval's users could not
map embeddings back to images; we make that impossible to lose).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import DataError
from .images import file_digest

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
PATH_COLUMNS = ("path", "image", "file", "filename", "image_path")


@dataclass(frozen=True)
class Item:
    source: str
    key: str
    path: str
    digest: str = ""


@dataclass
class Source:
    name: str
    kind: str  # "images" | "list"
    root: str
    arg: str
    files: int = 0
    rows: int = 0


@dataclass
class Plan:
    sources: list[Source]
    items: list[Item]
    duplicates: list[dict]  # {"source","key","path","duplicate_of_source","duplicate_of_key"}
    missing: list[dict]  # list entries whose file does not exist: {"source","key","path","reason","detail"}

    @property
    def inputs_sha256(self) -> str:
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.source}\0{it.key}\0{it.digest}\n".encode())
        return h.hexdigest()


class SourceError(DataError):
    """Bad --images/--list argument; the message names the path and the fix."""


def _unique_name(base: str, taken: set[str]) -> str:
    name, i = base or "source", 2
    while name in taken:
        name = f"{base}-{i}"
        i += 1
    taken.add(name)
    return name


def _decodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode kept undecodable bytes as lone surrogates
        return False
    return True


def escaped_name(name: str) -> str:
    """A file name whose bytes are not UTF-8, written readably: each bad byte as \\xNN."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def scan_images(root: Path, undecodable: list[Path] | None = None) -> list[Path]:
    """Recursive, sorted, image extensions only; hidden files and folders are skipped.

    A directory link is followed once and never into one of its own ancestors, so a link loop is not walked
    40 levels deep. Files whose names are not valid UTF-8 (which the cache's UTF-8 keys cannot hold) are left
    out and appended to ``undecodable``."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()

    def walk(d: Path, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            st = d.stat()
        except OSError:
            return
        ident = (st.st_dev, st.st_ino)
        if ident in ancestors or ident in seen:
            return
        seen.add(ident)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:
                continue
            if is_dir:
                walk(Path(e.path), ancestors | {ident})
            elif Path(e.name).suffix.lower() in IMAGE_EXTENSIONS:
                if not _decodable(e.path):
                    if undecodable is not None:
                        undecodable.append(Path(e.path))
                    continue
                found.append(Path(e.path))

    walk(Path(root), frozenset())
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_list_file(path: Path) -> list[str]:
    """Paths from a .txt (one per line, # comments), .csv (a path/image column, else the first) or .jsonl."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read list file ({e})") from e
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line") from e
            col = next((c for c in PATH_COLUMNS if isinstance(rec, dict) and c in rec), None)
            if col is None:
                raise SourceError(f"{path}:{n}: no path field; give each line one of {', '.join(PATH_COLUMNS)}")
            out.append(str(rec[col]))
        return out
    if suffix == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        col = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
        body = rows[1:] if col is not None else rows
        col = col or 0
        return [r[col].strip() for r in body if len(r) > col and r[col].strip()]
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _key_for(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()  # outside the list's folder: the absolute path is the key


def plan_sources(
    images: Sequence[str | os.PathLike] = (),
    lists: Sequence[str | os.PathLike] = (),
    *,
    hash_workers: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> Plan:
    """List all sources, hash every file, and keep the first copy of each content.

    Order is deterministic (sources in argument order, keys sorted within a source) so that the same command
    plans the same shards; that is what makes resuming and multi-process extraction safe.
    """
    taken: set[str] = set()
    sources: list[Source] = []
    candidates: list[Item] = []
    missing: list[dict] = []
    for arg in images:
        root = Path(arg)
        if not root.is_dir():
            raise SourceError(f"{root}: --images needs an existing folder")
        src = Source(_unique_name(root.resolve().name, taken), "images", str(root.resolve()), str(arg))
        bad_names: list[Path] = []
        files = scan_images(root, bad_names)
        for p in bad_names:
            rel = escaped_name(p.relative_to(root).as_posix())
            missing.append({"source": src.name, "key": rel, "path": escaped_name(str(p)), "reason": "undecodable-name",
                            "detail": "file name is not valid UTF-8 (bad bytes shown as \\xNN); rename it to index it"})
        src.files = len(files)
        sources.append(src)
        candidates += [Item(src.name, f.relative_to(root).as_posix(), str(f.resolve())) for f in files]
    for arg in lists:
        lpath = Path(arg)
        if not lpath.is_file():
            raise SourceError(f"{lpath}: --list needs an existing .txt, .csv or .jsonl file")
        root = lpath.resolve().parent
        src = Source(_unique_name(lpath.stem, taken), "list", str(root), str(arg))
        entries = read_list_file(lpath)
        src.files = len(entries)
        sources.append(src)
        seen: set[str] = set()
        listed = []
        for entry in entries:
            p = Path(entry) if Path(entry).is_absolute() else root / entry
            key = _key_for(p, root)
            if key in seen:
                continue
            seen.add(key)
            if not p.is_file():
                missing.append({"source": src.name, "key": key, "path": str(p), "reason": "missing",
                                "detail": "listed file does not exist"})
                continue
            listed.append(Item(src.name, key, str(p.resolve())))
        candidates += sorted(listed, key=lambda it: it.key)

    digests = _hash_all([it.path for it in candidates], hash_workers, progress)
    items: list[Item] = []
    duplicates: list[dict] = []
    first: dict[str, Item] = {}
    for it, digest in zip(candidates, digests):
        if digest in first:
            orig = first[digest]
            duplicates.append({"source": it.source, "key": it.key, "path": it.path,
                               "duplicate_of_source": orig.source, "duplicate_of_key": orig.key})
            continue
        kept = Item(it.source, it.key, it.path, digest)
        first[digest] = kept
        items.append(kept)
    for src in sources:
        src.rows = sum(1 for it in items if it.source == src.name)
    return Plan(sources, items, duplicates, missing)


def _hash_all(paths: list[str], workers: int, progress: Callable[[int, int], None] | None) -> list[str]:
    def one(p: str) -> str:
        try:
            return file_digest(p)
        except OSError:
            # Unreadable now: a unique placeholder keeps it in the plan; decode then skips it with the reason.
            return "unreadable:" + p

    out: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # hashlib releases the GIL
        for i, d in enumerate(pool.map(one, paths, chunksize=16), 1):
            out.append(d)
            if progress and (i % 64 == 0 or i == len(paths)):
                progress(i, len(paths))
    return out


def sources_to_json(sources: Iterable[Source]) -> list[dict]:
    return [asdict(s) for s in sources]
