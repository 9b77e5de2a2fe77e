"""Plain values the ledger stores and the hashes that bind them. Pure: no I/O, no web3."""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass

from trustfed.core.commitment import update_commitment as core_commitment
from trustfed.errors import TrustFedError

ZERO32 = "00" * 32
_HEX32 = re.compile(r"^[0-9a-f]{64}$")


class LedgerError(TrustFedError):
    """The ledger cannot be reached, deployed, read or written as asked."""


class Role(enum.IntEnum):
    PARTICIPANT = 0
    COORDINATOR = 1
    ENCLAVE = 2
    AUDITOR = 3


class Status(enum.IntEnum):
    NONE = 0
    ACTIVE = 1
    SUSPENDED = 2
    REVOKED = 3
    EXITED = 4


def hex32(value: str, what: str) -> str:
    """A 32-byte hash as 64 lowercase hex digits; '' means 'none yet' and maps to zeros."""
    v = value.lower().removeprefix("0x") if value else ZERO32
    if not _HEX32.match(v):
        raise LedgerError(f"{what} must be 32 bytes as 64 hex digits, got {value!r}")
    return v


@dataclass(frozen=True)
class Identity:
    id: str
    fingerprint: str  # SHA-256 hex of the certificate / public key
    role: Role = Role.PARTICIPANT
    status: Status = Status.ACTIVE


@dataclass(frozen=True)
class RoundCommitment:
    """What RoundLog stores per round (round 0 is the initial model)."""

    round: int
    model_hash: str
    merkle_root: str = ZERO32
    receipt_hash: str = ZERO32
    log_head: str = ZERO32
    num_updates: int = 0

    def normalised(self) -> RoundCommitment:
        return RoundCommitment(
            self.round,
            hex32(self.model_hash, "model_hash"),
            hex32(self.merkle_root, "merkle_root"),
            hex32(self.receipt_hash, "receipt_hash"),
            hex32(self.log_head, "log_head"),
            self.num_updates,
        )


@dataclass(frozen=True)
class TxRef:
    tx_hash: str
    block: int
    gas_used: int


@dataclass(frozen=True)
class AccountState:
    reputation: int
    balance: int
    stake: int


def update_hash(update_bytes: bytes) -> bytes:
    """H(update bytes): SHA-256 of the update exactly as it travels (raw float32, or sealed)."""
    return hashlib.sha256(update_bytes).digest()


def update_commitment(rnd: int, participant_id: str, update_digest: bytes) -> bytes:
    """H(round, id, H(update)): what a participant signs and what the round's Merkle tree holds."""
    if len(update_digest) != 32:
        raise LedgerError(f"update digest of {participant_id!r} must be 32 bytes, got {len(update_digest)}")
    return core_commitment(rnd, participant_id, update_digest)
