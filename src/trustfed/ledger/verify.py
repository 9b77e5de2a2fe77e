"""The independent verifier behind ``trustfed audit verify RUN_DIR``.

It trusts nothing the coordinator says about itself: it recomputes the audit log's hash chain and
every signature (keys come from the log's identity entries, whose fingerprints must match the
on-chain registry), every commitment and Merkle root, every checkpoint's hash, and compares all of
it with the on-chain round records. Every failure is reported with where it is: file and line,
round and field. The run verifies only if no failure was found.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustfed.errors import TrustFedError
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
from trustfed.ledger.kinds import (
    APP_KIND,
    ATTESTATION_KIND,
    BEHAVIOUR_KIND,
    INCENTIVES_KIND,
    PRIVACY_KIND,
    RECEIPT_KIND,
    REFUSAL_KIND,
    STAKE_KIND,
    STATUS_KIND,
)
from trustfed.ledger.metrics_check import METRICS_FILE, metrics_problems
from trustfed.ledger.participant import COMMITMENT_KIND
from trustfed.ledger.recorder import AUDIT_FILE, COORDINATOR_ID
from trustfed.ledger.verify_base import CHAIN, AuditReport, Failure, Located, VerifierState
from trustfed.ledger.verify_chain import ChainChecks
from trustfed.ledger.verify_enclave import EnclaveChecks
from trustfed.ledger.verify_entries import EntryChecks
from trustfed.ledger.verify_incentives import IncentiveChecks
from trustfed.ledger.verify_privacy import PrivacyChecks
from trustfed.ledger.verify_refusals import RefusalChecks
from trustfed.primitives.merkle import merkle_root


class _Verifier(EnclaveChecks, EntryChecks, IncentiveChecks, ChainChecks, PrivacyChecks, RefusalChecks, VerifierState):
    # ------------------------------------------------------------ 1. the log's chain and signatures
    def check_log(self, upto: str | None = None) -> None:
        """The log's hash chain and signatures; ``upto``: stop after the entry with that hash (an anchored
        head), leaving what comes after it unread."""
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
            self.entries.append(Located(lineno, e))
            prev_hash, expect_seq = e.hash, e.seq + 1
            if upto is not None and e.hash == upto:
                return

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
        by_round: dict[int, list[Located]] = defaultdict(list)
        for loc in self.entries:
            by_round[loc.entry.round].append(loc)
        facts: dict[int, dict[str, Any]] = {}
        prev_model: str | None = None
        for rnd in sorted(by_round):
            locs = by_round[rnd]
            f: dict[str, Any] = {"last_hash": locs[-1].entry.hash, "last_line": locs[-1].line, "leaves": []}
            plan: Located | None = None
            for loc in locs:
                e, ln = loc.entry, loc.line
                if e.kind == "round_plan":
                    plan = f["plan"] = loc
                    for pid in e.body.get("participants", []):
                        if pid in self.held_out:
                            self.fail(
                                AUDIT_FILE,
                                ln,
                                rnd,
                                "body.participants",
                                f"selects {pid!r}, suspended by the history guard in round {self.held_out[pid]}",
                            )
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
                    self._declared_counts(loc, f)
                    self._compression(loc, f)
                    self._federated_evaluation(loc, f)
                elif e.kind == ATTESTATION_KIND:
                    self._attestation(loc)
                elif e.kind == APP_KIND:
                    self._app(loc)
                elif e.kind == REFUSAL_KIND:
                    self._refusal(loc, plan)
                elif e.kind == PRIVACY_KIND:
                    self.privacy.append(loc)
                elif e.kind == STATUS_KIND:
                    self._status(loc)
                elif e.kind == BEHAVIOUR_KIND:
                    self._behaviour(loc, plan, f)
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

    # ------------------------------------------------------------ metrics.json
    def check_metrics_file(self, facts: dict[int, dict[str, Any]]) -> None:
        """The figures metrics.json reports must be the signed ones (a run without the file is fine)."""
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


def verify_run(run_dir: Path, rpc_url: str | None = None, participant_records: Sequence[Path] = ()) -> AuditReport:
    """Verify a run folder; ``participant_records``: refusal files (or folders of them) the participants
    kept, each of which the log must hold and the round's plan must agree with."""
    v = _Verifier(run_dir, rpc_url)
    v.check_log()
    facts = v.check_rounds()
    v.check_participant_records(list(participant_records), facts)
    v.check_incentives(facts)
    v.check_chain(facts)
    v.check_privacy(facts)
    v.check_metrics_file(facts)
    return AuditReport(not v.failures, v.failures, dict(v.checked), list(v.notes))


def verify_resume_point(run_dir: Path, ledger: Any, last: int) -> AuditReport:
    """What a coordinator resuming after round ``last`` builds on, checked before it changes anything:
    the log up to the head round ``last`` anchored (hash chain, signatures, every round's commitments,
    Merkle root, checkpoint files, incentives and privacy entries) and the chain's round records against
    it. Entries after that head (a round being recorded when the coordinator stopped) are not read: the
    resume sets them aside. Registry statuses and incentive accounts are not compared: a coordinator
    that stopped between a round's commitment and those transactions leaves them behind, and the
    resume sends them; ``audit verify`` checks them on the finished run."""
    v = _Verifier(run_dir, None)
    rec = ledger.read_round(last)
    if rec is None:
        v.fail(CHAIN, None, last, "round", f"the chain says round {last} is its last but holds no record of it")
    else:
        v.check_log(upto=rec.log_head)
        facts = v.check_rounds()
        v.check_incentives(facts)
        v.compare_rounds(ledger, facts)
        v.check_privacy(facts)
    return AuditReport(not v.failures, v.failures, dict(v.checked), list(v.notes))


@dataclass(frozen=True)
class SignedFigures:
    """metrics.json against the signed log, for a reader that shows a run's figures (the dashboard):
    ``aggregations`` are the bodies of the signed aggregation entries by round (empty when the log does
    not verify), ``log_failures`` why the log did not verify, ``problems`` what metrics.json reports that
    those entries do not back (:func:`~trustfed.ledger.metrics_check.metrics_problems`)."""

    aggregations: dict[int, Mapping[str, Any]]
    log_failures: list[Failure]
    problems: list[tuple[int | None, str, str]]


def signed_figures(run_dir: Path, metrics: Mapping[str, Any] | None) -> SignedFigures:
    """The log's hash chain and signatures checked as ``audit verify`` checks them, then ``metrics``
    (the parsed metrics.json, or None) checked against its signed aggregation entries."""
    v = _Verifier(run_dir, None)
    v.check_log()
    if v.failures:
        return SignedFigures({}, list(v.failures), [])
    aggregations = {loc.entry.round: loc.entry.body for loc in v.entries if loc.entry.kind == "aggregation"}
    problems = metrics_problems(metrics, aggregations) if metrics is not None else []
    return SignedFigures(aggregations, [], problems)
