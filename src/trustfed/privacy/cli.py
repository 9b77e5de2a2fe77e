"""``trustfed privacy``: inspect a run's privacy spend."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trustfed.privacy.report import load_records, plot_epsilon, summarize

app = typer.Typer(help="Differential privacy: spend reports.", no_args_is_help=True)


@app.command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="run folder holding privacy.jsonl")],
    plot: Annotated[Path | None, typer.Option(help="where to write the plot (default RUN_DIR/privacy.png)")] = None,
) -> None:
    """Print each participant's epsilon (re-derived from the recorded mechanisms) and plot it over rounds."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summaries = summarize(load_records(run_dir))
    table = Table(title=f"privacy spend: {run_dir}")
    for col in ("party", "rounds", "epsilon", "delta", "budget", "recomputed", "status"):
        table.add_column(col, justify="left" if col in ("party", "status") else "right")
    for s in summaries:
        budget = f"{s.budget_epsilon:.3g}" if s.budget_epsilon is not None else "-"
        check = "[green]ok[/green]" if s.verified else "[red]MISMATCH[/red]"
        table.add_row(
            s.party,
            str(len(s.rounds)),
            f"{s.epsilon:.4f}",
            f"{s.delta:.1e}" if s.rounds else "-",
            budget,
            f"{s.recomputed:.4f} {check}" if s.rounds else "-",
            s.status,
        )
    console.print(table)
    out = plot if plot is not None else run_dir / "privacy.png"
    plot_epsilon(summaries, out)
    bad = [s.party for s in summaries if s.rounds and not s.verified]
    console.print(f"plot: {out}")
    if bad:
        console.print(f"[red]recorded epsilon does not match the recorded mechanisms for: {', '.join(bad)}[/red]")
        raise typer.Exit(1)
