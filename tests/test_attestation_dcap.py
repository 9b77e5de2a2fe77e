"""DCAP backends against real Intel-signed SGX / TDX quotes (tests/fixtures/attestation, MIT, dcap-qvl).

The quotes verify only inside their collateral's window, so every check passes the verification time
in: 2025-06-25 00:00 UTC. Altered copies of the quotes (one bit flipped in the signed body) must fail.
"""

from __future__ import annotations

import calendar
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("dcap_qvl", reason="dcap-qvl (the 'tee' extra) is not installed")

from trustfed.enclave.attestation import verify_evidence
from trustfed.enclave.dcap import DcapBackend, GramineQuoteProvider, TdxConfigfsQuoteProvider, fetch_collateral
from trustfed.enclave.errors import AttestationError
from trustfed.enclave.evidence import report_data
from trustfed.enclave.keys import EnclaveKeyPair
from trustfed.enclave.policy import AttestationPolicy

FIX = Path(__file__).parent / "fixtures" / "attestation"
PINNED = float(calendar.timegm(time.strptime("2025-06-25", "%Y-%m-%d")))
SGX_MR_ENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
SGX_MR_SIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
TDX_MR_TD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"

CASES = {
    "sgx": ("sgx-dcap", "sgx_quote", SGX_MR_ENCLAVE, "ConfigurationAndSWHardeningNeeded"),
    "tdx": ("tdx-dcap", "tdx_quote", TDX_MR_TD, "UpToDate"),
}


def policy_for(kind: str, **over: object) -> AttestationPolicy:
    backend, quote, mr, status = CASES[kind]
    base: dict[str, object] = {
        "allowed_backends": [backend],
        "expected_measurements": [mr],
        "expected_signers": [SGX_MR_SIGNER] if kind == "sgx" else [],
        "allowed_tcb_statuses": sorted({"UpToDate", status}),
        "collateral_file": FIX / f"{quote}_collateral.json",
    }
    base.update(over)
    return AttestationPolicy.model_validate(base)


def quote_of(kind: str) -> bytes:
    return (FIX / CASES[kind][1]).read_bytes()


@pytest.mark.parametrize("kind", ["sgx", "tdx"])
def test_shipped_quote_passes_at_pinned_time(kind: str) -> None:
    backend, _, mr, status = CASES[kind]
    v = DcapBackend(backend).verify_quote(quote_of(kind), policy_for(kind), PINNED)
    assert v.ok, v.reasons
    assert v.claims["measurement"] == mr
    assert v.claims["tcb_status"] == status
    assert v.claims["tee"] == kind.upper()
    assert v.claims["debug"] is False


@pytest.mark.parametrize("kind", ["sgx", "tdx"])
@pytest.mark.parametrize("offset", [50, 200, 400])
def test_altered_signed_byte_fails(kind: str, offset: int) -> None:
    q = bytearray(quote_of(kind))
    q[offset] ^= 0x01
    v = DcapBackend(CASES[kind][0]).verify_quote(bytes(q), policy_for(kind), PINNED)
    assert not v.ok
    assert any("signature is invalid" in r for r in v.reasons), v.reasons


