"""``trustfed audit verify RUN_DIR [--rpc URL]``: the independent verifier (exit 0 only if all holds)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from trustfed.errors import TrustFedError
from trustfed.ledger.verify import verify_run

app = typer.Typer(help="Verify a recorded run: log chain, signatures, Merkle roots, checkpoints, chain.")
console = Console()


class AuditFailed(TrustFedError):
    """The verifier found at least one failure (listed above the message)."""

    exit_code = 1


@app.callback()
def _group() -> None:
    """Independent audit of a recorded run."""


@app.command("verify")
def verify(
    run_dir: Annotated[Path, typer.Argument(help="run folder (for example runs/demo)")],
    rpc: Annotated[str | None, typer.Option("--rpc", help="read the chain from this JSON-RPC URL")] = None,
    participant_records: Annotated[
        list[Path] | None,
        typer.Option(
            "--participant-records",
            help="a participant's refusals file (<id>.refusals.jsonl) or a folder of them; repeatable",
        ),
    ] = None,
) -> None:
    """Recompute everything the run claims and compare it with the chain; list every failure."""
    if not run_dir.is_dir():
        raise AuditFailed(f"{run_dir} is not a folder; pass the run folder (for example runs/demo)")
    missing = [p for p in participant_records or [] if not p.exists()]
    if missing:
        raise AuditFailed(f"--participant-records: {', '.join(map(str, missing))} not found")
    verdict = verify_run(run_dir, rpc, participant_records or [])
    checked = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in verdict.checked.items())
    for note in verdict.notes:
        console.print(f"[bold yellow]{escape(note)}[/bold yellow]", highlight=False)
    if verdict.ok:
        console.print(f"[bold green]VERIFIED[/bold green] {run_dir}: {checked}")
        return
    for f in verdict.failures:
        console.print(f"[red]FAIL[/red] {escape(str(f))}", highlight=False, markup=True, soft_wrap=True)
    raise AuditFailed(f"{run_dir}: {len(verdict.failures)} failure(s); checked {checked}")
