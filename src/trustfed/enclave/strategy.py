"""EnclaveStrategy: the coordinator's round loop aggregates through the enclave, relaying ciphertext only.

It wraps the federation's strategy: participant selection, local config and evaluation are the
inner strategy's; aggregation is sent to the enclave. ``configure_round`` adds the enclave's key id
and backend to the plan so participants know which attested key to seal to. ``aggregate`` refuses
any update in the clear, forwards the sealed ones, checks the receipt's signature and that it
describes the parameters returned, and keeps the receipts (``receipts``, ``last_receipt``) for the
ledger / audit log observers.

Central DP (``central_dp``, the enclave's measured DP-FedAvg settings) is applied by the enclave, not
here: this strategy only announces the noise multiplier, sampling rate and clip norm in the plan
(participants' budget guards read them), reports the selection and the number of participants it
was drawn from to the enclave, refuses a receipt whose ``privacy`` block does not state the expected
release, and takes the round's ``dp_*`` metrics (what the privacy recorder writes) from that signed
block. Wrapping a :class:`~trustfed.privacy.central.DPFedAvg` here is refused: its noise would never
be added, because aggregation does not run on the coordinator.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trustfed.core.aggregator import AggregateResult
from trustfed.core.codec import ParamSpec, model_hash
from trustfed.core.strategy import RoundPlan, RoundResult, Strategy, Update
from trustfed.enclave.core import AggregationRequest, EnclaveClient
from trustfed.enclave.errors import EnclaveError
from trustfed.enclave.keys import EnclavePublicKey
from trustfed.enclave.receipts import Receipt, receipt_hash, verify_receipt
from trustfed.enclave.sealing import SealedUpdate
from trustfed.enclave.settings import CentralDPSettings
from trustfed.privacy.central import DPFedAvg

log = logging.getLogger("trustfed.enclave.strategy")


class EnclaveStrategy(Strategy):
    """Wraps ``inner``; aggregation happens in ``enclave``. The coordinator never sees clear updates."""

    def __init__(
        self,
        inner: Strategy,
        enclave: EnclaveClient,
        spec: ParamSpec,
        *,
        allow_simulated: bool = False,
        central_dp: CentralDPSettings | None = None,
    ) -> None:
        if isinstance(inner, DPFedAvg):
            raise EnclaveError(
                "central DP runs inside the enclave: wrap the base strategy and give the enclave the DP settings "
                "(AggregationSettings.central_dp, central_dp= here); a DPFedAvg on the coordinator would never "
                "add its noise in enclave mode"
            )
        self.inner = inner
        self.central_dp = central_dp
        self._clip_norm = central_dp.clip_norm if central_dp is not None else 0.0
        self._available: dict[int, int] = {}
        self.enclave = enclave
        self.spec = spec
        self.allow_simulated = allow_simulated
        self.name = f"enclave({inner.name})"
        self.receipts: list[Receipt] = []
        self.redo_round: int | None = None  # a resumed run: the enclave's last round, to aggregate again
        self._public_key = enclave.public_key()

    def resume_clip_norm(self, clip_norm: float) -> None:
        """A resumed run: the clip norm the enclave will apply next (adaptive clipping moved it), from its
        signed state statement, so that plans announce what the enclave applies."""
        self._clip_norm = float(clip_norm)

    @property
    def last_receipt(self) -> Receipt | None:
        return self.receipts[-1] if self.receipts else None

    def configure_round(self, rnd: int, params: torch.Tensor, available: Sequence[str]) -> RoundPlan:
        plan = self.inner.configure_round(rnd, params, available)
        self._public_key = self.enclave.public_key()
        key_id = EnclavePublicKey.from_bytes(self._public_key).key_id
        self._available[rnd] = len(available)
        config = {**plan.config, "enclave_key_id": key_id}
        if self.central_dp is not None:  # what the enclave will apply; participants' budgets account it
            config.update(
                {
                    "dp_central_noise_multiplier": self.central_dp.noise_multiplier,
                    "dp_central_sample_rate": self._sample_rate(len(plan.participants), len(available)),
                    "dp_central_clip_norm": self._clip_norm,
                }
            )
        return RoundPlan(plan.round, plan.participants, config, plan.model_hash)

    def _sample_rate(self, selected: int, available: int) -> float:
        assert self.central_dp is not None
        return selected / max(available, 1) if self.central_dp.sampling_amplification else 1.0

    def _expected_release(self, plan: RoundPlan, available: int) -> dict[str, Any] | None:
        dp = self.central_dp
        if dp is None:
            return None
        return {
            "noise_multiplier": dp.noise_multiplier,
            "clipping": dp.clipping,
            "delta": dp.delta,
            "accountant": dp.accountant,
            "secure_noise": dp.secure_noise,
            "sample_rate": self._sample_rate(len(plan.participants), available) if available else 1.0,
            "denominator": len(plan.participants),
        }

    def aggregate(self, plan: RoundPlan, params: torch.Tensor, updates: Sequence[Update]) -> RoundResult:
        sealed: list[SealedUpdate] = []
        for u in updates:
            if not isinstance(u, SealedUpdate) or u.params.numel() != 0:
                raise EnclaveError(
                    f"round {plan.round}: the update from {u.participant_id} is not sealed; in enclave mode the "
                    "coordinator relays sealed updates only (wrap participants' trainers in SealingTrainer)"
                )
            sealed.append(u)
        available = self._available.pop(plan.round, 0)
        redo = plan.round == self.redo_round
        resp = self.enclave.aggregate(
            AggregationRequest(plan.round, params, self.spec, sealed, tuple(plan.participants), available, redo)
        )
        self.redo_round = None
        out_hash = model_hash(resp.params, self.spec)
        rejected = resp.receipt.body.get("rejected", {})
        verdict = verify_receipt(
            resp.receipt,
            enclave_public_key=self._public_key,
            commitments={u.participant_id: u.commitment for u in sealed if u.participant_id not in rejected},
            output_model_hash=out_hash,
            rnd=plan.round,
            allow_simulated=self.allow_simulated,
            privacy=self._expected_release(plan, available),
        )
        if not verdict.ok:
            raise EnclaveError(f"round {plan.round}: enclave receipt refused: {'; '.join(verdict.reasons)}")
        self.receipts.append(resp.receipt)
        label = "[SIMULATED TEE] " if resp.receipt.simulated else ""
        log.info("%sround %d: receipt %s…", label, plan.round, receipt_hash(resp.receipt)[:16])
        metrics = dict(resp.metrics)
        metrics["enclave_simulated"] = 1.0 if resp.receipt.simulated else 0.0
        if self.central_dp is not None:
            metrics.update(self._release_metrics(resp.receipt))
        index = {u.participant_id: i for i, u in enumerate(sealed)}
        selected = tuple(index[p] for p in resp.selected if p in index)
        return RoundResult(resp.params, metrics, AggregateResult(resp.params, selected))

    def evaluate(self, rnd: int, params: torch.Tensor) -> dict[str, float] | None:
        return self.inner.evaluate(rnd, params)

    def _release_metrics(self, receipt: Receipt) -> dict[str, float]:
        """The round's ``dp_*`` metrics, from the signed receipt (what the privacy recorder writes)."""
        block = receipt.body["privacy"]
        eps = block.get("epsilon")
        out = {
            "dp_epsilon": float(eps) if eps is not None else math.inf,
            "dp_delta": float(block["delta"]),
            "dp_noise_multiplier": float(block["noise_multiplier"]),
            "dp_sample_rate": float(block["sample_rate"]),
            "dp_clip_norm": float(block["clip_norm"]),
            "dp_noise_std": float(block["noise_std_mean"]),
        }
        if "next_clip_norm" in block:
            self._clip_norm = float(block["next_clip_norm"])
            out["dp_next_clip_norm"] = self._clip_norm
        return out

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "inner": self.inner.describe(), "enclave_key_id": self._key_id()}
        if self.central_dp is not None:
            out["central_dp"] = {**self.central_dp.model_dump(mode="json"), "applied_in": "enclave"}
        return out

    def _key_id(self) -> str:
        return EnclavePublicKey.from_bytes(self._public_key).key_id

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise EnclaveError("enclave-mode server state lives inside the enclave and cannot be loaded from outside")
