"""Shamir secret sharing over the prime field GF(2**521 - 1).

Secrets are byte strings of up to 64 bytes (X25519 keys and 32-byte seeds). Shares are
(x, y) points with x in 1..n; any ``threshold`` of them recover the secret, fewer reveal
nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from trustfed.errors import TrustFedError

PRIME = 2**521 - 1
SECRET_BYTES_MAX = 64
SHARE_BYTES = 66  # ceil(521 / 8)


class SecretSharingError(TrustFedError):
    """Shares are missing, duplicated or malformed."""


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares of ``secret`` at the points ``xs`` (distinct, non-zero, < PRIME)."""
    if not 1 <= len(secret) <= SECRET_BYTES_MAX:
        raise SecretSharingError(f"secret must have 1..{SECRET_BYTES_MAX} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise SecretSharingError(f"threshold {threshold} must be in 1..{len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise SecretSharingError("share points must be distinct and non-zero")
    # Prefix a length byte so leading zero bytes of the secret survive.
    s = int.from_bytes(bytes([len(secret)]) + secret, "big")
    coeffs = [s] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def combine(shares: dict[int, int], threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise SecretSharingError(f"need {threshold} shares, got {len(shares)}")
    pts = sorted(shares.items())[:threshold]
    s = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        s = (s + yi * num * pow(den, -1, PRIME)) % PRIME
    raw = s.to_bytes(SECRET_BYTES_MAX + 1, "big").lstrip(b"\0")
    if not raw or raw[0] != len(raw) - 1:
        raise SecretSharingError("shares do not combine to a well-formed secret (wrong or tampered shares)")
    return raw[1:]


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(b: bytes) -> int:
    if len(b) != SHARE_BYTES:
        raise SecretSharingError(f"share must be {SHARE_BYTES} bytes, got {len(b)}")
    y = int.from_bytes(b, "big")
    if y >= PRIME:
        raise SecretSharingError("share value out of field range")
    return y
