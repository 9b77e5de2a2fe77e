"""Sealing updates to the enclave (HPKE-style base mode) and the participant's signed commitment.

``seal``: a fresh ephemeral X25519 key agrees a secret with the enclave's attested X25519 key;
HKDF-SHA256 (info = domain, ephemeral key, recipient key) derives an AES-256-GCM key; the associated
data is the canonical JSON of {round, participant id, enclave key id}, so a ciphertext cannot be
moved to another round, participant or enclave. Wire form::

    b"TFS1" | ephemeral public key (32) | GCM nonce (12) | ciphertext + tag

The plaintext is an encoded update (header JSON + raw little-endian float32), never a pickle.
The participant commits to the sealed bytes with ``H(round, id, H(sealed))`` and signs the
commitment with its identity key, so the coordinator can neither alter nor swap updates unnoticed.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from trustfed.core.codec import from_bytes, to_bytes
from trustfed.core.commitment import update_commitment
from trustfed.core.strategy import Update
from trustfed.enclave.errors import SealingError
from trustfed.enclave.keys import EnclaveKeyPair, EnclavePublicKey
from trustfed.primitives.canonical import canonical_json, parse_json_object

_MAGIC = b"TFS1"
_UPDATE_MAGIC = b"TFU1"
_INFO = b"trustfed-seal-v1\0"
_HEADER = len(_MAGIC) + 32 + 12
MAX_HEADER_BYTES = 64 * 1024


def associated_data(rnd: int, participant_id: str, enclave_key_id: str) -> bytes:
    return canonical_json(
        {"v": "trustfed-seal-v1", "round": rnd, "participant_id": participant_id, "enclave_key_id": enclave_key_id}
    )


def _derive(shared: bytes, eph_pk: bytes, recipient_pk: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO + eph_pk + recipient_pk).derive(shared)


def seal(plaintext: bytes, recipient: EnclavePublicKey, *, rnd: int, participant_id: str) -> bytes:
    """Encrypt ``plaintext`` to the enclave key ``recipient`` for (round, participant)."""
    eph = X25519PrivateKey.generate()
    eph_pk = eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key = _derive(eph.exchange(recipient.kem_key()), eph_pk, recipient.kem)
    nonce = os.urandom(12)
    ct = AESGCM(key).encrypt(nonce, plaintext, associated_data(rnd, participant_id, recipient.key_id))
    return _MAGIC + eph_pk + nonce + ct


def open_sealed(blob: bytes, keypair: EnclaveKeyPair, *, rnd: int, participant_id: str) -> bytes:
    """Decrypt a sealed blob inside the enclave; any tampering or mismatch raises SealingError."""
    if len(blob) < _HEADER + 16 or not blob.startswith(_MAGIC):
        raise SealingError(f"sealed update from {participant_id} is malformed ({len(blob)} bytes, bad header)")
    eph_pk, nonce, ct = blob[4:36], blob[36:48], blob[48:]
    try:
        shared = keypair.exchange(X25519PublicKey.from_public_bytes(eph_pk))
    except ValueError as exc:
        raise SealingError(f"sealed update from {participant_id}: bad ephemeral key ({exc})") from None
    key = _derive(shared, eph_pk, keypair.public.kem)
    try:
        return AESGCM(key).decrypt(nonce, ct, associated_data(rnd, participant_id, keypair.key_id))
    except InvalidTag:
        raise SealingError(
            f"sealed update from {participant_id} for round {rnd} does not open with enclave key "
            f"{keypair.key_id[:16]}… (tampered, or sealed for another round, participant or enclave key)"
        ) from None


# ---------------------------------------------------------------- update plaintext
def encode_update(update: Update, rnd: int) -> bytes:
    header = canonical_json(
        {
            "participant_id": update.participant_id,
            "round": rnd,
            "num_examples": int(update.num_examples),
            "dim": int(update.params.numel()),
            "metrics": {k: float(v) for k, v in update.metrics.items()},
        }
    )
    return _UPDATE_MAGIC + struct.pack(">I", len(header)) + header + to_bytes(update.params)


def decode_update(data: bytes, *, expected_dim: int) -> tuple[Update, int]:
    """Parse an update plaintext, checking every length before allocating. Returns (update, round)."""
    if len(data) < 8 or not data.startswith(_UPDATE_MAGIC):
        raise SealingError("update plaintext has no TFU1 header")
    (hlen,) = struct.unpack(">I", data[4:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(data):
        raise SealingError(f"update header length {hlen} is invalid")
    try:
        h = parse_json_object(data[8 : 8 + hlen], "update header", MAX_HEADER_BYTES)
    except ValueError as exc:
        raise SealingError(str(exc)) from None
    pid, rnd, n, dim, metrics = (
        h.get("participant_id"),
        h.get("round"),
        h.get("num_examples"),
        h.get("dim"),
        h.get("metrics", {}),
    )
    if not isinstance(pid, str) or not isinstance(rnd, int) or not isinstance(n, int) or not isinstance(dim, int):
        raise SealingError("update header needs participant_id (str), round, num_examples and dim (int)")
    if dim != expected_dim:
        raise SealingError(f"update from {pid} has {dim} values, the model has {expected_dim}")
    payload = data[8 + hlen :]
    if len(payload) != 4 * dim:
        raise SealingError(f"update from {pid} carries {len(payload)} bytes, expected {4 * dim}")
    if not isinstance(metrics, dict) or not all(isinstance(v, int | float) for v in metrics.values()):
        raise SealingError(f"update from {pid} has malformed metrics")
    return Update(pid, from_bytes(payload), n, {str(k): float(v) for k, v in metrics.items()}), rnd


# ---------------------------------------------------------------- commitments and identities
def commitment(rnd: int, participant_id: str, enclave_key_id: str, sealed: bytes) -> bytes:
    """``H(round, id, H(sealed))`` (:func:`trustfed.core.commitment.update_commitment`): the 32 bytes a
    participant signs, the same value the ledger's Merkle tree holds. The enclave key id is bound by the
    seal's associated data (a blob sealed to another key does not open), so it is not repeated here."""
    del enclave_key_id  # bound by the AEAD associated data, see the docstring
    return update_commitment(rnd, participant_id, hashlib.sha256(sealed).digest())


