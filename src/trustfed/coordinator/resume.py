"""Resuming a networked run that stopped: from the coordinator state of the last round on chain (recorded
runs) or the newest state (unrecorded runs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trustfed.coordinator.enclave_record import EnclaveRecord
from trustfed.coordinator.engine import Coordinator
from trustfed.coordinator.incentives_record import IncentivesRecord
from trustfed.coordinator.recorders import StatusRecord
from trustfed.coordinator.state import latest_state, load_state, resume
from trustfed.core.rounds import RoundObserver
from trustfed.errors import CheckpointError
from trustfed.ledger.recorder import LedgerRecorder
from trustfed.privacy.report import PrivacyRecorder

log = logging.getLogger("trustfed.coordinator.service")


STATE_DIR = "state"


def resume_run(
    cfg: Any,
    coord: Coordinator,
    out_dir: Path | None,
    recorders: Sequence[RoundObserver],
    enclave: EnclaveRecord | None = None,
) -> int:
    """Continue a run that stopped: from the coordinator state of the last round on chain (recorded
    runs; the audit log cut back to that round's anchor) or the newest state (unrecorded runs). In
    enclave mode the enclave must be the same one, at the same round (:meth:`EnclaveRecord.check_resume`).
    Returns the round resumed after (0: nothing to resume, a fresh start)."""
    if out_dir is None:
        raise CheckpointError("resuming needs the run folder (--out) of the run to continue")
    state_dir = out_dir / STATE_DIR
    recorder = next((o for o in recorders if isinstance(o, LedgerRecorder)), None)
    if recorder is not None:
        last = recorder.prepare_resume()
        if last == 0:
            return 0
        folder = state_dir / f"round_{last:04d}"
        if not folder.is_dir():
            raise CheckpointError(
                f"cannot resume: the chain is at round {last} but {folder} (the coordinator state of that round) is "
                "missing"
            )
        state = load_state(folder)
        for rec in recorders:
            if isinstance(rec, PrivacyRecorder):
                rec.keep_rounds_upto(last)
            if isinstance(rec, IncentivesRecord):
                rec.check_resume(recorder.audit_path, last)
        gone = StatusRecord.check_resume(recorder.audit_path, last, recorder.ledger)
        exclude = getattr(coord.transport, "exclude", None)
        if gone and callable(exclude):
            exclude({pid: f"{status} before the resume" for pid, status in gone.items()})
        lost = enclave.check_resume(last, recorder.audit_path) if enclave is not None else None
        for rec in recorders:
            if lost is not None and isinstance(rec, PrivacyRecorder):
                rec.count_lost(lost)
    else:
        found = latest_state(state_dir)
        if found is None:
            return 0
        state = found
        if enclave is not None:
            enclave.check_resume(state.round, None)
    resume(coord, state)
    log.warning("resumed after round %d from %s", state.round, state_dir)
    return state.round
