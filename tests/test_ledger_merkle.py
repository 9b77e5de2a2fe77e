"""Merkle tree: proofs against a slow oracle, proof size bound, and rejection of bad proofs."""

from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustfed.ledger.merkle import (
    EMPTY_ROOT,
    InclusionProof,
    MerkleError,
    MerkleTree,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_inclusion,
)


def _oracle_root(leaves: list[bytes]) -> bytes:
    """Recursive definition: split after the largest power of two below n... for promote-odd trees,
    the same as pairing level by level; written independently as recursion over levels."""
    level = [hashlib.sha256(b"\x00" + x).digest() for x in leaves]
    while len(level) > 1:
        pairs = [level[i : i + 2] for i in range(0, len(level), 2)]
        level = [hashlib.sha256(b"\x01" + p[0] + p[1]).digest() if len(p) == 2 else p[0] for p in pairs]
    return level[0]


def _leaves(n: int) -> list[bytes]:
    return [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(n)]


def test_known_small_trees() -> None:
    a, b, c = _leaves(3)
    assert merkle_root([]) == EMPTY_ROOT
    assert merkle_root([a]) == leaf_hash(a)
    assert merkle_root([a, b]) == node_hash(leaf_hash(a), leaf_hash(b))
    assert merkle_root([a, b, c]) == node_hash(node_hash(leaf_hash(a), leaf_hash(b)), leaf_hash(c))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), data=st.data())
def test_every_proof_verifies_and_matches_oracle(n: int, data: st.DataObject) -> None:
    leaves = _leaves(n)
    tree = MerkleTree(leaves)
    assert tree.root == _oracle_root(leaves)
    i = data.draw(st.integers(0, n - 1))
    proof = tree.proof(i)
    assert len(proof.siblings) <= math.ceil(math.log2(n)) if n > 1 else not proof.siblings
    assert verify_inclusion(leaves[i], proof, tree.root)
    assert not verify_inclusion(leaves[(i + 1) % n] if n > 1 else b"x" * 32, proof, tree.root)
    rt = InclusionProof.from_json(proof.to_json())
    assert rt == proof


def test_tampered_proofs_fail() -> None:
    leaves = _leaves(13)
    tree = MerkleTree(leaves)
    p = tree.proof(6)
    assert verify_inclusion(leaves[6], p, tree.root)
    flipped = bytes([p.siblings[0][0] ^ 1]) + p.siblings[0][1:]
    assert not verify_inclusion(leaves[6], InclusionProof(6, 13, (flipped, *p.siblings[1:])), tree.root)
    assert not verify_inclusion(leaves[6], InclusionProof(7, 13, p.siblings), tree.root)
    assert not verify_inclusion(leaves[6], InclusionProof(6, 13, p.siblings[:-1]), tree.root)
    assert not verify_inclusion(leaves[6], InclusionProof(6, 13, (*p.siblings, p.siblings[0])), tree.root)
    assert not verify_inclusion(leaves[6], InclusionProof(13, 13, p.siblings), tree.root)


def test_proof_size_at_a_million_leaves_bound() -> None:
    # The bound without building 10^6 leaves here (benchmarks/ledger.py builds the real tree).
    assert math.ceil(math.log2(10**6)) * 32 == 640
    tree = MerkleTree(_leaves(1025))
    assert max(len(tree.proof(i).to_bytes()) for i in (0, 511, 1023, 1024)) <= 11 * 32


def test_errors() -> None:
    with pytest.raises(MerkleError):
        MerkleTree([])
    with pytest.raises(MerkleError):
        MerkleTree(_leaves(2)).proof(2)
    with pytest.raises(MerkleError):
        InclusionProof.from_json({"index": 0, "leaf_count": 1, "siblings": ["zz"]})
