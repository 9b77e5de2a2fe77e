"""The enclave in a recorded run: the coordinator's own attestation of it and its signed receipts,
as coordinator-signed audit entries anchored with each round."""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustfed.core.rounds import RoundRecord
from trustfed.core.strategy import RoundPlan, RoundResult, Update
from trustfed.enclave.attestation import raise_if_refused, verify_evidence
from trustfed.enclave.core import EnclaveClient
from trustfed.enclave.policy import AttestationPolicy
from trustfed.enclave.receipts import receipt_hash, verify_state
from trustfed.enclave.strategy import EnclaveStrategy
from trustfed.errors import CheckpointError
from trustfed.ledger.audit import parsed_entries
from trustfed.ledger.kinds import ATTESTATION_KIND, RECEIPT_KIND
from trustfed.ledger.recorder import Attachment
from trustfed.ledger.records import LedgerError

log = logging.getLogger("trustfed.coordinator.recorders")


@dataclass(frozen=True)
class EnclaveAttestation:
    """The coordinator's own attestation of the enclave: recorded so an auditor can re-verify it."""

    evidence: bytes
    nonce: bytes
    verified_at: float
    claims: Mapping[str, Any]


def attest_enclave(client: EnclaveClient, policy: AttestationPolicy, where: str = "coordinator") -> EnclaveAttestation:
    """Challenge ``client`` with a fresh nonce and verify the evidence against ``policy`` (raises if refused)."""
    nonce = os.urandom(32)
    now = time.time()
    evidence = client.evidence(nonce)
    verdict = verify_evidence(evidence, policy, nonce, now)
    raise_if_refused(verdict, where)
    return EnclaveAttestation(evidence, nonce, now, dict(verdict.claims))


class EnclaveRecord:
    """The enclave's attestation (before round 1) and every round's signed receipt, for the log."""

    def __init__(self, strategy: EnclaveStrategy, attestation: EnclaveAttestation) -> None:
        self.strategy = strategy
        self.attestation = attestation

    def genesis(self) -> Sequence[Attachment]:
        a = self.attestation
        simulated = bool(a.claims.get("simulated"))
        body = {
            "backend": str(a.claims.get("backend", "")),
            "simulated": simulated,
            "label": "SIMULATED" if simulated else "ATTESTED",
            "public_key": str(a.claims.get("public_key", "")),
            "measurement": str(a.claims.get("measurement", "")),
            "nonce": a.nonce.hex(),
            "verified_at": a.verified_at,
            "evidence": base64.b64encode(a.evidence).decode(),
        }
        return [Attachment(ATTESTATION_KIND, body)]

    def for_round(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> Sequence[Attachment]:
        r = self.strategy.last_receipt
        if r is None or r.round != plan.round:
            raise LedgerError(f"round {plan.round}: the enclave returned no receipt for this round")
        if r.enclave_public_key.hex() != self.attestation.claims.get("public_key"):
            raise LedgerError(
                f"round {plan.round}: the receipt is signed by an enclave key that was not attested; the enclave "
                "restarted or was replaced: restart the federation so that it is attested again"
            )
        body = {"label": r.body.get("label"), "receipt": r.to_dict()}
        return [Attachment(RECEIPT_KIND, body, receipt_hash=receipt_hash(r))]

    def check_resume(self, last: int, audit_path: Path | None) -> dict[str, Any] | None:
        """Before a resumed run goes on through the enclave, from round ``last``: the enclave must be the
        one this run attested (the key in the log's attestation entry; keys never leave an enclave, so
        the same process, with its privacy accountant and adaptive clip norm), at round ``last``, or at
        ``last + 1`` when the coordinator stopped after the enclave's output of that round and before
        recording it. That round is then aggregated again (``redo``); its first release stays counted
        in the enclave's accountant, and is returned (its receipt privacy block, with central DP) so
        the privacy record counts it too. With central DP the accountant must hold the releases the
        round-``last`` receipt on record counts (plus that lost one). The enclave answers with a
        statement signed by its attested key over a fresh nonce; unrecorded runs (no audit log) check
        the round only. Then the coordinator takes the clip norm the enclave applies next."""
        attested = str(self.attestation.claims.get("public_key", ""))
        logged: str | None = None
        recorded: Any = None
        if audit_path is not None:
            for e in parsed_entries(audit_path):
                if e.kind == ATTESTATION_KIND:
                    logged = str(e.body.get("public_key", ""))
                elif e.kind == RECEIPT_KIND and e.round == last:
                    recorded = (e.body.get("receipt") or {}).get("body", {})
            if logged is None:
                raise CheckpointError(f"cannot resume: {audit_path} holds no enclave attestation")
            if logged != attested:
                raise CheckpointError(
                    "cannot resume through the enclave: it is not the one this run attested (its key "
                    f"{attested[:16]}… differs from the logged {logged[:16]}…): it restarted or was replaced, and "
                    "a new enclave's privacy accountant would start from nothing; start a new run"
                )
        nonce = os.urandom(32)
        state = verify_state(
            self.strategy.enclave.state(nonce), enclave_public_key=bytes.fromhex(attested), nonce=nonce
        )
        done = int(state["last_round"])
        if not last <= done <= last + 1:
            raise CheckpointError(
                f"cannot resume after round {last}: the enclave's last round is {done}, so it is not the enclave "
                "that aggregated this run's rounds (a restarted enclave starts from nothing); start a new run"
            )
        lost = done == last + 1
        if lost:
            self.strategy.redo_round = done
            log.warning(
                "the enclave aggregated round %d, which the run does not record: the round runs again (redo) and "
                "its first release stays counted",
                done,
            )
        if self.strategy.central_dp is None:
            return None
        privacy = state.get("privacy")
        if not isinstance(privacy, dict):
            raise CheckpointError("cannot resume: the enclave runs without central DP, the federation with it")
        release = privacy.get("last_release")
        extra = lost and isinstance(release, dict) and release.get("round") == done
        if audit_path is not None:
            want = (recorded or {}).get("privacy", {}).get("rounds_accounted")
            have = privacy.get("rounds_accounted")
            if not isinstance(want, int) or have != want + int(extra):
                raise CheckpointError(
                    f"cannot resume: the enclave's accountant holds {have!r} release(s); the round-{last} receipt "
                    f"on record counts {want!r}" + (f" and the enclave released round {done} since" if extra else "")
                )
        self.strategy.resume_clip_norm(float(privacy["clip_norm"]))
        log.warning(
            "resuming through the same enclave (key %s…): last round %d, %s release(s) accounted, epsilon %s",
            attested[:16],
            done,
            privacy.get("rounds_accounted"),
            privacy.get("epsilon"),
        )
        return dict(release) if extra and isinstance(release, dict) else None

    def receipt_json(self, rnd: int) -> bytes | None:
        """The signed receipt of round ``rnd`` (canonical JSON), for participants."""
        for r in reversed(self.strategy.receipts):
            if r.round == rnd:
                return r.to_json()
        return None

    @property
    def simulated(self) -> bool:
        return bool(self.attestation.claims.get("simulated"))

    def describe(self) -> dict[str, Any]:
        """For metrics.json and the demo banner: the enclave is labelled SIMULATED when it is."""
        return {
            "label": "SIMULATED" if self.simulated else "ATTESTED",
            "backend": str(self.attestation.claims.get("backend", "")),
            "measurement": str(self.attestation.claims.get("measurement", "")),
            "public_key": str(self.attestation.claims.get("public_key", "")),
            "receipts": len(self.strategy.receipts),
        }