@pytest.mark.parametrize("kind", ["sgx", "tdx"])
def test_unexpected_measurement_fails(kind: str) -> None:
    other = "ab" * (len(CASES[kind][2]) // 2)
    v = DcapBackend(CASES[kind][0]).verify_quote(
        quote_of(kind), policy_for(kind, expected_measurements=[other]), PINNED
    )
    assert not v.ok
    assert (
        v.reasons == (v.reasons[0],) and "measurement" in v.reasons[0] and "not one this policy expects" in v.reasons[0]
    )


def test_unexpected_sgx_signer_fails() -> None:
    v = DcapBackend("sgx-dcap").verify_quote(quote_of("sgx"), policy_for("sgx", expected_signers=["cd" * 32]), PINNED)
    assert not v.ok and any("mr_signer" in r for r in v.reasons)


@pytest.mark.parametrize("kind", ["sgx", "tdx"])
@pytest.mark.parametrize("day", ["2025-06-18", "2025-07-20", "2026-11-01"])
def test_time_outside_collateral_window_fails(kind: str, day: str) -> None:
    now = float(calendar.timegm(time.strptime(day, "%Y-%m-%d")))
    v = DcapBackend(CASES[kind][0]).verify_quote(quote_of(kind), policy_for(kind), now)
    assert not v.ok
    assert any("outside the collateral" in r for r in v.reasons), v.reasons
    assert any("DCAP quote verification failed" in r for r in v.reasons), v.reasons


def test_tcb_status_not_allowed_by_default_policy() -> None:
    v = DcapBackend("sgx-dcap").verify_quote(
        quote_of("sgx"), policy_for("sgx", allowed_tcb_statuses=["UpToDate"]), PINNED
    )
    assert not v.ok and any("ConfigurationAndSWHardeningNeeded" in r for r in v.reasons)


def test_rejected_advisory_fails() -> None:
    v = DcapBackend("sgx-dcap").verify_quote(
        quote_of("sgx"), policy_for("sgx", rejected_advisories=["INTEL-SA-00615"]), PINNED
    )
    assert not v.ok and any("INTEL-SA-00615" in r for r in v.reasons)


def test_quote_type_must_match_backend() -> None:
    v = DcapBackend("tdx-dcap").verify_quote(quote_of("sgx"), policy_for("sgx"), PINNED)
    assert not v.ok and any("expects TDX" in r for r in v.reasons)


class _FixedQuote:
    def __init__(self, quote: bytes) -> None:
        self.quote_bytes = quote
        self.seen: list[bytes] = []

    def quote(self, report_data: bytes) -> bytes:
        self.seen.append(report_data)
        return self.quote_bytes


@pytest.mark.parametrize("kind", ["sgx", "tdx"])
def test_full_verify_refuses_quote_not_binding_key_and_nonce(kind: str) -> None:
    """The fixtures were not made for our key and nonce: verify() must refuse for exactly that reason."""
    backend = CASES[kind][0]
    provider = _FixedQuote(quote_of(kind))
    keys = EnclaveKeyPair()
    nonce = os.urandom(32)
    ev = DcapBackend(backend, provider).evidence(nonce, keys.public.to_bytes())
    assert provider.seen == [report_data(keys.public.to_bytes(), nonce)]
    v = verify_evidence(ev, policy_for(kind), nonce, PINNED)
    assert not v.ok
    assert len(v.reasons) == 1 and "does not bind the enclave key" in v.reasons[0], v.reasons
    assert v.claims["key_id"] == keys.key_id


def test_policy_without_collateral_source_fails_closed() -> None:
    v = DcapBackend("tdx-dcap").verify_quote(quote_of("tdx"), policy_for("tdx", collateral_file=None), PINNED)
    assert not v.ok and any("neither pccs_url" in r for r in v.reasons)


def test_unreachable_pccs_gives_clear_error() -> None:
    t0 = time.perf_counter()
    with pytest.raises(
        AttestationError, match=r"could not fetch collateral from PCCS http://127\.0\.0\.1:9|did not answer"
    ):
        fetch_collateral("http://127.0.0.1:9", quote_of("tdx"), timeout_s=5)
    assert time.perf_counter() - t0 < 10
    v = DcapBackend("tdx-dcap").verify_quote(
        quote_of("tdx"),
        policy_for("tdx", collateral_file=None, pccs_url="http://127.0.0.1:9", pccs_timeout_s=5),
        PINNED,
    )
    assert not v.ok and "pccs_url" in v.reasons[-1]


def test_gramine_quote_provider_file_protocol(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="not running inside Gramine"):
        GramineQuoteProvider(tmp_path / "missing").quote(bytes(64))
    (tmp_path / "attestation_type").write_text("dcap")
    (tmp_path / "quote").write_bytes(b"QUOTE")
    assert GramineQuoteProvider(tmp_path).quote(b"r" * 64) == b"QUOTE"
    assert (tmp_path / "user_report_data").read_bytes() == b"r" * 64
    (tmp_path / "attestation_type").write_text("none")
    with pytest.raises(AttestationError, match="remote_attestation"):
        GramineQuoteProvider(tmp_path).quote(bytes(64))


def test_tdx_quote_provider_needs_configfs(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="not a TDX guest"):
        TdxConfigfsQuoteProvider(tmp_path / "none").quote(bytes(64))
