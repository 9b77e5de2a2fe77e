"""``trustfed ledger show RUN_DIR``: participants, rounds, reputation and balances of a recorded run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from trustfed.incentives.book import REPUTATION_SCALE
from trustfed.ledger.backends import EmbeddedLedger, JsonRpcLedger, Web3Ledger, read_deployment
from trustfed.ledger.recorder import LEDGER_DIR
from trustfed.ledger.records import LedgerError

app = typer.Typer(help="Inspect a run's ledger (identities, round commitments, incentives).", no_args_is_help=True)
console = Console()


@app.callback()
def _group() -> None:
    """Inspect a run's ledger."""


@app.command("show")
def show(
    run_dir: Annotated[Path, typer.Argument(help="run folder (for example runs/demo)")],
    rpc: Annotated[str | None, typer.Option("--rpc", help="read the chain from this JSON-RPC URL")] = None,
) -> None:
    """Print the participants, the round commitments and the incentive accounts on chain."""
    ledger_dir = run_dir / LEDGER_DIR
    dep = read_deployment(ledger_dir)
    if dep is None:
        raise LedgerError(f"{ledger_dir} has no deployment.json: record a run with ledger.enabled = true first")
    ledger: Web3Ledger
    if rpc or dep.get("backend") == "jsonrpc":
        ledger = JsonRpcLedger(ledger_dir, rpc or str(dep.get("rpc_url", "")), deploy=False, read_only=True)
    else:
        ledger = EmbeddedLedger(ledger_dir, read_only=True)
    console.print(f"[bold]{dep.get('backend')}[/bold] chain {dep.get('chain_id')}; contracts {dep.get('contracts')}")
    people = Table(title="participants")
    for col in ("id", "role", "status", "fingerprint", "reputation", "balance", "stake"):
        people.add_column(col, no_wrap=col in ("id", "role"))
    for ident in ledger.participants():
        acct = ledger.account(ident.id)
        people.add_row(
            ident.id,
            ident.role.name.lower(),
            ident.status.name.lower(),
            ident.fingerprint[:12] + "…",
            f"{acct.reputation / REPUTATION_SCALE:.4f}" if acct.reputation else "-",  # "-": never scored
            str(acct.balance),
            str(acct.stake),
        )
    console.print(people)
    rounds = Table(title="rounds")
    for col in ("round", "model hash", "merkle root", "receipt", "log head", "updates"):
        rounds.add_column(col)
    for r in range(ledger.next_round()):
        rec = ledger.read_round(r)
        if rec is None:
            continue
        rounds.add_row(
            str(r),
            rec.model_hash[:12],
            rec.merkle_root[:12],
            rec.receipt_hash[:12],
            rec.log_head[:12],
            str(rec.num_updates),
        )
    console.print(rounds)
