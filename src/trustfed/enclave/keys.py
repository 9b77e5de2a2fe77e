"""The enclave's key pair: X25519 for sealing updates to it, Ed25519 for signing receipts.

Both halves are generated inside the enclave process and never leave it. The public half travels
as one byte string (:meth:`EnclavePublicKey.to_bytes`), which attestation evidence binds and whose
SHA-256 is the enclave's *key id*: it goes into every sealed update's associated data and every
receipt, so an enclave restarted with a new key is recognisably a different enclave.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from trustfed.enclave.errors import EnclaveError

_MAGIC = b"tfek1"
PUBLIC_KEY_BYTES = len(_MAGIC) + 32 + 32


def _raw(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class EnclavePublicKey:
    """The public half: 32-byte X25519 key (sealing) and 32-byte Ed25519 key (receipts)."""

    kem: bytes
    sig: bytes

    def to_bytes(self) -> bytes:
        return _MAGIC + self.kem + self.sig

    @classmethod
    def from_bytes(cls, data: bytes) -> EnclavePublicKey:
        if len(data) != PUBLIC_KEY_BYTES or not data.startswith(_MAGIC):
            raise EnclaveError(
                f"enclave public key must be {PUBLIC_KEY_BYTES} bytes starting with {_MAGIC!r}, got {len(data)} bytes"
            )
        return cls(data[5:37], data[37:69])

    @property
    def key_id(self) -> str:
        """SHA-256 (hex) of the public key bytes."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def kem_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.kem)

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.sig).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


class EnclaveKeyPair:
    """A fresh key pair from the operating system's CSPRNG (keys are not seeded, by design)."""

    def __init__(self) -> None:
        self._kem = X25519PrivateKey.generate()
        self._sig = Ed25519PrivateKey.generate()
        self.public = EnclavePublicKey(_raw(self._kem.public_key()), _raw(self._sig.public_key()))

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> bytes:
        return self._sig.sign(message)

    def exchange(self, peer: X25519PublicKey) -> bytes:
        return self._kem.exchange(peer)

    def __repr__(self) -> str:  # never print private material
        return f"EnclaveKeyPair(key_id={self.key_id[:16]}…)"
