"""The audit verifier's enclave checks: the coordinator's attestation of the enclave and each round's
enclave-signed receipt."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from trustfed.enclave.attestation import SIMULATED_LABEL, verify_evidence
from trustfed.enclave.errors import EnclaveError
from trustfed.enclave.policy import AttestationPolicy
from trustfed.enclave.receipts import HARDWARE_LABEL, Receipt, receipt_hash, verify_receipt
from trustfed.ledger.recorder import AUDIT_FILE
from trustfed.ledger.records import ZERO32
from trustfed.ledger.verify_base import AttestedEnclave, Located, VerifierState
from trustfed.primitives.canonical import canonical_json


class EnclaveChecks(VerifierState):
    # ------------------------------------------------------------ enclave attestation and receipts
    def _attestation(self, loc: Located) -> None:
        """Re-verify the enclave evidence the coordinator recorded, as of when it verified it."""
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
        self.enclave = AttestedEnclave(public_key, measurement, simulated)
        if simulated:
            self.notes.append(
                f"enclave: SIMULATED backend (software only, no hardware root of trust), measurement {measurement[:16]}…"
            )
        else:
            self.notes.append(f"enclave: {backend} attested, measurement {measurement[:16]}…")

    def _receipt(self, rnd: int, f: dict[str, Any]) -> None:
        """The round's enclave receipt: signed by the attested key, binding this round's commitments
        and output model; its hash is the one the aggregation entry and the chain record."""
        loc: Located | None = f.get("receipt")
        agg: Located | None = f.get("aggregation")
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
        # the enclave aggregates the committed updates it did not reject, and may reject only committed ones
        committed: dict[str, bytes] = f.get("commitments", {})
        rejected = receipt.body.get("rejected", {})
        stray = sorted(set(rejected) - set(committed)) if isinstance(rejected, dict) else ["(malformed)"]
        if stray:
            self.fail(AUDIT_FILE, ln, rnd, "body.receipt", f"rejects {stray}, who committed no update this round")
        verdict = verify_receipt(
            receipt,
            enclave_public_key=self.enclave.public_key,
            expected_measurements=[self.enclave.measurement],
            commitments={p: c for p, c in committed.items() if p not in rejected},
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
