"""Errors of the attested aggregation enclave. All derive from :class:`TrustFedError`."""

from __future__ import annotations

from collections.abc import Sequence

from trustfed.errors import TrustFedError


class EnclaveError(TrustFedError):
    """The enclave cannot do what was asked (bad request, wrong key, failed check)."""


class AttestationError(EnclaveError):
    """Attestation evidence cannot be produced, fetched or checked (collateral, quote device)."""


class AttestationRefused(AttestationError):
    """A verifier refused the enclave's evidence; ``reasons`` says why, one line each."""

    exit_code = 3

    def __init__(self, where: str, reasons: Sequence[str]) -> None:
        self.reasons = tuple(reasons)
        lines = [f"{where}: enclave attestation refused, nothing was sent:"]
        lines += [f"  - {r}" for r in self.reasons]
        lines.append("  check the enclave's measurement and backend against this policy, then re-attest")
        super().__init__("\n".join(lines))


class SealingError(EnclaveError):
    """A sealed update cannot be made or opened (wrong key, tampered ciphertext, bad header)."""


class ReceiptError(EnclaveError):
    """A receipt is malformed (as opposed to well-formed but failing verification)."""
