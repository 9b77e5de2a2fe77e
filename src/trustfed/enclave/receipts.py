"""Aggregation receipts: what the enclave signs about each round, and how anyone checks it.

A receipt body (canonical JSON) binds {round, Merkle root of the input commitments, the input and
output model hashes, aggregator and strategy with their parameters, measurement, backend, enclave
key id}, and with central DP a ``privacy`` block describing the round's Gaussian release
(noise multiplier, clip norm, noise std, sampling rate, delta, accountant and epsilon). The
enclave signs it with its Ed25519 key. :func:`receipt_hash` is what the ledger commits
on chain; :func:`verify_receipt` is what ``trustfed audit verify`` and participants run.
Receipts from the simulated backend carry ``"simulated": true`` and ``"label": "SIMULATED"``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trustfed.enclave.attestation import SIMULATED_LABEL
from trustfed.enclave.errors import EnclaveError, ReceiptError
from trustfed.enclave.keys import EnclavePublicKey
from trustfed.primitives.canonical import canonical_json, parse_json_object
from trustfed.primitives.merkle import merkle_root
from trustfed.primitives.verdict import Verdict

RECEIPT_FORMAT = "trustfed-receipt-v1"
STATE_FORMAT = "trustfed-enclave-state-v1"
MAX_RECEIPT_BYTES = 1024 * 1024
HARDWARE_LABEL = "ATTESTED"


def commitments_root(commitments: Mapping[str, bytes]) -> str:
    """Merkle root (hex) over the commitments, ordered by participant id."""
    return merkle_root([commitments[pid] for pid in sorted(commitments)]).hex()


@dataclass(frozen=True)
class Receipt:
    body: dict[str, Any]
    signature: bytes
    enclave_public_key: bytes

    @property
    def round(self) -> int:
        return int(self.body["round"])

    @property
    def simulated(self) -> bool:
        return bool(self.body.get("simulated", True))

    def to_dict(self) -> dict[str, Any]:
        return {
            "body": self.body,
            "signature": base64.b64encode(self.signature).decode(),
            "enclave_public_key": self.enclave_public_key.hex(),
        }

    def to_json(self) -> bytes:
        """Canonical JSON of the signed receipt (body, signature, enclave public key)."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes) -> Receipt:
        try:
            raw = parse_json_object(data, "receipt", MAX_RECEIPT_BYTES)
            body, sig, pk = raw["body"], raw["signature"], raw["enclave_public_key"]
            if not isinstance(body, dict) or not isinstance(sig, str) or not isinstance(pk, str):
                raise ValueError("body must be an object, signature and enclave_public_key strings")
            return cls(body, base64.b64decode(sig, validate=True), bytes.fromhex(pk))
        except (KeyError, ValueError, binascii.Error) as exc:
            raise ReceiptError(f"receipt is malformed: {exc}") from None


