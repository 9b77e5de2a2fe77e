"""The trust primitives: Merkle tree (against an RFC 6962 oracle), canonical JSON (property tests),
atomic writes (old file kept on failure) and the verdict."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import trustfed.primitives
from trustfed.primitives import atomic
from trustfed.primitives.atomic import atomic_write_bytes, atomic_write_text
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


# ---------------------------------------------------------------- merkle
def _rfc6962_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 MTH written directly from the RFC's recursive definition (n >= 1)."""
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _rfc6962_root(leaves[:k]) + _rfc6962_root(leaves[k:])).digest()


def _leaves(n: int) -> list[bytes]:
    return [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(n)]


def _flip(data: bytes, bit: int = 0) -> bytes:
    return data[: bit // 8] + bytes([data[bit // 8] ^ (1 << (bit % 8))]) + data[bit // 8 + 1 :]


def test_empty_root_is_pinned_to_32_zero_bytes() -> None:
    # The ledger's RoundLog, round 0 and training-run anchors hold zero for "no commitments".
    assert EMPTY_ROOT == bytes(32) == merkle_root([])
    assert merkle_root([]) != hashlib.sha256(b"").digest()  # not RFC 6962's empty MTH
    with pytest.raises(MerkleError, match="at least one leaf"):
        MerkleTree([])


def test_pinned_roots() -> None:
    # Roots recorded on chain, in audit logs and in receipts: these bytes must never change.
    assert merkle_root([b"a", b"b", b"c"]).hex() == "36642e73c2540ab121e3a6bf9545b0a24982cd830eb13d3cd19de3ce6c021ec1"
    assert (
        merkle_root([bytes([i]) for i in range(7)]).hex()
        == "3560191803028444b232018ac047fdb561c09c23a7a6876c85e08b5e4d48e9f3"
    )


def test_known_small_trees() -> None:
    a, b, c = _leaves(3)
    assert merkle_root([a]) == leaf_hash(a)
    assert merkle_root([a, b]) == node_hash(leaf_hash(a), leaf_hash(b))
    assert merkle_root([a, b, c]) == node_hash(node_hash(leaf_hash(a), leaf_hash(b)), leaf_hash(c))


@pytest.mark.parametrize("n", range(34))
def test_every_proof_verifies_and_a_flipped_bit_fails(n: int) -> None:
    leaves = _leaves(n)
    root = merkle_root(leaves)
    if n == 0:
        assert root == EMPTY_ROOT
        assert not verify_inclusion(b"x" * 32, InclusionProof(0, 0, ()), root)
        return
    assert root == _rfc6962_root(leaves)
    tree = MerkleTree(leaves)
    assert tree.root == root
    for i, leaf in enumerate(leaves):
        proof = tree.proof(i)
        assert len(proof.siblings) <= math.ceil(math.log2(n)) if n > 1 else not proof.siblings
        assert verify_inclusion(leaf, proof, root)
        assert InclusionProof.from_json(proof.to_json()) == proof
        assert not verify_inclusion(_flip(leaf, i % 256), proof, root)
        assert not verify_inclusion(leaf, proof, _flip(root, i % 256))
        for j, sib in enumerate(proof.siblings):
            bad = (*proof.siblings[:j], _flip(sib, (i + j) % 256), *proof.siblings[j + 1 :])
            assert not verify_inclusion(leaf, InclusionProof(i, n, bad), root)


@settings(derandomize=True, max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=8), min_size=1, max_size=40))
def test_root_matches_rfc6962_oracle(leaves: list[bytes]) -> None:
    assert merkle_root(leaves) == _rfc6962_root(leaves)


