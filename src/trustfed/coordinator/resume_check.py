"""What a coordinator checks before it resumes a run: everything it builds on, before it changes anything.

A resume (``trustfed server --resume``, or a standby that takes the lease) cuts the audit log back to
the last anchored head, rewrites privacy.jsonl, sends transactions and writes metrics.json and the plot.
So :func:`check_resume` runs first, before any participant is waited for, and only reads:

* a finished run is refused (:class:`RunFinished`): its chain, or for an unrecorded run its newest
  coordinator state, holds the config's last round; or it has a metrics.json and nothing to resume;
* a recorded run verifies up to the head its last round on chain anchored
  (:func:`~trustfed.ledger.verify.verify_resume_point`): the log's chain and signatures, every round's
  commitments, Merkle root and ledger checkpoint file, the chain's round records;
* the coordinator state of that round parses, its files hash as its manifest says, and it is that
  round's model (the chain's model hash) for this federation's model spec and strategy.

Any failure raises :class:`ResumeRefused`, naming the file and the reason, with nothing changed. The
earlier rounds' rows of metrics.json come from the signed aggregation entries (:attr:`ResumePoint.history`),
so a resumed run's metrics.json and plot hold the whole run, not only the rounds run after the resume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustfed.config import FederationConfig
from trustfed.coordinator.state import CoordinatorState, list_checkpoints, load_state
from trustfed.core.codec import ParamSpec, model_hash
from trustfed.errors import CheckpointError, ResumeRefused, RunFinished, TrustFedError
from trustfed.ledger.audit import AuditError, parsed_entries
from trustfed.ledger.backends import read_deployment
from trustfed.ledger.metrics_check import METRICS_FILE
from trustfed.ledger.recorder import AUDIT_FILE, LEDGER_DIR
from trustfed.ledger.verify import verify_resume_point
from trustfed.ledger.verify_base import Failure
from trustfed.ledger.verify_chain import open_chain_read_only
from trustfed.simulation.runner import federated_entry

STATE_DIR = "state"
__all__ = ["STATE_DIR", "ResumePoint", "ResumeRefused", "RunFinished", "check_resume"]


@dataclass(frozen=True)
class ResumePoint:
    """Where a checked run resumes: after round ``last`` (0: from the start), from ``state`` (None at
    round 0), with ``history`` the metrics.json rows of rounds 1..last (from the signed log)."""

    last: int
    state: CoordinatorState | None
    history: list[dict[str, Any]] = field(default_factory=list)


def check_resume(cfg: FederationConfig, out_dir: Path | None, spec: ParamSpec, strategy_name: str) -> ResumePoint:
    """Check the run in ``out_dir`` before a resume changes anything (see the module's docstring)."""
    if out_dir is None:
        raise ResumeRefused("resuming needs the run folder (--out) of the run to continue")
    if cfg.ledger.enabled:
        return _recorded(cfg, out_dir, spec, strategy_name)
    return _unrecorded(cfg, out_dir, spec, strategy_name)


def _recorded(cfg: FederationConfig, out_dir: Path, spec: ParamSpec, strategy_name: str) -> ResumePoint:
    ledger_dir = out_dir / LEDGER_DIR
    try:
        deployment = read_deployment(ledger_dir)
    except TrustFedError as exc:
        raise ResumeRefused(f"cannot resume {out_dir}: {exc}; nothing was changed") from None
    if deployment is None:
        return _nothing_recorded(out_dir)
    try:
        ledger = open_chain_read_only(ledger_dir, deployment, cfg.ledger.rpc_url)
    except TrustFedError as exc:
        raise ResumeRefused(f"cannot resume {out_dir}: {ledger_dir}: the chain cannot be read ({exc})") from None
    try:
        last = ledger.next_round() - 1
        if last < 0:
            return _nothing_recorded(out_dir)
        total = cfg.federation.rounds
        if last >= total:
            raise RunFinished(
                f"{out_dir} holds a finished run: round {last} of {total} is on chain ({ledger_dir}). A resume "
                f"would only rewrite its results, so nothing was changed; `trustfed audit verify {out_dir}` "
                "checks it, and a new run needs another folder"
            )
        report = verify_resume_point(out_dir, ledger, last)
        if not report.ok:
            raise ResumeRefused(_refusal(out_dir, last, report.failures))
        rec = ledger.read_round(last)
    finally:
        ledger.close()
    if rec is None:  # verify_resume_point reported it already; here for the type checker
        raise ResumeRefused(f"cannot resume {out_dir}: the chain holds no record of round {last}")
    history = _history(out_dir / AUDIT_FILE, rec.log_head, last)
    if last == 0:
        return ResumePoint(0, None, history)
    folder = out_dir / STATE_DIR / f"round_{last:04d}"
    if not folder.is_dir():
        raise ResumeRefused(
            f"cannot resume {out_dir}: {folder} is missing: the coordinator state of round {last}, the last "
            "round on chain; nothing was changed"
        )
    state = _load(out_dir, folder)
    _matches(out_dir, folder, state, last, spec, strategy_name)
    if model_hash(state.params, spec) != rec.model_hash:
        raise ResumeRefused(
            f"cannot resume {out_dir}: {folder / 'model.f32'} is not the model of round {last} on chain "
            f"({rec.model_hash[:16]}…): the coordinator state was replaced; nothing was changed"
        )
    return ResumePoint(last, state, history)


def _unrecorded(cfg: FederationConfig, out_dir: Path, spec: ParamSpec, strategy_name: str) -> ResumePoint:
    found = list_checkpoints(out_dir / STATE_DIR)
    if not found:
        return _nothing_recorded(out_dir)
    folder = found[-1]
    state = _load(out_dir, folder)
    if state.round >= cfg.federation.rounds:
        raise RunFinished(
            f"{out_dir} holds a finished run: its coordinator state {folder} is at round {state.round} of "
            f"{cfg.federation.rounds}. A resume would only rewrite its results, so nothing was changed"
        )
    _matches(out_dir, folder, state, int(folder.name.removeprefix("round_")), spec, strategy_name)
    return ResumePoint(state.round, state)


def _nothing_recorded(out_dir: Path) -> ResumePoint:
    """No round to resume after: a fresh start, unless the folder holds a finished run's results."""
    if (out_dir / METRICS_FILE).is_file():
        raise RunFinished(
            f"{out_dir} holds the results of a finished run ({out_dir / METRICS_FILE}) and no round to resume "
            "after; nothing was changed: a new run needs another folder"
        )
    return ResumePoint(0, None)


def _load(out_dir: Path, folder: Path) -> CoordinatorState:
    try:
        return load_state(folder)
    except CheckpointError as exc:
        raise ResumeRefused(f"cannot resume {out_dir}: coordinator state {exc}; nothing was changed") from None


def _matches(out_dir: Path, folder: Path, state: CoordinatorState, rnd: int, spec: ParamSpec, strategy: str) -> None:
    manifest = folder / "manifest.json"
    if state.round != rnd:
        problem = f"holds round {state.round}, its folder is round {rnd}'s"
    elif state.spec != spec:
        problem = "holds a model of another spec than this federation's"
    elif state.strategy_name != strategy:
        problem = f"was written by strategy {state.strategy_name!r}, this run uses {strategy!r}"
    else:
        return
    raise ResumeRefused(f"cannot resume {out_dir}: {manifest} {problem}; nothing was changed")


def _refusal(out_dir: Path, last: int, failures: list[Failure]) -> str:
    more = f" (and {len(failures) - 1} more: `trustfed audit verify {out_dir}` lists them)" if len(failures) > 1 else ""
    return (
        f"cannot resume {out_dir} after round {last}: the recorded run does not verify: {failures[0]}{more}; "
        "nothing was changed"
    )


def _history(audit_path: Path, head: str, last: int) -> list[dict[str, Any]]:
    """metrics.json's rows of rounds 1..``last`` from the signed log (up to the anchored ``head``): the
    figures ``audit verify`` checks metrics.json against. How long a round took is not signed: null."""
    plans: dict[int, list[str]] = {}
    rows: list[dict[str, Any]] = []
    try:
        for e in parsed_entries(audit_path):
            if e.kind == "round_plan":
                plans[e.round] = [str(p) for p in e.body.get("participants", [])]
            elif e.kind == "aggregation" and 1 <= e.round <= last:
                rows.append(_row(e.round, e.body, plans.get(e.round, [])))
            if e.hash == head:
                break
    except (OSError, AuditError) as exc:  # verified just before: only a concurrent writer gets here
        raise ResumeRefused(f"cannot resume: {audit_path} cannot be read back ({exc}); nothing was changed") from None
    return rows


def _row(rnd: int, body: Mapping[str, Any], participants: list[str]) -> dict[str, Any]:
    metrics = {str(k): float(v) for k, v in (body.get("metrics") or {}).items()}
    return {
        "round": rnd,
        "accuracy": metrics.get("accuracy", math.nan),
        "loss": metrics.get("loss", math.nan),
        "seconds": None,
        "participants": participants,
        "updated_by": sorted(str(p) for p in body.get("participants", [])),
        "model_hash": str(body.get("model_hash", "")),
        **federated_entry(metrics),
    }
