"""Who signs the ledger's transactions: publicly known development keys, and a run's own key.

Development chains fund accounts whose private keys everybody knows: anvil and hardhat derive theirs
from the mnemonic ``test test ... junk``, ganache from ``myth like ... collect``, and eth-tester (the
embedded backend's EVM) uses the private keys 1 to 10. An account among them proves nothing about who
signed: anyone can send as it. The coordinator refuses to sign with one unless
``[ledger] allow_dev_keys = true`` says it is a test chain, and every run output then says so.
"""

from __future__ import annotations

import os
import secrets
from functools import cache
from pathlib import Path
from typing import Any

from trustfed.ledger.records import LedgerError

# Published development mnemonics (anvil and hardhat share the first; ganache's deterministic mode).
DEV_MNEMONICS = (
    "test test test test test test test test test test test junk",
    "myth like bonus scare over problem client lizard pioneer submit female collect",
)
DEV_ACCOUNTS_PER_MNEMONIC = 20  # hardhat funds 20, anvil 10 by default
ETH_TESTER_KEYS = range(1, 11)  # eth-tester's default accounts: private keys 1..10


class DevKeyRefused(LedgerError):
    """The ledger would be signed with a publicly known development key, and that was not allowed."""


@cache
def dev_accounts() -> frozenset[str]:
    """Lower-case addresses of the well-known development accounts, derived from their public keys."""
    from eth_account import Account
    from eth_account.hdaccount import key_from_seed, seed_from_mnemonic

    out = {Account.from_key(k.to_bytes(32, "big")).address for k in ETH_TESTER_KEYS}
    for words in DEV_MNEMONICS:
        seed = seed_from_mnemonic(words, "")
        for i in range(DEV_ACCOUNTS_PER_MNEMONIC):
            out.add(Account.from_key(key_from_seed(seed, f"m/44'/60'/0'/0/{i}")).address)
    return frozenset(a.lower() for a in out)


def is_dev_account(address: str) -> bool:
    return address.lower() in dev_accounts()


def dev_key_notice(address: str) -> str:
    """The line every output of a run signed with a development key carries."""
    return (
        f"the ledger is signed with a PUBLIC DEVELOPMENT KEY ({address}): anyone can sign as the coordinator "
        "on this chain; its records show what was written, not who wrote it. For tests only"
    )


def check_signer(address: str, allow_dev_keys: bool, where: str) -> None:
    """Refuse a development account as the coordinator's signer unless explicitly allowed."""
    if is_dev_account(address) and not allow_dev_keys:
        raise DevKeyRefused(
            f"{where}: the coordinator would sign the ledger with {address}, a publicly known development key "
            "(anvil/hardhat/ganache mnemonic or eth-tester account). Set [ledger] key_file to a key of your own, "
            "or [ledger] allow_dev_keys = true on a test chain (every output then says so)"
        )


def load_or_create_key(path: Path) -> Any:
    """The run's own signing key (hex, mode 0600), created on first use; an ``eth_account`` LocalAccount."""
    from eth_account import Account

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # created meanwhile: read it below
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("0x" + secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
    try:
        return Account.from_key(path.read_text(encoding="utf-8").strip())
    except (OSError, ValueError) as exc:
        raise LedgerError(f"cannot read a hex private key from {path}: {exc}") from None
