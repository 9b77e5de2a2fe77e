"""Reading run folders for the dashboard: plain dicts, from JSON files only (nothing is unpickled).

A run folder is any folder holding ``metrics.json`` (a finished run) or ``audit.jsonl`` (a recorded
run, finished or still going: its per-round ``aggregation`` entries carry the round metrics). A file
that cannot be read becomes a ``problems`` line naming the file; it never stops the page. The figures
shown are the signed log's, checked as ``audit verify`` checks them; those of a run without a log that
verifies are marked unverified (:attr:`RunView.figures`).
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustfed.errors import TrustFedError
from trustfed.incentives.book import REPUTATION_SCALE
from trustfed.ledger.backends import EmbeddedLedger, read_deployment
from trustfed.ledger.recorder import AUDIT_FILE
from trustfed.ledger.verify import signed_figures
from trustfed.privacy.report import load_records, summarize

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunNotFound(TrustFedError):
    """No run folder of that name under the dashboard's root."""


@dataclass
class RunView:
    name: str
    status: str  # "finished", "recording" (audit log, no metrics.json yet) or "unreadable"
    rounds: list[dict[str, Any]] = field(default_factory=list)  # round, accuracy, loss, seconds, participants
    final_accuracy: float | None = None
    model_hash: str = ""
    federation: dict[str, Any] = field(default_factory=dict)
    strategy: dict[str, Any] = field(default_factory=dict)
    enclave: dict[str, Any] | None = None  # label SIMULATED / ATTESTED, backend, measurement
    participants: list[dict[str, Any]] = field(default_factory=list)  # id, role, status, reputation, balance
    ledger_rounds: list[dict[str, Any]] = field(default_factory=list)  # round, model_hash, merkle_root, updates
    modes: dict[str, str] = field(default_factory=dict)  # enclave, secagg, privacy: how the run was protected
    incentives: list[dict[str, Any]] = field(default_factory=list)  # per round: source, rewards, flagged
    privacy: list[dict[str, Any]] = field(default_factory=list)  # per party: epsilon, budget, verified
    problems: list[str] = field(default_factory=list)
    # "verified": every figure shown is the signed log's and metrics.json agrees with it; "mismatch": the
    # figures shown are the signed log's, metrics.json reports others (``mismatches``); "unverified": no
    # signed log backs the figures (an unrecorded run, or a log that does not verify)
    figures: str = "unverified"
    mismatches: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in self.__dict__.items()}


