"""What the coordinator makes of an accepted upload: the participant-signed commitment, checked against
the bytes that arrived, and the update itself (clear or sealed to the enclave); of a withdrawal that
refuses the round, the participant's signed refusal record; and the checks of what an update carries,
which no aggregator should have to survive: a declared example count within ``[strategy] max_examples``
(FedAvg's weight) and, for an update in the clear, finite values.

All raise :class:`~trustfed.transport.errors.MessageRejected` with the reason the servicer refuses
the upload with. A sealed update's values and count are checked by the enclave, which opens it; a
masked input's values cannot be checked by anyone (its declared count can, and is).
"""

from __future__ import annotations

import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustfed.core.aggregator import unusable_rows
from trustfed.core.codec import ParamSpec
from trustfed.core.strategy import Update
from trustfed.enclave.sealing import SealedUpdate
from trustfed.ledger.audit import entry_digest, verify_signature
from trustfed.ledger.participant import (
    COMMITMENT_KIND,
    PROVENANCE_KEYS,
    SignedCommitment,
    commitment_body,
    evaluation_of,
)
from trustfed.ledger.refusals import RefusalError, SignedRefusal, parse_refusal
from trustfed.transport import federation_pb2 as pb
from trustfed.transport.errors import MessageRejected
from trustfed.transport.streaming import as_vector


def signed_commitment(
    h: pb.UpdateHeader, pid: str, payload: bytes, cert: x509.Certificate
) -> tuple[SignedCommitment, dict[str, str]]:
    """The commitment must be H(round, id, H(payload)) and carry the sender's signature (its certificate
    key). Returns it with the app code and data manifest hashes it states."""
    rnd = int(h.round)
    provenance = {k: str(getattr(h, k)) for k in PROVENANCE_KEYS if h.HasField(k)}
    for key, digest in provenance.items():
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise MessageRejected("bad_provenance", f"{key} must be 64 lowercase hex digits")
    body = commitment_body(rnd, pid, payload, int(h.num_examples), provenance, evaluation_of(dict(h.metrics)))
    if body["commitment"] != bytes(h.commitment).hex():
        raise MessageRejected("bad_commitment", f"commitment is not H(round {rnd}, {pid}, H(update))")
    pem = cert.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    sig = bytes(h.commitment_signature)
    if not verify_signature(pem, entry_digest(COMMITMENT_KIND, rnd, pid, body), sig):
        raise MessageRejected(
            "bad_commitment_signature", f"the commitment's signature does not verify with the certificate of {pid}"
        )
    return SignedCommitment(pid, rnd, body, sig), provenance


def signed_refusal(h: pb.UpdateHeader, pid: str, cert: x509.Certificate) -> SignedRefusal:
    """The refusal a withdrawal carries: for this round, by this participant, signed with its certificate key."""
    try:
        refusal = parse_refusal(bytes(h.refusal), bytes(h.refusal_signature))
    except RefusalError as exc:
        raise MessageRejected("bad_refusal", f"round {h.round}: {exc}") from None
    if refusal.participant_id != pid or refusal.round != h.round:
        raise MessageRejected(
            "bad_refusal",
            f"refusal names {refusal.participant_id!r} round {refusal.round}, sent by {pid} round {h.round}",
        )
    pem = cert.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not refusal.verifies(pem):
        raise MessageRejected(
            "bad_refusal_signature", f"the refusal's signature does not verify with {pid}'s certificate"
        )
    return refusal


def received_update(h: pb.UpdateHeader, pid: str, buf: bytearray, spec: ParamSpec, *, sealed: bool) -> Update:
    """The update the bytes of an accepted upload carry: its parameters, or sealed ones for the enclave."""
    if sealed:
        return SealedUpdate(
            participant_id=pid,
            params=torch.zeros(0, dtype=torch.float32),
            num_examples=0,
            round=int(h.round),
            enclave_key_id=h.enclave_key_id,
            sealed=bytes(buf),
            commitment=bytes(h.commitment),
            signature=bytes(h.enclave_signature),
            metrics=dict(h.metrics),  # the participant's privacy accounting, if any (its parameters stay sealed)
        )
    return Update(pid, as_vector(buf, spec), int(h.num_examples), dict(h.metrics))


#: The refusals that are the participant's doing (what its update carries): recorded as its behaviour,
#: flagged, answered with INVALID_ARGUMENT.
BEHAVIOUR_REASONS = ("non_finite", "too_many_examples")


def check_declared_examples(h: pb.UpdateHeader, pid: str, max_examples: int, *, sealed: bool) -> None:
    """The example count a header declares: at least 1 (a sealed update's travels inside the seal, so its
    header may say 0) and at most ``max_examples``."""
    n = int(h.num_examples)
    if n > max_examples:
        raise MessageRejected(
            "too_many_examples",
            f"{pid} declares {n} examples for round {h.round}, more than max_examples {max_examples}",
        )
    if n < (0 if sealed else 1):
        raise MessageRejected("bad_num_examples", f"num_examples {n} out of range")


def check_finite(update: Update, rnd: int) -> None:
    """An update in the clear must hold finite values (no NaN, no infinity, no float32 overflow)."""
    if bool(unusable_rows(update.params[None]).any()):
        raise MessageRejected(
            "non_finite",
            f"the update of {update.participant_id} for round {rnd} holds NaN or infinite values (or overflows float32)",
        )
