"""Verifying a training run folder (``trustfed train verify``): the provenance log's chain, every logged
checkpoint still on disk, and, when the run anchors on a ledger, every on-chain record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trustfed.distributed.anchor import ledger_in_use, verify_anchors
from trustfed.distributed.provenance import LOG_FILE, ProvenanceLog, checkpoint_hashes, logged_checkpoint
from trustfed.errors import CheckpointError


@dataclass(frozen=True)
class RunReport:
    """What ``trustfed train verify`` found: located problems (empty: all good) and what was checked.
    The log's own chain check is a :class:`~trustfed.primitives.verdict.Verdict` (:meth:`ProvenanceLog.verify`)."""

    problems: list[str]
    checkpoints: int  # checkpoint folders whose files hash to what the log records
    anchors: int = 0  # on-chain records checked (0 without a ledger)
    chain: str = ""  # which chain and contract the anchors were read from


def verify_run_report(run_dir: Path, rpc_url: str | None = None) -> RunReport:
    """Verify a run folder: the log's chain, every logged checkpoint still on disk, and, when the
    run anchors on a ledger, every on-chain record against the log and the files."""
    plog = ProvenanceLog(run_dir / LOG_FILE)
    if not plog.path.exists():
        return RunReport([f"{plog.path}: no provenance log"], 0)
    problems = list(plog.verify().reasons)
    entries = list(plog.numbered())
    file_hashes: dict[int, tuple[str, str]] = {}  # log line -> hashes of the files on disk
    checked = 0
    for line, e in entries:
        if e.get("kind") != "checkpoint":
            continue
        try:
            lc = logged_checkpoint(run_dir, line, e)
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"{LOG_FILE}:{line} [checkpoint] malformed checkpoint entry ({exc!r})")
            continue
        if not lc.checkpoint.path.is_dir():
            continue
        try:
            got = checkpoint_hashes(lc.checkpoint.path)
        except CheckpointError as exc:
            problems.append(f"{LOG_FILE}:{line} step {lc.checkpoint.step} [files] {exc}")
            continue
        file_hashes[line] = got
        bad = False
        for stem, have, want in zip(
            ("model", "optim"), got, (lc.checkpoint.model_hash, lc.checkpoint.optim_hash), strict=True
        ):
            if have != want:
                bad = True
                problems.append(
                    f"{LOG_FILE}:{line} step {lc.checkpoint.step} [{stem}_hash] checkpoint {lc.checkpoint.path}: "
                    f"{stem} hash {have[:16]}… does not match the provenance log's {want[:16]}…; "
                    "the files were altered or corrupted"
                )
        checked += 0 if bad else 1
    if not ledger_in_use(run_dir, entries):
        return RunReport(problems, checked)
    chain_problems, anchors, chain = verify_anchors(run_dir, entries, file_hashes, rpc_url)
    return RunReport(problems + [str(p) for p in chain_problems], checked, anchors, chain)


def verify_run(run_dir: Path, rpc_url: str | None = None) -> tuple[list[str], int]:
    """:func:`verify_run_report` as (problems, checkpoints verified)."""
    v = verify_run_report(run_dir, rpc_url)
    return v.problems, v.checkpoints