def _finite(v: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def is_run(folder: Path) -> bool:
    return folder.is_dir() and ((folder / "metrics.json").is_file() or (folder / "audit.jsonl").is_file())


def list_runs(root: Path) -> list[str]:
    """Run folders directly under ``root`` (and ``root`` itself, named ".", when it is one)."""
    out = ["."] if is_run(root) else []
    if root.is_dir():
        out += sorted(p.name for p in root.iterdir() if RUN_NAME.match(p.name) and is_run(p))
    return out


def run_folder(root: Path, name: str) -> Path:
    """The folder of run ``name`` under ``root``; refuses anything but a direct child (or "." for root)."""
    if name == ".":
        folder = root
    elif RUN_NAME.match(name):
        folder = root / name
    else:
        raise RunNotFound(f"no run named {name!r}")
    if not is_run(folder):
        raise RunNotFound(f"no run named {name!r}")
    return folder


def load_run(root: Path, name: str) -> RunView:
    folder = run_folder(root, name)
    view = RunView(name, "recording")
    entries = _audit_entries(folder, view)
    metrics_file = folder / "metrics.json"
    m: dict[str, Any] | None = None
    if metrics_file.is_file():
        try:
            m = json.loads(metrics_file.read_text(encoding="utf-8"))
            if not isinstance(m, dict):
                raise ValueError("not a JSON object")
            _from_metrics(view, m)
            view.status = "finished"
        except (OSError, ValueError, TypeError, KeyError) as exc:
            view.problems.append(f"metrics.json: unreadable ({exc})")
            view.status = "unreadable"
            m = None
    cfg = (m or {}).get("config") or _federation_file(folder, view)
    if not view.federation:
        view.federation = dict(cfg.get("federation") or {}) if isinstance(cfg, dict) else {}
    if not view.rounds:
        view.rounds = _rounds_from_log(entries)
    _from_log(view, entries)
    _signed_figures(view, folder, m)
    _ledger(view, folder)
    _privacy(view, folder)
    view.modes = _modes(view, cfg if isinstance(cfg, dict) else {})
    return view


def _federation_file(folder: Path, view: RunView) -> dict[str, Any]:
    """The run's federation.toml (a run still recording has no metrics.json to say how it was set up)."""
    path = folder / "federation.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        view.problems.append(f"federation.toml: unreadable ({exc})")
        return {}


def _modes(view: RunView, cfg: dict[str, Any]) -> dict[str, str]:
    """How the run kept updates and data private, as its config says: the enclave (SIMULATED when its
    backend is simulated, whatever else a file claims), secure aggregation, differential privacy (with
    the most epsilon any party has spent)."""

    def section(name: str) -> dict[str, Any]:
        got = cfg.get(name)
        return got if isinstance(got, dict) else {}

    enclave = "off"
    if view.enclave is not None:
        enclave = str(view.enclave.get("label") or "on")
    elif section("enclave").get("enabled"):
        enclave = "SIMULATED" if section("enclave").get("backend") == "simulated" else "on"
    privacy = str(section("privacy").get("mode") or "none") if cfg else "unknown"
    spent = [p["epsilon"] for p in view.privacy if isinstance(p.get("epsilon"), float)]
    if spent:
        privacy += f" (max epsilon {max(spent):.2f})"
    return {
        "enclave": enclave if cfg or view.enclave is not None else "unknown",
        "secagg": ("on" if section("secagg").get("enabled") else "off") if cfg else "unknown",
        "privacy": privacy,
    }


def _from_metrics(view: RunView, m: dict[str, Any]) -> None:
    cfg = m.get("config") or {}
    view.federation = dict(cfg.get("federation") or {})
    view.strategy = dict(m.get("strategy") or {})
    fa = m.get("final_accuracy")
    view.final_accuracy = float(fa) if isinstance(fa, int | float) else None
    view.model_hash = str(m.get("model_hash", ""))
    view.rounds = [
        {
            "round": int(r["round"]),
            "accuracy": _num(r.get("accuracy")),
            "loss": _num(r.get("loss")),
            "seconds": _num(r.get("seconds")),
            "participants": list(r.get("participants") or []),
            "updated_by": list(r.get("updated_by") or r.get("participants") or []),  # older runs: the selection
        }
        for r in m.get("rounds") or []
    ]
    enc = m.get("enclave")
    if isinstance(enc, dict):
        view.enclave = {k: enc.get(k) for k in ("label", "backend", "measurement")}


def _signed_figures(view: RunView, folder: Path, metrics: dict[str, Any] | None) -> None:
    """Show the signed figures only: metrics.json is checked against the log's signed aggregation entries
    as ``audit verify`` checks it (:func:`~trustfed.ledger.verify.signed_figures`); the headline and each
    round's accuracy and loss are the signed ones, and whatever metrics.json reports otherwise is listed
    as a mismatch. Without a log that verifies, the figures are marked unverified."""
    if not (folder / AUDIT_FILE).is_file():
        return
    found = signed_figures(folder, metrics)
    if found.log_failures:
        view.problems.append(f"{found.log_failures[0]}: the audit log does not verify, so no figure here is verified")
        return
    for r in view.rounds:
        signed = found.aggregations.get(r["round"], {}).get("metrics") or {}
        r["accuracy"], r["loss"] = _num(signed.get("accuracy")), _num(signed.get("loss"))
    last = found.aggregations.get(max(found.aggregations, default=-1), {}).get("metrics") or {}
    view.final_accuracy = _num(last.get("accuracy"))
    view.mismatches = [
        f"metrics.json {where}" + (f" (round {rnd})" if rnd is not None else "") + f": {message}"
        for rnd, where, message in found.problems
    ]
    view.figures = "mismatch" if view.mismatches else "verified"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _audit_entries(folder: Path, view: RunView) -> list[dict[str, Any]]:
    path = folder / "audit.jsonl"
    if not path.is_file():
        return []
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        view.problems.append(f"audit.jsonl: unreadable ({exc})")
        return []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            if not isinstance(e, dict) or not isinstance(e.get("body"), dict):
                raise ValueError("not an audit entry")
            out.append(e)
        except ValueError as exc:
            view.problems.append(f"audit.jsonl:{i}: unreadable entry ({exc})")
    return out


def _rounds_from_log(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in entries:
        if e.get("kind") != "aggregation":
            continue
        met = e["body"].get("metrics") or {}
        out.append(
            {
                "round": int(e.get("round", 0)),
                "accuracy": _num(met.get("accuracy")),
                "loss": _num(met.get("loss")),
                "seconds": None,
                "participants": list(e["body"].get("participants") or []),
                "updated_by": list(e["body"].get("participants") or []),  # the committers
            }
        )
    return out


def _from_log(view: RunView, entries: list[dict[str, Any]]) -> None:
    for e in entries:
        kind, body = e.get("kind"), e["body"]
        if kind == "enclave_attestation" and view.enclave is None:
            view.enclave = {k: body.get(k) for k in ("label", "backend", "measurement")}
        elif kind == "incentives":
            view.incentives.append(
                {
                    "round": int(e.get("round", 0)),
                    "source": body.get("source"),
                    "rewards": dict(body.get("rewards") or {}),
                    "flagged": list(body.get("flagged") or []),
                }
            )
    if view.enclave is not None and str(view.enclave.get("backend")) == "simulated":
        view.enclave["label"] = "SIMULATED"  # whatever a file says, a simulated backend is shown as such


def _ledger(view: RunView, folder: Path) -> None:
    ledger_dir = folder / "ledger"
    try:
        dep = read_deployment(ledger_dir)
    except TrustFedError as exc:
        view.problems.append(f"ledger/deployment.json: {exc}")
        return
    if dep is None:
        return
    if dep.get("backend") != "embedded":
        view.problems.append(f"ledger: {dep.get('backend')} chain; the dashboard reads embedded chains only")
        return
    try:
        ledger = EmbeddedLedger(ledger_dir, read_only=True)
        for ident in ledger.participants():
            acct = ledger.account(ident.id)
            view.participants.append(
                {
                    "id": ident.id,
                    "role": ident.role.name.lower(),
                    "status": ident.status.name.lower(),
                    "reputation": acct.reputation / REPUTATION_SCALE if acct.reputation else None,
                    "balance": acct.balance,
                }
            )
        for rnd in range(ledger.next_round()):
            rec = ledger.read_round(rnd)
            if rec is not None:
                view.ledger_rounds.append(
                    {
                        "round": rec.round,
                        "model_hash": rec.model_hash,
                        "merkle_root": rec.merkle_root,
                        "updates": rec.num_updates,
                    }
                )
        ledger.close()
    except TrustFedError as exc:
        view.problems.append(f"ledger: cannot open the chain ({exc})")


def _privacy(view: RunView, folder: Path) -> None:
    path = folder / "privacy.jsonl"
    if not path.is_file():
        return

    try:
        for s in summarize(load_records(folder)):
            view.privacy.append(
                {
                    "party": s.party,
                    "kind": s.kind,
                    "epsilon": s.epsilon,
                    "budget": s.budget_epsilon,
                    "verified": s.verified,
                    "rounds": len(s.rounds),
                }
            )
    except (TrustFedError, OSError, ValueError, KeyError, TypeError) as exc:
        view.problems.append(f"privacy.jsonl: unreadable ({exc})")
