"""The coordinator's side of enclave aggregation: attest the enclave service, then aggregate through it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from trustfed.core.codec import ParamSpec
from trustfed.transport.settings import TransportSettings

if TYPE_CHECKING:
    pass
from trustfed.coordinator.enclave_record import EnclaveRecord, attest_enclave
from trustfed.coordinator.network import required_tls_paths
from trustfed.enclave.errors import EnclaveError
from trustfed.enclave.service import GrpcEnclaveClient, TlsMaterial
from trustfed.enclave.strategy import EnclaveStrategy
from trustfed.simulation.enclave import enclave_aggregation, simulated_policy

log = logging.getLogger("trustfed.coordinator.service")


def enclave_strategy(cfg: Any, inner: Any, spec: ParamSpec, settings: TransportSettings) -> tuple[Any, Any]:
    """Aggregate through the enclave service at ``[enclave].address``: attest it first (fail closed)."""
    section = cfg.enclave
    if section.address is None:
        raise EnclaveError(
            "[enclave] enabled over the network needs [enclave].address: the host:port of a `trustfed enclave` "
            "service that participants and the coordinator both reach"
        )
    if section.backend == "simulated" and not section.allow_simulated_tee:
        raise EnclaveError(
            "enclave.backend is 'simulated' (software only) but the federation has allow_simulated_tee = false"
        )
    ca, cert, key = required_tls_paths(settings)
    client = GrpcEnclaveClient(section.address, TlsMaterial.from_files(ca, cert, key))
    aggregation = enclave_aggregation(cfg)
    policy = simulated_policy(aggregation, section.policy) if section.policy.allow_simulated_tee else section.policy
    attestation = attest_enclave(client, policy, "coordinator")
    strategy = EnclaveStrategy(
        inner, client, spec, allow_simulated=section.allow_simulated_tee, central_dp=aggregation.central_dp
    )
    label = "SIMULATED " if attestation.claims.get("simulated") else ""
    log.warning(
        "aggregating through the %senclave at %s (measurement %s…)",
        label,
        section.address,
        str(attestation.claims.get("measurement", ""))[:16],
    )
    return strategy, EnclaveRecord(strategy, attestation)
