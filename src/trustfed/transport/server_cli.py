"""``trustfed server --config federation.toml``: run the coordinator over gRPC + mutual TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Run the coordinator: serve participants over mutual TLS.", invoke_without_command=True)
console = Console()


@app.callback(invoke_without_command=True)
def server(
    config: Annotated[Path, typer.Option("--config", "-c", help="federation TOML file with a \\[transport] section")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for metrics.json, the model and the plot")] = Path(
        "runs/server"
    ),
    listen: Annotated[str | None, typer.Option(help="override \\[transport].listen (host:port)")] = None,
) -> None:
    """Wait for the federation's participants, run every round, write OUT/metrics.json."""
    import logging

    import torch

    from trustfed.config import load_federation_config
    from trustfed.coordinator.service import GrpcTransport, run_coordinator, spec_for

    logging.getLogger("trustfed").setLevel(logging.INFO)
    torch.set_num_threads(1)
    cfg = load_federation_config(config)
    settings = cfg.transport.resolved(config.parent)
    if listen is not None:
        settings = settings.model_copy(update={"listen": listen})
    transport = GrpcTransport(settings, spec_for(cfg))
    console.print(
        f"coordinator listening on {transport.address}; waiting for {cfg.federation.participants} participants"
    )

    def on_round(rec: object) -> None:
        m = getattr(rec, "metrics", {})
        console.print(f"round {getattr(rec, 'round', '?')}: accuracy {m.get('accuracy', float('nan')):.4f}")

    _, metrics = run_coordinator(cfg, transport, out_dir=out, on_round=on_round)
    console.print(f"final accuracy {metrics['final_accuracy']:.4f}; results in {out}")
