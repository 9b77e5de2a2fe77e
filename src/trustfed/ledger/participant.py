"""The participant's side of the ledger.

* Sign the commitment H(round, id, H(update bytes)) with the participant's own key.
* Before training: check that the downloaded global model hashes to the value on chain, so a
  coordinator that serves different models to different participants is caught.
* After the round: check a Merkle proof that the participant's commitment is in the root on chain.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trustfed.core.codec import ParamSpec, model_hash, to_bytes
from trustfed.core.compression import CompressedUpdate, compression_body
from trustfed.core.evaluation import EVAL_PREFIX
from trustfed.core.strategy import RoundPlan, Update
from trustfed.ledger.audit import Signer, entry_digest, parsed_entries
from trustfed.ledger.backends import DEPLOYMENT_FILE, EmbeddedLedger, JsonRpcLedger, LedgerBackend
from trustfed.ledger.records import LedgerError, update_commitment, update_hash
from trustfed.models.trainer import Trainer
from trustfed.primitives.merkle import InclusionProof, MerkleTree, verify_inclusion

log = logging.getLogger("trustfed.ledger.participant")

COMMITMENT_KIND = "commitment"


class ModelMismatchError(LedgerError):
    """The model a participant received is not the one committed on chain: ``received`` is the hash of
    the bytes served, ``expected`` the chain's (empty when the chain has none)."""

    def __init__(self, message: str, *, received: str = "", expected: str = "") -> None:
        super().__init__(message)
        self.received = received
        self.expected = expected


class InclusionError(LedgerError):
    """A participant's commitment is not in the round's Merkle root on chain."""


@dataclass(frozen=True)
class SignedCommitment:
    """A commitment entry's body and its author's signature over the entry digest."""

    participant_id: str
    round: int
    body: dict[str, Any]
    sig: bytes

    @property
    def commitment(self) -> bytes:
        return bytes.fromhex(str(self.body["commitment"]))


