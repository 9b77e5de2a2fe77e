"""A participant's refusal of a round, signed and kept where an auditor can collect it.

The record (:mod:`trustfed.ledger.refusals`) goes to ``<state dir>/<id>.refusals.jsonl`` before the
withdrawal is sent, so the participant holds it whatever the coordinator does with its copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trustfed.enclave.errors import AttestationRefused
from trustfed.ledger.audit import Signer
from trustfed.ledger.participant import ModelMismatchError
from trustfed.ledger.refusals import REFUSALS_SUFFIX, SignedRefusal, append_refusal, refusal_body, sign_refusal
from trustfed.participant.rounds import ReceivedPlan

log = logging.getLogger("trustfed.participant")


def keep_refusal(
    signer: Signer, folder: Path | None, rp: ReceivedPlan, served: str, exc: ModelMismatchError | AttestationRefused
) -> SignedRefusal:
    """Sign a refusal of round ``rp`` (the plan's, the served and the expected model hash, the reason)
    and append it to ``folder``'s refusals file. ``served``: the hash of the model bytes received."""
    mismatch = isinstance(exc, ModelMismatchError)
    body = refusal_body(
        signer.key_id,
        rp.round,
        "model_not_on_chain" if mismatch else "enclave_attestation",
        str(exc),
        plan_model_hash=rp.plan.model_hash,
        served_model_hash=served,
        expected_model_hash=exc.expected if isinstance(exc, ModelMismatchError) else "",
    )
    signed = sign_refusal(signer, body)
    if folder is None:
        log.warning("participant %s: no [state].dir; its refusal of round %d is kept nowhere", signer.key_id, rp.round)
    else:
        path = folder / f"{signer.key_id}{REFUSALS_SUFFIX}"
        append_refusal(path, signed)
        log.info("participant %s: signed refusal of round %d kept in %s", signer.key_id, rp.round, path)
    return signed
