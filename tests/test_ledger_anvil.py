"""The same recorded run on anvil (JSON-RPC), and tampering by a second writer on that chain."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_utils import keccak
from tests.ledger_helpers import has, read_lines, record_run

from trustfed.ledger.accounts import DevKeyRefused
from trustfed.ledger.anvil import Anvil, find_anvil
from trustfed.ledger.backends import JsonRpcLedger
from trustfed.ledger.records import LedgerError, RoundCommitment
from trustfed.ledger.verify import verify_run

pytestmark = pytest.mark.skipif(
    find_anvil(Path(__file__).parent) is None,
    reason="anvil not installed: run `npm ci` in the repository root (make test does it)",
)


@pytest.fixture(scope="module")
def node() -> Iterator[Anvil]:
    with Anvil(find_anvil(Path(__file__).parent)) as a:
        yield a


@pytest.fixture(scope="module")
def recorded(node: Anvil, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("anvil") / "run"
    # anvil's first account signs: a public development key, allowed here explicitly
    record_run(out, {"enabled": True, "backend": "jsonrpc", "rpc_url": node.url, "allow_dev_keys": True})
    return out


def test_run_on_anvil_verifies(recorded: Path, node: Anvil) -> None:
    v = verify_run(recorded)
    assert v.ok, [str(f) for f in v.failures]
    assert v.checked["chain_rounds"] == 3 and v.checked["commitments"] == 6
    assert verify_run(recorded, rpc_url=node.url).ok
    assert not (recorded / "ledger" / "transactions.jsonl").exists()  # the node holds the chain


def test_only_writers_commit(recorded: Path, node: Anvil) -> None:
    led = JsonRpcLedger(recorded / "ledger", node.url, deploy=False, allow_dev_keys=True)
    other = led.w3.eth.accounts[5]
    fn = led.c["RoundLog"].functions.commitRound(3, b"\x01" * 32, b"\x00" * 32, b"\x00" * 32, b"\x00" * 32, 0)
    from web3.exceptions import ContractLogicError

    from trustfed.ledger.backends import _revert_reason

    with pytest.raises(ContractLogicError) as info:
        fn.call({"from": other})
    assert _revert_reason(info.value, [led.c["RoundLog"].abi]).startswith("NotWriter(")
    with pytest.raises(LedgerError, match="OutOfOrder"):
        led.commit_round(RoundCommitment(1, "ab" * 32))


def test_second_writer_changes_a_commitment(recorded: Path, node: Anvil, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    led = JsonRpcLedger(run / "ledger", node.url, deploy=False, allow_dev_keys=True)
    address = led.deployment()["contracts"]["RoundLog"]
    # Rewrite round 2's stored model hash (mapping at slot 3; Record.modelHash is its first slot).
    slot = int.from_bytes(keccak((2).to_bytes(32, "big") + (3).to_bytes(32, "big")), "big")
    node.rpc("anvil_setStorageAt", [address, hex(slot), "0x" + "11" * 32])
    r2 = led.read_round(2)
    assert r2 is not None and r2.model_hash == "11" * 32
    v = verify_run(run)
    assert not v.ok
    assert has(v.failures, file="chain", rnd=2, field="model_hash")
    # A second account made writer appends a round the audit log never saw.
    intruder = led.w3.eth.accounts[1]
    led.w3.eth.wait_for_transaction_receipt(
        led.c["RoundLog"].functions.setWriter(intruder, True).transact({"from": led.sender})
    )
    fn = led.c["RoundLog"].functions.commitRound(3, b"\x22" * 32, b"\x00" * 32, b"\x00" * 32, b"\x00" * 32, 0)
    led.w3.eth.wait_for_transaction_receipt(fn.transact({"from": intruder}))
    v = verify_run(run)
    assert has(v.failures, file="chain", rnd=3, field="round")
    assert has(v.failures, file="chain", field="RoundLog.writers")
    assert has(v.failures, file="chain", rnd=3, field="writer")


def test_anvil_development_key_is_refused_unless_allowed(node: Anvil, tmp_path: Path) -> None:
    """By default the coordinator would sign with anvil's first account, whose key is public."""
    with pytest.raises(DevKeyRefused, match="0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"):
        record_run(tmp_path / "run", {"enabled": True, "backend": "jsonrpc", "rpc_url": node.url}, rounds=1)
    assert not (tmp_path / "run" / "ledger" / "deployment.json").exists()


def test_an_allowed_development_key_is_said_everywhere(recorded: Path, node: Anvil) -> None:
    import json

    from trustfed.ledger.audit import parse_entry

    metrics = json.loads((recorded / "metrics.json").read_text())
    assert metrics["ledger"]["dev_key"] is True and "PUBLIC DEVELOPMENT KEY" in metrics["ledger"]["notice"]
    (entry,) = [e for e in map(parse_entry, read_lines(recorded)) if e.kind == "ledger_account"]
    assert entry.body["dev_key"] is True and entry.body["account"] == metrics["ledger"]["account"]
    v = verify_run(recorded, rpc_url=node.url)
    assert any("PUBLIC DEVELOPMENT KEY" in n for n in v.notes)


def test_writers_and_admins_are_checked_over_rpc(node: Anvil, tmp_path: Path) -> None:
    """A second RoundLog writer that never wrote, and a registry admin handed to another account, fail
    ``audit verify --rpc`` although every round still matches."""
    run = tmp_path / "run"
    record_run(run, {"enabled": True, "backend": "jsonrpc", "rpc_url": node.url, "allow_dev_keys": True}, rounds=1)
    assert verify_run(run, rpc_url=node.url).ok
    led = JsonRpcLedger(run / "ledger", node.url, deploy=False, allow_dev_keys=True)
    admin, intruder, other = led.sender, led.w3.eth.accounts[7], led.w3.eth.accounts[8]
    tx = led.c["RoundLog"].functions.setWriter(intruder, True).transact({"from": admin})
    led.w3.eth.wait_for_transaction_receipt(tx)
    v = verify_run(run, rpc_url=node.url)
    assert [f.field for f in v.failures] == ["RoundLog.writers"] and intruder in v.failures[0].message
    tx = led.c["ParticipantRegistry"].functions.transferAdmin(other).transact({"from": admin})
    led.w3.eth.wait_for_transaction_receipt(tx)
    v = verify_run(run, rpc_url=node.url)
    assert has(v.failures, file="chain", field="ParticipantRegistry.admin")
    assert any(other in f.message and "no such change" in f.message for f in v.failures)