def commitment_body(
    rnd: int,
    participant_id: str,
    update_bytes: bytes,
    num_examples: int,
    provenance: Mapping[str, str] | None = None,
    evaluation: Mapping[str, float] | None = None,
    compression: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The entry a participant signs for its update. ``provenance``: the app code it ran and its data
    manifest (``app_sha256``, ``data_sha256``); ``evaluation``: its scores of the model it received
    (federated evaluation); ``compression``: the codec of the bytes it sent and the error it measured
    (:meth:`trustfed.core.compression.CompressionRecord.to_body`; ``update_sha256`` is then the hash of
    the compressed bytes). Each is left out when absent, so older bodies keep their bytes."""
    digest = update_hash(update_bytes)
    body: dict[str, Any] = {
        "participant": participant_id,
        "update_sha256": digest.hex(),
        "commitment": update_commitment(rnd, participant_id, digest).hex(),
        "num_examples": int(num_examples),
    }
    for key in PROVENANCE_KEYS:
        if provenance and key in provenance:
            body[key] = str(provenance[key])
    if evaluation:
        body["evaluation"] = {str(k): float(v) for k, v in sorted(evaluation.items())}
    if compression:
        body["compression"] = dict(compression)
    return body


PROVENANCE_KEYS = ("app_sha256", "data_sha256")


def evaluation_of(metrics: Mapping[str, float]) -> dict[str, float]:
    """The federated-evaluation part of an update's metrics (``eval_*``), without the prefix."""
    return {k[len(EVAL_PREFIX) :]: float(v) for k, v in metrics.items() if k.startswith(EVAL_PREFIX)}


def sign_commitment(
    signer: Signer,
    rnd: int,
    update_bytes: bytes,
    num_examples: int,
    provenance: Mapping[str, str] | None = None,
    evaluation: Mapping[str, float] | None = None,
    compression: Mapping[str, Any] | None = None,
) -> SignedCommitment:
    body = commitment_body(rnd, signer.key_id, update_bytes, num_examples, provenance, evaluation, compression)
    sig = signer.sign(entry_digest(COMMITMENT_KIND, rnd, signer.key_id, body))
    return SignedCommitment(signer.key_id, rnd, body, sig)


def update_bytes(update: Update) -> bytes:
    """The update exactly as it travels: its sealed bytes in enclave mode, its masked input under
    secure aggregation, its compressed payload with ``[transport] compression``, else raw float32."""
    if isinstance(update, CompressedUpdate):
        return update.payload
    sealed = getattr(update, "sealed", b"") or getattr(update, "masked", b"")
    return bytes(sealed) if sealed else to_bytes(update.params)


def sign_update(
    signer: Signer, rnd: int, update: Update, provenance: Mapping[str, str] | None = None
) -> SignedCommitment:
    if update.participant_id != signer.key_id:
        raise LedgerError(f"key {signer.key_id!r} cannot sign the update of {update.participant_id!r}")
    return sign_commitment(
        signer,
        rnd,
        update_bytes(update),
        update.num_examples,
        provenance,
        evaluation_of(update.metrics),
        compression_body(update),
    )


def check_model(ledger: LedgerBackend, rnd: int, params: torch.Tensor, spec: ParamSpec) -> str:
    """Before training round ``rnd``: the model must hash to the chain's record of round ``rnd - 1``."""
    rec = ledger.read_round(rnd - 1)
    got = model_hash(params, spec)
    if rec is None:
        raise ModelMismatchError(
            f"round {rnd}: the chain has no model for round {rnd - 1}; refuse to train until it is committed",
            received=got,
        )
    if got != rec.model_hash:
        raise ModelMismatchError(
            f"round {rnd}: received model hashes to {got[:16]}…, but the chain records {rec.model_hash[:16]}… "
            "for the global model; the coordinator served a model that was not committed. Refusing to train",
            received=got,
            expected=rec.model_hash,
        )
    return got


def inclusion_proof(audit_path: Path, rnd: int, participant_id: str) -> tuple[bytes, InclusionProof]:
    """Cut the proof for ``participant_id``'s commitment in round ``rnd`` from the audit log."""
    leaves: list[bytes] = []
    index: int | None = None
    for e in parsed_entries(audit_path):
        if e.round == rnd and e.kind == COMMITMENT_KIND:
            if e.author == participant_id:
                index = len(leaves)
            leaves.append(bytes.fromhex(str(e.body["commitment"])))
    if index is None:
        raise InclusionError(f"round {rnd}: {audit_path} has no commitment from {participant_id!r}")
    return leaves[index], MerkleTree(leaves).proof(index)


def check_inclusion(ledger: LedgerBackend, rnd: int, commitment: bytes, proof: InclusionProof) -> None:
    rec = ledger.read_round(rnd)
    if rec is None:
        raise InclusionError(f"round {rnd} is not committed on chain yet")
    if not verify_inclusion(commitment, proof, bytes.fromhex(rec.merkle_root)):
        raise InclusionError(
            f"round {rnd}: commitment {commitment.hex()[:16]}… is not included in the Merkle root on chain "
            f"({rec.merkle_root[:16]}…); the coordinator left this update out or altered it"
        )


class ChainCheckedTrainer:
    """Wraps a Trainer: checks the received model against the chain before every fit."""

    def __init__(self, inner: Trainer, ledger: LedgerBackend, spec: ParamSpec) -> None:
        self.inner = inner
        self.ledger = ledger
        self.spec = spec
        self.participant_id = inner.participant_id

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        check_model(self.ledger, plan.round, params, self.spec)
        return self.inner.fit(params, plan)

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return self.inner.evaluate(params)


class ChainView:
    """A participant's own, read-only view of the chain: not obtained from the coordinator's process.

    * ``jsonrpc`` (``rpc_url`` given): the participant queries the node itself.
    * ``embedded``: the participant replays the run folder's signed transaction journal
      (``ledger/transactions.jsonl``) into an EVM of its own, and on every refresh checks that the part
      it already replayed is unchanged (the journal may only grow). Every participant reading the same
      journal sees the same chain, so a coordinator serving different models to different participants
      is caught; what the embedded chain cannot give is independence from whoever can rewrite the whole
      folder before anyone looked (use a node others run for that).
    """

    def __init__(self, ledger_dir: Path, rpc_url: str | None = None, *, wait_s: float = 30.0) -> None:
        self.ledger_dir = ledger_dir
        self.rpc_url = rpc_url
        self.wait_s = wait_s
        self._ledger: Any = None

    def backend(self) -> LedgerBackend:
        """The chain as of now (opened on first use; the embedded journal is replayed up to its end)."""
        if self._ledger is None:
            end = time.monotonic() + self.wait_s
            while not (self.ledger_dir / DEPLOYMENT_FILE).is_file():
                if time.monotonic() > end:
                    raise LedgerError(
                        f"no {DEPLOYMENT_FILE} in {self.ledger_dir} after {self.wait_s:.0f} s: the ledger was never "
                        "deployed there; check [ledger].dir in the participant's file"
                    )
                time.sleep(0.2)
            if self.rpc_url:
                self._ledger = JsonRpcLedger(self.ledger_dir, self.rpc_url, deploy=False, read_only=True)
            else:
                self._ledger = EmbeddedLedger(self.ledger_dir, read_only=True)
        elif isinstance(self._ledger, EmbeddedLedger):
            self._ledger.refresh()
        ledger: LedgerBackend = self._ledger
        return ledger

    def check_model(self, rnd: int, params: torch.Tensor, spec: ParamSpec) -> str:
        return check_model(self.backend(), rnd, params, spec)

    def check_inclusion(self, rnd: int, commitment: bytes, proof: InclusionProof) -> None:
        check_inclusion(self.backend(), rnd, commitment, proof)

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
