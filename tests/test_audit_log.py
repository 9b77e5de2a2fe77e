"""The audit log alone: chain, signatures, continuation after reopening, and the Signer protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trustfed.ledger.audit import (
    GENESIS_PREV,
    AuditError,
    AuditLog,
    EcdsaSigner,
    Signer,
    chain_hash,
    entry_digest,
    key_fingerprint,
    parse_entry,
    verify_signature,
)
from trustfed.primitives.canonical import canonical_json


def test_append_chain_and_reopen(tmp_path: Path) -> None:
    s = EcdsaSigner.generate("coordinator")
    assert isinstance(s, Signer)
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        e0 = log.append("note", 0, {"x": 1, "text": "héllo"}, s)
        e1 = log.append("note", 1, {"x": 2.5}, s)
    assert e0.prev == GENESIS_PREV and e1.prev == e0.hash
    with AuditLog(path) as log:  # a restarted writer continues the same chain
        assert log.seq == 2 and log.head == e1.hash
        e2 = log.append("note", 1, {"x": 3}, s)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    entries = [parse_entry(line) for line in lines]
    assert [e.seq for e in entries] == [0, 1, 2] and entries[2].prev == e1.hash == entries[1].hash
    for e, line in zip(entries, lines, strict=True):
        assert canonical_json(e.to_json(), allow_nan=True).decode() == line  # the line is canonical JSON
        assert chain_hash(e.prev, e.seq, e.digest, e.sig) == e.hash
        assert verify_signature(s.public_key_pem(), e.digest, e.sig)
    assert e2.hash == entries[2].hash


def test_non_finite_metrics_and_non_ascii_keep_their_signed_bytes(tmp_path: Path) -> None:
    # Entries with a NaN or infinite metric have always been written (tokens NaN / Infinity) and signed so.
    s = EcdsaSigner.generate("coordinator")
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        e = log.append("aggregation", 1, {"metrics": {"loss": float("nan"), "max": float("inf")}, "id": "zö"}, s)
    line = path.read_text(encoding="utf-8")
    assert '"loss":NaN' in line and '"max":Infinity' in line and '"id":"zö"' in line
    back = parse_entry(line)
    assert back.digest == e.digest and verify_signature(s.public_key_pem(), back.digest, back.sig)
    assert chain_hash(back.prev, back.seq, back.digest, back.sig) == e.hash
    assert entry_digest("k", 1, "a", {"x": "é", "m": float("nan")}).hex() == (
        "a31d2d648c6374ca9f2ed2f67f10fb70c914705935c374982734a1580e831e5b"
    )


def test_signature_binds_body_and_author(tmp_path: Path) -> None:
    a, b = EcdsaSigner.generate("a"), EcdsaSigner.generate("b")
    d = entry_digest("k", 1, "a", {"v": 1})
    sig = a.sign(d)
    assert verify_signature(a.public_key_pem(), d, sig)
    assert not verify_signature(b.public_key_pem(), d, sig)
    assert not verify_signature(a.public_key_pem(), entry_digest("k", 1, "a", {"v": 2}), sig)
    assert not verify_signature(a.public_key_pem(), entry_digest("k", 1, "b", {"v": 1}), sig)
    assert not verify_signature(b"not a key", d, sig)


def test_keys_round_trip_and_fingerprint(tmp_path: Path) -> None:
    s = EcdsaSigner.generate("p000")
    s.save(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0
    t = EcdsaSigner.load("p000", tmp_path / "k.pem")
    assert t.public_key_pem() == s.public_key_pem()
    fp = key_fingerprint(s.public_key_pem())
    assert len(fp) == 64 and fp != key_fingerprint(EcdsaSigner.generate("x").public_key_pem())
    with pytest.raises(AuditError):
        EcdsaSigner.load("p000", tmp_path / "missing.pem")


def test_parse_rejects_malformed() -> None:
    s = EcdsaSigner.generate("c")
    good = {"seq": 0, "prev": GENESIS_PREV, "kind": "k", "round": 0, "author": "c", "body": {}, "sig": "", "hash": ""}
    parse_entry(json.dumps(good))
    for bad in (
        "{",
        "[]",
        json.dumps({**good, "extra": 1}),
        json.dumps({**good, "seq": "0"}),
        json.dumps({**good, "sig": "%%%"}),
        json.dumps({**good, "body": []}),
    ):
        with pytest.raises(AuditError):
            parse_entry(bad)
    assert s.key_id == "c"


def test_append_outside_context_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="outside"):
        AuditLog(tmp_path / "a.jsonl").append("k", 0, {}, EcdsaSigner.generate("c"))


def test_corrupt_last_line_is_not_continued(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"seq": 0, "truncated', encoding="utf-8")
    with pytest.raises(AuditError, match="audit verify"):
        AuditLog(p)
