"""The Merkle tree of trustfed: one definition for the ledger, the enclave and every verifier.

Shape and hashes are RFC 6962's (Certificate Transparency): ``leaf = SHA-256(0x00 || data)``,
``node = SHA-256(0x01 || left || right)``, and a tree of n > 1 leaves is the node over the tree of
its first k leaves and the tree of the rest, k the largest power of two below n. Built level by
level, that is the same tree as pairing neighbours and promoting an odd last node unchanged, which
is how it is computed here. No leaf is duplicated, so a root has one leaf list and a proof is unique;
a proof holds at most ``ceil(log2(n))`` sibling hashes (20 x 32 = 640 bytes at 10^6 leaves), listed
from the leaf up. Which side each sibling is on follows from the leaf index and the leaf count, so a
proof carries nothing else.

The empty root is 32 zero bytes (:data:`EMPTY_ROOT`), not RFC 6962's ``SHA-256("")``. Zero is what
every persisted record already holds for "no commitments": the ``RoundLog`` contract's
``merkleRoot`` (it stores the root and recomputes nothing), round 0 and training-run anchors, and the
``ZERO32`` that ``trustfed.ledger.verify`` expects there. The enclave signs receipts only over at
least one accepted update, so no receipt carries an empty root. A verifier that recomputed
``SHA-256("")`` would refuse a valid empty round; there is one empty root so that none can.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from trustfed.errors import TrustFedError

HASH_SIZE = 32
EMPTY_ROOT = bytes(HASH_SIZE)


class MerkleError(TrustFedError):
    """A Merkle proof or leaf set is malformed."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    level = [leaf_hash(x) for x in leaves]
    levels = [level]
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        levels.append(nxt)
        level = nxt
    return levels


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root of the tree over ``leaves``; :data:`EMPTY_ROOT` (32 zero bytes) for no leaves."""
    if not leaves:
        return EMPTY_ROOT
    return _levels(leaves)[-1][0]


@dataclass(frozen=True)
class InclusionProof:
    index: int
    leaf_count: int
    siblings: tuple[bytes, ...]

    def to_bytes(self) -> bytes:
        """The sibling path only (index and count travel alongside): 32 bytes per level."""
        return b"".join(self.siblings)

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "leaf_count": self.leaf_count, "siblings": [s.hex() for s in self.siblings]}

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> InclusionProof:
        index, count, sibs = raw.get("index"), raw.get("leaf_count"), raw.get("siblings")
        if not isinstance(index, int) or not isinstance(count, int) or not isinstance(sibs, list):
            raise MerkleError("inclusion proof needs integer index, leaf_count and a list of siblings")
        try:
            siblings = tuple(bytes.fromhex(str(s)) for s in sibs)
        except ValueError as exc:
            raise MerkleError(f"inclusion proof sibling is not hex: {exc}") from None
        return cls(index, count, siblings)


class MerkleTree:
    """All levels kept, so many proofs can be cut from one build."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        if not leaves:
            raise MerkleError("a Merkle tree needs at least one leaf (the empty root is EMPTY_ROOT)")
        self.leaf_count = len(leaves)
        self.levels = _levels(leaves)

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    def proof(self, index: int) -> InclusionProof:
        if not 0 <= index < self.leaf_count:
            raise MerkleError(f"leaf index {index} is outside 0..{self.leaf_count - 1}")
        sibs: list[bytes] = []
        i = index
        for level in self.levels[:-1]:
            if i % 2:
                sibs.append(level[i - 1])
            elif i + 1 < len(level):
                sibs.append(level[i + 1])
            i //= 2
        return InclusionProof(index, self.leaf_count, tuple(sibs))


def verify_inclusion(leaf: bytes, proof: InclusionProof, root: bytes) -> bool:
    """True only if ``leaf`` sits at ``proof.index`` in a tree of ``proof.leaf_count`` leaves with ``root``."""
    if not 0 <= proof.index < proof.leaf_count or any(len(s) != HASH_SIZE for s in proof.siblings):
        return False
    h = leaf_hash(leaf)
    i, width = proof.index, proof.leaf_count
    sibs = iter(proof.siblings)
    try:
        while width > 1:
            if i % 2:
                h = node_hash(next(sibs), h)
            elif i + 1 < width:
                h = node_hash(h, next(sibs))
            i //= 2
            width = (width + 1) // 2
    except StopIteration:
        return False
    return next(sibs, None) is None and h == root
