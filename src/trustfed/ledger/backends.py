"""LedgerBackend: the ledger seam, and its two implementations over web3.

* ``embedded``: an in-process EVM (eth-tester + py-evm). Every transaction is signed here with the
  run's own key (``RUN_DIR/ledger/account.key``, created on first use and funded by one transfer from
  eth-tester's public test account) and its raw bytes are appended to
  ``RUN_DIR/ledger/transactions.jsonl``; opening
  the folder again replays them into a fresh chain, so a restarted coordinator continues the same
  chain (same addresses, nonces, storage and events; block hashes and timestamps differ). Nothing
  is pickled.
* ``jsonrpc``: any Ethereum node by URL (anvil in tests; Besu or geth for a consortium chain). It
  sends from the node's first unlocked account, or signs locally with a key read from a file.

Neither signs with a publicly known development key (:mod:`trustfed.ledger.accounts`) unless
``allow_dev_keys`` says so. Read-only views sign nothing.

Where the contracts live is kept in ``RUN_DIR/ledger/deployment.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from trustfed.ledger.accounts import check_signer, dev_key_notice, is_dev_account, load_or_create_key
from trustfed.ledger.artifacts import CONTRACTS, load_artifact
from trustfed.ledger.deployment import DEPLOYMENT_FILE as DEPLOYMENT_FILE  # re-exported for callers
from trustfed.ledger.deployment import Deployment
from trustfed.ledger.deployment import read_deployment as read_deployment  # re-exported for callers
from trustfed.ledger.records import (
    AccountState,
    Identity,
    LedgerError,
    Role,
    RoundCommitment,
    Status,
    TxRef,
    hex32,
)
from trustfed.ledger.reverts import revert_reason as _revert_reason
from trustfed.primitives.atomic import atomic_write_text

log = logging.getLogger("trustfed.ledger")

JOURNAL_FILE = "transactions.jsonl"
ACCOUNT_KEY_FILE = "account.key"  # the embedded chain's signing key, next to its journal
_FUNDING_WEI = 10**21  # what the run's own key gets from eth-tester's account to pay for gas


class LedgerBackend(Protocol):
    """The ledger seam: identities, round commitments and incentive accounts."""

    name: str

    def deployment(self) -> dict[str, Any]: ...

    def register(self, identities: Sequence[Identity]) -> TxRef: ...

    def set_status(self, participant_id: str, status: Status) -> TxRef: ...

    def commit_round(self, record: RoundCommitment) -> TxRef: ...

    def read_round(self, rnd: int) -> RoundCommitment | None: ...

    def next_round(self) -> int: ...

    def participants(self) -> list[Identity]: ...

    def apply_incentives(
        self, rnd: int, ids: Sequence[str], reputation_deltas: Sequence[int], rewards: Sequence[int]
    ) -> TxRef: ...

    def add_stake(self, participant_id: str, amount: int) -> TxRef: ...

    def slash(self, participant_id: str, rnd: int, amount: int, reason: str) -> TxRef: ...

    def account(self, participant_id: str) -> AccountState: ...

    def close(self) -> None: ...


class Web3Ledger:
    """The contracts through web3; subclasses decide how transactions are sent."""

    name = "web3"

    def __init__(self, w3: Any, ledger_dir: Path) -> None:
        self.w3 = w3
        self.ledger_dir = ledger_dir
        self.c: dict[str, Any] = {}
        self._deployment: Deployment | None = None

    # --- sending: overridden
    @property
    def sender(self) -> str:
        raise NotImplementedError

    def _send(self, fn: Any) -> Any:
        raise NotImplementedError

    def _rpc_url(self) -> str | None:
        return None

    # --- shared
    def _abis(self) -> list[list[dict[str, Any]]]:
        return [load_artifact(n).abi for n in CONTRACTS]

    def _transact(self, fn: Any, what: str) -> TxRef:
        from web3.exceptions import ContractLogicError

        try:
            receipt = self._send(fn)
        except (ContractLogicError, ValueError) as exc:
            raise LedgerError(f"{what} was refused by the chain: {_revert_reason(exc, self._abis())}") from None
        except Exception as exc:
            if type(exc).__name__ == "TransactionFailed":  # eth-tester's revert, imported lazily
                raise LedgerError(f"{what} was refused by the chain: {_revert_reason(exc, self._abis())}") from None
            raise
        if receipt["status"] != 1:
            raise LedgerError(f"{what} failed on chain (transaction {receipt['transactionHash'].hex()} reverted)")
        return TxRef(
            "0x" + bytes(receipt["transactionHash"]).hex(), int(receipt["blockNumber"]), int(receipt["gasUsed"])
        )

    def _deploy_all(self, backend: str) -> None:
        addresses: dict[str, str] = {}
        for name in CONTRACTS:
            art = load_artifact(name)
            factory = self.w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
            try:
                receipt = self._send(factory.constructor())
            except Exception as exc:
                raise LedgerError(f"deploying {name} failed: {exc}") from None
            if receipt["status"] != 1 or not receipt["contractAddress"]:
                raise LedgerError(f"deploying {name} failed (status {receipt['status']})")
            addresses[name] = str(receipt["contractAddress"])
        self._deployment = Deployment(backend, int(self.w3.eth.chain_id), self.sender, addresses, self._rpc_url())
        self.ledger_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.ledger_dir / DEPLOYMENT_FILE, json.dumps(self._deployment.to_json(), indent=2) + "\n")
        self._bind(addresses)
        log.info("deployed ledger contracts on chain %d: %s", self._deployment.chain_id, addresses)

    def _attach(self, raw: dict[str, Any], backend: str) -> None:
        chain_id = int(self.w3.eth.chain_id)
        if raw.get("chain_id") != chain_id:
            raise LedgerError(
                f"{self.ledger_dir / DEPLOYMENT_FILE} is for chain {raw.get('chain_id')}, but the node is chain {chain_id}"
            )
        addresses = {str(k): str(v) for k, v in raw["contracts"].items()}
        for name in CONTRACTS:
            if name not in addresses:
                raise LedgerError(f"{self.ledger_dir / DEPLOYMENT_FILE} lacks the address of {name}")
            if not self.w3.eth.get_code(addresses[name]):
                raise LedgerError(f"no contract code at {addresses[name]} ({name}) on chain {chain_id}")
        self._deployment = Deployment(backend, chain_id, str(raw.get("admin", "")), addresses, self._rpc_url())
        self._bind(addresses)

    def _bind(self, addresses: dict[str, str]) -> None:
        self.c = {n: self.w3.eth.contract(address=addresses[n], abi=load_artifact(n).abi) for n in CONTRACTS}

    def deployment(self) -> dict[str, Any]:
        assert self._deployment is not None
        return self._deployment.to_json()

    def register(self, identities: Sequence[Identity]) -> TxRef:
        ids = [i.id for i in identities]
        fps = [bytes.fromhex(hex32(i.fingerprint, f"fingerprint of {i.id}")) for i in identities]
        roles = [int(i.role) for i in identities]
        return self._transact(
            self.c["ParticipantRegistry"].functions.registerMany(ids, fps, roles), f"registering {ids}"
        )

    def set_status(self, participant_id: str, status: Status) -> TxRef:
        fn = self.c["ParticipantRegistry"].functions.setStatus(participant_id, int(status))
        return self._transact(fn, f"setting {participant_id} to {status.name.lower()}")

    def commit_round(self, record: RoundCommitment) -> TxRef:
        r = record.normalised()
        fn = self.c["RoundLog"].functions.commitRound(
            r.round,
            bytes.fromhex(r.model_hash),
            bytes.fromhex(r.merkle_root),
            bytes.fromhex(r.receipt_hash),
            bytes.fromhex(r.log_head),
            r.num_updates,
        )
        return self._transact(fn, f"committing round {r.round}")

    def next_round(self) -> int:
        return int(self.c["RoundLog"].functions.nextRound().call())

    def read_round(self, rnd: int) -> RoundCommitment | None:
        if rnd < 0 or rnd >= self.next_round():
            return None
        m, root, receipt, head, n, _block = self.c["RoundLog"].functions.getRound(rnd).call()
        return RoundCommitment(rnd, bytes(m).hex(), bytes(root).hex(), bytes(receipt).hex(), bytes(head).hex(), int(n))

    def participants(self) -> list[Identity]:
        reg = self.c["ParticipantRegistry"].functions
        out = []
        for i in range(int(reg.count().call())):
            pid = str(reg.idAt(i).call())
            fp, role, status = reg.get(pid).call()
            out.append(Identity(pid, bytes(fp).hex(), Role(int(role)), Status(int(status))))
        return out

    def apply_incentives(
        self, rnd: int, ids: Sequence[str], reputation_deltas: Sequence[int], rewards: Sequence[int]
    ) -> TxRef:
        fn = self.c["Incentives"].functions.applyRound(rnd, list(ids), list(reputation_deltas), list(rewards))
        return self._transact(fn, f"applying round {rnd} incentives")

    def add_stake(self, participant_id: str, amount: int) -> TxRef:
        fn = self.c["Incentives"].functions.addStake(participant_id, amount)
        return self._transact(fn, f"staking {amount} for {participant_id}")

    def slash(self, participant_id: str, rnd: int, amount: int, reason: str) -> TxRef:
        fn = self.c["Incentives"].functions.slash(participant_id, rnd, amount, reason)
        return self._transact(fn, f"slashing {amount} of {participant_id}'s stake in round {rnd}")

    def account(self, participant_id: str) -> AccountState:
        rep, bal, stake = self.c["Incentives"].functions.accountOf(participant_id).call()
        return AccountState(int(rep), int(bal), int(stake))

    def close(self) -> None:
        pass


class EmbeddedLedger(Web3Ledger):
    """In-process EVM whose signed transactions are journaled in the run folder and replayed on open."""

    name = "embedded"

    def __init__(
        self, ledger_dir: Path, *, read_only: bool = False, key_file: Path | None = None, allow_dev_keys: bool = False
    ) -> None:
        from eth_account import Account
        from eth_tester import EthereumTester, PyEVMBackend
        from web3 import Web3
        from web3.providers.eth_tester import EthereumTesterProvider

        backend = PyEVMBackend()
        tester = EthereumTester(backend)
        super().__init__(Web3(EthereumTesterProvider(tester)), ledger_dir)
        # eth-tester's first funded key (private key 1: public): it only funds the run's own key.
        self._tester = self._account = Account.from_key(backend.account_keys[0].to_bytes())
        self._journal = ledger_dir / JOURNAL_FILE
        self._gas_limit: int | None = None
        self._read_only = read_only
        self._offset = 0  # bytes of the journal replayed so far
        self._prefix = hashlib.sha256()  # hash of those bytes: the journal may only grow
        self._lines = 0
        if not read_only:
            ledger_dir.mkdir(parents=True, exist_ok=True)
        self.replayed = self._replay()
        raw = read_deployment(ledger_dir)
        if raw is None and read_only:
            raise LedgerError(f"no {DEPLOYMENT_FILE} in {ledger_dir}: nothing to read")
        if not read_only:
            self._use_own_key(key_file or ledger_dir / ACCOUNT_KEY_FILE, raw, allow_dev_keys)
        if raw is None:
            if self.replayed:
                raise LedgerError(f"{self._journal} has transactions but {DEPLOYMENT_FILE} is missing")
            self._deploy_all(self.name)
        else:
            self._attach(raw, self.name)

    def _use_own_key(self, key_file: Path, raw: dict[str, Any] | None, allow_dev_keys: bool) -> None:
        """Sign with the run's own key. A chain deployed by eth-tester's public key (before runs had their
        own) keeps it, as a development key: refused unless ``allow_dev_keys``."""
        admin = str((raw or {}).get("admin", ""))
        if not (raw is not None and not key_file.is_file() and admin == self._tester.address):
            self._account = load_or_create_key(key_file)
            if raw is not None and admin != self._account.address:
                raise LedgerError(f"{key_file} holds {self._account.address}, but this chain's admin is {admin}")
        check_signer(self._account.address, allow_dev_keys, f"ledger {self.ledger_dir}")
        if self._account.address != self._tester.address and not self.w3.eth.get_balance(self._account.address):
            self._sign_and_send(self._tester, {"to": self._account.address, "value": _FUNDING_WEI, "gas": 21000})

    @property
    def sender(self) -> str:
        return str(self._account.address)

    def _replay(self) -> int:
        """Replay the journal's lines after those already replayed; returns how many were replayed."""
        if not self._journal.is_file():
            return 0
        with self._journal.open("rb") as f:
            head = f.read(self._offset)
            if len(head) != self._offset or hashlib.sha256(head).digest() != self._prefix.digest():
                raise LedgerError(
                    f"{self._journal}: the first {self._lines} transaction line(s), already replayed, have changed "
                    "or were removed; the journal may only grow. Someone rewrote the chain's history"
                )
            rest = f.read()
        n = 0
        lineno = self._lines
        for raw_line in rest.splitlines(keepends=True):
            if not raw_line.endswith(b"\n"):
                break  # a line still being written: take it next time
            lineno += 1
            line = raw_line.decode("utf-8", errors="replace")
            self._offset += len(raw_line)
            self._prefix.update(raw_line)
            self._lines = lineno
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                raw_tx = bytes.fromhex(rec["raw"].removeprefix("0x"))
            except (json.JSONDecodeError, KeyError, ValueError, AttributeError) as exc:
                raise LedgerError(f"{self._journal}:{lineno}: not a journaled transaction ({exc})") from None
            try:
                h = self.w3.eth.send_raw_transaction(raw_tx)
                receipt = self.w3.eth.wait_for_transaction_receipt(h)
            except Exception as exc:  # any decoding or validation failure of an altered transaction
                raise LedgerError(
                    f"{self._journal}:{lineno}: journaled transaction does not replay ({exc}); the journal was altered"
                ) from None
            if "0x" + bytes(h).hex() != rec.get("tx") or receipt["status"] != rec.get("status", 1):
                raise LedgerError(
                    f"{self._journal}:{lineno}: replayed transaction differs from the journal "
                    f"(hash {bytes(h).hex()}, status {receipt['status']}); the journal was altered"
                )
            n += 1
        if n:
            log.info("replayed %d ledger transactions from %s", n, self._journal)
        return n

    def refresh(self) -> int:
        """Read-only views: replay the transactions appended to the journal since the last look.

        The bytes replayed before must be unchanged (checked by hash), so a view notices a rewritten
        history. Returns the number of new transactions."""
        if not self._read_only:
            return 0
        n = self._replay()
        self.replayed += n
        return n

    def _send(self, fn: Any) -> Any:
        addr = self._account.address
        params: dict[str, Any] = {"from": addr}
        if hasattr(fn, "call"):
            # py-evm estimates gas by a binary search of ~13 executions; a generous explicit limit costs
            # one (unused gas is not charged). A revert is then re-run as a call to read its reason.
            if self._gas_limit is None:
                self._gas_limit = int(self.w3.eth.get_block("latest")["gasLimit"]) // 2
            params["gas"] = self._gas_limit
        receipt = self._sign_and_send(self._account, fn.build_transaction(params))
        if receipt["status"] != 1 and hasattr(fn, "call"):
            fn.call({"from": addr}, block_identifier=receipt["blockNumber"] - 1)  # raises with the reason
        return receipt

    def _sign_and_send(self, account: Any, tx: dict[str, Any]) -> Any:
        """Sign ``tx`` with ``account``, mine it and journal it; returns the receipt."""
        tx = {**tx, "from": account.address, "nonce": self.w3.eth.get_transaction_count(account.address)}
        if "maxFeePerGas" not in tx and "gasPrice" not in tx:
            tx["maxFeePerGas"] = 2 * int(self.w3.eth.get_block("latest")["baseFeePerGas"]) + 10**9
            tx["maxPriorityFeePerGas"] = 10**9
        tx.setdefault("chainId", int(self.w3.eth.chain_id))
        signed = account.sign_transaction(tx)
        h = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(h)
        # Every mined transaction is journaled, failed ones too: they use a nonce, so replay needs them.
        line = json.dumps(
            {
                "tx": "0x" + bytes(h).hex(),
                "raw": "0x" + bytes(signed.raw_transaction).hex(),
                "status": receipt["status"],
            }
        )
        with self._journal.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        return receipt


