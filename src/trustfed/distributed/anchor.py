"""Anchoring the training provenance on a ledger: one on-chain record per checkpoint.

With ``[run] ledger = "embedded"`` (an in-process EVM whose transactions are journaled in
``OUT/ledger``) or ``ledger = "jsonrpc"`` (+ ``rpc_url``; contract addresses in
``OUT/ledger/deployment.json``), rank 0 commits one ``RoundLog.commitRound`` transaction right after
it appends each ``checkpoint`` entry to ``provenance.jsonl``, through the ledger's
:class:`~trustfed.ledger.backends.LedgerBackend`. The federation's RoundLog contract is reused
unchanged; its fields carry:

============  ===================================================================================
RoundLog      training run
============  ===================================================================================
round         the anchor's index 0, 1, 2, … (RoundLog accepts only consecutive rounds, so the step
              cannot be the round)
numUpdates    the checkpoint's step
modelHash     the checkpoint's model hash (``model_hash`` of ``model.f32`` under its spec)
receiptHash   the checkpoint's optimizer-state hash (``optim.f32``)
logHead       the hash of that ``checkpoint`` entry, i.e. the log's head right after it: it binds the
              step, path, both hashes, config hash, world size, and every earlier entry
merkleRoot    zero (a training run has no participants' update commitments)
============  ===================================================================================

Nothing else touches the chain: training pays one transaction per checkpoint, on rank 0.

Resume (rank 0) takes the newest checkpoint whose entry the chain anchors with the same hashes; a
log whose anchored entries are gone or changed is refused, and so is an entry the chain
contradicts; a newest entry the chain does not know yet (the run stopped between writing the log
and committing) is skipped for an older, anchored one. ``trustfed train verify`` checks every
on-chain record against the log and the checkpoint files, and requires every checkpoint entry to
be anchored.

Trust: an embedded chain lives in the run folder, so it catches edits of the log and the files
that leave the chain's journal alone, not someone who rebuilds the whole folder. For that, anchor
on a chain that others hold (``jsonrpc``) and compare the chain id and RoundLog address that
``trustfed train verify`` prints with the ones you expect.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from trustfed.distributed.provenance import LOG_FILE, LoggedCheckpoint, ProvenanceLog, checkpoint_candidates
from trustfed.errors import CheckpointError, TrustFedError
from trustfed.ledger.backends import EmbeddedLedger, JsonRpcLedger, Web3Ledger, read_deployment
from trustfed.ledger.records import ZERO32, LedgerError, RoundCommitment, TxRef

log = logging.getLogger("trustfed.distributed.anchor")

LEDGER_DIR = "ledger"
LEDGERS = ("embedded", "jsonrpc")


class RoundLedger(Protocol):
    """The part of :class:`~trustfed.ledger.backends.LedgerBackend` that anchoring uses."""

    def commit_round(self, record: RoundCommitment) -> TxRef: ...

    def read_round(self, rnd: int) -> RoundCommitment | None: ...

    def next_round(self) -> int: ...


@dataclass(frozen=True)
class Anchor:
    """One on-chain record of a checkpoint (see the module docstring for the field mapping)."""

    index: int
    step: int
    model_hash: str
    optim_hash: str
    log_head: str

    def to_commitment(self) -> RoundCommitment:
        return RoundCommitment(self.index, self.model_hash, ZERO32, self.optim_hash, self.log_head, self.step)

    @classmethod
    def from_commitment(cls, rc: RoundCommitment) -> Anchor:
        return cls(rc.round, rc.num_updates, rc.model_hash, rc.receipt_hash, rc.log_head)


def anchor_for(index: int, entry: Mapping[str, Any]) -> Anchor:
    """The anchor of a provenance ``checkpoint`` entry (as written, with its ``hash``)."""
    if entry.get("kind") != "checkpoint":
        raise CheckpointError(f"only checkpoint entries are anchored, got a {entry.get('kind')!r} entry")
    return Anchor(index, int(entry["step"]), str(entry["model_hash"]), str(entry["optim_hash"]), str(entry["hash"]))


def read_anchors(ledger: RoundLedger) -> list[Anchor]:
    """Every anchor on the chain, in order."""
    out = []
    for i in range(ledger.next_round()):
        rc = ledger.read_round(i)
        if rc is None:
            raise CheckpointError(f"the chain lists {ledger.next_round()} records but record {i} cannot be read")
        out.append(Anchor.from_commitment(rc))
    return out


class LedgerAnchorSink:
    """A :class:`~trustfed.distributed.provenance.ProvenanceSink` that commits every checkpoint
    entry to the chain (the other entries are ignored)."""

    def __init__(self, ledger: RoundLedger) -> None:
        self.ledger = ledger

    def append(self, entry: Mapping[str, Any]) -> str:
        if entry.get("kind") != "checkpoint":
            return ""
        t0 = time.perf_counter()
        anchor = anchor_for(self.ledger.next_round(), entry)
        tx = self.ledger.commit_round(anchor.to_commitment())
        log.info(
            "anchored step %d as on-chain round %d (tx %s, %.0f ms)",
            anchor.step,
            anchor.index,
            tx.tx_hash,
            1000 * (time.perf_counter() - t0),
        )
        return tx.tx_hash


def open_run_ledger(
    run_dir: Path,
    backend: str,
    rpc_url: str | None = None,
    key_file: Path | None = None,
    *,
    read_only: bool = False,
    allow_dev_keys: bool = False,
) -> Web3Ledger:
    """The ledger of a run folder (``OUT/ledger``), deploying RoundLog on first use unless read-only; a
    publicly known development key signs only if ``allow_dev_keys``."""
    ledger_dir = run_dir / LEDGER_DIR
    if backend == "embedded":
        return EmbeddedLedger(ledger_dir, read_only=read_only, allow_dev_keys=allow_dev_keys)
    if backend == "jsonrpc":
        if not rpc_url:
            raise LedgerError("ledger 'jsonrpc' needs an rpc_url (run.rpc_url, or --rpc-url for verify)")
        return JsonRpcLedger(
            ledger_dir, rpc_url, key_file, deploy=not read_only, read_only=read_only, allow_dev_keys=allow_dev_keys
        )
    raise LedgerError(f"unknown ledger {backend!r}; expected one of {', '.join(LEDGERS)}")


def describe(ledger: Web3Ledger) -> dict[str, Any]:
    """What the ``run_start`` entry records about the chain: backend, chain id, RoundLog address."""
    d = ledger.deployment()
    return {"backend": d["backend"], "chain_id": d["chain_id"], "round_log": d["contracts"]["RoundLog"]}


# --- resume ------------------------------------------------------------------------------------


def resume_point(run_dir: Path, cfg_hash: str, anchors: Sequence[Anchor]) -> tuple[LoggedCheckpoint, Anchor] | None:
    """The newest checkpoint that the chain anchors with the hashes the log records.

    Raises :class:`CheckpointError` if the log no longer holds every anchored entry (it was
    rewritten or truncated) or if an entry's hashes disagree with its anchor."""
    heads = {str(e.get("hash")) for _, e in ProvenanceLog(run_dir / LOG_FILE).numbered()}
    lost = [a for a in anchors if a.log_head not in heads]
    if lost:
        a = lost[0]
        raise CheckpointError(
            f"on-chain round {a.index} anchors step {a.step} with log head {a.log_head[:16]}…, which "
            f"{run_dir / LOG_FILE} no longer contains ({len(lost)} such record(s)): the log was rewritten "
            "or truncated; refusing to resume. Run `trustfed train verify` on the folder for details"
        )
    by_head = {a.log_head: a for a in anchors}
    for lc in checkpoint_candidates(run_dir, cfg_hash):
        where = f"{run_dir / LOG_FILE}:{lc.line} (step {lc.checkpoint.step})"
        anchor = by_head.get(str(lc.entry.get("hash")))
        if anchor is None:
            log.warning(
                "%s: checkpoint is not anchored on the chain (the run stopped before committing it?); "
                "trying an older one",
                where,
            )
            continue
        bad = _disagreements(lc.entry, anchor)
        if bad:
            raise CheckpointError(
                f"{where}: the checkpoint disagrees with on-chain round {anchor.index}: {'; '.join(bad)}; "
                "refusing to resume"
            )
        return lc, anchor
    return None


