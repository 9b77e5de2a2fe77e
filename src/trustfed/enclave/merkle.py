"""A Merkle tree over byte-string leaves (RFC 6962 / Certificate Transparency shape).

Leaf hash ``SHA-256(0x00 || leaf)``, node hash ``SHA-256(0x01 || left || right)``; a tree of n
leaves splits at the largest power of two below n, so no leaf is duplicated and proofs are unique.
Pure functions: the enclave uses the root over a round's input commitments; participants check
their own commitment's inclusion with :func:`verify_inclusion`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _root(hashes: Sequence[bytes]) -> bytes:
    if len(hashes) == 1:
        return hashes[0]
    k = _split(len(hashes))
    return node_hash(_root(hashes[:k]), _root(hashes[k:]))


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return EMPTY_ROOT
    return _root([leaf_hash(x) for x in leaves])


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Sibling hashes from the leaf up to the root (RFC 6962 audit path)."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} out of range for {len(leaves)} leaves")

    def path(hashes: Sequence[bytes], i: int) -> list[bytes]:
        if len(hashes) == 1:
            return []
        k = _split(len(hashes))
        if i < k:
            return [*path(hashes[:k], i), _root(hashes[k:])]
        return [*path(hashes[k:], i - k), _root(hashes[:k])]

    return path([leaf_hash(x) for x in leaves], index)


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """Check that ``leaf`` is leaf ``index`` of a tree of ``size`` leaves with ``root``."""
    if not 0 <= index < size:
        return False

    def climb(h: bytes, i: int, n: int, rest: list[bytes]) -> bytes | None:
        if n == 1:
            return h if not rest else None
        if not rest:
            return None
        k = _split(n)
        sibling = rest[-1]
        if i < k:
            sub = climb(h, i, k, rest[:-1])
            return None if sub is None else node_hash(sub, sibling)
        sub = climb(h, i - k, n - k, rest[:-1])
        return None if sub is None else node_hash(sibling, sub)

    got = climb(leaf_hash(leaf), index, size, list(proof))
    return got is not None and got == root
