"""EnclaveStrategy: the coordinator's round loop aggregates through the enclave, relaying ciphertext only.

It wraps the federation's strategy: participant selection, local config and evaluation are the
inner strategy's; aggregation is sent to the enclave. ``configure_round`` adds the enclave's key id
and backend to the plan so participants know which attested key to seal to. ``aggregate`` refuses
any update in the clear, forwards the sealed ones, checks the receipt's signature and that it
describes the parameters returned, and keeps the receipts (``receipts``, ``last_receipt``) for the
ledger / audit log observers.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger("trustfed.enclave.strategy")


class EnclaveStrategy(Strategy):
    """Wraps ``inner``; aggregation happens in ``enclave``. The coordinator never sees clear updates."""

    def __init__(
        self, inner: Strategy, enclave: EnclaveClient, spec: ParamSpec, *, allow_simulated: bool = False
    ) -> None:
        self.inner = inner
        self.enclave = enclave
        self.spec = spec
        self.allow_simulated = allow_simulated
        self.name = f"enclave({inner.name})"
        self.receipts: list[Receipt] = []
        self._public_key = enclave.public_key()

    @property
    def last_receipt(self) -> Receipt | None:
        return self.receipts[-1] if self.receipts else None

    def configure_round(self, rnd: int, params: torch.Tensor, available: Sequence[str]) -> RoundPlan:
        plan = self.inner.configure_round(rnd, params, available)
        self._public_key = self.enclave.public_key()
        key_id = EnclavePublicKey.from_bytes(self._public_key).key_id
        return RoundPlan(plan.round, plan.participants, {**plan.config, "enclave_key_id": key_id}, plan.model_hash)

    def aggregate(self, plan: RoundPlan, params: torch.Tensor, updates: Sequence[Update]) -> RoundResult:
        sealed: list[SealedUpdate] = []
        for u in updates:
            if not isinstance(u, SealedUpdate) or u.params.numel() != 0:
                raise EnclaveError(
                    f"round {plan.round}: the update from {u.participant_id} is not sealed; in enclave mode the "
                    "coordinator relays sealed updates only (wrap participants' trainers in SealingTrainer)"
                )
            sealed.append(u)
        resp = self.enclave.aggregate(AggregationRequest(plan.round, params, self.spec, sealed))
        out_hash = model_hash(resp.params, self.spec)
        rejected = resp.receipt.body.get("rejected", {})
        verdict = verify_receipt(
            resp.receipt,
            enclave_public_key=self._public_key,
            commitments={u.participant_id: u.commitment for u in sealed if u.participant_id not in rejected},
            output_model_hash=out_hash,
            rnd=plan.round,
            allow_simulated=self.allow_simulated,
        )
        if not verdict.ok:
            raise EnclaveError(f"round {plan.round}: enclave receipt refused: {'; '.join(verdict.reasons)}")
        self.receipts.append(resp.receipt)
        label = "[SIMULATED TEE] " if resp.receipt.simulated else ""
        log.info("%sround %d: receipt %s…", label, plan.round, receipt_hash(resp.receipt)[:16])
        metrics = dict(resp.metrics)
        metrics["enclave_simulated"] = 1.0 if resp.receipt.simulated else 0.0
        index = {u.participant_id: i for i, u in enumerate(sealed)}
        selected = tuple(index[p] for p in resp.selected if p in index)
        return RoundResult(resp.params, metrics, AggregateResult(resp.params, selected))

    def evaluate(self, rnd: int, params: torch.Tensor) -> dict[str, float] | None:
        return self.inner.evaluate(rnd, params)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "inner": self.inner.describe(), "enclave_key_id": self._key_id()}

    def _key_id(self) -> str:
        return EnclavePublicKey.from_bytes(self._public_key).key_id

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise EnclaveError("enclave-mode server state lives inside the enclave and cannot be loaded from outside")
