"""Transport errors: every refusal names its reason."""

from __future__ import annotations

from trustfed.errors import TrustFedError


class TransportError(TrustFedError):
    """The coordinator cannot be reached, a handshake failed, or the peer refused us."""


class MessageRejected(TransportError):
    """A received message failed a check (signature, hash, replay, clock, size, role, round).

    ``reason`` is a short machine-friendly tag (``"bad_signature"``, ``"replay"``, ...);
    the message says what was wrong and where.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"message rejected ({reason}): {detail}")
