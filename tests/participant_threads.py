"""A networked coordinator in this process with participant clients on threads beside it: the
scaffolding of the gRPC tests that reach into a participant (a hostile trainer, a counting stub, the
refusal it kept)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from trustfed.config import FederationConfig
from trustfed.coordinator.network import GrpcTransport
from trustfed.coordinator.run import run_coordinator
from trustfed.participant.client import ParticipantClient


def run_with_participants(
    cfg: FederationConfig,
    transport: GrpcTransport,
    ids: Sequence[str],
    make_client: Callable[[str], ParticipantClient],
    *,
    after: Callable[[str, ParticipantClient], None] | None = None,
    join_s: float = 60,
    **coordinator: Any,
) -> tuple[dict[str, BaseException], Any]:
    """Run each participant's client (``make_client(pid)``, then ``after(pid, client)`` once it has run)
    on its own thread while ``run_coordinator(cfg, transport, **coordinator)`` runs here; close the
    transport, join the threads. Returns what each failed participant raised and the coordinator's result."""
    errors: dict[str, BaseException] = {}

    def participant(pid: str) -> None:
        client = make_client(pid)
        try:
            client.run()
            if after is not None:
                after(pid, client)
        except BaseException as exc:  # recorded and asserted by the caller
            errors[pid] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=participant, args=(pid,)) for pid in ids]
    for th in threads:
        th.start()
    try:
        result = run_coordinator(cfg, transport, **coordinator)
    finally:
        transport.close()
        for th in threads:
            th.join(join_s)
    return errors, result