class JsonRpcLedger(Web3Ledger):
    """Any Ethereum JSON-RPC node."""

    name = "jsonrpc"

    def __init__(
        self,
        ledger_dir: Path,
        url: str,
        key_file: Path | None = None,
        *,
        deploy: bool = True,
        read_only: bool = False,
        allow_dev_keys: bool = False,
    ) -> None:
        from web3 import Web3

        w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 30}))
        super().__init__(w3, ledger_dir)
        self.url = url
        try:
            accounts = list(w3.eth.accounts)
            w3.eth.chain_id  # noqa: B018 - probe the connection
        except Exception as exc:
            raise LedgerError(
                f"cannot reach the Ethereum node at {url}: {exc}; start it or fix ledger.rpc_url"
            ) from None
        self._local: Any = None
        if key_file is not None:
            from eth_account import Account

            try:
                self._local = Account.from_key(key_file.read_text(encoding="utf-8").strip())
            except (OSError, ValueError) as exc:
                raise LedgerError(f"cannot read a hex private key from {key_file}: {exc}") from None
            self._from = str(self._local.address)
        elif accounts:
            self._from = str(accounts[0])
        elif read_only:
            self._from = ""
        else:
            raise LedgerError(f"the node at {url} has no unlocked account; set ledger.key_file")
        if not read_only:
            check_signer(self._from, allow_dev_keys, f"ledger at {url}")
        ledger_dir.mkdir(parents=True, exist_ok=True)
        raw = read_deployment(ledger_dir)
        if raw is not None:
            self._attach(raw, self.name)
        elif deploy and not read_only:
            self._deploy_all(self.name)
        else:
            raise LedgerError(f"no {DEPLOYMENT_FILE} in {ledger_dir}: nothing to attach to")

    def _rpc_url(self) -> str | None:
        return self.url

    @property
    def sender(self) -> str:
        return self._from

    def _send(self, fn: Any) -> Any:
        if self._local is None:
            h = fn.transact({"from": self._from})
        else:
            nonce = self.w3.eth.get_transaction_count(self._from, "pending")
            tx = fn.build_transaction({"from": self._from, "nonce": nonce})
            h = self.w3.eth.send_raw_transaction(self._local.sign_transaction(tx).raw_transaction)
        return self.w3.eth.wait_for_transaction_receipt(h, timeout=60)


def open_backend(
    backend: str,
    ledger_dir: Path,
    rpc_url: str | None = None,
    key_file: Path | None = None,
    *,
    allow_dev_keys: bool = False,
) -> Web3Ledger:
    """Open (deploying on first use) the ledger of a run folder; a development key only if allowed."""
    ledger: Web3Ledger
    if backend == "embedded":
        ledger = EmbeddedLedger(ledger_dir, key_file=key_file, allow_dev_keys=allow_dev_keys)
    elif backend == "jsonrpc":
        if not rpc_url:
            raise LedgerError("ledger.backend = 'jsonrpc' needs ledger.rpc_url (for example http://127.0.0.1:8545)")
        ledger = JsonRpcLedger(ledger_dir, rpc_url, key_file, allow_dev_keys=allow_dev_keys)
    else:
        raise LedgerError(f"unknown ledger backend {backend!r}; expected 'embedded' or 'jsonrpc'")
    if is_dev_account(ledger.sender):
        log.warning("%s", dev_key_notice(ledger.sender))
    return ledger
