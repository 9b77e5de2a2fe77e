"""Assembly of a networked participant from its config: the trainer the federation's app builds over
the participant's own data (sealing to the enclave in enclave mode), then the client."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trustfed.app.api import DataSpec
from trustfed.apps.runtime import Runtime
from trustfed.attacks.trainers import CraftingTrainer
from trustfed.config import load_federation_config, participant_ids
from trustfed.enclave.errors import EnclaveError
from trustfed.enclave.participant import AttestedEnclave, SealingTrainer
from trustfed.enclave.sealing import KeySigner
from trustfed.enclave.service import GrpcEnclaveClient, TlsMaterial
from trustfed.errors import ConfigError, ConfigProblem
from trustfed.ledger.participant import (
    ChainView,
)
from trustfed.models.trainer import CompressingTrainer, Trainer
from trustfed.participant.client import ParticipantClient
from trustfed.participant.settings import ParticipantConfig
from trustfed.pki.ca import load_private_key
from trustfed.privacy.accounting import PrivacyError
from trustfed.simulation.enclave import enclave_aggregation, simulated_policy
from trustfed.transport.errors import TransportError

log = logging.getLogger("trustfed.participant")


def build_participant(cfg: ParticipantConfig) -> ParticipantClient:
    """Build the trainer for this participant from the federation file, then the client."""
    fed = load_federation_config(cfg.participant.federation_config)
    pid = cfg.participant.id
    rt = Runtime(fed)
    if rt.builtin and pid not in participant_ids(fed.federation.participants):
        raise TransportError(
            f"participant id {pid!r} is not one of the federation's participants "
            f"({', '.join(participant_ids(fed.federation.participants)[:5])}…); check [participant].id"
        )
    state_dir = cfg.state.dir if cfg.state is not None else None
    if fed.privacy.mode != "none" and state_dir is None:
        raise PrivacyError(
            f"participant {pid}: the federation runs differential privacy, but this participant has "
            "no [state].dir to keep its privacy spend in; a restart would forget what it has spent. Set [state].dir "
            "(load_participant_config defaults it to the participant file's folder)"
        )
    data_spec = participant_data_spec(cfg, rt.builtin)
    local = rt.local_data(data_spec, pid)
    trainer = attacking_trainer(fed, pid, rt.trainer(pid, local, budget_state_dir=state_dir))
    spec = rt.spec
    provenance = rt.provenance(data_spec, local)
    if fed.enclave.enabled:
        trainer = _sealing_trainer(fed, cfg, trainer)
    if fed.transport.compression != "none":  # uploads travel quantised (never with the enclave: config refuses it)
        trainer = CompressingTrainer(trainer, fed.transport.compression_policy)
    chain: ChainView | None = None
    if fed.ledger.enabled:
        if cfg.ledger is None:
            log.warning(
                "participant %s: the federation records a ledger but this participant's file has no [ledger] view; "
                "models and inclusion proofs are NOT checked against the chain",
                cfg.participant.id,
            )
        else:
            rpc = cfg.ledger.rpc_url or (fed.ledger.rpc_url if fed.ledger.backend == "jsonrpc" else None)
            chain = ChainView(cfg.ledger.dir, rpc)
    secagg = fed.secagg if fed.secagg.enabled else None
    return ParticipantClient(
        cfg, trainer, spec, chain=chain, commit=fed.ledger.enabled, secagg=secagg, provenance=provenance
    )


def attacking_trainer(fed: Any, pid: str, trainer: Trainer) -> Trainer:
    """With ``[attack]`` and ``pid`` among its malicious participants, the attack crafts what ``pid`` sends
    (its trainer already trains on the data the attack poisoned): the federation's attack, run in the
    participant's own process as the simulation runs it for that participant. Anyone else: ``trainer``."""
    a = fed.attack
    if a.kind == "none" or pid not in a.malicious(participant_ids(fed.federation.participants)):
        return trainer
    log.warning("participant %s is malicious in this federation: attack %s crafts its updates", pid, a.kind)
    aggregator = {"name": fed.strategy.aggregator, **fed.strategy.aggregator_params}
    return CraftingTrainer(trainer, a.build(), a.kind, a.seed * 7919 + fed.federation.seed, aggregator)


def participant_data_spec(cfg: ParticipantConfig, builtin: bool) -> DataSpec:
    """This participant's own ``[data]``: its path and free keys. Without one, the built-in app hands it
    its partition of the federation's dataset (a simulated participant); an app needs one."""
    source = f"{cfg.source} [data]"
    if cfg.data is None:
        if builtin:
            return DataSpec(None, {"participant": cfg.participant.id}, source)
        raise ConfigError(
            cfg.source,
            [ConfigProblem("data", "the federation runs an app: this participant needs its own [data] section")],
        )
    options = {k: v for k, v in cfg.data.items() if k != "path"}
    path = cfg.data.get("path")
    return DataSpec(Path(path) if isinstance(path, str) else None, options, source)


def _sealing_trainer(fed: Any, cfg: ParticipantConfig, trainer: Trainer) -> Trainer:
    """Enclave mode: attest the enclave against this participant's policy before training, then seal
    every update to the attested key and sign its commitment with the participant's PKI key."""
    section = fed.enclave
    if section.address is None:
        raise EnclaveError("the federation aggregates in an enclave but [enclave].address is not set")
    pid = cfg.participant.id
    aggregation = enclave_aggregation(fed)  # with central DP, its parameters are part of the measurement
    # This participant's own policy: the expected measurement is computed from its copy of the code.
    policy = simulated_policy(aggregation, section.policy) if section.policy.allow_simulated_tee else section.policy
    client = GrpcEnclaveClient(section.address, TlsMaterial.from_files(cfg.tls.ca, cfg.tls.cert, cfg.tls.key))
    key = load_private_key(cfg.tls.key)
    return SealingTrainer(trainer, AttestedEnclave(client, policy, where=f"participant {pid}"), KeySigner(pid, key))