def _disagreements(entry: Mapping[str, Any], anchor: Anchor) -> list[str]:
    out = []
    for fld, want in (("step", anchor.step), ("model_hash", anchor.model_hash), ("optim_hash", anchor.optim_hash)):
        have = entry.get(fld)
        if str(have) != str(want):
            out.append(f"{fld} is {_short(have)} in the log but {_short(want)} on chain")
    return out


# --- verify ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnchorProblem:
    """A located disagreement between the chain, the provenance log and the checkpoint files."""

    file: str
    line: int | None
    step: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line is not None else "")
        step = f" step {self.step}" if self.step is not None else ""
        return f"{where}{step} [{self.field}] {self.message}"


def _short(value: object) -> str:
    text = str(value)
    return text[:16] + "…" if len(text) > 16 else text


def check_anchors(
    entries: Sequence[tuple[int, Mapping[str, Any]]],
    anchors: Sequence[Anchor],
    file_hashes: Mapping[int, tuple[str, str]],
) -> list[AnchorProblem]:
    """Every anchor against the log's checkpoint entries and the files. An anchor is matched to the
    entry its log head names, else (the log was rewritten) to the next entry no anchor claims.

    ``entries`` are (line, entry) of the provenance log; ``file_hashes`` maps a checkpoint entry's
    line to the (model, optimizer) hashes of its files on disk. Pure: no I/O."""
    problems: list[AnchorProblem] = []
    cks = [(line, e) for line, e in entries if e.get("kind") == "checkpoint"]
    by_head = {str(e.get("hash")): (line, e) for line, e in cks}
    anchored = {a.log_head for a in anchors}
    used: set[int] = set()
    last = 0  # line of the entry the previous anchor matched: anchors are committed in log order
    for a in anchors:
        hit = by_head.get(a.log_head)
        if hit is None:
            # The entry the chain anchored is gone: compare with what the log now holds in its place,
            # the next entry no anchor claims (the one at the same step if there is one).
            free = [(line, e) for line, e in cks if line > last and str(e.get("hash")) not in anchored]
            hit = next(((line, e) for line, e in free if e.get("step") == a.step), free[0] if free else None)
            if hit is None:
                problems.append(
                    AnchorProblem(
                        LOG_FILE,
                        None,
                        a.step,
                        "log_head",
                        f"on-chain round {a.index} anchors a checkpoint entry hashing to {a.log_head[:16]}… that "
                        "the log does not contain: the log was rewritten or truncated",
                    )
                )
                continue
            line, e = hit
            problems.append(
                AnchorProblem(
                    LOG_FILE,
                    line,
                    a.step,
                    "hash",
                    f"the entry hashes to {str(e.get('hash'))[:16]}… but on-chain round {a.index} anchored "
                    f"{a.log_head[:16]}…: the log was rewritten at or before this line",
                )
            )
        line, e = hit
        used.add(line)
        last = max(last, line)
        for fld, want in (("step", a.step), ("model_hash", a.model_hash), ("optim_hash", a.optim_hash)):
            if str(e.get(fld)) != str(want):
                problems.append(
                    AnchorProblem(
                        LOG_FILE,
                        line,
                        a.step,
                        fld,
                        f"the log records {_short(e.get(fld))}, on-chain round {a.index} anchored {_short(want)}",
                    )
                )
        if line in file_hashes:
            for stem, have, want in zip(
                ("model", "optim"), file_hashes[line], (a.model_hash, a.optim_hash), strict=True
            ):
                if have != want:
                    problems.append(
                        AnchorProblem(
                            f"{e.get('path')}/{stem}.f32",
                            None,
                            a.step,
                            f"{stem}_hash",
                            f"the file hashes to {have[:16]}…, on-chain round {a.index} anchored {want[:16]}…",
                        )
                    )
    for line, e in cks:
        if line not in used:
            problems.append(
                AnchorProblem(
                    LOG_FILE,
                    line,
                    e.get("step") if isinstance(e.get("step"), int) else None,
                    "anchor",
                    "no on-chain record anchors this checkpoint entry (the run stopped between writing the log "
                    "and committing, or the entry was added afterwards); do not trust this checkpoint",
                )
            )
    return problems