def test_tampered_proofs_fail() -> None:
    leaves = _leaves(13)
    tree = MerkleTree(leaves)
    p = tree.proof(6)
    assert verify_inclusion(leaves[6], p, tree.root)
    assert not verify_inclusion(leaves[6], InclusionProof(7, 13, p.siblings), tree.root)
    assert not verify_inclusion(leaves[6], InclusionProof(6, 7, p.siblings), tree.root)
    assert not verify_inclusion(leaves[6], InclusionProof(6, 13, p.siblings[:-1]), tree.root)
    assert not verify_inclusion(leaves[6], InclusionProof(6, 13, (*p.siblings, p.siblings[0])), tree.root)
    assert not verify_inclusion(leaves[6], InclusionProof(13, 13, p.siblings), tree.root)
    assert not verify_inclusion(leaves[6], InclusionProof(6, 13, (p.siblings[0][:31], *p.siblings[1:])), tree.root)


def test_proof_size_at_a_million_leaves_bound() -> None:
    # The bound without building 10^6 leaves here (benchmarks/ledger.py builds the real tree).
    assert math.ceil(math.log2(10**6)) * 32 == 640
    tree = MerkleTree(_leaves(1025))
    assert max(len(tree.proof(i).to_bytes()) for i in (0, 511, 1023, 1024)) <= 11 * 32


def test_merkle_errors() -> None:
    with pytest.raises(MerkleError, match="outside"):
        MerkleTree(_leaves(2)).proof(2)
    with pytest.raises(MerkleError, match="not hex"):
        InclusionProof.from_json({"index": 0, "leaf_count": 1, "siblings": ["zz"]})
    with pytest.raises(MerkleError, match="integer index"):
        InclusionProof.from_json({"index": "0", "leaf_count": 1, "siblings": []})


# ---------------------------------------------------------------- canonical JSON
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=25,
)
_special = st.sampled_from([math.nan, math.inf, -math.inf])
json_values_with_nan = st.recursive(
    _scalars | _special,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=25,
)


def _reversed_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reversed_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed_keys(v) for v in value]
    return value


@settings(derandomize=True, deadline=None)
@given(json_values)
def test_canonical_json_matches_the_strict_oracle_and_round_trips(value: Any) -> None:
    data = canonical_json(value)
    assert data == json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )
    assert canonical_text(value) == data.decode("utf-8")
    assert json.loads(data) == value
    assert canonical_json(json.loads(data)) == data  # a parsed value re-encodes to the same bytes
    assert canonical_json(_reversed_keys(value)) == data  # insertion order does not matter


@settings(derandomize=True, deadline=None)
@given(json_values)
def test_canonical_options_agree_on_ascii_and_escape_the_rest(value: Any) -> None:
    strict = canonical_json(value)
    escaped = canonical_json(value, ensure_ascii=True)
    assert escaped.isascii()
    assert json.loads(escaped) == value
    assert canonical_json(value, allow_nan=True) == strict  # finite values: the audit log's bytes
    if strict.isascii():
        assert escaped == strict


@settings(derandomize=True, deadline=None)
@given(json_values_with_nan)
def test_canonical_options_keep_the_formats_logs_were_hashed_with(value: Any) -> None:
    # The audit log's encoder and the provenance log's (without its never-reached ``default=str``).
    audit = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    provenance = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    assert canonical_json(value, allow_nan=True) == audit
    assert canonical_json(value, ensure_ascii=True, allow_nan=True) == provenance


@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
def test_canonical_json_strict_refuses_nan_and_infinity(special: float) -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": [1.0, special]})
    assert canonical_json({"x": special}, allow_nan=True) in (b'{"x":NaN}', b'{"x":Infinity}', b'{"x":-Infinity}')


def test_canonical_json_bytes_are_pinned() -> None:
    value = {"b": [1, 2.5, None, True], "a": "héllo ✓", "c": {"z": -0.0, "y": 10**20}}
    assert (
        canonical_json(value)
        == '{"a":"héllo ✓","b":[1,2.5,null,true],"c":{"y":100000000000000000000,"z":-0.0}}'.encode()
    )
    assert canonical_json(value, ensure_ascii=True) == (
        b'{"a":"h\\u00e9llo \\u2713","b":[1,2.5,null,true],"c":{"y":100000000000000000000,"z":-0.0}}'
    )
    with pytest.raises(TypeError):
        canonical_json({"p": Path("x")})


