"""The [ledger] section of the federation file."""

from __future__ import annotations

import pytest

from trustfed.config import validate_federation_config
from trustfed.errors import ConfigError


def test_default_is_off_and_embedded() -> None:
    cfg = validate_federation_config({}, "t")
    assert cfg.ledger.enabled is False and cfg.ledger.backend == "embedded"


def test_jsonrpc_needs_a_url() -> None:
    with pytest.raises(ConfigError, match="ledger"):
        validate_federation_config({"ledger": {"enabled": True, "backend": "jsonrpc"}}, "t")
    with pytest.raises(ConfigError, match="rpc_url"):
        validate_federation_config({"ledger": {"backend": "jsonrpc", "rpc_url": "127.0.0.1:8545"}}, "t")
    cfg = validate_federation_config({"ledger": {"backend": "jsonrpc", "rpc_url": "http://127.0.0.1:8545"}}, "t")
    assert cfg.ledger.rpc_url == "http://127.0.0.1:8545"
    with pytest.raises(ConfigError, match="unknown key"):
        validate_federation_config({"ledger": {"chain": "x"}}, "t")
