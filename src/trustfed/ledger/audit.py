"""The audit log: append-only JSON lines, hash-chained, each entry signed by its author.

One line per entry::

    {"author": KEY_ID, "body": {...}, "hash": HEX, "kind": KIND, "prev": HEX, "round": R, "seq": N, "sig": B64}

* ``digest = SHA-256("trustfed-audit-entry-v1\\0" || canonical({"author", "body", "kind", "round"}))``
  is what the author signs (ECDSA P-256 / SHA-256, DER). It does not depend on the log's position,
  so a participant can sign its commitment before the coordinator places it in the log. ``canonical``
  is :mod:`trustfed.primitives.canonical` with ``allow_nan=True``: a NaN or infinite metric is written
  ``NaN`` / ``Infinity``, as it always was, and every line is that canonical JSON too.
* ``hash = SHA-256("trustfed-audit-chain-v1\\0" || prev || seq (8 bytes, big-endian) || digest || sig)``
  chains every entry to the one before (``prev`` of the first entry is 32 zero bytes). The head (hash of
  the last entry) is anchored on chain every round, so rewriting history breaks either the chain or
  the anchor.

Signers are a small protocol (:class:`Signer`) so that keys from the PKI plug in unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustfed.errors import TrustFedError
from trustfed.primitives.atomic import atomic_write_bytes
from trustfed.primitives.canonical import canonical_text

GENESIS_PREV = "00" * 32
_ENTRY_DOMAIN = b"trustfed-audit-entry-v1\0"
_CHAIN_DOMAIN = b"trustfed-audit-chain-v1\0"
ENTRY_FIELDS = frozenset({"seq", "prev", "kind", "round", "author", "body", "sig", "hash"})


class AuditError(TrustFedError):
    """The audit log cannot be read or appended to."""


# ---------------------------------------------------------------- keys and signatures
@runtime_checkable
class Signer(Protocol):
    """Anything that can sign for one identity: a simulated key today, a PKI key tomorrow."""

    @property
    def key_id(self) -> str: ...

    def public_key_pem(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


def key_fingerprint(public_key_pem: bytes) -> str:
    """SHA-256 (hex) of the public key's DER SubjectPublicKeyInfo: what the registry stores."""
    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except ValueError as exc:
        raise AuditError(f"not a PEM public key: {exc}") from None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def certificate_fingerprint(certificate_pem: bytes) -> tuple[str, bytes]:
    """(SHA-256 hex of the certificate's DER, its public key as PEM): a PKI identity for the registry."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError as exc:
        raise AuditError(f"not a PEM certificate: {exc}") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    pem = cert.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest(), pem


def verify_signature(public_key_pem: bytes, data: bytes, signature: bytes) -> bool:
    """ECDSA P-256 / SHA-256 check; False for any malformed key or signature."""
    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except ValueError:
        return False
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return False
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


class EcdsaSigner:
    """An ECDSA P-256 key held in this process."""

    def __init__(self, key_id: str, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise AuditError(f"key {key_id!r} is on {private_key.curve.name}; trustfed signs with P-256")
        self._key_id = key_id
        self._key = private_key
        self._pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def key_id(self) -> str:
        return self._key_id

    @classmethod
    def generate(cls, key_id: str) -> EcdsaSigner:
        """A fresh random key (keys are secrets: deliberately not derived from the run's seed)."""
        return cls(key_id, ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def load(cls, key_id: str, path: Path) -> EcdsaSigner:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise AuditError(f"cannot load the private key of {key_id!r} from {path}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AuditError(f"{path} holds a {type(key).__name__}, not an ECDSA P-256 key")
        return cls(key_id, key)

    def save(self, path: Path) -> None:
        """Write the private key as unencrypted PKCS#8 PEM, readable by the owner only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write_bytes(path, data, mode=0o600)

    def public_key_pem(self) -> bytes:
        return self._pem

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, _ECDSA_SHA256)


# ---------------------------------------------------------------- the chain (pure)
def _dumps(value: Any) -> str:
    """Canonical JSON of the log: NaN and infinite metrics are admitted (``allow_nan``), as they
    always were, so every signed entry on disk keeps its digest."""
    return canonical_text(value, allow_nan=True)


def _signed_text(kind: str, rnd: int, author: str, body_json: str) -> bytes:
    # Equal to canonical JSON of {"author", "body", "kind", "round"}, built without re-serialising the body.
    return f'{{"author":{_dumps(author)},"body":{body_json},"kind":{_dumps(kind)},"round":{int(rnd)}}}'.encode()


def entry_digest(kind: str, rnd: int, author: str, body: Mapping[str, Any]) -> bytes:
    """What the author signs: independent of the entry's place in the log."""
    return hashlib.sha256(_ENTRY_DOMAIN + _signed_text(kind, rnd, author, _dumps(body))).digest()


def chain_hash(prev_hex: str, seq: int, digest: bytes, sig: bytes) -> str:
    return hashlib.sha256(_CHAIN_DOMAIN + bytes.fromhex(prev_hex) + seq.to_bytes(8, "big") + digest + sig).hexdigest()


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    prev: str
    kind: str
    round: int
    author: str
    body: Mapping[str, Any]
    sig: bytes
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "prev": self.prev,
            "kind": self.kind,
            "round": self.round,
            "author": self.author,
            "body": dict(self.body),
            "sig": base64.b64encode(self.sig).decode(),
            "hash": self.hash,
        }

    def to_line(self) -> str:
        return _dumps(self.to_json()) + "\n"

    @property
    def digest(self) -> bytes:
        return entry_digest(self.kind, self.round, self.author, self.body)


def make_entry(
    seq: int, prev: str, kind: str, rnd: int, body: Mapping[str, Any], signer: Signer, sig: bytes | None = None
) -> tuple[AuditEntry, str]:
    """Build and sign an entry and its line. Pass ``sig`` when the author signed elsewhere (a participant)."""
    body_json = _dumps(body)
    author = signer.key_id
    digest = hashlib.sha256(_ENTRY_DOMAIN + _signed_text(kind, rnd, author, body_json)).digest()
    signature = signer.sign(digest) if sig is None else sig
    h = chain_hash(prev, seq, digest, signature)
    sig_b64 = base64.b64encode(signature).decode()
    line = (
        f'{{"author":{_dumps(author)},"body":{body_json},"hash":"{h}","kind":{_dumps(kind)},'
        f'"prev":"{prev}","round":{int(rnd)},"seq":{int(seq)},"sig":"{sig_b64}"}}\n'
    )
    return AuditEntry(seq, prev, kind, rnd, author, dict(body), signature, h), line


def parse_entry(line: str) -> AuditEntry:
    """Parse one line; raises AuditError naming the first malformed field."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise AuditError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(raw, dict):
        raise AuditError("entry is not a JSON object")
    missing, extra = ENTRY_FIELDS - raw.keys(), raw.keys() - ENTRY_FIELDS
    if missing or extra:
        raise AuditError(f"fields wrong: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for name, typ in (("seq", int), ("round", int), ("prev", str), ("kind", str), ("author", str), ("hash", str)):
        if not isinstance(raw[name], typ) or isinstance(raw[name], bool):
            raise AuditError(f"field {name} must be {typ.__name__}")
    if not isinstance(raw["body"], dict):
        raise AuditError("field body must be an object")
    try:
        sig = base64.b64decode(raw["sig"], validate=True)
        bytes.fromhex(raw["prev"])
    except (ValueError, TypeError) as exc:
        raise AuditError(f"field sig or prev is not valid base64/hex: {exc}") from None
    return AuditEntry(raw["seq"], raw["prev"], raw["kind"], raw["round"], raw["author"], raw["body"], sig, raw["hash"])


# ---------------------------------------------------------------- the file
class AuditLog:
    """Appends to ``path``; use as a context manager. Reads the last line to continue the chain."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seq = 0
        self.head = GENESIS_PREV
        if path.exists():
            last = _last_line(path)
            if last is not None:
                try:
                    entry = parse_entry(last)
                except AuditError as exc:
                    raise AuditError(
                        f"{path}: the last line cannot be continued ({exc}); run `trustfed audit verify`"
                    ) from None
                self.seq, self.head = entry.seq + 1, entry.hash
        self._file: IO[str] | None = None

    def __enter__(self) -> AuditLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def append(
        self, kind: str, rnd: int, body: Mapping[str, Any], signer: Signer, sig: bytes | None = None
    ) -> AuditEntry:
        if self._file is None:
            raise AuditError(f"{self.path}: append outside `with AuditLog(...)`")
        entry, line = make_entry(self.seq, self.head, kind, rnd, body, signer, sig)
        self._file.write(line)
        self.seq, self.head = self.seq + 1, entry.hash
        return entry

    def sync(self) -> None:
        """Flush and fsync: call before anchoring the head on chain."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())


def _last_line(path: Path) -> str | None:
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        pos, chunk, buf = end, 65536, b""
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            lines = buf.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or pos == 0:
                last = lines[-1]
                return last.decode("utf-8") if last.strip() else None
    return None


def read_entries(path: Path) -> Iterator[tuple[int, str]]:
    """(line number starting at 1, text) for every line of the log."""
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            yield i, line.rstrip("\n")


def parsed_entries(path: Path) -> Iterator[AuditEntry]:
    """Every entry of the log, parsed (blank lines skipped; a malformed one raises AuditError). For
    reading a log one trusts, such as one's own on resume; ``audit verify`` checks each line instead."""
    for _, line in read_entries(path):
        if line.strip():
            yield parse_entry(line)
