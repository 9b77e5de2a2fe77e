"""The audit verifier's chain checks: the on-chain registry and round records against the log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trustfed.errors import TrustFedError
from trustfed.incentives.book import IncentiveBook
from trustfed.ledger.backends import EmbeddedLedger, JsonRpcLedger, Web3Ledger, read_deployment
from trustfed.ledger.recorder import AUDIT_FILE, LEDGER_DIR
from trustfed.ledger.records import ZERO32, Identity, RoundCommitment
from trustfed.ledger.verify_admin import AdminChecks
from trustfed.ledger.verify_base import CHAIN


def open_chain_read_only(ledger_dir: Path, deployment: dict[str, Any], rpc_url: str | None = None) -> Web3Ledger:
    """The run's chain opened for reading only: at ``rpc_url`` (or the deployment's own) for a JSON-RPC
    chain, else the embedded chain replayed from its journal."""
    if rpc_url or deployment.get("backend") == "jsonrpc":
        url = rpc_url or str(deployment.get("rpc_url", ""))
        return JsonRpcLedger(ledger_dir, url, deploy=False, read_only=True)
    return EmbeddedLedger(ledger_dir, read_only=True)


class ChainChecks(AdminChecks):
    # ------------------------------------------------------------ 3. the chain
    def check_chain(self, facts: dict[int, dict[str, Any]]) -> None:
        ledger_dir = self.run_dir / LEDGER_DIR
        try:
            dep = read_deployment(ledger_dir)
        except TrustFedError as exc:
            self.fail(f"{LEDGER_DIR}/deployment.json", None, None, "file", str(exc))
            return
        if dep is None:
            self.fail(f"{LEDGER_DIR}/deployment.json", None, None, "file", "missing: nothing to check on chain")
            return
        try:
            ledger = open_chain_read_only(ledger_dir, dep, self.rpc_url)
        except TrustFedError as exc:
            self.fail(f"{LEDGER_DIR}/", None, None, "chain", f"cannot open the chain: {exc}")
            return
        try:
            self._compare_chain(ledger, facts)
            self.check_admin(ledger)
        finally:
            ledger.close()

    def _compare_chain(self, ledger: Any, facts: dict[int, dict[str, Any]]) -> None:
        on_chain: dict[str, Identity] = {i.id: i for i in ledger.participants()}
        for pid, (fp, role) in self.identities.items():
            ident = on_chain.get(pid)
            if ident is None:
                self.fail(CHAIN, None, None, f"registry.{pid}", "declared in the log but not registered on chain")
            elif ident.fingerprint != fp:
                self.fail(
                    CHAIN, None, None, f"registry.{pid}.fingerprint", "on-chain fingerprint differs from the log's key"
                )
            elif ident.role.name.lower() != role:
                self.fail(
                    CHAIN, None, None, f"registry.{pid}.role", f"chain says {ident.role.name.lower()}, log says {role}"
                )
            elif ident.status.name.lower() != self.left.get(pid, ("active", 0))[0]:
                self.fail(
                    CHAIN,
                    None,
                    None,
                    f"registry.{pid}.status",
                    f"chain says {ident.status.name.lower()}, the log says {self.left.get(pid, ('active', 0))[0]}",
                )
        for pid in on_chain.keys() - self.identities.keys():
            self.fail(CHAIN, None, None, f"registry.{pid}", "registered on chain but absent from the log")
        book = self.book or IncentiveBook()
        for pid in sorted(self.identities):
            acct = ledger.account(pid)
            held = (book.reputation.get(pid, 0), book.balances.get(pid, 0), book.stakes.get(pid, 0))
            if (acct.reputation, acct.balance, acct.stake) != held:
                self.fail(
                    CHAIN,
                    None,
                    None,
                    f"incentives.{pid}",
                    f"chain holds reputation {acct.reputation}, balance {acct.balance} and stake {acct.stake}, the "
                    f"log gives {held[0]}, {held[1]} and {held[2]}",
                )
            self.checked["incentive_accounts"] += 1
        self.compare_rounds(ledger, facts)

    def compare_rounds(self, ledger: Any, facts: dict[int, dict[str, Any]]) -> None:
        """Each round's on-chain record against the log and files: model hash, Merkle root, number of
        updates, receipt hash, and the anchored log head at the round's last entry."""
        nxt = ledger.next_round()
        rounds = sorted(facts)
        hashes = {loc.entry.hash: loc for loc in self.entries}
        anchored_upto = -1
        for rnd in rounds:
            f = facts[rnd]
            rec: RoundCommitment | None = ledger.read_round(rnd)
            if rec is None:
                self.fail(
                    CHAIN, None, rnd, "round", f"in the log (up to line {f['last_line']}) but never committed on chain"
                )
                continue
            self.checked["chain_rounds"] += 1
            want = {
                "model_hash": f.get("model_hash", ""),
                "merkle_root": f.get("merkle_root", ZERO32) if rnd > 0 else ZERO32,
                "num_updates": len(f["leaves"]),
                "receipt_hash": f.get("receipt_hash", ZERO32) if rnd > 0 else ZERO32,
            }
            for name, value in want.items():
                if getattr(rec, name) != value:
                    self.fail(
                        CHAIN,
                        None,
                        rnd,
                        name,
                        f"chain has {str(getattr(rec, name))[:16]}…, the log and files give {str(value)[:16]}…",
                    )
            anchor = hashes.get(rec.log_head)
            if anchor is None:
                self.fail(
                    CHAIN,
                    None,
                    rnd,
                    "log_head",
                    f"anchored head {rec.log_head[:16]}… is no entry of the log: the log was rewritten after round {rnd}",
                )
            elif rec.log_head != f["last_hash"]:
                self.fail(
                    AUDIT_FILE,
                    anchor.line,
                    rnd,
                    "log_head",
                    f"chain anchors line {anchor.line}, but round {rnd} ends at line {f['last_line']}",
                )
            else:
                anchored_upto = max(anchored_upto, f["last_line"])
        for r in range(max(rounds, default=-1) + 1, nxt):
            self.fail(CHAIN, None, r, "round", "committed on chain but absent from the audit log")
        tail = [loc.line for loc in self.entries if loc.line > anchored_upto]
        if tail and anchored_upto >= 0:
            self.fail(
                AUDIT_FILE,
                tail[0],
                None,
                "log_head",
                f"lines {tail[0]}-{tail[-1]} come after the last head anchored on chain",
            )