def make_receipt_body(
    *,
    rnd: int,
    commitments: Mapping[str, bytes],
    rejected: Mapping[str, str],
    input_model_hash: str,
    output_model_hash: str,
    aggregator: Mapping[str, Any],
    strategy: Mapping[str, Any],
    measurement: str,
    backend: str,
    enclave_key_id: str,
    issued_at: float,
    privacy: Mapping[str, Any] | None = None,
    contributions: Mapping[str, float] | None = None,
    num_examples: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    simulated = backend == "simulated"
    body: dict[str, Any] = {
        "format": RECEIPT_FORMAT,
        "round": rnd,
        "participants": sorted(commitments),
        "commitments_root": commitments_root(commitments),
        "rejected": dict(sorted(rejected.items())),
        "input_model_hash": input_model_hash,
        "output_model_hash": output_model_hash,
        "aggregator": dict(aggregator),
        "strategy": dict(strategy),
        "measurement": measurement,
        "backend": backend,
        "simulated": simulated,
        "label": SIMULATED_LABEL if simulated else HARDWARE_LABEL,
        "enclave_key_id": enclave_key_id,
        "issued_at": issued_at,
    }
    if privacy is not None:
        body["privacy"] = dict(privacy)
    if contributions is not None:
        body["contributions"] = dict(sorted(contributions.items()))
    if num_examples is not None:  # each accepted update's declared count (FedAvg's weight), within max_examples
        body["num_examples"] = {k: int(v) for k, v in sorted(num_examples.items())}
    return body


def receipt_hash(receipt: Receipt) -> str:
    """SHA-256 (hex) of the canonical signed receipt: the value the ledger commits on chain."""
    return hashlib.sha256(receipt.to_json()).hexdigest()


def verify_receipt(
    receipt: Receipt,
    *,
    enclave_public_key: bytes | None = None,
    expected_measurements: Sequence[str] | None = None,
    commitments: Mapping[str, bytes] | None = None,
    output_model_hash: str | None = None,
    rnd: int | None = None,
    allow_simulated: bool = False,
    expected_hash: str | None = None,
    privacy: Mapping[str, Any] | None = None,
) -> Verdict:
    """Check a receipt's signature and, where given, that it matches what the caller knows.

    ``enclave_public_key`` should be the key the caller attested (otherwise only the receipt's own key
    is used, which proves integrity but not origin). Simulated receipts are refused unless
    ``allow_simulated``. ``privacy``: values the receipt's central-DP ``privacy`` block must carry
    (a receipt without one is refused). Returns a Verdict with every mismatch as a reason.
    """
    reasons: list[str] = []
    b = receipt.body
    claims = {k: b.get(k) for k in ("round", "backend", "simulated", "measurement", "enclave_key_id", "label")}
    if b.get("format") != RECEIPT_FORMAT:
        reasons.append(f"receipt format is {b.get('format')!r}, expected {RECEIPT_FORMAT!r}")
    try:
        pk = EnclavePublicKey.from_bytes(receipt.enclave_public_key)
    except EnclaveError as exc:
        return Verdict.of([*reasons, f"receipt's enclave key is malformed: {exc}"], claims)
    try:
        body_bytes = canonical_json(b)
    except ValueError as exc:
        return Verdict.of([*reasons, f"receipt body is not canonical JSON: {exc}"], claims)
    if not pk.verify(receipt.signature, body_bytes):
        reasons.append("receipt signature does not verify with the enclave key (receipt altered or forged)")
    if enclave_public_key is not None and receipt.enclave_public_key != enclave_public_key:
        reasons.append("receipt is signed by a different enclave key than the one attested")
    if b.get("enclave_key_id") != pk.key_id:
        reasons.append("receipt's enclave_key_id does not match its signing key")
    simulated = b.get("backend") == "simulated"
    if bool(b.get("simulated")) != simulated or b.get("label") != (SIMULATED_LABEL if simulated else HARDWARE_LABEL):
        reasons.append("receipt's simulated flag / label does not match its backend")
    if simulated and not allow_simulated:
        reasons.append("receipt comes from the SIMULATED backend (software only) and simulated TEEs are not allowed")
    if expected_measurements is not None and b.get("measurement") not in expected_measurements:
        reasons.append(f"receipt measurement {str(b.get('measurement'))[:16]}… is not an expected measurement")
    if commitments is not None:
        if b.get("commitments_root") != commitments_root(commitments):
            reasons.append("Merkle root of input commitments does not match the receipt")
        if b.get("participants") != sorted(commitments):
            reasons.append("receipt's participants differ from the committed inputs")
    if output_model_hash is not None and b.get("output_model_hash") != output_model_hash:
        reasons.append("receipt's output model hash differs from the model the coordinator published")
    if rnd is not None and b.get("round") != rnd:
        reasons.append(f"receipt is for round {b.get('round')}, expected round {rnd}")
    if expected_hash is not None and receipt_hash(receipt) != expected_hash:
        reasons.append("receipt hash differs from the hash committed on the ledger")
    if privacy is not None:
        reasons += _privacy_mismatches(b.get("privacy"), privacy)
    return Verdict.of(reasons, claims)


def _privacy_mismatches(block: object, expected: Mapping[str, Any]) -> list[str]:
    if not isinstance(block, dict):
        return ["receipt states no central-DP release (no privacy block), but the federation runs central DP"]
    out = []
    for key, want in expected.items():
        got = block.get(key)
        if isinstance(got, int | float) and isinstance(want, int | float) and not isinstance(got, bool):
            same = not isinstance(want, bool) and math.isclose(got, want, rel_tol=1e-12, abs_tol=0.0)
        else:
            same = got == want
        if not same:
            out.append(f"receipt's privacy.{key} is {got!r}, expected {want!r}")
    return out


def verify_state(statement: Receipt, *, enclave_public_key: bytes, nonce: bytes) -> dict[str, Any]:
    """The body of an enclave's signed state statement (:meth:`trustfed.enclave.core.Enclave.state`),
    once its format, its signature by ``enclave_public_key`` (the key the caller attested) and its
    echo of the caller's fresh ``nonce`` hold. Raises ReceiptError naming what does not."""
    b = statement.body
    reasons: list[str] = []
    if b.get("format") != STATE_FORMAT:
        reasons.append(f"format is {b.get('format')!r}, expected {STATE_FORMAT!r}")
    if statement.enclave_public_key != enclave_public_key:
        reasons.append("it is signed by a different enclave key than the one attested")
    else:
        try:
            ok = EnclavePublicKey.from_bytes(enclave_public_key).verify(statement.signature, canonical_json(b))
        except (EnclaveError, ValueError) as exc:
            ok = False
            reasons.append(f"it cannot be checked: {exc}")
        if not ok:
            reasons.append("its signature does not verify with the attested enclave key")
    if b.get("nonce") != nonce.hex():
        reasons.append("it does not answer this request's nonce (a replayed statement)")
    if not isinstance(b.get("last_round"), int) or b["last_round"] < 0:
        reasons.append(f"last_round is {b.get('last_round')!r}")
    if reasons:
        raise ReceiptError(f"the enclave's state statement is refused: {'; '.join(reasons)}")
    return b
