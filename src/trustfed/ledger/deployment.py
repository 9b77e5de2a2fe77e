"""Where a run's contracts live: ``RUN_DIR/ledger/deployment.json`` (backend, chain id, admin account,
contract addresses and, for a node, its URL)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustfed.ledger.records import LedgerError

DEPLOYMENT_FILE = "deployment.json"


@dataclass(frozen=True)
class Deployment:
    backend: str
    chain_id: int
    admin: str
    contracts: dict[str, str]
    rpc_url: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backend": self.backend,
            "chain_id": self.chain_id,
            "admin": self.admin,
            "contracts": self.contracts,
        }
        if self.rpc_url is not None:
            out["rpc_url"] = self.rpc_url
        return out


def read_deployment(ledger_dir: Path) -> dict[str, Any] | None:
    path = ledger_dir / DEPLOYMENT_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LedgerError(f"{path} is unreadable ({exc}); restore it or start a new run folder") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("contracts"), dict):
        raise LedgerError(f"{path} has no 'contracts' object")
    return raw