@dataclass(frozen=True)
class SealedUpdate(Update):
    """What the coordinator relays in enclave mode: no parameters in the clear (``params`` is empty)."""

    round: int = 0
    enclave_key_id: str = ""
    sealed: bytes = b""
    commitment: bytes = b""
    signature: bytes = b""
    extra: Mapping[str, Any] = field(default_factory=dict)


class ParticipantSigner(Protocol):
    participant_id: str

    def sign(self, message: bytes) -> bytes: ...


class ParticipantKeyring(Protocol):
    def verify(self, participant_id: str, message: bytes, signature: bytes) -> bool: ...


PublicKey = ec.EllipticCurvePublicKey | Ed25519PublicKey


class KeySigner:
    """Signs with an ECDSA P-256 (SHA-256) or Ed25519 private key: the participant's identity key."""

    def __init__(self, participant_id: str, key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> None:
        self.participant_id = participant_id
        self._key = key

    @classmethod
    def generate(cls, participant_id: str) -> KeySigner:
        return cls(participant_id, ec.generate_private_key(ec.SECP256R1()))

    def public_key(self) -> PublicKey:
        return self._key.public_key()

    def public_pem(self) -> bytes:
        return self.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)

    def sign(self, message: bytes) -> bytes:
        if isinstance(self._key, Ed25519PrivateKey):
            return self._key.sign(message)
        return self._key.sign(message, ec.ECDSA(hashes.SHA256()))


class StaticKeyring:
    """Participant id -> public key (objects or PEM). The PKI's certificate store can stand in for it."""

    def __init__(self, keys: Mapping[str, PublicKey | bytes]) -> None:
        self._keys: dict[str, PublicKey] = {}
        for pid, k in keys.items():
            if isinstance(k, bytes):
                loaded = serialization.load_pem_public_key(k)
                if not isinstance(loaded, ec.EllipticCurvePublicKey | Ed25519PublicKey):
                    raise SealingError(f"public key of {pid} must be ECDSA or Ed25519, got {type(loaded).__name__}")
                k = loaded
            self._keys[pid] = k

    def __contains__(self, participant_id: str) -> bool:
        return participant_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, participant_id: str, message: bytes, signature: bytes) -> bool:
        key = self._keys.get(participant_id)
        if key is None:
            return False
        try:
            if isinstance(key, Ed25519PublicKey):
                key.verify(signature, message)
            else:
                key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


def seal_update(update: Update, rnd: int, enclave_key: EnclavePublicKey, signer: ParticipantSigner) -> SealedUpdate:
    """Participant side: encode, seal to the attested enclave key, commit and sign."""
    if update.participant_id != signer.participant_id:
        raise SealingError(f"update of {update.participant_id} cannot be signed by {signer.participant_id}")
    blob = seal(encode_update(update, rnd), enclave_key, rnd=rnd, participant_id=update.participant_id)
    c = commitment(rnd, update.participant_id, enclave_key.key_id, blob)
    return SealedUpdate(
        participant_id=update.participant_id,
        params=torch.zeros(0, dtype=torch.float32),
        num_examples=0,
        round=rnd,
        enclave_key_id=enclave_key.key_id,
        sealed=blob,
        commitment=c,
        signature=signer.sign(c),
    )
