"""Enclave mode for a simulated federation: wrap trainers and strategy, run rounds, keep receipts.

:func:`wrap_for_enclave` turns a plain federation (strategy + trainers) into an enclave-mode one:
each trainer becomes a :class:`SealingTrainer` with its own identity key and attestation policy, the
strategy becomes an :class:`EnclaveStrategy`. :func:`run_federation` builds the whole thing from a
:class:`FederationConfig` with the same building blocks as ``trustfed simulate`` so that plain and
enclave mode can be compared round by round (tests, ``benchmarks/enclave.py``, the demo).
With ``[privacy] mode = "central"`` the enclave, not the coordinator, runs DP-FedAvg: the DP
parameters enter the enclave's measured aggregation config (:func:`enclave_aggregation`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from trustfed.apps.runtime import Runtime
from trustfed.config import FederationConfig, StrategySection, participant_ids
from trustfed.coordinator.engine import Coordinator
from trustfed.core.codec import ParamSpec
from trustfed.core.rounds import RoundObserver, RoundRecord, Transport
from trustfed.core.strategy import Strategy
from trustfed.enclave.core import Enclave, EnclaveClient
from trustfed.enclave.errors import EnclaveError
from trustfed.enclave.measurement import measure
from trustfed.enclave.participant import AttestedEnclave, SealingTrainer
from trustfed.enclave.policy import AttestationPolicy
from trustfed.enclave.receipts import Receipt
from trustfed.enclave.sealing import KeySigner, StaticKeyring
from trustfed.enclave.settings import AggregationSettings, CentralDPSettings
from trustfed.enclave.strategy import EnclaveStrategy
from trustfed.models.trainer import Trainer
from trustfed.privacy.settings import PrivacySettings
from trustfed.simulation.transports import InProcessTransport

log = logging.getLogger("trustfed.simulation.enclave")


def aggregation_settings_for(
    strategy: StrategySection,
    min_updates: int = 1,
    *,
    privacy: PrivacySettings | None = None,
    seed: int = 0,
    contributions: bool = False,
) -> AggregationSettings:
    """The enclave's aggregation settings equivalent to a federation's ``[strategy]`` (and, with
    ``privacy.mode = "central"``, its ``[privacy]``; ``seed`` seeds the noise unless secure_noise).
    ``contributions``: release per-update contribution scores (for ``[incentives]``; never with
    central DP)."""
    central = central_dp_settings(privacy, seed) if privacy is not None else None
    return AggregationSettings(
        strategy=strategy.name,
        aggregator=strategy.aggregator,
        aggregator_params=dict(strategy.aggregator_params),
        server_lr=strategy.server_lr,
        beta1=strategy.beta1,
        beta2=strategy.beta2,
        tau=strategy.tau,
        min_updates=min_updates,
        max_examples=strategy.max_examples,
        central_dp=central,
        release_contributions=contributions and central is None,
    )


def central_dp_settings(privacy: PrivacySettings, seed: int) -> CentralDPSettings | None:
    """The enclave's DP-FedAvg settings for a federation's ``[privacy]`` (none unless mode = "central")."""
    if privacy.mode != "central":
        return None
    return CentralDPSettings(
        noise_multiplier=privacy.noise_multiplier,
        clip_norm=privacy.max_grad_norm,
        delta=privacy.delta,
        clipping=privacy.clipping,
        target_quantile=privacy.target_quantile,
        clip_learning_rate=privacy.clip_learning_rate,
        clip_count_stddev=privacy.clip_count_stddev,
        sampling_amplification=privacy.sampling_amplification,
        accountant=privacy.accountant,
        seed=seed,
        secure_noise=privacy.secure_noise,
    )


def enclave_aggregation(cfg: FederationConfig) -> AggregationSettings:
    """What the enclave of federation ``cfg`` computes (and is measured with): every party derives it
    the same way from the shared federation file."""
    return aggregation_settings_for(
        cfg.strategy,
        cfg.strategy.min_participants,
        privacy=cfg.privacy,
        seed=cfg.federation.seed,
        contributions=cfg.incentives.enabled,
    )


def simulated_policy(aggregation: AggregationSettings, base: AttestationPolicy | None = None) -> AttestationPolicy:
    """A policy accepting the SIMULATED enclave built from this code and ``aggregation`` (dev/CI only).

    Each participant computes the expected measurement from its own copy of the code and the agreed
    aggregation config, as it would reproduce an enclave build.
    """
    base = base or AttestationPolicy()
    return base.model_copy(
        update={
            "allowed_backends": sorted({*base.allowed_backends, "simulated"}),
            "allow_simulated_tee": True,
            "expected_measurements": [*base.expected_measurements, measure(aggregation.measured())],
        }
    )


@dataclass
class EnclaveFederation:
    strategy: Strategy
    trainers: dict[str, SealingTrainer]
    enclave: EnclaveClient
    signers: dict[str, KeySigner] = field(default_factory=dict)

    @property
    def receipts(self) -> list[Receipt]:
        return self.strategy.receipts if isinstance(self.strategy, EnclaveStrategy) else []


def wrap_for_enclave(
    inner: Strategy,
    trainers: Mapping[str, Trainer],
    spec: ParamSpec,
    aggregation: AggregationSettings,
    *,
    policies: Mapping[str, AttestationPolicy] | AttestationPolicy,
    allow_simulated_tee: bool,
    enclave_factory: Callable[[StaticKeyring], EnclaveClient] | None = None,
    clock: Callable[[], float] = time.time,
) -> EnclaveFederation:
    """Enclave mode around a plain federation.

    Each participant gets a fresh identity key; ``enclave_factory`` receives the keyring of their
    public keys and returns the enclave to use (default: an in-process simulated :class:`Enclave`).
    """
    signers = {pid: KeySigner.generate(pid) for pid in trainers}
    keyring = StaticKeyring({pid: s.public_key() for pid, s in signers.items()})
    if enclave_factory is not None:
        enclave = enclave_factory(keyring)
    else:
        enclave = Enclave(aggregation, keyring, allow_simulated_tee=allow_simulated_tee, clock=clock)
    wrapped = {}
    for pid, t in trainers.items():
        policy = policies if isinstance(policies, AttestationPolicy) else policies[pid]
        wrapped[pid] = SealingTrainer(
            t, AttestedEnclave(enclave, policy, where=f"participant {pid}", clock=clock), signers[pid]
        )
    strategy = EnclaveStrategy(
        inner, enclave, spec, allow_simulated=allow_simulated_tee, central_dp=aggregation.central_dp
    )
    return EnclaveFederation(strategy, wrapped, enclave, signers)


@dataclass
class FederationRun:
    params: torch.Tensor
    records: list[RoundRecord]
    receipts: list[Receipt]
    seconds: float


def run_federation(
    cfg: FederationConfig,
    *,
    enclave_mode: bool,
    rounds: int | None = None,
    transport_wrapper: Callable[[Transport], Transport] | None = None,
    enclave_factory: Callable[[StaticKeyring], EnclaveClient] | None = None,
    observers: Sequence[RoundObserver] = (),
) -> FederationRun:
    """Run ``cfg`` in process, plain or through an in-process enclave (``cfg.enclave`` settings).

    Plain mode with ``[privacy] mode = "central"`` runs DP-FedAvg on the coordinator; enclave mode runs
    it in the enclave (the coordinator's strategy is the base one)."""
    rt = Runtime(cfg)
    params, spec = rt.initial
    evaluate_fn = rt.evaluate_fn()
    strategy: Strategy = rt.base_strategy(evaluate_fn) if enclave_mode else rt.strategy(evaluate_fn)
    trainers: dict[str, Trainer] = {
        pid: rt.simulated_trainer(pid) for pid in participant_ids(cfg.federation.participants)
    }
    receipts: list[Receipt] = []
    fed: EnclaveFederation | None = None
    if enclave_mode:
        section = cfg.enclave
        if section.backend == "simulated" and not section.allow_simulated_tee:
            raise EnclaveError(
                "enclave.backend is 'simulated' (software only) but the federation has allow_simulated_tee = false"
            )
        if enclave_factory is None and (section.backend != "simulated" or section.address is not None):
            raise EnclaveError(
                "run_federation builds an in-process simulated enclave; pass enclave_factory to use another one"
            )
        aggregation = enclave_aggregation(cfg)
        policy = simulated_policy(aggregation, section.policy) if section.policy.allow_simulated_tee else section.policy
        fed = wrap_for_enclave(
            strategy,
            trainers,
            spec,
            aggregation,
            policies=policy,
            allow_simulated_tee=section.allow_simulated_tee,
            enclave_factory=enclave_factory,
        )
        strategy = fed.strategy
        trainers = dict(fed.trainers)
    transport: Transport = InProcessTransport(trainers)
    if transport_wrapper is not None:
        transport = transport_wrapper(transport)
    coord = Coordinator(
        strategy, transport, params, spec, min_updates=cfg.strategy.min_participants, observers=list(observers)
    )
    t0 = time.perf_counter()
    try:
        hist = coord.run(rounds if rounds is not None else cfg.federation.rounds)
    finally:
        transport.close()
    if fed is not None:
        receipts = fed.receipts
    return FederationRun(coord.params, hist.rounds, receipts, time.perf_counter() - t0)
