"""The audit verdict of each run, computed once per state of its files and kept in memory.

``trustfed audit verify`` takes a second or more on a long run, too slow for every page load of an
index that shows every run's verdict. :class:`VerdictCache` runs it once per run folder and state of
the files it covers: the state is every file's path, size, modification and change time and inode
(the participant process logs under ``logs/`` aside: the verifier does not read them), plus the
SHA-256 of ``audit.jsonl`` and ``metrics.json``, so an edit that keeps a file's size and time still
counts. Any change means a fresh verification before the verdict is shown again.

The cache lives in the dashboard's memory only. A cache file in the run folder would be trusted by
the next dashboard, and whoever can edit the run's files could write a VERIFIED one beside a forged
log. A run still recording (no ``metrics.json`` yet) is not verified: its verdict is ``pending``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustfed.ledger.metrics_check import METRICS_FILE
from trustfed.ledger.recorder import AUDIT_FILE
from trustfed.ledger.verify import verify_run
from trustfed.ledger.verify_base import AuditReport

#: Folders of a run that the verifier never reads (the participant processes' own logs).
UNVERIFIED_FOLDERS = frozenset({"logs"})
_HASHED = (AUDIT_FILE, METRICS_FILE)


@dataclass(frozen=True)
class Verdict:
    """``state``: "verified", "failed" or "pending" (the run is still recording); ``report`` as the
    JSON API gives it (None while pending)."""

    state: str
    report: dict[str, Any] | None

    @property
    def failures(self) -> int:
        return len(self.report["failures"]) if self.report else 0

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, **(self.report or {})}


def report_json(v: AuditReport) -> dict[str, Any]:
    return {
        "ok": v.ok,
        "checked": dict(v.checked),
        "notes": list(v.notes),
        "failures": [
            {"file": f.file, "line": f.line, "round": f.round, "field": f.field, "message": f.message}
            for f in v.failures
        ],
    }


def fingerprint(folder: Path) -> tuple[Any, ...]:
    """What a verdict of ``folder`` depends on: every file's stat (logs aside) and the audit log's and
    metrics.json's content hash. Two equal fingerprints mean the verifier would read the same files."""
    stats: list[tuple[Any, ...]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if here == folder:
            dirnames[:] = [d for d in dirnames if d not in UNVERIFIED_FOLDERS]
        dirnames.sort()
        for name in sorted(filenames):
            try:
                st = (here / name).stat()
            except OSError:
                continue  # removed while walking: the next look sees the folder without it
            rel = (here / name).relative_to(folder).as_posix()
            stats.append((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    hashes = []
    for name in _HASHED:
        try:
            hashes.append(hashlib.sha256((folder / name).read_bytes()).hexdigest())
        except OSError:
            hashes.append("")
    return (tuple(stats), tuple(hashes))


class VerdictCache:
    """Verdicts by run folder, each recomputed only when the folder's :func:`fingerprint` changes.
    ``verify`` is the verifier (default: ``verify_run``)."""

    def __init__(self, verify: Callable[[Path], AuditReport] | None = None) -> None:
        self._verify = verify
        self._lock = threading.Lock()
        self._folder_locks: dict[Path, threading.Lock] = {}
        self._kept: dict[Path, tuple[tuple[Any, ...], Verdict]] = {}

    def verdict(self, folder: Path) -> Verdict:
        if not (folder / METRICS_FILE).is_file():
            return Verdict("pending", None)
        key = folder.resolve()
        with self._lock:
            lock = self._folder_locks.setdefault(key, threading.Lock())
        with lock:  # one verification per folder at a time; other runs' pages are not held up
            seen = fingerprint(key)
            kept = self._kept.get(key)
            if kept is not None and kept[0] == seen:
                return kept[1]
            report = report_json((self._verify or verify_run)(key))
            # the files may change while the verifier reads them: keep the verdict under the state it
            # started from, so that the next look verifies again if anything moved meanwhile
            verdict = Verdict("verified" if report["ok"] else "failed", report)
            self._kept[key] = (seen, verdict)
            return verdict
