"""A verifier's attestation policy: what evidence it accepts from an enclave.

Pure data (pydantic, frozen). Participants and auditors each hold their own. Every default is the
strict choice: hardware backends only, ``UpToDate`` TCB only, no debug enclaves, and no accepted
measurement at all until one is configured, so an unconfigured verifier accepts nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

BackendName = Literal["simulated", "sgx-dcap", "tdx-dcap"]
BACKEND_NAMES: tuple[str, ...] = ("simulated", "sgx-dcap", "tdx-dcap")
TCB_STATUSES: tuple[str, ...] = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)


def _hardware_backends() -> list[BackendName]:
    return ["sgx-dcap", "tdx-dcap"]


def _hex_list(values: list[str], what: str) -> list[str]:
    out = []
    for v in values:
        s = v.strip().lower()
        if s.startswith("0x"):
            s = s[2:]
        try:
            bytes.fromhex(s)
        except ValueError:
            raise ValueError(f"{what}: {v!r} is not hexadecimal") from None
        if len(s) not in (64, 96):
            raise ValueError(f"{what}: {v!r} must be 32 bytes (SHA-256, mr_enclave) or 48 bytes (mr_td) of hex")
        out.append(s)
    return out


class AttestationPolicy(BaseModel):
    """What a verifier accepts. ``expected_measurements`` must be set or nothing verifies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_backends: list[BackendName] = Field(
        default_factory=_hardware_backends,
        description="backends whose evidence this verifier accepts",
    )
    allow_simulated_tee: bool = Field(
        False, description="accept the software-only 'simulated' backend (development and CI only)"
    )
    expected_measurements: list[str] = Field(
        default_factory=list,
        description="hex: mr_enclave (sgx-dcap), mr_td (tdx-dcap) or code+config hash (simulated)",
    )
    expected_signers: list[str] = Field(
        default_factory=list, description="hex mr_signer values accepted for sgx-dcap (empty: not checked)"
    )
    allowed_tcb_statuses: list[str] = Field(default_factory=lambda: ["UpToDate"])
    rejected_advisories: list[str] = Field(default_factory=list, description="Intel advisory IDs to refuse")
    allow_debug: bool = Field(False, description="accept debug-mode enclaves / TDs (never in production)")
    max_evidence_age_s: float = Field(300.0, gt=0, description="oldest accepted evidence, and attestation reuse")
    report_data_hash: Literal["sha512", "sha256"] = Field(
        "sha512", description="how report data binds the enclave key and the nonce"
    )
    pccs_url: str | None = Field(None, description="PCCS / PCS base URL for fresh collateral (production)")
    collateral_file: Path | None = Field(
        None, description="offline collateral JSON (air-gapped verifiers, tests); used instead of pccs_url"
    )
    pccs_timeout_s: float = Field(15.0, gt=0)

    @field_validator("expected_measurements")
    @classmethod
    def _measurements(cls, v: list[str]) -> list[str]:
        return _hex_list(v, "expected_measurements")

    @field_validator("expected_signers")
    @classmethod
    def _signers(cls, v: list[str]) -> list[str]:
        return _hex_list(v, "expected_signers")

    @field_validator("allowed_tcb_statuses")
    @classmethod
    def _statuses(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in TCB_STATUSES]
        if bad:
            raise ValueError(f"unknown TCB status(es) {bad}; expected some of {', '.join(TCB_STATUSES)}")
        return v
