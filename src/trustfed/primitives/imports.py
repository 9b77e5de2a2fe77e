"""Importing a user's module (an app, an attack) from a folder of the user's, without leaving the folder
on ``sys.path`` afterwards."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


@contextmanager
def importable_from(folder: Path | None) -> Iterator[None]:
    """Put ``folder`` first on ``sys.path`` for the block (unless it is already there or None)."""
    if folder is None:
        yield
        return
    entry = str(folder)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added:
            with suppress(ValueError):
                sys.path.remove(entry)