def test_parse_json_object_checks_size_encoding_and_type() -> None:
    assert parse_json_object(b'{"a":1}', "thing", 100) == {"a": 1}
    with pytest.raises(ValueError, match="thing is 8 bytes, more than the limit of 7"):
        parse_json_object(b'{"a":12}', "thing", 7)
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        parse_json_object(b"\xff{}", "thing", 100)
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        parse_json_object(b"[1]", "thing", 100)


# ---------------------------------------------------------------- atomic writes
def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    atomic_write_bytes(p, b"one")
    atomic_write_text(p, "twö")
    assert p.read_text(encoding="utf-8") == "twö"
    assert _leftovers(tmp_path, {"state.json"}) == []


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_atomic_write_keeps_the_old_file_when_it_fails_midway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    p = tmp_path / "state.json"
    atomic_write_bytes(p, b"old contents")
    folder_syncs: list[str] = []

    def boom(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    if failing == "write":
        real_fdopen = os.fdopen

        def half_written(fd: int, *args: Any, **kwargs: Any) -> Any:
            f = real_fdopen(fd, *args, **kwargs)

            class Torn:
                def __enter__(self) -> Torn:
                    return self

                def __exit__(self, *exc: object) -> None:
                    f.close()

                def write(self, data: bytes) -> int:
                    f.write(data[:3])
                    f.flush()
                    raise OSError(28, "No space left on device")

            return Torn()

        monkeypatch.setattr(atomic.os, "fdopen", half_written)
    elif failing == "fsync":
        monkeypatch.setattr(atomic.os, "fsync", boom)
    else:
        monkeypatch.setattr(atomic.os, "replace", boom)
    monkeypatch.setattr(atomic, "fsync_folder", lambda folder: folder_syncs.append(str(folder)))
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(p, b"new contents that never land")
    assert p.read_bytes() == b"old contents"
    assert _leftovers(tmp_path, {"state.json"}) == []
    assert folder_syncs == []


def _record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The fsyncs (of files and of folders) and renames the atomic module makes, in order."""
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync-folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        calls.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    return calls


def test_atomic_write_fsyncs_file_then_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record_syncs(monkeypatch)
    atomic_write_bytes(tmp_path / "f", b"x")
    assert calls == ["fsync-file", "replace", "fsync-folder"]


def test_atomic_write_modes(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "key.pem", b"secret", mode=0o600)
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    atomic_write_bytes(tmp_path / "plain", b"x")
    (tmp_path / "reference").write_bytes(b"x")  # as open() creates it, under the same umask
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == stat.S_IMODE((tmp_path / "reference").stat().st_mode)
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "missing" / "f", b"x")


def test_publish_folder_syncs_every_file_then_moves_over_the_old_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old").write_bytes(b"old")
    tmp = tmp_path / ".ckpt.tmp"
    tmp.mkdir()
    (tmp / "a").write_bytes(b"a")
    (tmp / "b").write_bytes(b"b")
    calls = _record_syncs(monkeypatch)
    atomic.publish_folder(tmp, final)
    assert calls == ["fsync-file", "fsync-file", "fsync-folder", "replace", "fsync-folder"]
    assert sorted(p.name for p in final.iterdir()) == ["a", "b"] and not tmp.exists()


# ---------------------------------------------------------------- verdict
def test_verdict_is_ok_only_without_reasons() -> None:
    assert Verdict.of([]).ok and Verdict.of([], {"entries": 2}).claims == {"entries": 2}
    refused = Verdict.of(["bad signature", "wrong round"], {"backend": "x"})
    assert not refused.ok and refused.reasons == ("bad signature", "wrong round")
    assert not Verdict(False).ok and Verdict(False).reasons == ()  # refused by default
    with pytest.raises(ValueError, match="cannot be ok"):
        Verdict(True, ("a reason",))


# ---------------------------------------------------------------- layering
def test_primitives_import_only_the_standard_library_and_errors() -> None:
    folder = Path(trustfed.primitives.__file__).parent
    allowed = {"trustfed.errors"} | {f"trustfed.primitives.{p.stem}" for p in folder.glob("*.py")}
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top == "__future__" or name in allowed, (path.name, name)
