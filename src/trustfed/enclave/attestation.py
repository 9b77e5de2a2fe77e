"""The AttestationBackend seam and the software-only ``simulated`` backend (the evidence envelope they
share is :mod:`trustfed.enclave.evidence`).

Enclave side: ``evidence(nonce, public_key) -> bytes``: a statement, rooted in the TEE, that code
with a given measurement holds ``public_key``, made for the verifier's ``nonce``.

Verifier side: ``verify(evidence, policy, nonce, now) -> Verdict`` (:class:`trustfed.primitives.verdict.Verdict`,
its claims what the evidence states). It fails closed: any missing,
malformed or unexpected value is a reason, and ``ok`` is true only when there are no reasons.

Evidence is a canonical-JSON envelope ``{"format", "backend", "public_key", "binding", ...}``; the
DCAP backends add the raw quote (whose report data must equal :func:`report_data` of the key and
the nonce), the simulated backend adds a self-signed statement labelled SIMULATED.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from trustfed.enclave.dcap import DcapBackend
from trustfed.enclave.errors import AttestationError, AttestationRefused
from trustfed.enclave.evidence import (
    EVIDENCE_FORMAT,
    common_checks,
    open_envelope,
    report_data,
)
from trustfed.enclave.keys import EnclavePublicKey
from trustfed.enclave.policy import BACKEND_NAMES, AttestationPolicy
from trustfed.primitives.canonical import canonical_json
from trustfed.primitives.verdict import Verdict

log = logging.getLogger("trustfed.enclave.attestation")

SIMULATED_LABEL = "SIMULATED"
MAX_CLOCK_SKEW_S = 60.0


def raise_if_refused(verdict: Verdict, where: str) -> None:
    """Raise :class:`AttestationRefused` with the verdict's reasons unless it is ok."""
    if not verdict.ok:
        raise AttestationRefused(where, verdict.reasons or ("no reason given (refused by default)",))


@runtime_checkable
class AttestationBackend(Protocol):
    """One TEE technology: produces evidence inside the enclave and verifies it outside."""

    name: str

    def evidence(self, nonce: bytes, public_key: bytes) -> bytes: ...

    def verify(self, evidence: bytes, policy: AttestationPolicy, nonce: bytes, now: float) -> Verdict: ...


