"""The compiled contracts that ship in the package (written by ``node src/trustfed/ledger/compile.js``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from trustfed.ledger.records import LedgerError

CONTRACTS = ("ParticipantRegistry", "RoundLog", "Incentives")


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str
    compiler: str


@cache
def load_artifact(name: str) -> Artifact:
    if name not in CONTRACTS:
        raise LedgerError(f"unknown contract {name!r}; expected one of {', '.join(CONTRACTS)}")
    try:
        text = resources.files("trustfed.ledger").joinpath("artifacts", f"{name}.json").read_text(encoding="utf-8")
    except OSError as exc:
        raise LedgerError(
            f"compiled artifact for {name} is missing ({exc}); run `node src/trustfed/ledger/compile.js`"
        ) from None
    raw = json.loads(text)
    return Artifact(name, raw["abi"], raw["bytecode"], raw["compiler"])
