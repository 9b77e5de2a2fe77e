"""The same recorded run on anvil (JSON-RPC), and tampering by a second writer on that chain."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_utils import keccak
from tests.ledger_helpers import has, record_run

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
    record_run(out, {"enabled": True, "backend": "jsonrpc", "rpc_url": node.url})
    return out


def test_run_on_anvil_verifies(recorded: Path, node: Anvil) -> None:
    v = verify_run(recorded)
    assert v.ok, [str(f) for f in v.failures]
    assert v.checked["chain_rounds"] == 3 and v.checked["commitments"] == 6
    assert verify_run(recorded, rpc_url=node.url).ok
    assert not (recorded / "ledger" / "transactions.jsonl").exists()  # the node holds the chain


def test_only_writers_commit(recorded: Path, node: Anvil) -> None:
    led = JsonRpcLedger(recorded / "ledger", node.url, deploy=False)
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
    led = JsonRpcLedger(run / "ledger", node.url, deploy=False)
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
