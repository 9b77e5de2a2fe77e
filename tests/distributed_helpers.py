"""Shared helpers for the distributed-training tests: provenance-log surgery and an in-memory RoundLog."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trustfed.distributed.provenance import GENESIS, entry_hash
from trustfed.ledger.records import LedgerError, RoundCommitment, TxRef


def rechain_provenance(path: Path, start: int) -> None:
    """Recompute prev/hash from 1-based line ``start`` on, as a forger covering their tracks would."""
    lines = path.read_text(encoding="utf-8").splitlines()
    prev = json.loads(lines[start - 2])["hash"] if start > 1 else GENESIS
    for i in range(start - 1, len(lines)):
        body = {k: v for k, v in json.loads(lines[i]).items() if k != "hash"} | {"prev": prev}
        prev = entry_hash(body)
        lines[i] = json.dumps({**body, "hash": prev}, sort_keys=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def edit_provenance(path: Path, line: int, **fields: Any) -> None:
    """Overwrite fields of the entry on 1-based ``line`` (breaking the chain until rechained)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[line - 1] = json.dumps(json.loads(lines[line - 1]) | fields, sort_keys=True)
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")


class MemoryRoundLog:
    """RoundLog's rules in memory (consecutive rounds, records never change), for tests without an EVM."""

    def __init__(self) -> None:
        self.records: list[RoundCommitment] = []

    def commit_round(self, record: RoundCommitment) -> TxRef:
        if record.round != len(self.records):
            raise LedgerError(f"OutOfOrder({len(self.records)}, {record.round})")
        self.records.append(record.normalised())
        return TxRef("0x" + "00" * 32, len(self.records), 0)

    def read_round(self, rnd: int) -> RoundCommitment | None:
        return self.records[rnd] if 0 <= rnd < len(self.records) else None

    def next_round(self) -> int:
        return len(self.records)
