"""The ``[ledger]`` section of the federation file. Imports nothing from trustfed.config."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LedgerSettings(BaseModel):
    """Where a run's rounds are recorded. Off by default; the demo turns it on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="record every round in the audit log and on chain")
    backend: Literal["embedded", "jsonrpc"] = Field("embedded", description="in-process EVM or a node by URL")
    rpc_url: str | None = Field(None, description="JSON-RPC URL of the node (jsonrpc only)")
    key_file: Path | None = Field(
        None,
        description="hex private key to sign with (default: the node's first account for jsonrpc; for embedded a key "
        "of the run's own, RUN_DIR/ledger/account.key)",
    )
    allow_dev_keys: bool = Field(
        False,
        description="let the coordinator sign with a publicly known development key (anvil/hardhat accounts): "
        "test chains only; every output of the run then says so",
    )
    checkpoints: bool = Field(True, description="save every round's global model under RUN_DIR/checkpoints")

    @model_validator(mode="after")
    def _url(self) -> LedgerSettings:
        if self.backend == "jsonrpc" and not self.rpc_url:
            raise ValueError("backend 'jsonrpc' needs rpc_url, for example http://127.0.0.1:8545")
        if self.rpc_url is not None and not self.rpc_url.startswith(("http://", "https://")):
            raise ValueError("rpc_url must start with http:// or https://")
        return self
