"""Attested aggregation enclave: attestation backends, sealing, receipts, the enclave and its service.

The public API is re-exported lazily (``from trustfed.enclave import Enclave``) so that importing
``trustfed.enclave.settings`` from the federation config stays cheap and free of cycles; DCAP
(``dcap_qvl``) and gRPC load only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "AttestationBackend": "attestation",
    "SimulatedBackend": "attestation",
    "Verdict": "attestation",
    "report_data": "attestation",
    "verify_evidence": "attestation",
    "verifier_backend": "attestation",
    "DcapBackend": "dcap",
    "AttestationPolicy": "policy",
    "EnclaveKeyPair": "keys",
    "EnclavePublicKey": "keys",
    "KeySigner": "sealing",
    "SealedUpdate": "sealing",
    "StaticKeyring": "sealing",
    "seal": "sealing",
    "open_sealed": "sealing",
    "seal_update": "sealing",
    "Receipt": "receipts",
    "receipt_hash": "receipts",
    "verify_receipt": "receipts",
    "commitments_root": "receipts",
    "measure": "measurement",
    "AggregationRequest": "core",
    "AggregationResponse": "core",
    "Enclave": "core",
    "EnclaveClient": "core",
    "AttestedEnclave": "participant",
    "SealingTrainer": "participant",
    "EnclaveStrategy": "strategy",
    "AggregationSettings": "settings",
    "EnclaveSection": "settings",
    "EnclaveServiceConfig": "settings",
    "load_enclave_config": "settings",
    "EnclaveError": "errors",
    "AttestationError": "errors",
    "AttestationRefused": "errors",
    "SealingError": "errors",
    "ReceiptError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'trustfed.enclave' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trustfed.enclave.{mod}"), name)
