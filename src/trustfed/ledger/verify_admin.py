"""The audit verifier's administration checks: who may write the chain, and who did.

The log's ``ledger_account`` entry (coordinator-signed, anchored with round 0) names the one account
that deploys, administers and writes the run's contracts. From the contracts' events the verifier
rebuilds the history of that authority and fails on anything the log does not record:

* each contract's ``admin()`` is that account, and ``deployment.json`` agrees with the log;
* ParticipantRegistry's ``AdminChanged`` events: only the constructor's (none -> that account);
* RoundLog's ``WriterChanged`` events: only the constructor's (that account allowed); a second
  writer, even one that never wrote, is a failure;
* every ``RoundCommitted`` event was sent by that account.

A publicly known development account (:mod:`trustfed.ledger.accounts`) is reported as a note when the
log declares it (``dev_key``), and as a failure when it does not.
"""

from __future__ import annotations

from typing import Any

from trustfed.ledger.accounts import dev_key_notice, is_dev_account
from trustfed.ledger.artifacts import CONTRACTS
from trustfed.ledger.kinds import LEDGER_KIND
from trustfed.ledger.recorder import AUDIT_FILE, COORDINATOR_ID, LEDGER_DIR
from trustfed.ledger.verify_base import CHAIN, VerifierState

_ZERO_ADDRESS = "0x" + "00" * 20
_DEPLOYMENT = f"{LEDGER_DIR}/deployment.json"


def _same(a: object, b: object) -> bool:
    return str(a).lower() == str(b).lower()


class AdminChecks(VerifierState):
    def check_admin(self, ledger: Any) -> None:
        """Compare the chain's administration history with the account the log records."""
        dep = ledger.deployment()
        account = self._recorded_account(dep)
        for name in CONTRACTS:
            admin = ledger.c[name].functions.admin().call()
            if not _same(admin, account):
                self.fail(CHAIN, None, None, f"{name}.admin", f"admin is {admin}, the log records {account}")
        self._admin_events(ledger, account)
        self._writer_events(ledger, account)
        self._write_events(ledger, account)

    def _recorded_account(self, dep: dict[str, Any]) -> str:
        entry = next((loc for loc in self.entries if loc.entry.kind == LEDGER_KIND), None)
        if entry is None:
            self.fail(
                AUDIT_FILE, None, 0, LEDGER_KIND, "no ledger_account entry: the log names no account that may write"
            )
            return str(dep.get("admin", ""))
        e, line = entry.entry, entry.line
        if e.author != COORDINATOR_ID or e.round != 0:
            self.fail(
                AUDIT_FILE, line, e.round, "author", "the ledger_account entry must be the coordinator's, round 0"
            )
        account = str(e.body.get("account", ""))
        if not _same(dep.get("admin"), account):
            self.fail(_DEPLOYMENT, None, None, "admin", f"names {dep.get('admin')}, the log records {account}")
        if e.body.get("contracts") != dep.get("contracts") or e.body.get("chain_id") != dep.get("chain_id"):
            self.fail(_DEPLOYMENT, None, None, "contracts", f"chain or contracts differ from line {line} of the log")
        if is_dev_account(account):
            if e.body.get("dev_key") is True:
                self.notes.append(dev_key_notice(account))
            else:
                self.fail(AUDIT_FILE, line, 0, "body.dev_key", f"{account} is a public development key, undeclared")
        return account

    def _admin_events(self, ledger: Any, account: str) -> None:
        events = ledger.c["ParticipantRegistry"].events.AdminChanged.get_logs(from_block=0)
        for i, ev in enumerate(events):
            old, new = ev["args"]["previousAdmin"], ev["args"]["newAdmin"]
            if i == 0 and _same(old, _ZERO_ADDRESS) and _same(new, account):
                continue  # the constructor
            self.fail(
                CHAIN,
                None,
                None,
                "ParticipantRegistry.admin",
                f"block {ev['blockNumber']}: admin changed from {old} to {new}; the log records no such change",
            )
        self.checked["admin_events"] += len(events)

    def _writer_events(self, ledger: Any, account: str) -> None:
        events = ledger.c["RoundLog"].events.WriterChanged.get_logs(from_block=0)
        for i, ev in enumerate(events):
            writer, allowed = ev["args"]["writer"], bool(ev["args"]["allowed"])
            if i == 0 and allowed and _same(writer, account):
                continue  # the constructor
            what = "authorised as a second RoundLog writer" if allowed else "removed as a RoundLog writer"
            self.fail(
                CHAIN,
                None,
                None,
                "RoundLog.writers",
                f"block {ev['blockNumber']}: {writer} {what}; only {account} may write, and the log records no other",
            )
        self.checked["admin_events"] += len(events)

    def _write_events(self, ledger: Any, account: str) -> None:
        for ev in ledger.c["RoundLog"].events.RoundCommitted.get_logs(from_block=0):
            writer, rnd = ev["args"]["writer"], int(ev["args"]["round"])
            self.checked["chain_writes"] += 1
            if not _same(writer, account):
                self.fail(
                    CHAIN,
                    None,
                    rnd,
                    "writer",
                    f"round {rnd} was written by {writer} (tx {bytes(ev['transactionHash']).hex()[:16]}…), "
                    f"not by the recorded coordinator account {account}",
                )
