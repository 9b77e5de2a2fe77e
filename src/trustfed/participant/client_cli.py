"""``trustfed client --config participant.toml``: run one participant process."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import torch
import typer

from trustfed.participant.assembly import build_participant
from trustfed.participant.settings import load_participant_config

app = typer.Typer(help="Run one participant against a coordinator.", invoke_without_command=True)


@app.callback(invoke_without_command=True)
def client(
    config: Annotated[Path, typer.Option("--config", "-c", help="participant TOML file")],
    threads: Annotated[int, typer.Option(min=1, help="torch threads for local training")] = 1,
) -> None:
    """Pull rounds from the coordinator, train on local data, upload signed updates."""
    logging.getLogger("trustfed").setLevel(logging.INFO)
    torch.set_num_threads(threads)
    cfg = load_participant_config(config)
    client = build_participant(cfg)
    try:
        outcomes = client.run()
    finally:
        client.close()
    included = sum(o.included for o in outcomes)
    typer.echo(f"participant {cfg.participant.id}: {len(outcomes)} round(s), included in {included}")
    if client.refusal is not None:
        typer.echo(f"participant {cfg.participant.id} refused to go on: {client.refusal}", err=True)
        raise typer.Exit(3)
