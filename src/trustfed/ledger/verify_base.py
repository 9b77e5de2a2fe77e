"""What the audit verifier reports (:class:`AuditReport`, each :class:`Failure` located) and the state
its checks share while they read a run folder."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from trustfed.incentives.book import IncentiveBook
from trustfed.ledger.audit import (
    AuditEntry,
)

CHAIN = "chain"


@dataclass(frozen=True)
class Failure:
    file: str
    line: int | None
    round: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line is not None else "")
        rnd = f" round {self.round}" if self.round is not None else ""
        return f"{where}{rnd} [{self.field}] {self.message}"


@dataclass
class AuditReport:
    """What ``trustfed audit verify`` found: ``ok`` only without failures, each failure located (file,
    line, round, field), the counts of what was checked, and notes an auditor must see. A report rather
    than a :class:`~trustfed.primitives.verdict.Verdict`, whose reasons are plain lines."""

    ok: bool
    failures: list[Failure]
    checked: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # facts an auditor must see (a SIMULATED enclave)


@dataclass(frozen=True)
class AttestedEnclave:
    public_key: bytes
    measurement: str
    simulated: bool


@dataclass
class Located:
    line: int
    entry: AuditEntry


class VerifierState:
    """The run folder, what the checks have found so far and the facts later checks rely on."""

    def __init__(self, run_dir: Path, rpc_url: str | None) -> None:
        self.run_dir = run_dir
        self.rpc_url = rpc_url
        self.failures: list[Failure] = []
        self.checked: dict[str, int] = defaultdict(int)
        self.keys: dict[str, bytes] = {}
        self.identities: dict[str, tuple[str, str]] = {}  # id -> (fingerprint, role)
        self.entries: list[Located] = []
        self.notes: list[str] = []
        self.enclave: AttestedEnclave | None = None  # from the log's enclave_attestation entry
        self.privacy: list[Located] = []  # the signed privacy_spend entries, in log order
        self.book: IncentiveBook | None = None  # reputation and balances recomputed from the log
        self.left: dict[str, tuple[str, int]] = {}  # participant -> (status, round) from participant_status entries
        self.suspensions: dict[str, int] = {}  # participant -> the round a logged entry suspended it in
        self.held_out: dict[str, int] = {}  # participant -> the round the history guard suspended it in
        self._due: set[str] = set()  # the suspensions the recomputed reputations call for, so far
        self.app_code: str | None = None  # the app entry's code hash: what every participant must have run

    def fail(self, file: str, line: int | None, rnd: int | None, fld: str, msg: str) -> None:
        self.failures.append(Failure(file, line, rnd, fld, msg))
