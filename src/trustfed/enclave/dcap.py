"""Intel DCAP attestation: ``sgx-dcap`` and ``tdx-dcap`` backends.

Verification has two layers:

1. ``dcap_qvl`` (Python bindings of a Rust quote verification library) checks the quote's
   signatures, the PCK chain up to Intel's root, CRLs, TCB info and QE identity at time ``now``.
2. Our policy on top (:meth:`DcapBackend.verify_quote`): quote type matches the backend, TCB status
   allowed, no rejected advisory, no debug enclave/TD, collateral valid at ``now``, measurement
   (``mr_enclave`` / ``mr_td``) expected, signer (``mr_signer``, SGX) expected; and in
   :meth:`DcapBackend.verify` the report data must bind the enclave key and the verifier's nonce.

Collateral comes from ``policy.collateral_file`` (offline JSON, air-gapped verifiers and tests) or is
fetched from ``policy.pccs_url`` (production). Inside the enclave, quotes come from Gramine's
``/dev/attestation`` (SGX) or the Linux configfs-tsm interface (TDX); see docs/tee.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from trustfed.enclave.errors import AttestationError
from trustfed.enclave.evidence import common_checks, envelope, open_envelope, report_data
from trustfed.enclave.keys import EnclavePublicKey
from trustfed.enclave.policy import AttestationPolicy
from trustfed.primitives.verdict import Verdict

log = logging.getLogger("trustfed.enclave.dcap")

_TEE = {"sgx-dcap": "SGX", "tdx-dcap": "TDX"}


def _dcap() -> Any:
    try:
        import dcap_qvl
    except ModuleNotFoundError:
        raise AttestationError(
            "the sgx-dcap / tdx-dcap backends need the 'dcap-qvl' package: pip install 'trustfed[tee]'"
        ) from None
    return dcap_qvl


# ---------------------------------------------------------------- quote providers (enclave side)
class QuoteProvider(Protocol):
    def quote(self, report_data: bytes) -> bytes:
        """A DCAP quote over 64 bytes of report data, from the TEE this process runs in."""
        ...


class GramineQuoteProvider:
    """SGX under Gramine: write report data to ``/dev/attestation/user_report_data``, read ``quote``."""

    def __init__(self, root: Path = Path("/dev/attestation")) -> None:
        self.root = root

    def quote(self, report_data: bytes) -> bytes:
        kind = self.root / "attestation_type"
        if not kind.exists():
            raise AttestationError(
                f"{self.root} not found: this process is not running inside Gramine-SGX with remote attestation; "
                'run it under gramine-sgx with sgx.remote_attestation = "dcap" (docs/tee.md) or use backend = '
                '"simulated" for development'
            )
        got = kind.read_text().strip()
        if got != "dcap":
            raise AttestationError(f'Gramine attestation type is {got!r}; set sgx.remote_attestation = "dcap"')
        (self.root / "user_report_data").write_bytes(report_data)
        return (self.root / "quote").read_bytes()


class TdxConfigfsQuoteProvider:
    """A TDX guest (Linux >= 6.7): the configfs-tsm report interface under ``/sys/kernel/config/tsm``."""

    def __init__(self, root: Path = Path("/sys/kernel/config/tsm/report")) -> None:
        self.root = root

    def quote(self, report_data: bytes) -> bytes:
        if not self.root.is_dir():
            raise AttestationError(
                f"{self.root} not found: this is not a TDX guest with configfs-tsm (Linux >= 6.7, configfs mounted); "
                'see docs/tee.md, or use backend = "simulated" for development'
            )
        entry = self.root / f"trustfed-{uuid.uuid4().hex}"
        entry.mkdir()
        try:
            provider = (entry / "provider").read_text().strip() if (entry / "provider").exists() else "tdx_guest"
            if provider != "tdx_guest":
                raise AttestationError(f"configfs-tsm provider is {provider!r}, expected 'tdx_guest'")
            (entry / "inblob").write_bytes(report_data)
            return (entry / "outblob").read_bytes()
        finally:
            try:
                entry.rmdir()
            except OSError:
                log.warning("could not remove configfs-tsm entry %s", entry)


def default_quote_provider(backend: str) -> QuoteProvider:
    return GramineQuoteProvider() if backend == "sgx-dcap" else TdxConfigfsQuoteProvider()


# ---------------------------------------------------------------- collateral (verifier side)
def fetch_collateral(pccs_url: str, quote: bytes, timeout_s: float = 15.0) -> Any:
    """Fetch collateral for ``quote`` from a PCCS / Intel PCS base URL, with a clear error if unreachable."""
    dcap = _dcap()

    async def _get() -> Any:
        return await asyncio.wait_for(dcap.get_collateral(pccs_url, quote), timeout_s)

    try:
        return asyncio.run(_get())
    except TimeoutError:
        raise AttestationError(
            f"PCCS at {pccs_url} did not answer within {timeout_s:g} s; check attestation pccs_url and the network, "
            "or set collateral_file for offline verification"
        ) from None
    except (ValueError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AttestationError(
            f"could not fetch collateral from PCCS {pccs_url}: {first}; check attestation pccs_url and the network, "
            "or set collateral_file for offline verification"
        ) from None


def load_collateral(policy: AttestationPolicy, quote: bytes) -> Any:
    dcap = _dcap()
    if policy.collateral_file is not None:
        path = policy.collateral_file
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AttestationError(f"cannot read collateral_file {path}: {exc.strerror}") from None
        try:
            return dcap.QuoteCollateralV3.from_json(text)
        except ValueError as exc:
            raise AttestationError(f"collateral_file {path} is not DCAP collateral JSON: {exc}") from None
    if policy.pccs_url:
        return fetch_collateral(policy.pccs_url, quote, policy.pccs_timeout_s)
    raise AttestationError(
        "the attestation policy has neither pccs_url (production) nor collateral_file (offline); set one"
    )


def _iso_to_unix(s: Any) -> float | None:
    if not isinstance(s, str):
        return None
    try:
        return float(calendar.timegm(time.strptime(s.replace(".000", ""), "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def collateral_window_reasons(collateral: Any, now: float) -> list[str]:
    """Reasons why the collateral's TCB info / QE identity is not valid at ``now`` (issueDate..nextUpdate)."""
    out = []
    for name, text in (("TCB info", collateral.tcb_info), ("QE identity", collateral.qe_identity)):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            out.append(f"collateral {name} is not JSON")
            continue
        issued, nxt = _iso_to_unix(doc.get("issueDate")), _iso_to_unix(doc.get("nextUpdate"))
        if issued is None or nxt is None:
            out.append(f"collateral {name} lacks issueDate / nextUpdate")
        elif not issued <= now <= nxt:
            out.append(
                f"verification time {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now))} is outside the "
                f"collateral {name} window {doc['issueDate']} .. {doc['nextUpdate']}; fetch fresh collateral"
            )
    return out


