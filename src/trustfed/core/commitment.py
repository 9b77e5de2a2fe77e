"""The update commitment ``H(round, id, H(update bytes))``: one definition for the ledger and the enclave.

A participant signs it, the round's Merkle tree holds it, the enclave checks it against the sealed
bytes, and its receipt's Merkle root covers it. Pure: no I/O.
"""

from __future__ import annotations

import hashlib

from trustfed.errors import TrustFedError

_DOMAIN = b"trustfed-commitment-v1\0"


def update_commitment(rnd: int, participant_id: str, update_digest: bytes) -> bytes:
    """``SHA-256(domain || round (8 bytes) || len(id) (4 bytes) || id || H(update))``."""
    if len(update_digest) != 32:
        raise TrustFedError(f"update digest of {participant_id!r} must be 32 bytes (SHA-256), got {len(update_digest)}")
    pid = participant_id.encode()
    return hashlib.sha256(_DOMAIN + rnd.to_bytes(8, "big") + len(pid).to_bytes(4, "big") + pid + update_digest).digest()
