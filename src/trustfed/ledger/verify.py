"""The independent verifier behind ``trustfed audit verify RUN_DIR``.

It trusts nothing the coordinator says about itself: it recomputes the audit log's hash chain and
every signature (keys come from the log's identity entries, whose fingerprints must match the
on-chain registry), every commitment and Merkle root, every checkpoint's hash, and compares all of
it with the on-chain round records. Every failure is reported with where it is: file and line,
round and field. The run verifies only if no failure was found.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustfed.coordinator.recorders import (
    APP_KIND,
    ATTESTATION_KIND,
    INCENTIVES_KIND,
    PRIVACY_KIND,
    RECEIPT_KIND,
    STAKE_KIND,
    STATUS_KIND,
)
from trustfed.core.evaluation import EVAL_PREFIX, FED_EVAL_PREFIX, combine
from trustfed.errors import CheckpointError, TrustFedError
from trustfed.incentives.book import IncentiveBook, selection_shares
from trustfed.incentives.scoring import IncentiveError, ReputationPolicy, reputation_weighted_selection
from trustfed.ledger.audit import (
    GENESIS_PREV,
    AuditEntry,
    AuditError,
    certificate_fingerprint,
    chain_hash,
    key_fingerprint,
    parse_entry,
    read_entries,
    verify_signature,
)
from trustfed.ledger.checkpoint import hash_model_bytes
from trustfed.ledger.metrics_check import METRICS_FILE, metrics_problems
from trustfed.ledger.participant import COMMITMENT_KIND
from trustfed.ledger.recorder import AUDIT_FILE, COORDINATOR_ID, LEDGER_DIR
from trustfed.ledger.records import ZERO32, Identity, RoundCommitment, update_commitment
from trustfed.primitives.canonical import canonical_json
from trustfed.primitives.merkle import merkle_root

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
class _AttestedEnclave:
    public_key: bytes
    measurement: str
    simulated: bool


@dataclass
class _Located:
    line: int
    entry: AuditEntry


class _Verifier:
    def __init__(self, run_dir: Path, rpc_url: str | None) -> None:
        self.run_dir = run_dir
        self.rpc_url = rpc_url
        self.failures: list[Failure] = []
        self.checked: dict[str, int] = defaultdict(int)
        self.keys: dict[str, bytes] = {}
        self.identities: dict[str, tuple[str, str]] = {}  # id -> (fingerprint, role)
        self.entries: list[_Located] = []
        self.notes: list[str] = []
        self.enclave: _AttestedEnclave | None = None  # from the log's enclave_attestation entry
        self.privacy: list[_Located] = []  # the signed privacy_spend entries, in log order
        self.book: IncentiveBook | None = None  # reputation and balances recomputed from the log
        self.left: dict[str, tuple[str, int]] = {}  # participant -> (status, round) from participant_status entries
        self.suspensions: dict[str, int] = {}  # participant -> the round a logged entry suspended it in
        self._due: set[str] = set()  # the suspensions the recomputed reputations call for, so far
        self.app_code: str | None = None  # the app entry's code hash: what every participant must have run

    def fail(self, file: str, line: int | None, rnd: int | None, fld: str, msg: str) -> None:
        self.failures.append(Failure(file, line, rnd, fld, msg))

    # ------------------------------------------------------------ 1. the log's chain and signatures
    def check_log(self) -> None:
        path = self.run_dir / AUDIT_FILE
        if not path.is_file():
            self.fail(AUDIT_FILE, None, None, "file", "no audit log; was the run recorded (ledger.enabled)?")
            return
        prev_hash, expect_seq = GENESIS_PREV, 0
        for lineno, text in read_entries(path):
            try:
                e = parse_entry(text)
            except AuditError as exc:
                self.fail(AUDIT_FILE, lineno, None, "entry", f"unreadable entry: {exc}")
                prev_hash, expect_seq = "?", expect_seq + 1
                continue
            self.checked["entries"] += 1
            if e.seq != expect_seq:
                self.fail(
                    AUDIT_FILE,
                    lineno,
                    e.round,
                    "seq",
                    f"sequence {e.seq}, expected {expect_seq}: an entry was deleted, inserted or moved",
                )
            if e.prev != prev_hash and prev_hash != "?":
                self.fail(
                    AUDIT_FILE,
                    lineno,
                    e.round,
                    "prev",
                    f"links to {e.prev[:16]}…, but the entry before hashes to {prev_hash[:16]}…",
                )
            digest = e.digest
            real = chain_hash(e.prev, e.seq, digest, e.sig)
            if real != e.hash:
                self.fail(
                    AUDIT_FILE,
                    lineno,
                    e.round,
                    "hash",
                    f"stored hash {e.hash[:16]}… but the entry hashes to {real[:16]}…: the line was edited",
                )
            self._check_signature(lineno, e, digest)
            self.entries.append(_Located(lineno, e))
            prev_hash, expect_seq = e.hash, e.seq + 1

    def _check_signature(self, lineno: int, e: AuditEntry, digest: bytes) -> None:
        if e.kind == "identity" and not self.keys and e.author == COORDINATOR_ID == e.body.get("id"):
            pem = str(e.body.get("public_key_pem", "")).encode()  # the coordinator's self-signed identity
            self.keys[COORDINATOR_ID] = pem
        key = self.keys.get(e.author)
        if key is None:
            self.fail(AUDIT_FILE, lineno, e.round, "author", f"no identity entry before this line for {e.author!r}")
        elif not verify_signature(key, digest, e.sig):
            self.fail(
                AUDIT_FILE,
                lineno,
                e.round,
                "sig",
                f"signature does not verify with the registered key of {e.author!r}: forged or altered",
            )
        else:
            self.checked["signatures"] += 1
        if e.kind == "identity":
            self._identity(lineno, e)

    def _identity(self, lineno: int, e: AuditEntry) -> None:
        b = e.body
        pid, pem, fp = str(b.get("id", "")), str(b.get("public_key_pem", "")).encode(), str(b.get("fingerprint", ""))
        if e.author != COORDINATOR_ID:
            self.fail(AUDIT_FILE, lineno, e.round, "author", f"identity of {pid!r} not issued by the coordinator")
        try:
            real = key_fingerprint(pem)
        except TrustFedError as exc:
            self.fail(AUDIT_FILE, lineno, e.round, "body.public_key_pem", str(exc))
            return
        cert = b.get("certificate_pem")
        if cert is not None:  # a PKI identity: registered by its certificate's fingerprint
            try:
                cert_fp, cert_key = certificate_fingerprint(str(cert).encode())
            except TrustFedError as exc:
                self.fail(AUDIT_FILE, lineno, e.round, "body.certificate_pem", str(exc))
                return
            if key_fingerprint(cert_key) != real:
                self.fail(
                    AUDIT_FILE,
                    lineno,
                    e.round,
                    "body.certificate_pem",
                    f"the certificate of {pid!r} does not hold its declared public key",
                )
            real = cert_fp
        if real != fp:
            what = "certificate" if cert is not None else "key"
            self.fail(AUDIT_FILE, lineno, e.round, "body.fingerprint", f"fingerprint of {pid!r} is not its {what}'s")
        if pid in self.identities:
            self.fail(AUDIT_FILE, lineno, e.round, "body.id", f"{pid!r} is declared twice")
        self.keys[pid] = pem
        self.identities[pid] = (real, str(b.get("role", "")))

    # ------------------------------------------------------------ 2. per-round content
    def check_rounds(self) -> dict[int, dict[str, Any]]:
        """Recompute commitments, Merkle roots and checkpoint hashes; returns per-round facts."""
        by_round: dict[int, list[_Located]] = defaultdict(list)
        for loc in self.entries:
            by_round[loc.entry.round].append(loc)
        facts: dict[int, dict[str, Any]] = {}
        prev_model: str | None = None
        for rnd in sorted(by_round):
            locs = by_round[rnd]
            f: dict[str, Any] = {"last_hash": locs[-1].entry.hash, "last_line": locs[-1].line, "leaves": []}
            plan: _Located | None = None
            for loc in locs:
                e, ln = loc.entry, loc.line
                if e.kind == "round_plan":
                    plan = f["plan"] = loc
                    for pid in e.body.get("participants", []):
                        if pid in self.left and self.left[pid][1] < rnd:
                            self.fail(
                                AUDIT_FILE,
                                ln,
                                rnd,
                                "body.participants",
                                f"selects {pid!r}, who left in round {self.left[pid][1]}",
                            )
                    if prev_model is not None and e.body.get("model_hash") != prev_model:
                        self.fail(
                            AUDIT_FILE,
                            ln,
                            rnd,
                            "body.model_hash",
                            "plan sends a model other than the previous round's checkpoint",
                        )
                elif e.kind == COMMITMENT_KIND:
                    self._commitment(loc, plan, f)
                elif e.kind == "aggregation":
                    root = merkle_root(f["leaves"]).hex()
                    self.checked["merkle_roots"] += 1
                    if e.body.get("merkle_root") != root:
                        self.fail(
                            AUDIT_FILE,
                            ln,
                            rnd,
                            "body.merkle_root",
                            f"recorded {str(e.body.get('merkle_root'))[:16]}…, the commitments give {root[:16]}…",
                        )
                    f["merkle_root"], f["aggregation"] = root, loc
                    self._aggregation_names(loc, f)
                    self._federated_evaluation(loc, f)
                elif e.kind == ATTESTATION_KIND:
                    self._attestation(loc)
                elif e.kind == APP_KIND:
                    self._app(loc)
                elif e.kind == PRIVACY_KIND:
                    self.privacy.append(loc)
                elif e.kind == STATUS_KIND:
                    self._status(loc)
                elif e.kind == STAKE_KIND:
                    if rnd != 0 or "stake" in f:
                        self.fail(AUDIT_FILE, ln, rnd, "kind", "stakes are set once, before round 1")
                    f["stake"] = loc
                elif e.kind == INCENTIVES_KIND:
                    if "incentives" in f:
                        self.fail(AUDIT_FILE, ln, rnd, "kind", "a second incentives entry for this round")
                    f["incentives"] = loc
                elif e.kind == RECEIPT_KIND:
                    if "receipt" in f:
                        self.fail(AUDIT_FILE, ln, rnd, "kind", "a second enclave receipt for this round")
                    f["receipt"] = loc
                elif e.kind == "checkpoint":
                    f["model_hash"] = self._checkpoint(loc)
                    agg = f.get("aggregation")
                    if agg is not None and agg.entry.body.get("model_hash") != e.body.get("model_hash"):
                        self.fail(AUDIT_FILE, ln, rnd, "body.model_hash", "checkpoint differs from the aggregation")
                    prev_model = f["model_hash"]
            if rnd > 0 and (plan is None or "aggregation" not in f or "model_hash" not in f):
                self.fail(
                    AUDIT_FILE,
                    locs[-1].line,
                    rnd,
                    "round",
                    "round is incomplete: needs round_plan, aggregation and checkpoint entries",
                )
            if rnd > 0:
                self._receipt(rnd, f)
            facts[rnd] = f
        return facts

    # ------------------------------------------------------------ enclave attestation and receipts
    def _attestation(self, loc: _Located) -> None:
        """Re-verify the enclave evidence the coordinator recorded, as of when it verified it."""
        import base64
        import binascii

        from trustfed.enclave.attestation import SIMULATED_LABEL, verify_evidence
        from trustfed.enclave.policy import AttestationPolicy
        from trustfed.enclave.receipts import HARDWARE_LABEL

        e, ln, b = loc.entry, loc.line, loc.entry.body
        if self.enclave is not None:
            self.fail(AUDIT_FILE, ln, e.round, "kind", "a second enclave attestation in one run")
            return
        backend, measurement = str(b.get("backend", "")), str(b.get("measurement", ""))
        simulated = backend == "simulated"
        if bool(b.get("simulated")) != simulated or b.get("label") != (
            SIMULATED_LABEL if simulated else HARDWARE_LABEL
        ):
            self.fail(AUDIT_FILE, ln, e.round, "body.label", "simulated flag / label does not match the backend")
        try:
            evidence = base64.b64decode(str(b.get("evidence", "")), validate=True)
            nonce = bytes.fromhex(str(b.get("nonce", "")))
            public_key = bytes.fromhex(str(b.get("public_key", "")))
            at = float(b.get("verified_at", 0.0))
            policy = AttestationPolicy(
                allowed_backends=[backend],  # type: ignore[list-item]
                allow_simulated_tee=simulated,
                expected_measurements=[measurement],
            )
        except (binascii.Error, ValueError, TypeError) as exc:
            self.fail(AUDIT_FILE, ln, e.round, "body", f"malformed attestation record: {exc}")
            return
        verdict = verify_evidence(evidence, policy, nonce, at)
        for reason in verdict.reasons:
            self.fail(AUDIT_FILE, ln, e.round, "body.evidence", f"enclave evidence does not verify: {reason}")
        if verdict.ok and verdict.claims.get("public_key") != b.get("public_key"):
            self.fail(AUDIT_FILE, ln, e.round, "body.public_key", "the evidence binds another enclave key")
        self.checked["attestations"] += 1
        self.enclave = _AttestedEnclave(public_key, measurement, simulated)
        if simulated:
            self.notes.append(
                f"enclave: SIMULATED backend (software only, no hardware root of trust), measurement {measurement[:16]}…"
            )
        else:
            self.notes.append(f"enclave: {backend} attested, measurement {measurement[:16]}…")

    def _receipt(self, rnd: int, f: dict[str, Any]) -> None:
        """The round's enclave receipt: signed by the attested key, binding this round's commitments
        and output model; its hash is the one the aggregation entry and the chain record."""
        from trustfed.enclave.errors import EnclaveError
        from trustfed.enclave.receipts import Receipt, receipt_hash, verify_receipt

        loc: _Located | None = f.get("receipt")
        agg: _Located | None = f.get("aggregation")
        recorded = str(agg.entry.body.get("receipt_hash", "")) if agg is not None else ""
        if loc is None:
            f["receipt_hash"] = ZERO32
            if self.enclave is not None and agg is not None:
                self.fail(AUDIT_FILE, agg.line, rnd, "receipt", "enclave run, but this round has no enclave receipt")
            elif recorded:
                self.fail(AUDIT_FILE, agg.line if agg else None, rnd, "body.receipt_hash", "no receipt in the log")
            return
        e, ln = loc.entry, loc.line
        if self.enclave is None:
            self.fail(AUDIT_FILE, ln, rnd, "kind", "enclave receipt without an attested enclave in the log")
            return
        try:
            receipt = Receipt.from_json(canonical_json(e.body.get("receipt")))
        except (EnclaveError, ValueError, TypeError) as exc:
            self.fail(AUDIT_FILE, ln, rnd, "body.receipt", f"unreadable receipt: {exc}")
            return
        verdict = verify_receipt(
            receipt,
            enclave_public_key=self.enclave.public_key,
            expected_measurements=[self.enclave.measurement],
            commitments=f.get("commitments", {}),
            output_model_hash=str(f.get("model_hash", "")),
            rnd=rnd,
            allow_simulated=self.enclave.simulated,
        )
        for reason in verdict.reasons:
            self.fail(AUDIT_FILE, ln, rnd, "body.receipt", reason)
        h = receipt_hash(receipt)
        if recorded != h:
            self.fail(
                AUDIT_FILE, agg.line if agg else ln, rnd, "body.receipt_hash", "differs from the logged receipt's hash"
            )
        if e.body.get("label") != receipt.body.get("label"):
            self.fail(AUDIT_FILE, ln, rnd, "body.label", "differs from the receipt's own label")
        f["receipt_hash"] = h
        self.checked["receipts"] += 1

    def _aggregation_names(self, loc: _Located, f: dict[str, Any]) -> None:
        """The aggregation names exactly the round's committers, in log order, and selects among them
        (a coordinator cannot claim an update that was never committed, nor drop one that was)."""
        e, ln = loc.entry, loc.line
        authors = list(f.get("authors", []))
        named = [str(p) for p in e.body.get("participants", [])]
        if named != authors:
            self.fail(
                AUDIT_FILE, ln, e.round, "body.participants", f"names {named}, the round's commitments are by {authors}"
            )
        stray = sorted(set(map(str, e.body.get("selected", []))) - set(authors))
        if stray:
            self.fail(AUDIT_FILE, ln, e.round, "body.selected", f"selects {stray}, who committed no update this round")

    def _commitment(self, loc: _Located, plan: _Located | None, f: dict[str, Any]) -> None:
        e, ln, b = loc.entry, loc.line, loc.entry.body
        if e.author in f.setdefault("authors", []):
            self.fail(AUDIT_FILE, ln, e.round, "author", f"a second commitment by {e.author!r} this round")
        f["authors"].append(e.author)
        if b.get("participant") != e.author:
            self.fail(AUDIT_FILE, ln, e.round, "body.participant", "commitment names someone other than its author")
        if plan is None or e.author not in plan.entry.body.get("participants", []):
            self.fail(AUDIT_FILE, ln, e.round, "author", f"{e.author!r} was not selected in this round's plan")
        gone = self.left.get(e.author)
        if gone is not None and gone[1] < e.round:
            self.fail(AUDIT_FILE, ln, e.round, "author", f"{e.author!r} left the federation in round {gone[1]}")
        try:
            real = update_commitment(e.round, e.author, bytes.fromhex(str(b.get("update_sha256")))).hex()
        except (ValueError, TrustFedError) as exc:
            self.fail(AUDIT_FILE, ln, e.round, "body.update_sha256", f"malformed: {exc}")
            return
        if real != b.get("commitment"):
            self.fail(AUDIT_FILE, ln, e.round, "body.commitment", "is not H(round, id, H(update))")
        self.checked["commitments"] += 1
        self._provenance(loc, f)
        f["leaves"].append(bytes.fromhex(real))
        f.setdefault("commitments", {})[e.author] = f["leaves"][-1]  # author -> commitment, for the receipt

    # ------------------------------------------------------------ metrics.json
    def check_metrics_file(self, facts: dict[int, dict[str, Any]]) -> None:
        """The figures metrics.json reports must be the signed ones (a run without the file is fine)."""
        import json

        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self.fail(METRICS_FILE, None, None, "(file)", f"unreadable: {exc}")
            return
        aggregations = {rnd: f["aggregation"].entry.body for rnd, f in facts.items() if "aggregation" in f}
        for rnd, where, message in metrics_problems(metrics if isinstance(metrics, dict) else {}, aggregations):
            self.fail(METRICS_FILE, None, rnd, where, message)
        self.checked["metrics_file"] += 1

    # ------------------------------------------------------------ the app and its provenance
    def _app(self, loc: _Located) -> None:
        """The app that trained the model, named once by the coordinator before round 1."""
        e, ln, b = loc.entry, loc.line, loc.entry.body
        code = str(b.get("code_sha256", ""))
        if e.author != COORDINATOR_ID or e.round != 0 or self.app_code is not None:
            self.fail(AUDIT_FILE, ln, e.round, "kind", "the app is named once, by the coordinator, before round 1")
        elif len(code) != 64 or any(c not in "0123456789abcdef" for c in code):
            self.fail(AUDIT_FILE, ln, e.round, "body.code_sha256", "must be 64 lowercase hex digits")
        else:
            self.app_code = code
            self.checked["app"] += 1

    def _provenance(self, loc: _Located, f: dict[str, Any]) -> None:
        """A participant's commitment states the code it ran; it must be the federation's app. Its
        federated-evaluation scores are kept for the round's aggregation check."""
        e, ln, b = loc.entry, loc.line, loc.entry.body
        if self.app_code is not None:
            ran = b.get("app_sha256")
            if ran is None:
                self.fail(AUDIT_FILE, ln, e.round, "body.app_sha256", f"{e.author!r} does not state the code it ran")
            elif ran != self.app_code:
                self.fail(
                    AUDIT_FILE,
                    ln,
                    e.round,
                    "body.app_sha256",
                    f"{e.author!r} ran code {str(ran)[:16]}…, not the federation's app ({self.app_code[:16]}…)",
                )
            else:
                self.checked["provenance"] += 1
        evaluation = b.get("evaluation")
        if isinstance(evaluation, dict):
            try:
                f.setdefault("evaluations", []).append({EVAL_PREFIX + str(k): float(v) for k, v in evaluation.items()})
            except (TypeError, ValueError):
                self.fail(AUDIT_FILE, ln, e.round, "body.evaluation", "scores must be numbers")

    def _federated_evaluation(self, loc: _Located, f: dict[str, Any]) -> None:
        """The round's federated evaluation must be the example-weighted mean of the signed scores."""
        e, ln = loc.entry, loc.line
        metrics = e.body.get("metrics", {})
        recorded = (
            {k: v for k, v in metrics.items() if k.startswith(FED_EVAL_PREFIX)} if isinstance(metrics, dict) else {}
        )
        real = combine(f.get("evaluations", []), e.round - 1)
        if not recorded and not real:
            return
        same = set(recorded) == set(real) and all(
            isinstance(recorded[k], int | float) and math.isclose(recorded[k], v, rel_tol=1e-9, abs_tol=1e-12)
            for k, v in real.items()
        )
        if not same:
            self.fail(
                AUDIT_FILE,
                ln,
                e.round,
                "body.metrics",
                "the federated evaluation is not the example-weighted mean of the participants' signed scores",
            )
        else:
            self.checked["federated_evaluations"] += 1

    def _status(self, loc: _Located) -> None:
        """A participant left the federation: known to the log, once, as exited or revoked."""
        e, ln, b = loc.entry, loc.line, loc.entry.body
        pid, status = str(b.get("participant", "")), b.get("status")
        if e.author != COORDINATOR_ID:
            self.fail(AUDIT_FILE, ln, e.round, "author", "a status is recorded by the coordinator only")
        elif pid not in self.identities:
            self.fail(AUDIT_FILE, ln, e.round, "body.participant", f"{pid!r} is not a registered identity")
        elif status not in ("exited", "revoked", "suspended"):
            self.fail(AUDIT_FILE, ln, e.round, "body.status", f"expected exited, revoked or suspended, got {status!r}")
        elif pid in self.left and not (self.left[pid][0] == "suspended" and status != "suspended"):
            self.fail(AUDIT_FILE, ln, e.round, "body.participant", f"{pid!r} already left in round {self.left[pid][1]}")
        else:  # a suspended participant may still exit or be revoked (final)
            self.left[pid] = (str(status), e.round)
            if status == "suspended":
                self.suspensions[pid] = e.round
            self.checked["departures"] += 1

    def _checkpoint(self, loc: _Located) -> str:
        e, ln, b = loc.entry, loc.line, loc.entry.body
        recorded = str(b.get("model_hash", ""))
        if "file" not in b:
            return recorded
        f32, spec = self.run_dir / str(b["file"]), self.run_dir / str(b.get("spec_file", ""))
        try:
            real = hash_model_bytes(f32.read_bytes(), spec.read_text(encoding="utf-8"))
        except (OSError, CheckpointError, TrustFedError) as exc:
            self.fail(str(b["file"]), None, e.round, "file", f"checkpoint unreadable ({exc}); logged at line {ln}")
            return recorded
        self.checked["checkpoints"] += 1
        if real != recorded:
            self.fail(
                str(b["file"]),
                None,
                e.round,
                "model_hash",
                f"file hashes to {real[:16]}…, the log (line {ln}) records {recorded[:16]}…: swapped or altered",
            )
        return recorded

    # ------------------------------------------------------------ incentives
    def check_incentives(self, facts: dict[int, dict[str, Any]]) -> None:
        """Recompute every round's reputation and rewards from the logged contributions and flags (and
        those from the round's aggregation entry and enclave receipt); the totals are compared with
        the chain's accounts in :meth:`_compare_chain`."""
        first = next((facts[r]["incentives"] for r in sorted(facts) if "incentives" in facts[r]), None)
        if first is not None:  # a malformed policy is reported with its entry below
            with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError, IncentiveError):
                self.book = IncentiveBook(
                    ReputationPolicy(**{k: float(v) for k, v in first.entry.body["policy"].items()})
                )
        genesis: _Located | None = facts.get(0, {}).get("stake")
        if genesis is not None:
            try:
                stake = int(genesis.entry.body["stake"])
                ids = [str(p) for p in genesis.entry.body["participants"]]
            except (KeyError, TypeError, ValueError) as exc:
                self.fail(AUDIT_FILE, genesis.line, 0, "body", f"malformed stake entry: {exc}")
            else:
                self.book = self.book or IncentiveBook()
                self.book.stakes.update(dict.fromkeys(ids, stake))
        for rnd in sorted(facts):
            f = facts[rnd]
            self._selection(rnd, f)
            loc: _Located | None = f.get("incentives")
            if loc is None:
                if self.book is not None and rnd > 0 and "aggregation" in f:
                    self.fail(
                        AUDIT_FILE, f["aggregation"].line, rnd, "incentives", "this round has no incentives entry"
                    )
                continue
            self._incentive_round(rnd, f, loc)

    def _selection(self, rnd: int, f: dict[str, Any]) -> None:
        """A reputation-weighted draw must be the one the reputations before this round give."""
        plan: _Located | None = f.get("plan")
        config = plan.entry.body.get("config") if plan is not None else None
        if plan is None or not isinstance(config, dict) or config.get("selection") != "reputation":
            return
        if self.book is None:
            self.fail(AUDIT_FILE, plan.line, rnd, "body.config.selection", "reputation selection without incentives")
            return
        try:
            pool = [p for p in str(config["selection_available"]).split(",") if p]
            seed = int(config["selection_seed"])
            chosen = tuple(sorted(str(p) for p in plan.entry.body.get("participants", [])))
            want = reputation_weighted_selection(pool, {p: self.book.current(p) for p in pool}, len(chosen), seed, rnd)
        except (KeyError, TypeError, ValueError, IncentiveError) as exc:
            self.fail(AUDIT_FILE, plan.line, rnd, "body.config", f"malformed selection record: {exc}")
            return
        if chosen != want:
            self.fail(
                AUDIT_FILE,
                plan.line,
                rnd,
                "body.participants",
                f"{list(chosen)} is not the reputation-weighted draw {list(want)} from the reputations before the round",
            )
        self.checked["reputation_draws"] += 1

    def _incentive_round(self, rnd: int, f: dict[str, Any], loc: _Located) -> None:
        b, ln = loc.entry.body, loc.line
        agg: _Located | None = f.get("aggregation")
        if agg is None:
            self.fail(AUDIT_FILE, ln, rnd, "incentives", "incentives without the round's aggregation entry")
            return
        try:
            policy = ReputationPolicy(**{k: float(v) for k, v in dict(b["policy"]).items()})
            pool, source, flag_unselected = int(b["pool"]), str(b["source"]), bool(b["flag_unselected"])
            slash_fraction = float(b.get("slash_fraction", 0.0))
            contributions = {str(k): float(v) for k, v in dict(b["contributions"]).items()}
            flagged = {str(p) for p in b["flagged"]}
        except (KeyError, TypeError, ValueError, IncentiveError) as exc:
            self.fail(AUDIT_FILE, ln, rnd, "body", f"malformed incentives entry: {exc}")
            return
        if self.book is None:
            self.book = IncentiveBook(policy)
        elif policy != self.book.policy:
            self.fail(AUDIT_FILE, ln, rnd, "body.policy", "the reputation policy changed during the run")
        participants = [str(p) for p in agg.entry.body.get("participants", [])]
        selected = [str(p) for p in agg.entry.body.get("selected", [])]
        receipt: _Located | None = f.get("receipt")
        rbody = (receipt.entry.body.get("receipt") or {}).get("body", {}) if receipt is not None else {}
        rejected = set(rbody.get("rejected", {})) & set(participants)
        want_flagged = (set(participants) - set(selected) if flag_unselected else set()) | rejected
        if flagged != want_flagged:
            self.fail(
                AUDIT_FILE, ln, rnd, "body.flagged", f"{sorted(flagged)}, the aggregation gives {sorted(want_flagged)}"
            )
        if set(contributions) != set(participants):
            self.fail(AUDIT_FILE, ln, rnd, "body.contributions", "names other participants than the aggregation")
            return
        if source == "enclave receipt":
            released = rbody.get("contributions")
            if not isinstance(released, dict):
                self.fail(AUDIT_FILE, ln, rnd, "body.source", "the round's receipt releases no contributions")
            elif any(contributions[p] != float(released.get(p, 0.0)) for p in participants):
                self.fail(AUDIT_FILE, ln, rnd, "body.contributions", "differ from the enclave receipt's")
        elif source == "selection":
            if contributions != selection_shares(participants, selected):
                self.fail(AUDIT_FILE, ln, rnd, "body.contributions", "are not equal shares of the selected updates")
        elif source == "coordinator":
            if self.enclave is not None:
                self.fail(AUDIT_FILE, ln, rnd, "body.source", "enclave run, but the coordinator scored the updates")
            total = sum(contributions.values())
            if total != 0.0 and not math.isclose(total, 1.0, rel_tol=1e-9):
                self.fail(AUDIT_FILE, ln, rnd, "body.contributions", f"sum to {total:.12g}, not 1 or 0")
        else:
            self.fail(AUDIT_FILE, ln, rnd, "body.source", f"unknown source {source!r}")
        try:
            change = self.book.apply(
                rnd, participants, contributions, flagged & set(participants), pool, slash_fraction
            )
        except IncentiveError as exc:
            self.fail(AUDIT_FILE, ln, rnd, "body", str(exc))
            return
        for key, want in (
            ("reputation_ppm", change.reputation),
            ("reputation_deltas", change.reputation_deltas),
            ("rewards", change.rewards),
            ("slashed", change.slashed),
            ("stake", change.stakes),
        ):
            got = b.get(key)
            if not isinstance(got, dict) or {str(k): v for k, v in got.items()} != want:
                self.fail(
                    AUDIT_FILE, ln, rnd, f"body.{key}", f"recorded {got!r}, the contributions and policy give {want!r}"
                )
        self._suspensions(rnd, ln, participants, b.get("suspend_below", 0.0))
        self.checked["incentive_rounds"] += 1

    def _suspensions(self, rnd: int, ln: int, participants: list[str], threshold: object) -> None:
        """The round's recomputed reputations call for exactly the suspensions its status entries record."""
        if not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            self.fail(AUDIT_FILE, ln, rnd, "body.suspend_below", f"expected a number in [0, 1], got {threshold!r}")
            return
        assert self.book is not None
        due = {p for p in participants if p not in self._due and self.book.current(p) < threshold}
        self._due |= due
        logged = {p for p, r in self.suspensions.items() if r == rnd}
        if due != logged:
            self.fail(
                AUDIT_FILE,
                ln,
                rnd,
                "participant_status",
                f"the reputations suspend {sorted(due)} in this round; the log suspends {sorted(logged)}",
            )

    # ------------------------------------------------------------ 3. the chain
    def check_chain(self, facts: dict[int, dict[str, Any]]) -> None:
        from trustfed.ledger.backends import JsonRpcLedger, Web3Ledger, read_deployment

        ledger_dir = self.run_dir / LEDGER_DIR
        try:
            dep = read_deployment(ledger_dir)
        except TrustFedError as exc:
            self.fail(f"{LEDGER_DIR}/deployment.json", None, None, "file", str(exc))
            return
        if dep is None:
            self.fail(f"{LEDGER_DIR}/deployment.json", None, None, "file", "missing: nothing to check on chain")
            return
        ledger: Web3Ledger
        try:
            if self.rpc_url or dep.get("backend") == "jsonrpc":
                url = self.rpc_url or str(dep.get("rpc_url", ""))
                ledger = JsonRpcLedger(ledger_dir, url, deploy=False, read_only=True)
            else:
                from trustfed.ledger.backends import EmbeddedLedger

                ledger = EmbeddedLedger(ledger_dir, read_only=True)
        except TrustFedError as exc:
            self.fail(f"{LEDGER_DIR}/", None, None, "chain", f"cannot open the chain: {exc}")
            return
        try:
            self._compare_chain(ledger, facts)
        finally:
            ledger.close()

    def _compare_chain(self, ledger: Any, facts: dict[int, dict[str, Any]]) -> None:
        on_chain: dict[str, Identity] = {i.id: i for i in ledger.participants()}
        for pid, (fp, role) in self.identities.items():
            ident = on_chain.get(pid)
            if ident is None:
                self.fail(CHAIN, None, None, f"registry.{pid}", "declared in the log but not registered on chain")
            elif ident.fingerprint != fp:
                self.fail(
                    CHAIN, None, None, f"registry.{pid}.fingerprint", "on-chain fingerprint differs from the log's key"
                )
            elif ident.role.name.lower() != role:
                self.fail(
                    CHAIN, None, None, f"registry.{pid}.role", f"chain says {ident.role.name.lower()}, log says {role}"
                )
            elif ident.status.name.lower() != self.left.get(pid, ("active", 0))[0]:
                self.fail(
                    CHAIN,
                    None,
                    None,
                    f"registry.{pid}.status",
                    f"chain says {ident.status.name.lower()}, the log says {self.left.get(pid, ('active', 0))[0]}",
                )
        for pid in on_chain.keys() - self.identities.keys():
            self.fail(CHAIN, None, None, f"registry.{pid}", "registered on chain but absent from the log")
        book = self.book or IncentiveBook()
        for pid in sorted(self.identities):
            acct = ledger.account(pid)
            held = (book.reputation.get(pid, 0), book.balances.get(pid, 0), book.stakes.get(pid, 0))
            if (acct.reputation, acct.balance, acct.stake) != held:
                self.fail(
                    CHAIN,
                    None,
                    None,
                    f"incentives.{pid}",
                    f"chain holds reputation {acct.reputation}, balance {acct.balance} and stake {acct.stake}, the "
                    f"log gives {held[0]}, {held[1]} and {held[2]}",
                )
            self.checked["incentive_accounts"] += 1
        nxt = ledger.next_round()
        rounds = sorted(facts)
        hashes = {loc.entry.hash: loc for loc in self.entries}
        anchored_upto = -1
        for rnd in rounds:
            f = facts[rnd]
            rec: RoundCommitment | None = ledger.read_round(rnd)
            if rec is None:
                self.fail(
                    CHAIN, None, rnd, "round", f"in the log (up to line {f['last_line']}) but never committed on chain"
                )
                continue
            self.checked["chain_rounds"] += 1
            want = {
                "model_hash": f.get("model_hash", ""),
                "merkle_root": f.get("merkle_root", ZERO32) if rnd > 0 else ZERO32,
                "num_updates": len(f["leaves"]),
                "receipt_hash": f.get("receipt_hash", ZERO32) if rnd > 0 else ZERO32,
            }
            for name, value in want.items():
                if getattr(rec, name) != value:
                    self.fail(
                        CHAIN,
                        None,
                        rnd,
                        name,
                        f"chain has {str(getattr(rec, name))[:16]}…, the log and files give {str(value)[:16]}…",
                    )
            anchor = hashes.get(rec.log_head)
            if anchor is None:
                self.fail(
                    CHAIN,
                    None,
                    rnd,
                    "log_head",
                    f"anchored head {rec.log_head[:16]}… is no entry of the log: the log was rewritten after round {rnd}",
                )
            elif rec.log_head != f["last_hash"]:
                self.fail(
                    AUDIT_FILE,
                    anchor.line,
                    rnd,
                    "log_head",
                    f"chain anchors line {anchor.line}, but round {rnd} ends at line {f['last_line']}",
                )
            else:
                anchored_upto = max(anchored_upto, f["last_line"])
        for r in range(max(rounds, default=-1) + 1, nxt):
            self.fail(CHAIN, None, r, "round", "committed on chain but absent from the audit log")
        tail = [loc.line for loc in self.entries if loc.line > anchored_upto]
        if tail and anchored_upto >= 0:
            self.fail(
                AUDIT_FILE,
                tail[0],
                None,
                "log_head",
                f"lines {tail[0]}-{tail[-1]} come after the last head anchored on chain",
            )

    # ------------------------------------------------------------ 4. privacy spend
    def check_privacy(self, facts: dict[int, dict[str, Any]]) -> None:
        """Every party's recorded epsilon must be the total its recorded mechanisms give (recomputed
        with the same accountant over all its rounds so far) and must stay within its declared budget;
        a release the enclave made must match the ``privacy`` block of that round's signed receipt."""
        if not self.privacy:
            return
        from trustfed.privacy.report import summarize

        for loc in self.privacy:
            b, rnd = loc.entry.body, loc.entry.round
            if b.get("kind") != "aggregator" or b.get("released_in") != "enclave" or b.get("lost") is True:
                continue  # a lost release (made, then redone after a resume) has no receipt on record; it adds spend
            receipt: _Located | None = facts.get(rnd, {}).get("receipt")
            block = (receipt.entry.body.get("receipt") or {}).get("body", {}).get("privacy") if receipt else None
            if not isinstance(block, dict):
                self.fail(
                    AUDIT_FILE, loc.line, rnd, "body.released_in", "enclave release without a receipt privacy block"
                )
                continue
            for key in ("noise_multiplier", "sample_rate", "delta", "epsilon"):
                mine, theirs = b.get(key), block.get(key)
                same = isinstance(mine, int | float) and isinstance(theirs, int | float)
                if not same or not math.isclose(float(mine), float(theirs), rel_tol=1e-9, abs_tol=1e-12):  # type: ignore[arg-type]
                    self.fail(
                        AUDIT_FILE, loc.line, rnd, f"body.{key}", f"{mine!r} differs from the receipt's {theirs!r}"
                    )
            self.checked["privacy_receipts"] += 1

        seen: dict[str, list[_Located]] = defaultdict(list)
        for loc in self.privacy:
            seen[str(loc.entry.body.get("party", ""))].append(loc)
        for party, locs in sorted(seen.items()):
            for k in range(len(locs)):  # the running total at every recorded round, not only the last
                try:
                    (s,) = summarize([dict(x.entry.body) for x in locs[: k + 1]])
                except (TrustFedError, KeyError, TypeError, ValueError) as exc:
                    self.fail(AUDIT_FILE, locs[k].line, locs[k].entry.round, "body", f"malformed privacy spend: {exc}")
                    break
                if not s.epsilons:
                    continue
                if not s.verified and (s.kind == "aggregator" or s.epsilon < s.recomputed):
                    self.fail(
                        AUDIT_FILE,
                        locs[k].line,
                        locs[k].entry.round,
                        "body.epsilon",
                        f"{party} records epsilon {s.epsilon:.6g}, its recorded mechanisms give {s.recomputed:.6g}",
                    )
                elif not s.verified and k == len(locs) - 1:
                    # A participant counting more than the log shows is conservative, not a hidden release: it
                    # also counts updates that left it in rounds the log does not hold (one dropped when a
                    # standby coordinator took over, for example).
                    self.notes.append(
                        f"privacy: {party} counts epsilon {s.epsilon:.6g}, more than the {s.recomputed:.6g} of the "
                        "rounds in the log (it also counts rounds not recorded here)"
                    )
                if s.budget_epsilon is not None and s.recomputed > s.budget_epsilon * (1 + 1e-9):
                    self.fail(
                        AUDIT_FILE,
                        locs[k].line,
                        locs[k].entry.round,
                        "body.epsilon",
                        f"{party} spent epsilon {s.recomputed:.6g}, over its budget {s.budget_epsilon:g}",
                    )
            self.checked["privacy_parties"] += 1
        self.checked["privacy_entries"] += len(self.privacy)


def verify_run(run_dir: Path, rpc_url: str | None = None) -> AuditReport:
    v = _Verifier(run_dir, rpc_url)
    v.check_log()
    facts = v.check_rounds()
    v.check_incentives(facts)
    v.check_chain(facts)
    v.check_privacy(facts)
    v.check_metrics_file(facts)
    return AuditReport(not v.failures, v.failures, dict(v.checked), list(v.notes))