# ---------------------------------------------------------------- the backend
class DcapBackend:
    """``sgx-dcap`` or ``tdx-dcap``: real Intel DCAP quotes, verified with dcap-qvl plus our policy."""

    def __init__(self, name: str, quote_provider: QuoteProvider | None = None, binding: str = "sha512") -> None:
        if name not in _TEE:
            raise AttestationError(f"DcapBackend name must be 'sgx-dcap' or 'tdx-dcap', got {name!r}")
        self.name = name
        self._provider = quote_provider
        self._binding = binding

    def evidence(self, nonce: bytes, public_key: bytes) -> bytes:
        provider = self._provider or default_quote_provider(self.name)
        quote = provider.quote(report_data(public_key, nonce, self._binding))
        return envelope(self.name, public_key, self._binding, quote=base64.b64encode(quote).decode())

    def verify_quote(
        self, quote: bytes, policy: AttestationPolicy, now: float, collateral: Any | None = None
    ) -> Verdict:
        """Everything except the key/nonce binding: signatures, chain, time, TCB, measurement, signer."""
        dcap = _dcap()
        reasons: list[str] = []
        claims: dict[str, Any] = {"backend": self.name, "simulated": False, "verified_at": now}
        try:
            parsed = dcap.parse_quote(quote)
        except ValueError as exc:
            return Verdict.of([f"quote cannot be parsed: {exc}"], claims)
        qtype = parsed.quote_type()
        claims["tee"] = qtype
        if qtype != _TEE[self.name]:
            reasons.append(f"quote is a {qtype} quote but backend {self.name!r} expects {_TEE[self.name]}")
        if collateral is None:
            try:
                collateral = load_collateral(policy, quote)
            except AttestationError as exc:
                return Verdict.of([*reasons, str(exc)], claims)
        reasons += collateral_window_reasons(collateral, now)
        try:
            result = dcap.verify(quote, collateral, int(now))
        except ValueError as exc:
            reasons.append(f"DCAP quote verification failed: {str(exc).splitlines()[0]}")
            return Verdict.of(reasons, claims)
        claims["tcb_status"] = result.status
        claims["advisory_ids"] = list(result.advisory_ids)
        if result.status not in policy.allowed_tcb_statuses:
            reasons.append(
                f"TCB status {result.status!r} is not allowed by this policy "
                f"(allowed: {', '.join(policy.allowed_tcb_statuses)})"
            )
        bad = sorted(set(result.advisory_ids) & set(policy.rejected_advisories))
        if bad:
            reasons.append(f"platform is affected by rejected advisories {', '.join(bad)}")
        rep = parsed.report
        if qtype == "SGX":
            measurement, debug = rep.mr_enclave.hex(), bool(rep.attributes[0] & 0x02)
            claims["mr_signer"] = rep.mr_signer.hex()
            if policy.expected_signers and claims["mr_signer"] not in policy.expected_signers:
                reasons.append(f"mr_signer {claims['mr_signer'][:16]}… is not one this policy expects")
        else:
            measurement, debug = rep.mr_td.hex(), bool(rep.td_attributes[0] & 0x01)
            claims["rt_mrs"] = [rep.rt_mr0.hex(), rep.rt_mr1.hex(), rep.rt_mr2.hex(), rep.rt_mr3.hex()]
        claims["measurement"] = measurement
        claims["debug"] = debug
        claims["report_data"] = rep.report_data.hex()
        if measurement not in policy.expected_measurements:
            reasons.append(
                f"measurement {measurement[:16]}… is not one this policy expects "
                f"({', '.join(m[:16] + '…' for m in policy.expected_measurements) or 'none configured'})"
            )
        if debug and not policy.allow_debug:
            reasons.append("the enclave / TD runs in DEBUG mode (its memory is readable by the host)")
        return Verdict.of(reasons, claims)

    def verify(self, evidence: bytes, policy: AttestationPolicy, nonce: bytes, now: float) -> Verdict:
        reasons: list[str] = []
        env = open_envelope(evidence, reasons)
        if env is None:
            return Verdict.of(reasons, {"backend": self.name, "simulated": False})
        common_checks(env, self.name, policy, nonce, reasons)
        q64 = env.fields.get("quote")
        try:
            quote = base64.b64decode(q64, validate=True) if isinstance(q64, str) else b""
        except (ValueError, binascii.Error):
            quote = b""
        if not quote:
            return Verdict.of([*reasons, "evidence carries no base64 quote"], {"backend": self.name})
        inner = self.verify_quote(quote, policy, now)
        claims = dict(inner.claims)
        claims["public_key"] = env.public_key.hex()
        claims["key_id"] = EnclavePublicKey.from_bytes(env.public_key).key_id
        reasons += inner.reasons
        if env.binding in ("sha512", "sha256") and "report_data" in claims:
            want = report_data(env.public_key, nonce, env.binding).hex()
            if claims["report_data"] != want:
                reasons.append(
                    "quote report data does not bind the enclave key and this verifier's nonce "
                    "(stale, replayed or foreign quote)"
                )
        return Verdict.of(reasons, claims)
