"""Atomic file replacement: a reader sees the old file or the new one, never a mix, even after a crash.

:func:`atomic_write_bytes` writes to a new temporary file in the destination's folder (so the rename
stays on one file system), flushes and fsyncs it, renames it over the destination with
``os.replace`` and then fsyncs the folder, so the rename itself is on disk when the call returns. If
anything fails before the rename, the temporary file is removed and the destination is untouched.

:func:`publish_folder` does the same for a folder written in full beside its destination.

Temporary names are ``.<name>.<random>.tmp`` and are created exclusively, so two processes writing
the same file never share one. ``mode`` is the new file's permission bits before the umask, as for
``open()`` (``0o600`` for a private key); it is set when the file is created, with no window.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

DEFAULT_MODE = 0o666


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make the entries of ``folder`` (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = DEFAULT_MODE) -> None:
    """Replace ``path`` with ``data`` atomically and durably; its folder must exist."""
    dest = Path(path)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(dest.parent)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", mode: int = DEFAULT_MODE
) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded with ``encoding``."""
    atomic_write_bytes(path, text.encode(encoding), mode=mode)


def publish_folder(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Make the finished folder ``tmp`` durable (each file in it, then its entries) and move it to
    ``final`` in the same parent folder, replacing a folder there; then make the move durable. A reader
    that opens ``final`` finds a complete folder; a crash between removing an old ``final`` and the move
    leaves the complete ``tmp`` beside it."""
    src, dest = Path(tmp), Path(final)
    for f in src.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    fsync_folder(src)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(src, dest)
    fsync_folder(dest.parent)
