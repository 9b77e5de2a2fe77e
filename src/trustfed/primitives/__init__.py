"""Trust primitives, one implementation each: the Merkle tree, canonical JSON, atomic file writes
and the verifier's verdict.

Everything above (ledger, enclave, coordinator, participants, distributed training) builds on
these; they import only the standard library and :mod:`trustfed.errors`.
"""

from trustfed.primitives.atomic import atomic_write_bytes, atomic_write_text, fsync_folder
from trustfed.primitives.canonical import canonical_json, canonical_text, parse_json_object
from trustfed.primitives.merkle import (
    EMPTY_ROOT,
    InclusionProof,
    MerkleError,
    MerkleTree,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_inclusion,
)
from trustfed.primitives.verdict import Verdict

__all__ = [
    "EMPTY_ROOT",
    "InclusionProof",
    "MerkleError",
    "MerkleTree",
    "Verdict",
    "atomic_write_bytes",
    "atomic_write_text",
    "canonical_json",
    "canonical_text",
    "fsync_folder",
    "leaf_hash",
    "merkle_root",
    "node_hash",
    "parse_json_object",
    "verify_inclusion",
]
