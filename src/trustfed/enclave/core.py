"""The enclave: holds a key pair generated inside it, attests, opens sealed updates, aggregates, signs.

:class:`Enclave` is the trusted computation, independent of how it is reached (in-process object
or the gRPC service in :mod:`trustfed.enclave.service`). Per round it

1. refuses updates sealed to another key (an enclave restarted with a new key must be re-attested),
   for another round, with a commitment that does not match the sealed bytes, or with a signature
   that does not verify against the participant's identity key;
2. opens the rest and runs the configured strategy/aggregator from :mod:`trustfed.core`, wrapped,
   when the measured config has ``central_dp``, in DP-FedAvg (:mod:`trustfed.privacy.central`):
   every delta is clipped and calibrated Gaussian noise is added *here*, so the coordinator only
   ever receives the noised aggregate;
3. returns the new parameters and a :class:`~trustfed.enclave.receipts.Receipt` signed by its key
   (with central DP, the receipt's ``privacy`` block states the release: noise multiplier, clip
   norm, noise std, sampling rate and the accountant's epsilon at delta).

With the simulated backend every log line starts with ``[SIMULATED TEE]``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, MutableMapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from trustfed.core.aggregator import unusable_rows
from trustfed.core.codec import ParamSpec, model_hash
from trustfed.core.strategy import STRATEGIES, FedAvg, FedOpt, RoundPlan, Strategy, Update
from trustfed.enclave.attestation import SIMULATED_LABEL, AttestationBackend, SimulatedBackend
from trustfed.enclave.errors import EnclaveError, SealingError
from trustfed.enclave.evidence import MIN_NONCE_BYTES
from trustfed.enclave.keys import EnclaveKeyPair
from trustfed.enclave.measurement import measure
from trustfed.enclave.receipts import HARDWARE_LABEL, STATE_FORMAT, Receipt, make_receipt_body
from trustfed.enclave.sealing import ParticipantKeyring, SealedUpdate, commitment, decode_update, open_sealed
from trustfed.enclave.settings import AggregationSettings
from trustfed.errors import AggregationError
from trustfed.incentives.scoring import contribution_scores
from trustfed.primitives.canonical import canonical_json
from trustfed.privacy.accounting import GaussianSteps, PrivacyError, epsilon
from trustfed.privacy.central import DPFedAvg

_log = logging.getLogger("trustfed.enclave")


class _Labelled(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"{self.extra['label'] if self.extra else ''}{msg}", kwargs


@dataclass(frozen=True)
class AggregationRequest:
    """What the coordinator relays to the enclave for one round: ciphertexts, never clear updates.

    ``selected``: the participants the round plan selected (updates from anyone else are rejected;
    with central DP, the fixed denominator of the noised mean). ``available``: how many participants
    they were selected from (central DP's sampling rate ``len(selected) / available``; 0: not
    reported, and the enclave accounts without sampling amplification). ``redo``: aggregate the
    enclave's last round again, for a resumed coordinator that lost its output before recording it;
    the earlier release stays counted (and its server state, such as an adaptive clip norm, stays
    advanced), and the receipt says ``"redo": true``."""

    round: int
    params: torch.Tensor
    spec: ParamSpec
    updates: Sequence[SealedUpdate]
    selected: tuple[str, ...] = ()
    available: int = 0
    redo: bool = False


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

    def state(self, nonce: bytes) -> Receipt: ...


def build_core_strategy(settings: AggregationSettings) -> FedAvg:
    """The core strategy the enclave runs, from its (measured) aggregation settings, without DP."""
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


def build_strategy(settings: AggregationSettings) -> Strategy:
    """The core strategy, wrapped in DP-FedAvg when the measured settings have ``central_dp``."""
    core = build_core_strategy(settings)
    dp = settings.central_dp
    if dp is None:
        return core
    try:
        return DPFedAvg(
            core,
            noise_multiplier=dp.noise_multiplier,
            clip_norm=dp.clip_norm,
            delta=dp.delta,
            clipping=dp.clipping,
            target_quantile=dp.target_quantile,
            clip_learning_rate=dp.clip_learning_rate,
            clip_count_stddev=dp.clip_count_stddev,
            sampling_amplification=dp.sampling_amplification,
            accountant=dp.accountant,
            seed=dp.seed,
            secure_noise=dp.secure_noise,
        )
    except PrivacyError as exc:
        raise EnclaveError(f"enclave central DP config is invalid: {exc}") from exc


# Statistics DP-FedAvg reports that are computed from the clear updates without noise: they stay in the enclave.
_UNRELEASED_METRICS = ("dp_unclipped_fraction", "dp_update_norm_median")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


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
        self._last_release: dict[str, Any] | None = None  # the privacy block of the last central-DP release
        if self.simulated:
            self.log.warning("software-only enclave: no hardware root of trust; receipts are labelled SIMULATED")
        dp = aggregation.central_dp
        if dp is not None:
            self.log.info(
                "central DP inside the enclave: noise multiplier %g, clip norm %g (%s), delta %g, %s accountant",
                dp.noise_multiplier,
                dp.clip_norm,
                dp.clipping,
                dp.delta,
                dp.accountant,
            )
            if not dp.secure_noise:
                self.log.warning(
                    "central DP noise is seeded from the run seed (secure_noise = false): reproducible, but anyone "
                    "who knows the seed can recompute the noise and remove it; set privacy.secure_noise = true "
                    "in a deployment"
                )
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

    def state(self, nonce: bytes) -> Receipt:
        """A signed statement of where this enclave stands, answering the caller's fresh ``nonce``: the
        last round it aggregated and, with central DP, how many releases its accountant holds, the
        epsilon they add up to, the clip norm of the next round and the last release's privacy block. A resumed coordinator checks it
        against the run's last receipt on record: the same key (keys never leave an enclave, so the same
        process and accountant) and nothing released since."""
        if not MIN_NONCE_BYTES <= len(nonce) <= 1024:
            raise EnclaveError(f"the state request's nonce must be {MIN_NONCE_BYTES}..1024 bytes")
        simulated = self.backend.name == "simulated"
        body: dict[str, Any] = {
            "format": STATE_FORMAT,
            "nonce": nonce.hex(),
            "last_round": self.last_round,
            "enclave_key_id": self.key_id,
            "measurement": self.measurement,
            "backend": self.backend.name,
            "simulated": simulated,
            "label": SIMULATED_LABEL if simulated else HARDWARE_LABEL,
            "issued_at": float(self._clock()),
        }
        if isinstance(self.strategy, DPFedAvg):
            history = self.strategy.accountant.history
            body["privacy"] = {
                "rounds_accounted": len(history),
                "epsilon": _finite(self.strategy.accountant.epsilon()) if history else 0.0,
                "clip_norm": self.strategy.clip_norm,
                "last_release": self._last_release,
            }
        return Receipt(body, self._keys.sign(canonical_json(body)), self.public_key())

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
        if req.selected and pid not in req.selected:
            raise SealingError(f"update from {pid}, who is not among the participants selected for round {req.round}")
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
        if upd.num_examples > self.aggregation.max_examples:  # FedAvg's weight: a claimed count is bounded
            raise SealingError(
                f"too_many_examples: update from {pid} declares {upd.num_examples} examples, more than "
                f"max_examples {self.aggregation.max_examples}"
            )
        if bool(unusable_rows(upd.params[None]).any()):
            raise SealingError(f"non_finite: update from {pid} holds NaN or infinite values (or overflows float32)")
        return upd

    def aggregate(self, request: AggregationRequest) -> AggregationResponse:
        req = request
        if req.redo and req.round != self.last_round:
            raise EnclaveError(f"round {req.round}: a redo is for the last aggregated round ({self.last_round}) only")
        if req.round < self.last_round or (req.round == self.last_round and not req.redo):
            raise EnclaveError(f"round {req.round} is not after the last aggregated round {self.last_round}")
        if req.redo:
            self.log.warning(
                "round %d aggregated again for a resumed coordinator: its earlier release stays counted", req.round
            )
        if req.params.dtype != torch.float32 or req.params.dim() != 1 or req.params.numel() != req.spec.size:
            raise EnclaveError("global parameters must be a flat float32 vector matching the spec")
        if req.params.numel() > self.aggregation.max_params:
            raise EnclaveError(f"model has {req.params.numel()} values, more than max_params")
        if len(set(req.selected)) != len(req.selected):
            raise EnclaveError(f"round {req.round}: the selected participants list someone twice")
        accepted: list[Update] = []
        commitments: dict[str, bytes] = {}
        examples: dict[str, int] = {}  # each accepted update's declared count, released in the receipt
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
            examples[u.participant_id] = int(upd.num_examples)
        if len(accepted) < self.aggregation.min_updates:
            detail = "; ".join(f"{k}: {v}" for k, v in rejected.items()) or "no updates"
            raise EnclaveError(
                f"round {req.round}: {len(accepted)} valid sealed update(s), {self.aggregation.min_updates} needed "
                f"({detail})"
            )
        privacy: dict[str, Any] | None = None
        if self.aggregation.central_dp is None:
            plan = RoundPlan(req.round, tuple(u.participant_id for u in accepted), {})
            result = self.strategy.aggregate(plan, req.params, accepted)
        else:
            selected = req.selected or tuple(u.participant_id for u in accepted)
            q = self._sample_rate(req, len(selected))
            plan = RoundPlan(req.round, selected, {"dp_central_sample_rate": q})
            result = self.strategy.aggregate(plan, req.params, accepted)
            privacy = self._privacy_release(result.metrics, max(len(selected), len(accepted)), q)
            self._last_release = {"round": req.round, **privacy}
        self.last_round = req.round
        desc = self.strategy.describe()
        body = make_receipt_body(
            rnd=req.round,
            commitments=commitments,
            rejected=rejected,
            input_model_hash=model_hash(req.params, req.spec),
            output_model_hash=model_hash(result.params, req.spec),
            aggregator=self._core_aggregator(),
            strategy=desc,
            measurement=self.measurement,
            backend=self.backend.name,
            enclave_key_id=self.key_id,
            issued_at=float(self._clock()),
            privacy=privacy,
            contributions=self._contributions(req.params, accepted, result.params),
            num_examples=examples,
        )
        if req.redo:
            body["redo"] = True
        receipt = Receipt(body, self._keys.sign(canonical_json(body)), self.public_key())
        self.log.info(
            "round %d aggregated %d update(s) (%d rejected), output %s…",
            req.round,
            len(accepted),
            len(rejected),
            body["output_model_hash"][:16],
        )
        metrics = {k: v for k, v in result.metrics.items() if k not in _UNRELEASED_METRICS}
        metrics["enclave_rejected"] = float(len(rejected))
        return AggregationResponse(
            result.params,
            receipt,
            metrics,
            tuple(accepted[i].participant_id for i in result.aggregate.selected),
        )

    def _contributions(
        self, params: torch.Tensor, accepted: Sequence[Update], new_params: torch.Tensor
    ) -> dict[str, float] | None:
        """Each accepted update's contribution score (see :func:`trustfed.incentives.contribution_scores`),
        when the measured config releases them: one number per participant leaves the enclave."""
        if not self.aggregation.release_contributions:
            return None

        deltas = torch.stack([u.params for u in accepted]) - params
        scores = contribution_scores(deltas, new_params - params)
        return {u.participant_id: float(s) for u, s in zip(accepted, scores.tolist(), strict=True)}

    def _core_aggregator(self) -> dict[str, Any]:
        core = self.strategy.inner if isinstance(self.strategy, DPFedAvg) else self.strategy
        describe = getattr(getattr(core, "aggregator", None), "describe", None)
        return dict(describe()) if callable(describe) else {}

    def _sample_rate(self, req: AggregationRequest, n_selected: int) -> float:
        """Central DP's participant sampling rate for the accountant: ``selected / available`` as the
        coordinator reports it, bounded by the participants registered with this enclave; 1.0 (no
        amplification) when it reports nothing or amplification is off."""
        dp = self.aggregation.central_dp
        assert dp is not None
        if not dp.sampling_amplification or req.available <= 0:
            return 1.0
        if req.available < n_selected:
            raise EnclaveError(
                f"round {req.round}: the coordinator reports {req.available} available participants but selected "
                f"{n_selected}"
            )
        if isinstance(self._keyring, Sized) and req.available > len(self._keyring):
            raise EnclaveError(
                f"round {req.round}: the coordinator reports {req.available} available participants, more than the "
                f"{len(self._keyring)} registered with the enclave (that would understate the privacy spend)"
            )
        return n_selected / req.available

    def _privacy_release(self, metrics: dict[str, float], denominator: int, q: float) -> dict[str, Any]:
        """The receipt's ``privacy`` block: what this round released and what it cost."""
        dp = self.aggregation.central_dp
        assert dp is not None and isinstance(self.strategy, DPFedAvg)
        out: dict[str, Any] = {
            "algorithm": "dp_fedavg",
            "mechanism": "gaussian",
            "noise_multiplier": dp.noise_multiplier,
            "clipping": dp.clipping,
            "clip_norm": metrics["dp_clip_norm"],
            "noise_std": metrics["dp_noise_std"] * denominator,  # on the sum of clipped deltas
            "noise_std_mean": metrics["dp_noise_std"],  # on the released mean
            "denominator": denominator,
            "sample_rate": q,
            "steps": 1,
            "delta": dp.delta,
            "accountant": dp.accountant,
            "epsilon_round": _finite(epsilon([GaussianSteps(dp.noise_multiplier, q, 1)], dp.delta, dp.accountant)),
            "epsilon": _finite(metrics["dp_epsilon"]),  # cumulative over the rounds this enclave released
            "rounds_accounted": len(self.strategy.accountant.history),
            "secure_noise": dp.secure_noise,
        }
        if "dp_next_clip_norm" in metrics:
            out["next_clip_norm"] = metrics["dp_next_clip_norm"]
        return out