class SimulatedBackend:
    """Software-only attestation for development and CI. It proves NOTHING about code identity.

    The "measurement" is SHA-256 of the enclave package's code and aggregation config, computed by
    the enclave process about itself; the evidence is signed by the enclave's own key (proof of
    possession only). Verifiers refuse it unless their policy sets ``allow_simulated_tee = true``
    and lists ``"simulated"`` among the allowed backends. Everything it emits says SIMULATED.
    """

    name = "simulated"

    def __init__(
        self,
        measurement: str | None = None,
        sign: Callable[[bytes], bytes] | None = None,
        clock: Callable[[], float] | None = None,
        binding: str = "sha512",
    ) -> None:
        self._measurement = measurement
        self._sign = sign
        self._clock = clock
        self._binding = binding

    def evidence(self, nonce: bytes, public_key: bytes) -> bytes:
        if self._measurement is None or self._sign is None or self._clock is None:
            raise AttestationError(
                "this SimulatedBackend was built for verifying only; build it with measurement, sign and clock "
                "to produce evidence"
            )
        body = {
            "format": EVIDENCE_FORMAT,
            "backend": self.name,
            "label": SIMULATED_LABEL,
            "public_key": public_key.hex(),
            "binding": self._binding,
            "measurement": self._measurement,
            "nonce": nonce.hex(),
            "issued_at": float(self._clock()),
            "report_data": report_data(public_key, nonce, self._binding).hex(),
        }
        sig = self._sign(canonical_json(body))
        log.info("[SIMULATED TEE] produced software-only attestation evidence (no hardware root of trust)")
        return canonical_json({**body, "signature": base64.b64encode(sig).decode()})

    def verify(self, evidence: bytes, policy: AttestationPolicy, nonce: bytes, now: float) -> Verdict:
        reasons: list[str] = []
        env = open_envelope(evidence, reasons)
        if env is None:
            return Verdict.of(reasons, {"backend": self.name, "simulated": True})
        common_checks(env, self.name, policy, nonce, reasons)
        if not policy.allow_simulated_tee:
            reasons.append(
                "evidence is SIMULATED (software only, no hardware root of trust) and this policy has "
                "allow_simulated_tee = false"
            )
        f = env.fields
        claims: dict[str, Any] = {
            "backend": self.name,
            "simulated": True,
            "label": SIMULATED_LABEL,
            "public_key": env.public_key.hex(),
            "key_id": EnclavePublicKey.from_bytes(env.public_key).key_id,
            "measurement": f.get("measurement"),
            "issued_at": f.get("issued_at"),
            "verified_at": now,
        }
        if f.get("label") != SIMULATED_LABEL:
            reasons.append("simulated evidence is not labelled SIMULATED")
        sig_b64 = f.get("signature")
        body = {k: v for k, v in f.items() if k != "signature"}
        try:
            sig = base64.b64decode(sig_b64, validate=True) if isinstance(sig_b64, str) else b""
        except ValueError:
            sig = b""
        if not EnclavePublicKey.from_bytes(env.public_key).verify(sig, canonical_json(body)):
            reasons.append("simulated evidence signature does not verify with the enclave key it names")
        if f.get("measurement") not in policy.expected_measurements:
            reasons.append(
                f"measurement {str(f.get('measurement'))[:16]}… is not one this policy expects "
                f"({', '.join(m[:16] + '…' for m in policy.expected_measurements) or 'none'})"
            )
        if f.get("nonce") != nonce.hex():
            reasons.append("evidence answers a different nonce than this verifier's (stale or replayed evidence)")
        expected_rd = report_data(
            env.public_key, nonce, env.binding if env.binding in ("sha512", "sha256") else "sha512"
        )
        if f.get("report_data") != expected_rd.hex():
            reasons.append("report data does not bind the enclave key and this verifier's nonce")
        issued = f.get("issued_at")
        if not isinstance(issued, int | float) or isinstance(issued, bool):
            reasons.append("simulated evidence has no issue time")
        elif now - issued > policy.max_evidence_age_s:
            reasons.append(
                f"evidence is {now - issued:.0f} s old, older than max_evidence_age_s = {policy.max_evidence_age_s:g}"
            )
        elif issued - now > MAX_CLOCK_SKEW_S:
            reasons.append(f"evidence is issued {issued - now:.0f} s in the future (clock skew)")
        return Verdict.of(reasons, claims)


def verifier_backend(name: str) -> AttestationBackend:
    """A verifier-side backend by name (DCAP backends import dcap_qvl lazily, when used)."""
    if name == "simulated":
        return SimulatedBackend()
    if name in ("sgx-dcap", "tdx-dcap"):
        return DcapBackend(name)
    raise AttestationError(f"unknown attestation backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")


def verify_evidence(evidence: bytes, policy: AttestationPolicy, nonce: bytes, now: float) -> Verdict:
    """Verify evidence with the backend it names, if the policy allows that backend at all."""
    reasons: list[str] = []
    env = open_envelope(evidence, reasons)
    if env is None:
        return Verdict.of(reasons, {})
    if env.backend not in BACKEND_NAMES:
        return Verdict.of([f"unknown attestation backend {env.backend!r}"], {"backend": env.backend})
    if env.backend not in policy.allowed_backends:
        extra = ""
        if env.backend == "simulated" and not policy.allow_simulated_tee:
            extra = " and allow_simulated_tee = false (evidence is SIMULATED, software only)"
        return Verdict.of(
            [
                f"backend {env.backend!r} is not allowed by this policy (allowed: {', '.join(policy.allowed_backends)}){extra}"
            ],
            {"backend": env.backend, "simulated": env.backend == "simulated"},
        )
    try:
        return verifier_backend(env.backend).verify(evidence, policy, nonce, now)
    except AttestationError as exc:
        return Verdict.of([str(exc)], {"backend": env.backend})
