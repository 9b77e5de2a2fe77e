"""The evidence envelope every attestation backend shares.

Evidence is a canonical-JSON envelope ``{"format", "backend", "public_key", "binding", ...}``;
:func:`report_data` binds the enclave's public key and the verifier's nonce, and
:func:`common_checks` are the checks every backend's verifier makes.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from trustfed.enclave.errors import AttestationError
from trustfed.enclave.keys import EnclavePublicKey
from trustfed.enclave.policy import AttestationPolicy
from trustfed.primitives.canonical import canonical_json, parse_json_object

EVIDENCE_FORMAT = "trustfed-evidence-v1"
MAX_EVIDENCE_BYTES = 256 * 1024
MIN_NONCE_BYTES = 16
_BINDING_DOMAIN = b"trustfed-attestation-v1\0"


def report_data(public_key: bytes, nonce: bytes, how: str = "sha512") -> bytes:
    """The 64 bytes of report data that bind ``public_key`` and ``nonce`` (length-prefixed)."""
    msg = _BINDING_DOMAIN + struct.pack(">I", len(public_key)) + public_key + struct.pack(">I", len(nonce)) + nonce
    if how == "sha512":
        return hashlib.sha512(msg).digest()
    if how == "sha256":
        return hashlib.sha256(msg).digest() + bytes(32)
    raise AttestationError(f"unknown report data binding {how!r}; use 'sha512' or 'sha256'")


def envelope(backend: str, public_key: bytes, binding: str, **fields: Any) -> bytes:
    return canonical_json(
        {"format": EVIDENCE_FORMAT, "backend": backend, "public_key": public_key.hex(), "binding": binding, **fields}
    )


@dataclass(frozen=True)
class Envelope:
    backend: str
    public_key: bytes
    binding: str
    fields: dict[str, Any]


def open_envelope(evidence: bytes, reasons: list[str]) -> Envelope | None:
    """Parse the evidence envelope; on any problem append a reason and return None."""
    try:
        raw = parse_json_object(evidence, "attestation evidence", MAX_EVIDENCE_BYTES)
    except ValueError as exc:
        reasons.append(str(exc))
        return None
    if raw.get("format") != EVIDENCE_FORMAT:
        reasons.append(f"evidence format is {raw.get('format')!r}, expected {EVIDENCE_FORMAT!r}")
        return None
    backend, pk_hex, binding = raw.get("backend"), raw.get("public_key"), raw.get("binding")
    if not isinstance(backend, str) or not isinstance(pk_hex, str) or not isinstance(binding, str):
        reasons.append("evidence lacks backend, public_key or binding")
        return None
    try:
        pk = bytes.fromhex(pk_hex)
        EnclavePublicKey.from_bytes(pk)
    except ValueError as exc:
        reasons.append(f"evidence public key is malformed: {exc}")
        return None
    return Envelope(backend, pk, binding, raw)


def common_checks(env: Envelope, name: str, policy: AttestationPolicy, nonce: bytes, reasons: list[str]) -> None:
    """Checks every backend makes: backend allowed by the policy, binding, nonce shape."""
    if env.backend != name:
        reasons.append(f"evidence is from backend {env.backend!r}, but the {name!r} verifier was used")
    if env.backend not in policy.allowed_backends:
        reasons.append(
            f"backend {env.backend!r} is not allowed by this policy (allowed: {', '.join(policy.allowed_backends)})"
        )
    if env.binding != policy.report_data_hash:
        reasons.append(f"evidence binds with {env.binding!r}, policy requires {policy.report_data_hash!r}")
    if len(nonce) < MIN_NONCE_BYTES:
        reasons.append(f"verifier nonce is {len(nonce)} bytes; use at least {MIN_NONCE_BYTES} random bytes")
    if not policy.expected_measurements:
        reasons.append("policy lists no expected measurement, so no enclave can be trusted")
