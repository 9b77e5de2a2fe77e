"""``trustfed dashboard RUNS``: serve the read-only dashboard over the run folders in RUNS."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from trustfed.errors import ConfigError, ConfigProblem

# A group's callback takes no options after its first argument unless asked to: without this,
# ``trustfed dashboard runs --port 9000`` (the documented order) reads ``--port`` as a subcommand.
app = typer.Typer(
    help="Serve a read-only web dashboard over run folders.",
    invoke_without_command=True,
    context_settings={"allow_interspersed_args": True},
)
console = Console()


@app.callback(invoke_without_command=True)
def dashboard(
    runs: Annotated[Path, typer.Argument(help="a run folder, or a folder of run folders (for example runs)")] = Path(
        "runs"
    ),
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to listen on")] = 8080,
) -> None:
    """Serve http://HOST:PORT/ with every run under RUNS (accuracy, ledger accounts, incentives, privacy
    spend, and the audit on request)."""
    if not runs.is_dir():
        raise ConfigError("dashboard", [ConfigProblem("RUNS", "folder does not exist", str(runs))])
    try:
        import uvicorn

        from trustfed.dashboard.app import create_app
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "dashboard", [ConfigProblem("install", f"the dashboard needs the 'dashboard' extra ({exc.name} missing)")]
        ) from exc
    console.print(f"trustfed dashboard for {runs} on http://{host}:{port}/ (read-only; Ctrl-C stops it)")
    uvicorn.run(create_app(runs), host=host, port=port, log_level="warning", ws="none")  # no websockets used
