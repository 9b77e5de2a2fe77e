"""The AttestationBackend seam with the software-only simulated backend: fail closed, fresh nonces."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustfed.enclave.attestation import SimulatedBackend, raise_if_refused, verifier_backend, verify_evidence
from trustfed.enclave.errors import AttestationError, AttestationRefused
from trustfed.enclave.evidence import report_data
from trustfed.enclave.keys import EnclaveKeyPair
from trustfed.enclave.policy import AttestationPolicy
from trustfed.primitives.verdict import Verdict

MEAS = "11" * 32
NOW = 1_750_000_000.0


def make(clock: float = NOW, measurement: str = MEAS) -> tuple[EnclaveKeyPair, SimulatedBackend]:
    keys = EnclaveKeyPair()
    return keys, SimulatedBackend(measurement, keys.sign, lambda: clock)


def allowing(**over: object) -> AttestationPolicy:
    base: dict[str, object] = {
        "allowed_backends": ["simulated"],
        "allow_simulated_tee": True,
        "expected_measurements": [MEAS],
    }
    base.update(over)
    return AttestationPolicy.model_validate(base)


def test_simulated_evidence_verifies_with_allowing_policy() -> None:
    keys, be = make()
    nonce = os.urandom(32)
    v = verify_evidence(be.evidence(nonce, keys.public.to_bytes()), allowing(), nonce, NOW + 1)
    assert v.ok, v.reasons
    assert v.claims["simulated"] is True and v.claims["label"] == "SIMULATED"
    assert v.claims["key_id"] == keys.key_id and v.claims["measurement"] == MEAS


def test_simulated_refused_when_not_allowed() -> None:
    keys, be = make()
    nonce = os.urandom(32)
    ev = be.evidence(nonce, keys.public.to_bytes())
    # default policy: hardware backends only
    v = verify_evidence(ev, AttestationPolicy(expected_measurements=[MEAS]), nonce, NOW)
    assert not v.ok and "allow_simulated_tee = false" in v.reasons[0] and "SIMULATED" in v.reasons[0]
    # backend listed but allow_simulated_tee false: still refused, by the backend itself
    v2 = SimulatedBackend().verify(ev, allowing(allow_simulated_tee=False), nonce, NOW)
    assert not v2.ok and any("allow_simulated_tee = false" in r for r in v2.reasons)
    with pytest.raises(AttestationRefused, match="SIMULATED"):
        raise_if_refused(v2, "participant p000")


def test_stale_nonce_refused() -> None:
    keys, be = make()
    old_nonce, new_nonce = os.urandom(32), os.urandom(32)
    ev = be.evidence(old_nonce, keys.public.to_bytes())
    v = verify_evidence(ev, allowing(), new_nonce, NOW)
    assert not v.ok
    assert any("different nonce" in r for r in v.reasons)
    assert any("does not bind" in r for r in v.reasons)


def test_old_evidence_refused() -> None:
    keys, be = make(clock=NOW - 3600)
    nonce = os.urandom(32)
    v = verify_evidence(be.evidence(nonce, keys.public.to_bytes()), allowing(max_evidence_age_s=300), nonce, NOW)
    assert not v.ok and any("older than max_evidence_age_s" in r for r in v.reasons)


def test_unexpected_measurement_refused() -> None:
    keys, be = make(measurement="22" * 32)
    nonce = os.urandom(32)
    v = verify_evidence(be.evidence(nonce, keys.public.to_bytes()), allowing(), nonce, NOW)
    assert not v.ok and any("not one this policy expects" in r for r in v.reasons)


def test_policy_without_measurements_trusts_nothing() -> None:
    keys, be = make()
    nonce = os.urandom(32)
    v = verify_evidence(be.evidence(nonce, keys.public.to_bytes()), allowing(expected_measurements=[]), nonce, NOW)
    assert not v.ok and any("no expected measurement" in r for r in v.reasons)


def test_tampered_evidence_refused() -> None:
    keys, be = make(measurement="22" * 32)
    nonce = os.urandom(32)
    raw = json.loads(be.evidence(nonce, keys.public.to_bytes()))
    raw["measurement"] = MEAS  # claim the expected measurement without re-signing
    v = verify_evidence(json.dumps(raw).encode(), allowing(), nonce, NOW)
    assert not v.ok and any("signature does not verify" in r for r in v.reasons)


def test_evidence_for_another_key_refused() -> None:
    keys, be = make()
    other = EnclaveKeyPair()
    nonce = os.urandom(32)
    raw = json.loads(be.evidence(nonce, keys.public.to_bytes()))
    raw["public_key"] = other.public.to_bytes().hex()  # swap in a key the enclave does not hold
    v = verify_evidence(json.dumps(raw).encode(), allowing(), nonce, NOW)
    assert not v.ok and any("signature does not verify" in r for r in v.reasons)


def test_short_nonce_refused() -> None:
    keys, be = make()
    v = verify_evidence(be.evidence(b"abc", keys.public.to_bytes()), allowing(), b"abc", NOW)
    assert not v.ok and any("at least 16" in r for r in v.reasons)


def test_report_data_binding_shapes() -> None:
    pk, n = b"k" * 69, b"n" * 32
    a, b = report_data(pk, n, "sha512"), report_data(pk, n, "sha256")
    assert len(a) == len(b) == 64 and a != b and b[32:] == bytes(32)
    assert report_data(pk, n) != report_data(pk, b"m" * 32)
    assert report_data(pk + b"x", n[1:]) != report_data(pk, n)  # length-prefixed: no ambiguity
    with pytest.raises(AttestationError):
        report_data(pk, n, "md5")


def test_unknown_backend_name() -> None:
    with pytest.raises(AttestationError, match="unknown attestation backend"):
        verifier_backend("sev-snp")


def test_verifier_only_backend_cannot_make_evidence() -> None:
    with pytest.raises(AttestationError, match="verifying only"):
        SimulatedBackend().evidence(os.urandom(32), EnclaveKeyPair().public.to_bytes())


def test_policy_rejects_bad_hex() -> None:
    with pytest.raises(ValueError, match="not hexadecimal"):
        AttestationPolicy(expected_measurements=["zz" * 32])
    with pytest.raises(ValueError, match="unknown TCB status"):
        AttestationPolicy(allowed_tcb_statuses=["Fine"])


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_verify_and_never_raise(data: bytes) -> None:
    v = verify_evidence(data, allowing(), b"n" * 32, NOW)
    assert isinstance(v, Verdict) and not v.ok and v.reasons


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(["format", "backend", "public_key", "binding", "nonce", "label"]), st.text()))
def test_arbitrary_envelopes_never_verify(fields: dict[str, str]) -> None:
    v = verify_evidence(json.dumps(fields).encode(), allowing(), b"n" * 32, NOW)
    assert not v.ok and v.reasons
