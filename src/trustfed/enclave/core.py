"""The enclave: holds a key pair generated inside it, attests, opens sealed updates, aggregates, signs.

:class:`Enclave` is the trusted computation, independent of how it is reached (in-process object
or the gRPC service in :mod:`trustfed.enclave.service`). Per round it

1. refuses updates sealed to another key (an enclave restarted with a new key must be re-attested),
   for another round, with a commitment that does not match the sealed bytes, or with a signature
   that does not verify against the participant's identity key;
2. opens the rest and runs the configured strategy/aggregator from :mod:`trustfed.core`;
3. returns the new parameters and a :class:`~trustfed.enclave.receipts.Receipt` signed by its key.

With the simulated backend every log line starts with ``[SIMULATED TEE]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from trustfed.core.codec import ParamSpec, model_hash
from trustfed.core.strategy import STRATEGIES, FedAvg, FedOpt, RoundPlan, Strategy, Update
from trustfed.enclave.attestation import AttestationBackend, SimulatedBackend
from trustfed.enclave.canonical import canonical_json
from trustfed.enclave.errors import EnclaveError, SealingError
from trustfed.enclave.keys import EnclaveKeyPair
from trustfed.enclave.measurement import measure
from trustfed.enclave.receipts import Receipt, make_receipt_body
from trustfed.enclave.sealing import ParticipantKeyring, SealedUpdate, commitment, decode_update, open_sealed
from trustfed.enclave.settings import AggregationSettings
from trustfed.errors import AggregationError

_log = logging.getLogger("trustfed.enclave")


class _Labelled(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"{self.extra['label'] if self.extra else ''}{msg}", kwargs


@dataclass(frozen=True)
class AggregationRequest:
    """What the coordinator relays to the enclave for one round: ciphertexts, never clear updates."""

    round: int
    params: torch.Tensor
    spec: ParamSpec
    updates: Sequence[SealedUpdate]


@dataclass(frozen=True)
class AggregationResponse:
    params: torch.Tensor
    receipt: Receipt
    metrics: dict[str, float]
    selected: tuple[str, ...]


class EnclaveClient(Protocol):
    """How the coordinator and participants reach an enclave (in-process object or gRPC)."""

    def public_key(self) -> bytes: ...

    def evidence(self, nonce: bytes) -> bytes: ...

    def aggregate(self, request: AggregationRequest) -> AggregationResponse: ...


def build_strategy(settings: AggregationSettings) -> FedAvg:
    """The core strategy the enclave runs, from its (measured) aggregation settings."""
    cls = STRATEGIES[settings.strategy]
    common: dict[str, Any] = {
        "aggregator": settings.aggregator,
        "aggregator_params": dict(settings.aggregator_params),
        "min_participants": settings.min_updates,
    }
    try:
        if issubclass(cls, FedOpt):
            return cls(
                server_lr=settings.server_lr, beta1=settings.beta1, beta2=settings.beta2, tau=settings.tau, **common
            )
        if settings.strategy == "fedprox":
            return STRATEGIES["fedprox"](proximal_mu=0.0, **common)  # type: ignore[call-arg]
        return cls(**common)
    except (AggregationError, ValueError) as exc:
        raise EnclaveError(f"enclave aggregation config is invalid: {exc}") from exc


class Enclave:
    """The attested aggregator. Its key pair is generated in ``__init__`` and never exported."""

    def __init__(
        self,
        aggregation: AggregationSettings,
        participant_keys: ParticipantKeyring,
        *,
        backend: AttestationBackend | None = None,
        allow_simulated_tee: bool = False,
        measurement: str | None = None,
        clock: Callable[[], float] = time.time,
        binding: str = "sha512",
    ) -> None:
        self.aggregation = aggregation
        self._keys = EnclaveKeyPair()
        self._keyring = participant_keys
        self._clock = clock
        self.measurement = measurement or measure(aggregation.measured())
        if backend is None:
            if not allow_simulated_tee:
                raise EnclaveError(
                    "the enclave has no hardware attestation backend and allow_simulated_tee is false; "
                    "run it under SGX/TDX with backend sgx-dcap / tdx-dcap, or set allow_simulated_tee = true "
                    "for development (everything it produces is then labelled SIMULATED)"
                )
            backend = SimulatedBackend(self.measurement, self._keys.sign, clock, binding)
        self.backend = backend
        self.simulated = backend.name == "simulated"
        self.log = _Labelled(_log, {"label": "[SIMULATED TEE] " if self.simulated else ""})
        self.strategy: Strategy = build_strategy(aggregation)
        self.last_round = 0
        if self.simulated:
            self.log.warning("software-only enclave: no hardware root of trust; receipts are labelled SIMULATED")
        self.log.info(
            "enclave up: backend %s, key %s…, measurement %s…",
            backend.name,
            self._keys.key_id[:16],
            self.measurement[:16],
        )

    # --- EnclaveClient
    def public_key(self) -> bytes:
        return self._keys.public.to_bytes()

    @property
    def key_id(self) -> str:
        return self._keys.key_id

    def evidence(self, nonce: bytes) -> bytes:
        return self.backend.evidence(nonce, self.public_key())

    def _check(self, req: AggregationRequest, u: SealedUpdate, seen: set[str]) -> Update:
        pid = u.participant_id
        if pid in seen:
            raise SealingError(f"second update from {pid} in round {req.round}")
        if u.params.numel() != 0:
            raise SealingError(f"update from {pid} carries clear parameters; enclave mode accepts sealed updates only")
        if u.enclave_key_id != self.key_id:
            raise SealingError(
                f"update from {pid} is sealed to enclave key {u.enclave_key_id[:16]}…, but this enclave's key is "
                f"{self.key_id[:16]}… (the enclave restarted or is another one); the participant must re-attest"
            )
        if u.round != req.round:
            raise SealingError(f"update from {pid} is for round {u.round}, this is round {req.round}")
        if commitment(req.round, pid, self.key_id, u.sealed) != u.commitment:
            raise SealingError(f"commitment of {pid} does not match its sealed bytes")
        if not self._keyring.verify(pid, u.commitment, u.signature):
            raise SealingError(f"signature of {pid} on its commitment does not verify with its identity key")
        upd, rnd = decode_update(
            open_sealed(u.sealed, self._keys, rnd=req.round, participant_id=pid), expected_dim=req.params.numel()
        )
        if upd.participant_id != pid or rnd != req.round:
            raise SealingError(f"sealed plaintext names {upd.participant_id} / round {rnd}, outside says {pid}")
        if upd.num_examples <= 0:
            raise SealingError(f"update from {pid} reports {upd.num_examples} examples")
        return upd

    def aggregate(self, request: AggregationRequest) -> AggregationResponse:
        req = request
        if req.round <= self.last_round:
            raise EnclaveError(f"round {req.round} is not after the last aggregated round {self.last_round}")
        if req.params.dtype != torch.float32 or req.params.dim() != 1 or req.params.numel() != req.spec.size:
            raise EnclaveError("global parameters must be a flat float32 vector matching the spec")
        if req.params.numel() > self.aggregation.max_params:
            raise EnclaveError(f"model has {req.params.numel()} values, more than max_params")
        accepted: list[Update] = []
        commitments: dict[str, bytes] = {}
        rejected: dict[str, str] = {}
        seen: set[str] = set()
        for u in req.updates:
            try:
                upd = self._check(req, u, seen)
            except SealingError as exc:
                rejected[u.participant_id] = str(exc)
                self.log.warning("round %d: rejected update: %s", req.round, exc)
                continue
            finally:
                seen.add(u.participant_id)
            accepted.append(upd)
            commitments[u.participant_id] = u.commitment
        if len(accepted) < self.aggregation.min_updates:
            detail = "; ".join(f"{k}: {v}" for k, v in rejected.items()) or "no updates"
            raise EnclaveError(
                f"round {req.round}: {len(accepted)} valid sealed update(s), {self.aggregation.min_updates} needed "
                f"({detail})"
            )
        plan = RoundPlan(req.round, tuple(u.participant_id for u in accepted), {})
        result = self.strategy.aggregate(plan, req.params, accepted)
        self.last_round = req.round
        desc = self.strategy.describe()
        body = make_receipt_body(
            rnd=req.round,
            commitments=commitments,
            rejected=rejected,
            input_model_hash=model_hash(req.params, req.spec),
            output_model_hash=model_hash(result.params, req.spec),
            aggregator=desc.get("aggregator", {}),
            strategy=desc,
            measurement=self.measurement,
            backend=self.backend.name,
            enclave_key_id=self.key_id,
            issued_at=float(self._clock()),
        )
        receipt = Receipt(body, self._keys.sign(canonical_json(body)), self.public_key())
        self.log.info(
            "round %d aggregated %d update(s) (%d rejected), output %s…",
            req.round,
            len(accepted),
            len(rejected),
            body["output_model_hash"][:16],
        )
        metrics = dict(result.metrics)
        metrics["enclave_rejected"] = float(len(rejected))
        return AggregationResponse(
            result.params,
            receipt,
            metrics,
            tuple(accepted[i].participant_id for i in result.aggregate.selected),
        )