def _configured(run_dir: Path, entries: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, Any] | None:
    """The ``[run]`` section of the newest config that sets a ledger (from the log's run_start
    entries, else config.json), or None."""
    runs: list[dict[str, Any]] = []
    cfg_path = run_dir / "config.json"
    if cfg_path.is_file():
        try:
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
            if isinstance(raw, dict) and isinstance(raw.get("run"), dict):
                runs.append(raw["run"])
        except (OSError, json.JSONDecodeError):
            pass
    for _, e in entries:
        cfg = e.get("config") if e.get("kind") == "run_start" else None
        if isinstance(cfg, dict) and isinstance(cfg.get("run"), dict):
            runs.append(cfg["run"])
    with_ledger = [r for r in runs if r.get("ledger") not in (None, "none")]
    return with_ledger[-1] if with_ledger else None


def ledger_in_use(run_dir: Path, entries: Sequence[tuple[int, Mapping[str, Any]]]) -> bool:
    """Whether the run anchors on a ledger: its config says so, or it has a ledger folder."""
    return (run_dir / LEDGER_DIR / "deployment.json").is_file() or _configured(run_dir, entries) is not None


def verify_anchors(
    run_dir: Path,
    entries: Sequence[tuple[int, Mapping[str, Any]]],
    file_hashes: Mapping[int, tuple[str, str]],
    rpc_url: str | None = None,
) -> tuple[list[AnchorProblem], int, str]:
    """Read the run's chain (read-only) and check every record: (problems, records, which chain)."""
    ledger_dir = run_dir / LEDGER_DIR
    run = _configured(run_dir, entries) or {}
    try:
        dep = read_deployment(ledger_dir)
    except TrustFedError as exc:
        return [AnchorProblem(f"{LEDGER_DIR}/deployment.json", None, None, "deployment", str(exc))], 0, ""
    if dep is None:
        msg = f"the run anchors on a ledger (run.ledger = {run.get('ledger')!r}) but there is no deployment"
        return [AnchorProblem(f"{LEDGER_DIR}/deployment.json", None, None, "deployment", msg)], 0, ""
    backend = str(dep.get("backend", ""))
    problems: list[AnchorProblem] = []
    if run and run.get("ledger") != backend:
        problems.append(
            AnchorProblem(
                f"{LEDGER_DIR}/deployment.json",
                None,
                None,
                "backend",
                f"the deployment is {backend!r} but the run's config says ledger = {run.get('ledger')!r}",
            )
        )
    url = rpc_url or dep.get("rpc_url") or run.get("rpc_url")
    try:
        ledger = open_run_ledger(run_dir, backend, url, read_only=True)
        try:
            anchors = read_anchors(ledger)
            chain = describe(ledger)
        finally:
            ledger.close()
    except TrustFedError as exc:
        problems.append(AnchorProblem(LEDGER_DIR, None, None, "chain", f"cannot read the chain: {exc}"))
        return problems, 0, ""
    for line, e in entries:
        recorded = e.get("ledger") if e.get("kind") == "run_start" else None
        if isinstance(recorded, dict) and recorded != chain:
            problems.append(
                AnchorProblem(
                    LOG_FILE, line, None, "ledger", f"the run started on chain {recorded}, but the folder holds {chain}"
                )
            )
    problems += check_anchors(entries, anchors, file_hashes)
    where = f"{chain['backend']} chain {chain['chain_id']}, RoundLog {chain['round_log']}"
    return problems, len(anchors), where
