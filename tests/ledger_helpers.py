"""Shared helpers for the ledger and audit tests: a small recorded run, and log surgery."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustfed.config import validate_federation_config
from trustfed.ledger.audit import AuditEntry, EcdsaSigner, chain_hash, make_entry, parse_entry
from trustfed.ledger.verify_base import Failure
from trustfed.simulation.runner import run_simulation


def record_run(
    out: Path,
    ledger: dict[str, Any] | None = None,
    rounds: int = 2,
    participants: int = 3,
    privacy: dict[str, Any] | None = None,
) -> None:
    raw: dict[str, Any] = {
        "federation": {"name": "ledger-test", "rounds": rounds, "participants": participants, "seed": 1},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"local_epochs": 1, "batch_size": 64, "lr": 0.05},
        "strategy": {"name": "fedavg", "min_participants": 2},
        "ledger": ledger or {"enabled": True},
    }
    if privacy is not None:
        raw["privacy"] = privacy
    run_simulation(validate_federation_config(raw, "test"), out)


def read_lines(run: Path) -> list[str]:
    return (run / "audit.jsonl").read_text(encoding="utf-8").splitlines()


def write_lines(run: Path, lines: list[str]) -> None:
    (run / "audit.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def find(lines: list[str], kind: str, rnd: int, nth: int = 0) -> int:
    """0-based index of the nth entry of ``kind`` in round ``rnd``."""
    hits = [i for i, line in enumerate(lines) if (e := parse_entry(line)).kind == kind and e.round == rnd]
    return hits[nth]


def rechain(lines: list[str], start: int) -> list[str]:
    """Recompute seq/prev/hash from ``start`` on, as a forger covering their tracks would."""
    out = list(lines)
    prev = parse_entry(out[start - 1]).hash if start else "00" * 32
    for i in range(start, len(out)):
        e = parse_entry(out[i])
        h = chain_hash(prev, i, e.digest, e.sig)
        fixed = AuditEntry(i, prev, e.kind, e.round, e.author, e.body, e.sig, h)
        out[i] = json.dumps(fixed.to_json(), sort_keys=True, separators=(",", ":"))
        prev = h
    return out


def has(failures: list[Failure], *, file: str, line: int | None = None, rnd: int | None = None, field: str) -> bool:
    return any(
        f.file == file and f.field == field and (line is None or f.line == line) and (rnd is None or f.round == rnd)
        for f in failures
    )


def resign(
    run: Path, key_file: Path, kind: str, rnd: int, edit: Callable[[dict[str, Any]], object], nth: int = 0
) -> int:
    """Let ``edit`` change the body of the nth ``kind`` entry of round ``rnd`` in place, re-sign it with
    the coordinator's own key (``key_file``) and re-chain the log: a dishonest coordinator covering its
    tracks, not an outside forger. Returns the entry's 0-based index."""
    from trustfed.pki.ca import load_private_key

    lines = read_lines(run)
    i = find(lines, kind, rnd, nth=nth)
    e = parse_entry(lines[i])
    body = json.loads(json.dumps(e.body))
    edit(body)
    _, line = make_entry(e.seq, e.prev, e.kind, e.round, body, EcdsaSigner("coordinator", load_private_key(key_file)))
    lines[i] = line.rstrip("\n")
    write_lines(run, rechain(lines, i))
    return i
