"""Resuming a networked run that stopped, from the point :func:`~trustfed.coordinator.resume_check.check_resume`
verified: the coordinator state of the last round on chain (recorded runs) or the newest state
(unrecorded runs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from trustfed.coordinator.enclave_record import EnclaveRecord
from trustfed.coordinator.engine import Coordinator
from trustfed.coordinator.incentives_record import IncentivesRecord
from trustfed.coordinator.recorders import StatusRecord
from trustfed.coordinator.resume_check import STATE_DIR, ResumePoint
from trustfed.coordinator.state import resume
from trustfed.core.rounds import RoundObserver
from trustfed.errors import ResumeRefused
from trustfed.ledger.recorder import LedgerRecorder
from trustfed.privacy.report import PrivacyRecorder

log = logging.getLogger("trustfed.coordinator.service")

__all__ = ["STATE_DIR", "resume_run"]


def resume_run(
    coord: Coordinator,
    point: ResumePoint,
    recorders: Sequence[RoundObserver],
    enclave: EnclaveRecord | None = None,
) -> int:
    """Continue a run that stopped after ``point.last`` (checked by ``check_resume``). What only reads
    or asks comes first: the enclave must be the same one, at the same round
    (:meth:`EnclaveRecord.check_resume`), the coordinator takes the state, the chain's incentives must
    fit the log. Then the run folder changes: the audit log is cut back to the last round's anchor,
    privacy.jsonl to its rounds, and statuses the chain lacks are sent. Returns the round resumed after
    (0: nothing to resume, a fresh start)."""
    recorder = next((o for o in recorders if isinstance(o, LedgerRecorder)), None)
    if recorder is None:
        if point.state is None:
            return 0
        if enclave is not None:
            enclave.check_resume(point.last, None)
        resume(coord, point.state)
    elif point.last == 0:
        recorder.prepare_resume()  # sets aside a round 1 that was being recorded
        return 0
    else:
        last = point.last
        lost = enclave.check_resume(last, recorder.audit_path) if enclave is not None else None
        if point.state is not None:
            resume(coord, point.state)
        for rec in recorders:
            if isinstance(rec, IncentivesRecord):
                rec.check_resume(recorder.audit_path, last)
        if recorder.prepare_resume() != last:
            raise ResumeRefused(f"the chain of {recorder.run_dir} moved past round {last} while resuming")
        for rec in recorders:
            if isinstance(rec, PrivacyRecorder):
                rec.keep_rounds_upto(last)
                if lost is not None:
                    rec.count_lost(lost)
        gone = StatusRecord.check_resume(recorder.audit_path, last, recorder.ledger)
        exclude = getattr(coord.transport, "exclude", None)
        if gone and callable(exclude):
            exclude({pid: f"{status} before the resume" for pid, status in gone.items()})
    log.warning("resumed after round %d", point.last)
    return point.last
