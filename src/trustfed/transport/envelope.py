"""The signing envelope: every message body is signed by its sender.

The signature is ECDSA P-256 / SHA-256 over a canonical, length-prefixed encoding of
(message type, round, sender id, nonce, timestamp, SHA-256 of the body), so it never depends on
how protobuf happens to serialize a header. A receiver checks, in order: the type, the body
hash, the timestamp window, the sender's certificate (CA, validity, revocation, role), that the
sender id is the certificate's id, the signature, and last the nonce (recorded only for messages
that verified, so forgeries cannot fill the cache). Every rejection is logged with its reason; the
peer's strings in it are escaped and capped, and a flood of rejections is counted, not written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustfed.pki.ca import Identity, PkiError, RevocationList, verify_certificate
from trustfed.transport import federation_pb2 as pb
from trustfed.transport.errors import MessageRejected
from trustfed.transport.logsafe import LogBudget, clean

log = logging.getLogger("trustfed.transport")

_DOMAIN = b"trustfed-envelope-v1\0"
NONCE_BYTES = 16
MAX_CERT_BYTES = 16 * 1024


def canonical_header(
    msg_type: str, rnd: int, sender_id: str, nonce: bytes, timestamp_ms: int, body_sha256: bytes
) -> bytes:
    """The exact bytes that are signed (length-prefixed fields after a domain tag)."""
    parts = [
        msg_type.encode(),
        struct.pack(">Q", rnd),
        sender_id.encode(),
        nonce,
        struct.pack(">q", timestamp_ms),
        body_sha256,
    ]
    return _DOMAIN + b"".join(struct.pack(">I", len(p)) + p for p in parts)


class Signer:
    """Signs message bodies as ``sender_id`` with an ECDSA P-256 key."""

    def __init__(self, sender_id: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate | None = None) -> None:
        self.sender_id = sender_id
        self._key = key
        self._cert_der = cert.public_bytes(serialization.Encoding.DER) if cert is not None else b""

    def sign(self, msg_type: str, rnd: int, body: bytes, *, timestamp_ms: int | None = None) -> pb.SignedMessage:
        nonce = os.urandom(NONCE_BYTES)
        ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        digest = hashlib.sha256(body).digest()
        sig = self._key.sign(
            canonical_header(msg_type, rnd, self.sender_id, nonce, ts, digest), ec.ECDSA(hashes.SHA256())
        )
        env = pb.Envelope(
            msg_type=msg_type,
            round=rnd,
            sender_id=self.sender_id,
            nonce=nonce,
            timestamp_ms=ts,
            body_sha256=digest,
            signature=sig,
            signer_cert=self._cert_der,
        )
        return pb.SignedMessage(envelope=env, body=body)


class NonceCache:
    """Remembers (sender, nonce) pairs for the timestamp window, in bounded memory.

    Entries older than the window can be dropped safely: a message that old is refused by its
    timestamp anyway. If the cache is full of entries still inside the window, new messages are
    refused (fail closed) rather than forgetting a nonce that could then be replayed.
    """

    def __init__(self, capacity: int, window_s: float) -> None:
        self.capacity = capacity
        self.window_ms = int(window_s * 1000)
        self._seen: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, sender: str, nonce: bytes, timestamp_ms: int, now_ms: int) -> str | None:
        """Record the nonce; return None if fresh, or the reason it is refused."""
        key = (sender, nonce)
        with self._lock:
            if key in self._seen:
                return "replay"
            # Insertion order ~ arrival order; drop entries whose message timestamps left the window.
            while self._seen:
                old_key, old_ts = next(iter(self._seen.items()))
                if old_ts >= now_ms - 2 * self.window_ms and len(self._seen) < self.capacity:
                    break
                if old_ts >= now_ms - 2 * self.window_ms:
                    return "nonce_cache_full"
                del self._seen[old_key]
            self._seen[key] = timestamp_ms
            return None


@dataclass(frozen=True)
class Verified:
    """A message that passed every check: who sent it and its (now trusted) body."""

    identity: Identity
    envelope: pb.Envelope
    body: bytes


class Verifier:
    """Checks signed messages against the TLS peer's certificate (or the signer's, client side)."""

    def __init__(
        self,
        ca_cert: x509.Certificate,
        revocations: Callable[[], RevocationList],
        *,
        window_s: float,
        nonce_cache_size: int,
        where: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ca_cert = ca_cert
        self.revocations = revocations
        self.window_ms = int(window_s * 1000)
        self.nonces = NonceCache(nonce_cache_size, window_s)
        self.where = where
        self.clock = clock
        self.log_budget = LogBudget()

    def reject(self, reason: str, detail: str, msg_type: str = "?", sender: str = "?") -> MessageRejected:
        """Log the rejection (peer text cleaned, within the log budget) and return it to raise."""
        msg_type, sender, detail = clean(msg_type, 40), clean(sender, 64), clean(detail, 200)
        write, suppressed = self.log_budget.take(reason)
        if write:
            log.warning(
                "%s rejected %s message from %s: %s (%s)%s",
                self.where,
                msg_type,
                sender,
                detail,
                reason,
                f" [{suppressed} similar rejection(s) not logged]" if suppressed else "",
                extra={"reason": reason, "msg_type": msg_type, "sender": sender},
            )
        return MessageRejected(reason, detail)

    def verify(
        self,
        msg: pb.SignedMessage,
        *,
        expected_type: str,
        peer_cert: x509.Certificate | None,
        role: str,
    ) -> Verified:
        """Verify ``msg``; ``peer_cert`` None means: use the certificate carried in the envelope."""
        return self._verify(msg, expected_type, peer_cert, role, fresh=True)

    def verify_relayed(self, msg: pb.SignedMessage, *, expected_type: str, role: str) -> Verified:
        """Verify a message its sender signed for *others*, relayed by a third party (a participant's
        secure-aggregation keys in the roster): the carried certificate must come from the CA, name the
        sender with ``role`` and verify the signature. The timestamp window and the nonce cache are not
        applied (the relay may hand it to many, minutes later); the body must bind it to its context."""
        return self._verify(msg, expected_type, None, role, fresh=False)

    def _verify(
        self, msg: pb.SignedMessage, expected_type: str, peer_cert: x509.Certificate | None, role: str, *, fresh: bool
    ) -> Verified:
        if not msg.HasField("envelope"):
            raise self.reject("no_envelope", "message carries no signed envelope", expected_type)
        env = msg.envelope
        mtype, sender = env.msg_type, env.sender_id
        if mtype != expected_type:
            raise self.reject("wrong_type", f"expected a {expected_type!r} message, got {mtype!r}", mtype, sender)
        if hashlib.sha256(msg.body).digest() != env.body_sha256:
            raise self.reject(
                "body_hash_mismatch", "body does not match its signed hash (tampered in transit?)", mtype, sender
            )
        now_ms = int(self.clock() * 1000)
        if fresh and abs(now_ms - env.timestamp_ms) > self.window_ms:
            raise self.reject(
                "stale_timestamp",
                f"timestamp is {(now_ms - env.timestamp_ms) / 1000:.1f} s from our clock; window is ±{self.window_ms / 1000:.0f} s",
                mtype,
                sender,
            )
        if len(env.nonce) != NONCE_BYTES:
            raise self.reject("bad_nonce", f"nonce must be {NONCE_BYTES} bytes, got {len(env.nonce)}", mtype, sender)
        cert = peer_cert
        if cert is None:
            if not env.signer_cert or len(env.signer_cert) > MAX_CERT_BYTES:
                raise self.reject(
                    "no_signer_cert", "message carries no (or an oversized) signer certificate", mtype, sender
                )
            try:
                cert = x509.load_der_x509_certificate(env.signer_cert)
            except ValueError as exc:
                raise self.reject(
                    "bad_signer_cert", f"signer certificate does not parse: {exc}", mtype, sender
                ) from None
        try:
            ident = verify_certificate(cert, self.ca_cert, self.revocations(), role=role)
        except PkiError as exc:
            raise self.reject("certificate_refused", str(exc), mtype, sender) from None
        if ident.name != sender:
            raise self.reject(
                "sender_mismatch", f"sender id {sender!r} is not the certificate's id {ident.name!r}", mtype, sender
            )
        pub = cert.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise self.reject("bad_key", "certificate key is not ECDSA", mtype, sender)
        try:
            pub.verify(
                env.signature,
                canonical_header(mtype, env.round, sender, env.nonce, env.timestamp_ms, env.body_sha256),
                ec.ECDSA(hashes.SHA256()),
            )
        except InvalidSignature:
            raise self.reject(
                "bad_signature", "signature does not verify with the sender's certificate", mtype, sender
            ) from None
        if not fresh:
            return Verified(ident, env, msg.body)
        why = self.nonces.check_and_add(sender, env.nonce, env.timestamp_ms, now_ms)
        if why == "replay":
            raise self.reject("replay", f"nonce {env.nonce.hex()} was already used (replayed message)", mtype, sender)
        if why is not None:
            raise self.reject(why, "too many messages inside the timestamp window; try again later", mtype, sender)
        return Verified(ident, env, msg.body)
