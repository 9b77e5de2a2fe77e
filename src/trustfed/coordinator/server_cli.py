"""``trustfed server --config federation.toml``: run the coordinator over gRPC + mutual TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from trustfed.config import load_federation_config
from trustfed.coordinator.ha import LeaseHeartbeat, open_lease
from trustfed.core.evaluation import final_headline, round_headline
from trustfed.errors import RunFinished

app = typer.Typer(help="Run the coordinator: serve participants over mutual TLS.", invoke_without_command=True)
console = Console()


@app.callback(invoke_without_command=True)
def server(
    config: Annotated[Path, typer.Option("--config", "-c", help="federation TOML file with a \\[transport] section")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for metrics.json, the model and the plot")] = Path(
        "runs/server"
    ),
    listen: Annotated[str | None, typer.Option(help="override \\[transport].listen (host:port)")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the run recorded in OUT after its last round on chain")
    ] = False,
    lease: Annotated[
        str | None,
        typer.Option(
            help="leadership lease shared with standby coordinators (a file, or etcd://HOST:PORT/KEY across hosts): "
            "wait for it, then resume the run in OUT"
        ),
    ] = None,
    lease_ttl: Annotated[float, typer.Option(min=0.5, help="seconds a lease lasts without renewal")] = 5.0,
) -> None:
    """Wait for the federation's participants, run every round, write OUT/metrics.json.

    With --lease, several coordinators started the same way share OUT and the lease: one leads, the
    others wait as standbys; when the leader stops, one of them takes the lease, binds the same
    address and resumes after the last round on chain. Participants drop the round in flight and
    take the next plan (give them enough \\[retry] attempts to outlast the lease's ttl).

    A resume checks the run in OUT before it waits for participants or changes a file: a finished run
    is refused (exit 2; a standby stands down, exit 0), and so is one whose log, ledger checkpoint or
    coordinator state does not verify (exit 2, naming the file and the reason)."""
    import logging

    import torch

    from trustfed.coordinator.network import GrpcTransport
    from trustfed.coordinator.run import run_coordinator, spec_for

    logging.getLogger("trustfed").setLevel(logging.INFO)
    torch.set_num_threads(1)
    cfg = load_federation_config(config)
    held = None
    if lease is not None:
        import os
        import socket

        taken = open_lease(lease, f"{socket.gethostname()}:{os.getpid()}", lease_ttl)
        console.print(f"waiting for the lease {lease} (standby until the leader stops)")
        taken.wait(poll=min(0.5, lease_ttl / 4))
        held = LeaseHeartbeat(taken, lease_ttl / 3)  # renew from now on, also while participants join
        held.start()
        console.print(f"{taken.holder} leads (epoch {taken.epoch})")
        resume = True
    settings = cfg.transport.resolved(config.parent)
    if listen is not None:
        settings = settings.model_copy(update={"listen": listen})
    transport = GrpcTransport(
        settings,
        spec_for(cfg),
        require_commitment=cfg.ledger.enabled,
        sealed=cfg.enclave.enabled,
        secagg=cfg.secagg if cfg.secagg.enabled else None,
    )
    console.print(
        f"coordinator listening on {transport.address}; waiting for {cfg.federation.participants} participants"
    )

    def on_round(rec: object) -> None:
        console.print(f"round {getattr(rec, 'round', '?')}: {round_headline(getattr(rec, 'metrics', {}))}")

    try:
        _, metrics = run_coordinator(cfg, transport, out_dir=out, on_round=on_round, resume=resume, heartbeat=held)
    except RunFinished as exc:
        if held is None:  # --resume on a finished run: refused, exit 2
            raise
        held.stop.set()  # a standby that finds the run finished has nothing to take over: it stands down
        held.lease.release()
        transport.close()
        console.print(f"{exc}; this standby stands down", highlight=False)
        return
    console.print(f"{final_headline(metrics)}; results in {out}")
