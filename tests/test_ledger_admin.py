"""Ledger administration: the coordinator never signs with a public development key unless allowed, and
``audit verify`` rebuilds who administers and writes the contracts from their events (the embedded chain
here; the same checks on anvil are in test_ledger_anvil.py)."""

from __future__ import annotations

import json
import logging
import shutil
import stat
from pathlib import Path

import pytest
from tests.ledger_helpers import has, read_lines, record_run

from trustfed.ledger.accounts import DevKeyRefused, dev_accounts, is_dev_account
from trustfed.ledger.audit import parse_entry
from trustfed.ledger.backends import ACCOUNT_KEY_FILE, EmbeddedLedger, open_backend
from trustfed.ledger.verify import verify_run

# Published by anvil and hardhat for the mnemonic "test test ... junk" (accounts 0, 1 and 9), and
# eth-tester's first account (private key 1).
PUBLISHED = (
    "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
    "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
    "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720",
    "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf",
)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("admin") / "run"
    record_run(out, rounds=1)
    return out


@pytest.fixture
def run(recorded: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(recorded, dst)
    return dst


def test_the_development_accounts_are_the_published_ones() -> None:
    assert all(is_dev_account(a) for a in PUBLISHED)
    assert len(dev_accounts()) == 50  # 20 per mnemonic (anvil/hardhat, ganache) + eth-tester's 10
    assert not is_dev_account("0x" + "12" * 20)


def test_the_embedded_chain_signs_with_a_key_of_its_own(recorded: Path) -> None:
    key = recorded / "ledger" / ACCOUNT_KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    dep = json.loads((recorded / "ledger" / "deployment.json").read_text())
    assert not is_dev_account(dep["admin"])
    (entry,) = [e for e in map(parse_entry, read_lines(recorded)) if e.kind == "ledger_account"]
    assert entry.body["account"] == dep["admin"] and entry.body["dev_key"] is False
    assert entry.body["contracts"] == dep["contracts"]
    metrics = json.loads((recorded / "metrics.json").read_text())
    assert metrics["ledger"]["account"] == dep["admin"] and metrics["ledger"]["dev_key"] is False
    v = verify_run(recorded)
    assert v.ok, [str(f) for f in v.failures]
    assert v.checked["chain_writes"] == 2 and not v.notes


def test_a_public_key_is_refused_unless_allowed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tester_key = tmp_path / "tester.key"
    tester_key.write_text("0x" + "00" * 31 + "01\n")
    with pytest.raises(DevKeyRefused, match=r"0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf.*allow_dev_keys"):
        open_backend("embedded", tmp_path / "a", key_file=tester_key)
    assert not (tmp_path / "a" / "deployment.json").exists()  # refused before anything was deployed
    with caplog.at_level(logging.WARNING, logger="trustfed.ledger"):
        led = open_backend("embedded", tmp_path / "b", key_file=tester_key, allow_dev_keys=True)
    assert led.sender == PUBLISHED[3]
    assert "PUBLIC DEVELOPMENT KEY" in caplog.text


def test_a_second_writer_is_caught_before_it_writes(run: Path) -> None:
    led = EmbeddedLedger(run / "ledger")  # the admin's own key (RUN_DIR/ledger/account.key)
    intruder = led.w3.eth.accounts[2]
    led._transact(led.c["RoundLog"].functions.setWriter(intruder, True), "adding a writer")
    v = verify_run(run)
    assert has(v.failures, file="chain", field="RoundLog.writers"), [str(f) for f in v.failures]
    assert any(intruder in f.message and "second RoundLog writer" in f.message for f in v.failures)


def test_a_new_registry_admin_is_caught(run: Path) -> None:
    led = EmbeddedLedger(run / "ledger")
    other = led.w3.eth.accounts[4]
    led._transact(led.c["ParticipantRegistry"].functions.transferAdmin(other), "handing over the registry")
    v = verify_run(run)
    assert has(v.failures, file="chain", field="ParticipantRegistry.admin")
    assert any(other in f.message and "no such change" in f.message for f in v.failures)


def test_a_deployment_file_naming_another_admin_is_caught(run: Path) -> None:
    path = run / "ledger" / "deployment.json"
    dep = json.loads(path.read_text())
    dep["admin"] = "0x" + "12" * 20
    path.write_text(json.dumps(dep))
    v = verify_run(run)
    assert has(v.failures, file="ledger/deployment.json", field="admin")
