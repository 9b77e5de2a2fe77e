"""Participant side: attest the enclave against one's own policy, then seal, commit and sign.

:class:`AttestedEnclave` challenges the enclave with a fresh random nonce and verifies the evidence
against the participant's :class:`AttestationPolicy` (allowed backends, expected measurements,
freshness). Only a key that verified is ever used for sealing; a different key (a restarted enclave)
is re-attested first, and refused if it does not verify.

:class:`SealingTrainer` wraps any Trainer: it checks the enclave *before* training, so a participant
whose policy refuses the enclave computes and sends nothing, and says why (AttestationRefused).
Of the update's metrics only the privacy accounting (:data:`CLEAR_METRICS`) travels in the clear,
for the coordinator's privacy record; everything else stays inside the sealed bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from trustfed.core.evaluation import EVAL_PREFIX
from trustfed.core.strategy import RoundPlan, Update
from trustfed.enclave.attestation import raise_if_refused, verify_evidence
from trustfed.enclave.errors import AttestationRefused
from trustfed.enclave.keys import EnclavePublicKey
from trustfed.enclave.policy import AttestationPolicy
from trustfed.enclave.sealing import ParticipantSigner, SealedUpdate, seal_update
from trustfed.models.trainer import Trainer
from trustfed.primitives.verdict import Verdict

log = logging.getLogger("trustfed.enclave.participant")

NONCE_BYTES = 32

# A participant's privacy accounting, as its budget guard reports it (trustfed.privacy.budget.BudgetGuard.metrics):
# derived from the announced mechanism and its own budget, not from its data.
CLEAR_METRICS = frozenset(
    {
        "dp_epsilon",
        "dp_delta",
        "dp_epsilon_round",
        "dp_noise_multiplier",
        "dp_sample_rate",
        "dp_steps",
        "dp_budget_epsilon",
    }
)


class EvidenceSource(Protocol):
    def evidence(self, nonce: bytes) -> bytes: ...


class AttestedEnclave:
    """A verifier's attested view of one enclave: the key it may seal to, and when it was verified."""

    def __init__(
        self,
        source: EvidenceSource,
        policy: AttestationPolicy,
        *,
        where: str = "participant",
        clock: Callable[[], float] = time.time,
        nonce_fn: Callable[[], bytes] | None = None,
    ) -> None:
        self.source = source
        self.policy = policy
        self.where = where
        self.clock = clock
        self._nonce_fn = nonce_fn or (lambda: os.urandom(NONCE_BYTES))
        self.key: EnclavePublicKey | None = None
        self.verdict: Verdict | None = None
        self.verified_at = float("-inf")

    def attest(self) -> Verdict:
        """Challenge the enclave with a fresh nonce; on success remember its key. Raises when refused."""
        nonce = self._nonce_fn()
        now = self.clock()
        verdict = verify_evidence(self.source.evidence(nonce), self.policy, nonce, now)
        self.verdict = verdict
        if not verdict.ok:
            self.key = None
            log.warning("%s: enclave refused: %s", self.where, "; ".join(verdict.reasons))
            raise_if_refused(verdict, self.where)
        self.key = EnclavePublicKey.from_bytes(bytes.fromhex(str(verdict.claims["public_key"])))
        self.verified_at = now
        label = "[SIMULATED TEE] " if verdict.claims.get("simulated") else ""
        log.info("%s%s: enclave %s… attested (%s)", label, self.where, self.key.key_id[:16], verdict.claims["backend"])
        return verdict

    @property
    def simulated(self) -> bool:
        return bool(self.verdict is not None and self.verdict.claims.get("simulated"))

    def sealing_key(self, expected_key_id: str | None = None) -> EnclavePublicKey:
        """The attested key to seal to; re-attests when stale or when the plan names another key."""
        fresh = self.clock() - self.verified_at <= self.policy.max_evidence_age_s
        if self.key is None or not fresh or (expected_key_id and expected_key_id != self.key.key_id):
            self.attest()
        assert self.key is not None
        if expected_key_id and expected_key_id != self.key.key_id:
            raise AttestationRefused(
                self.where,
                [
                    f"the round plan names enclave key {expected_key_id[:16]}…, but the enclave that attested holds "
                    f"{self.key.key_id[:16]}…; refusing to seal to an unattested key"
                ],
            )
        return self.key


class SealingTrainer:
    """A Trainer wrapper for enclave mode: attest first, train, then return only a sealed update."""

    def __init__(self, inner: Trainer, enclave: AttestedEnclave, signer: ParticipantSigner) -> None:
        if signer.participant_id != inner.participant_id:
            raise ValueError(f"signer {signer.participant_id} does not belong to {inner.participant_id}")
        self.inner = inner
        self.enclave = enclave
        self.signer = signer
        self.participant_id = inner.participant_id

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        key_id = plan.config.get("enclave_key_id")
        key = self.enclave.sealing_key(str(key_id) if key_id else None)  # raises before any training
        update = self.inner.fit(params, plan)
        sealed: SealedUpdate = seal_update(update, plan.round, key, self.signer)
        # in the clear: privacy accounting, and the federated evaluation of the model received (not of this update)
        accounting = {k: float(v) for k, v in update.metrics.items() if k in CLEAR_METRICS or k.startswith(EVAL_PREFIX)}
        return dataclasses.replace(sealed, metrics=accounting) if accounting else sealed

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return self.inner.evaluate(params)

    def describe(self) -> dict[str, Any]:
        return {"participant_id": self.participant_id, "sealing": True}
