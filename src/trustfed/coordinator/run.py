"""Assembly of a networked federation: :func:`run_coordinator` runs the federation in a config over a
:class:`~trustfed.coordinator.network.GrpcTransport` with the same round loop and recorders as a simulation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from trustfed.apps.runtime import Runtime
from trustfed.config import participant_ids
from trustfed.coordinator.admission import RegistryAdmission
from trustfed.coordinator.enclave_record import EnclaveRecord
from trustfed.coordinator.enclave_setup import enclave_strategy
from trustfed.coordinator.engine import Coordinator
from trustfed.coordinator.ha import LeadershipLost, LeaseHeartbeat
from trustfed.coordinator.incentives_record import use_reputation_selection
from trustfed.coordinator.network import GrpcTransport, required_tls_paths
from trustfed.coordinator.recorders import NetworkIdentities, ledger_metrics, recorders_for
from trustfed.coordinator.resume import STATE_DIR, resume_run
from trustfed.coordinator.resume_check import check_resume
from trustfed.coordinator.state import CheckpointObserver
from trustfed.core.codec import ParamSpec
from trustfed.core.history_guard import HistoryGuard
from trustfed.core.rounds import RoundObserver, RoundRecord
from trustfed.ledger.audit import EcdsaSigner
from trustfed.ledger.recorder import COORDINATOR_ID, LedgerRecorder
from trustfed.simulation.runner import run_rounds, write_results
from trustfed.transport.errors import TransportError


def run_coordinator(
    cfg: Any,
    transport: GrpcTransport,
    *,
    out_dir: Path | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    observers: Sequence[RoundObserver] = (),
    write: bool = True,
    resume: bool = False,
    heartbeat: LeaseHeartbeat | None = None,  # started when the lease was taken; renews it meanwhile
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the federation in ``cfg`` (a FederationConfig) over ``transport``: the same
    Coordinator round loop as the simulation, with the same recorders (privacy, ledger; see
    :func:`trustfed.coordinator.recorders.recorders_for`) when ``out_dir`` is given. The ledger
    records the commitments participants signed with their own keys and registers them by their
    certificates. With ``[enclave] enabled`` aggregation runs in the attested enclave service at
    ``[enclave].address``; this process relays sealed updates only. Returns the final parameters
    and the metrics (written to ``out_dir`` unless ``write`` is false)."""
    rt = Runtime(cfg)
    params, spec = rt.initial
    if spec != transport.spec:
        raise TransportError("the transport was built for another model spec than the federation config's")
    evaluate_fn = rt.evaluate_fn()
    # With an enclave, central DP runs inside it (its measured config), never here on the coordinator.
    strategy = rt.base_strategy(evaluate_fn) if cfg.enclave.enabled else rt.strategy(evaluate_fn)
    expected = participant_ids(cfg.federation.participants)
    transport.admit(expected, cfg.strategy.max_examples)  # nobody else is served, whatever its certificate
    enclave: EnclaveRecord | None = None
    if cfg.enclave.enabled:
        strategy, enclave = enclave_strategy(cfg, strategy, spec, transport.settings)
        transport.enclave_receipts = enclave.receipt_json
    # A resume checks everything it builds on before it waits for anyone or changes a file.
    point = check_resume(cfg, out_dir, spec, strategy.name) if resume else None
    present = transport.wait_for_participants(
        expected, transport.settings.join_timeout_s, cfg.strategy.min_participants
    )
    _ca, cert_path, key_path = required_tls_paths(transport.settings)
    with transport.board.cond:
        certificates = {pid: transport.board.certificates[pid] for pid in present}
    network = NetworkIdentities(
        EcdsaSigner.load(COORDINATOR_ID, key_path),
        {COORDINATOR_ID: cert_path.read_bytes(), **certificates},
        transport.commitment_for,
        participant_refusals=transport.refusals_in,
        upload_refusals=transport.refusals,
        max_examples=cfg.strategy.max_examples,
    )
    recorders = recorders_for(
        cfg,
        out_dir,
        spec,
        present,
        network=network,
        enclave=enclave,
        resume=resume,
        app=rt.identity,
        guard=strategy if isinstance(strategy, HistoryGuard) else None,
    )
    use_reputation_selection(cfg, strategy, recorders)
    # Coordinator state (model + server-side strategy state) after every round, before the ledger records
    # it: what a restarted or standby coordinator resumes from.
    state: list[RoundObserver] = [] if out_dir is None else [CheckpointObserver(out_dir / STATE_DIR, strategy, spec)]
    # The transport publishes receipts (with Merkle proofs) last, once the round is on chain.
    # Once the ledger registered the federation, the registry on chain says who is served.
    registry: list[RoundObserver] = [
        RegistryAdmission(transport.admission, r.ledger) for r in recorders if isinstance(r, LedgerRecorder)
    ]
    watchers: list[RoundObserver] = [*observers, *state, *recorders, *registry, transport]
    if cfg.secagg.enabled and transport.secagg is None:
        raise TransportError("[secagg] is enabled but the transport was built without it (GrpcTransport(secagg=...))")
    min_updates = 1 if cfg.secagg.enabled else cfg.strategy.min_participants  # secagg: one summed update
    coord = Coordinator(strategy, transport, params, spec, min_updates=min_updates, observers=watchers)
    resumed = resume_run(coord, point, recorders, enclave) if point is not None else 0

    def each_round(rec: RoundRecord) -> None:
        if heartbeat is not None and (heartbeat.lost.is_set() or not heartbeat.lease.renew()):
            transport.abort("this coordinator lost its lease: another one has taken over")
            raise LeadershipLost(
                f"{heartbeat.lease.holder} lost the lease {heartbeat.lease.path} after round {rec.round}"
            )
        if on_round:
            on_round(rec)

    try:
        metrics = run_rounds(coord, cfg, transport, strategy, spec, each_round)
    finally:
        if heartbeat is not None:
            heartbeat.stop.set()
    if heartbeat is not None:
        heartbeat.lease.release()
    if resumed and point is not None:
        metrics["resumed_after_round"] = resumed
        metrics["rounds"] = [*point.history, *metrics["rounds"]]  # the whole run, earlier rounds from the log
    metrics["transport"] = {"kind": "grpc-mtls", "address": transport.address}
    metrics["app"] = rt.identity.describe()
    metrics.update(ledger_metrics(recorders))
    provenance = transport.provenance()
    if provenance:
        metrics["participants_provenance"] = provenance
    if enclave is not None:
        metrics["enclave"] = enclave.describe()
    if out_dir is not None and write:
        write_results(out_dir, metrics, coord.params, spec.to_json())
    return coord.params, metrics


def spec_for(cfg: Any) -> ParamSpec:
    """The parameter spec of the federation's model (built from the app, no participant data needed)."""
    return Runtime(cfg).spec
