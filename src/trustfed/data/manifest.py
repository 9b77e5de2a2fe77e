"""A data manifest: which files a participant's data is made of, by name, size and SHA-256.

The manifest records names relative to a root and hashes of contents, never the contents
themselves, so it can be published or logged while the data stays where it is. Its hash
(:func:`manifest_hash`) is SHA-256 over the canonical JSON encoding (sorted keys, no
whitespace, UTF-8), so the same files give the same hash on any machine, whatever order the
paths were given in or where the root lies on disk.

Shape::

    {"format": "trustfed-data-manifest/1",
     "files": [{"path": "a/b.csv", "size": 123, "sha256": "..."},
               {"path": "a/latest.csv", "link": "b.csv"}]}

Entries are sorted by ``path`` (POSIX separators). Symbolic links below the given paths are
never followed: each is recorded with the text it points to (``link``), so nothing outside the
root is read and a link cycle cannot loop. The paths given themselves are resolved, and must
lie inside ``root``. Folders add only the files below them: an empty folder adds nothing.
Anything that is neither a file, a folder nor a link (a socket, a FIFO) is an error.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trustfed.errors import DataError
from trustfed.primitives.canonical import canonical_json

MANIFEST_FORMAT = "trustfed-data-manifest/1"

_CHUNK = 1 << 20


def data_manifest(paths: Sequence[Path] | Path, root: Path | None = None) -> dict[str, Any]:
    """List every file under ``paths`` (files or folders, recursively) relative to ``root``.

    ``root`` defaults to the deepest folder holding every path: a single folder is its own
    root, a single file's root is its folder.
    """
    given = [Path(paths)] if isinstance(paths, str | os.PathLike) else [Path(p) for p in paths]
    resolved = [_resolve(p) for p in given]
    base = _resolve(root) if root is not None else _default_root(resolved)
    if not base.is_dir():
        raise DataError(f"manifest root {base} is not a folder")
    entries: dict[str, dict[str, Any]] = {}
    for p in resolved:
        if not p.is_relative_to(base):
            raise DataError(f"{p}: outside the manifest root {base}")
        _add(p, base, entries)
    return {"format": MANIFEST_FORMAT, "files": [entries[name] for name in sorted(entries)]}


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """SHA-256 hex of the manifest's canonical JSON encoding."""
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def file_sha256(path: Path) -> tuple[int, str]:
    """Size in bytes and SHA-256 hex of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read for the data manifest: {exc.strerror or exc}") from None
    return size, digest.hexdigest()


def _resolve(p: Path) -> Path:
    if not p.exists() and not p.is_symlink():
        raise DataError(f"{p}: no such file or folder")
    return p.resolve()


def _default_root(resolved: list[Path]) -> Path:
    if not resolved:
        raise DataError("data manifest: no paths given")
    return Path(os.path.commonpath([p if p.is_dir() else p.parent for p in resolved]))


def _add(p: Path, base: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Record ``p`` and, for a folder, everything below it; links are recorded, not followed."""
    mode = p.lstat().st_mode
    name = p.relative_to(base).as_posix()
    if not name.isprintable() or _surrogates(name):
        raise DataError(f"{p!r}: the name is not printable UTF-8 text; rename it to be listed in a data manifest")
    if stat.S_ISLNK(mode):
        entries[name] = {"path": name, "link": os.readlink(p)}
    elif stat.S_ISREG(mode):
        size, sha = file_sha256(p)
        entries[name] = {"path": name, "size": size, "sha256": sha}
    elif stat.S_ISDIR(mode):
        for child in sorted(p.iterdir()):
            _add(child, base, entries)
    else:
        raise DataError(f"{p}: neither a file, a folder nor a symbolic link; it cannot be in a data manifest")


def _surrogates(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
