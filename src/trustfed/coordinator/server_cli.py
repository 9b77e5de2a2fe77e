"""``trustfed server --config federation.toml``: run the coordinator over gRPC + mutual TLS."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from trustfed.config import load_federation_config, participant_ids
from trustfed.coordinator.board import RoundBoard
from trustfed.coordinator.ha import LeaseHeartbeat, open_lease
from trustfed.coordinator.network import GrpcTransport
from trustfed.coordinator.run import run_coordinator, spec_for
from trustfed.core.evaluation import final_headline, round_headline
from trustfed.core.rounds import RoundRecord
from trustfed.core.strategy import RoundPlan, RoundResult, Update
from trustfed.errors import RunFinished

app = typer.Typer(help="Run the coordinator: serve participants over mutual TLS.", invoke_without_command=True)
console = Console()


class JoinReport(threading.Thread):
    """Says who has joined while the coordinator waits for its participants (a silent phase otherwise),
    until all have or the first round starts (:meth:`finish`)."""

    def __init__(self, board: RoundBoard, expected: int) -> None:
        super().__init__(name="trustfed-joins", daemon=True)
        self.board, self.expected = board, expected
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._seen: list[str] = []

    def report(self) -> None:
        with self.board.cond:
            joined = set(self.board.checked_in)
        with self._lock:
            for pid in sorted(joined - set(self._seen)):
                self._seen.append(pid)
                console.print(f"{pid} joined ({len(self._seen)}/{self.expected})", highlight=False)

    def run(self) -> None:
        while not self.stop.is_set() and len(self._seen) < self.expected:
            self.report()
            with self.board.cond:
                self.board.cond.wait(0.5)

    def finish(self) -> None:
        """Report whoever joined since the last look, and stop looking."""
        if not self.stop.is_set():
            self.stop.set()
            self.report()


class FirstRoundStart:
    """A RoundObserver that says when the first round this process runs has started: until it ends
    (the ledger's set-up, every participant's training) nothing else is printed."""

    def __init__(self, joins: JoinReport) -> None:
        self.joins = joins
        self.started = False

    def on_round_start(self, plan: RoundPlan, params: torch.Tensor) -> None:
        self.joins.finish()
        if not self.started:
            self.started = True
            n = len(plan.participants)
            console.print(f"round {plan.round} started: {n} participant(s) training", highlight=False)

    def on_round_end(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> None:
        pass


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
    logging.getLogger("trustfed").setLevel(logging.INFO)
    torch.set_num_threads(1)
    console.print(f"starting the coordinator: loading {config}, building the model", highlight=False)
    cfg = load_federation_config(config)
    held = None
    if lease is not None:
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
        participants=participant_ids(cfg.federation.participants),
    )
    console.print(
        f"coordinator listening on {transport.address}; waiting for {cfg.federation.participants} participants"
    )

    joins = JoinReport(transport.board, cfg.federation.participants)
    joins.start()

    def on_round(rec: RoundRecord) -> None:
        console.print(f"round {rec.round}: {round_headline(rec.metrics)}")

    try:
        _, metrics = run_coordinator(
            cfg,
            transport,
            out_dir=out,
            on_round=on_round,
            observers=[FirstRoundStart(joins)],
            resume=resume,
            heartbeat=held,
        )
    except RunFinished as exc:
        if held is None:  # --resume on a finished run: refused, exit 2
            raise
        held.stop.set()  # a standby that finds the run finished has nothing to take over: it stands down
        held.lease.release()
        transport.close()
        console.print(f"{exc}; this standby stands down", highlight=False)
        return
    finally:
        joins.stop.set()
    console.print(f"{final_headline(metrics)}; results in {out}")
