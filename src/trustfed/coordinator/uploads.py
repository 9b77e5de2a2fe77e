"""What the coordinator makes of an accepted upload: the participant-signed commitment, checked against
the bytes that arrived, and the update itself (clear or sealed to the enclave); of a withdrawal that
refuses the round, the participant's signed refusal record; and the checks of what an update carries,
which no aggregator should have to survive: a declared example count within ``[strategy] max_examples``
(FedAvg's weight) and, for an update in the clear, finite values.

With ``[transport] compression``, an upload declares its codec and the error its sender measured
(:func:`declared_compression`, checked against the federation's policy before a byte of the payload is
read), and its payload is restored onto the round's global model (:func:`received_update`); a payload
that does not decode (wrong length, tag or block, a non-finite scale) is refused as ``bad_compression``.

All raise :class:`~trustfed.transport.errors.MessageRejected` with the reason the servicer refuses
the upload with. A sealed update's values and count are checked by the enclave, which opens it; a
masked input's values cannot be checked by anyone (its declared count can, and is).
"""

from __future__ import annotations

import math

import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustfed.core.aggregator import unusable_rows
from trustfed.core.codec import ParamSpec, from_bytes
from trustfed.core.compression import CompressedUpdate, CompressionPolicy, CompressionRecord, restore
from trustfed.core.strategy import Update
from trustfed.enclave.sealing import SealedUpdate
from trustfed.errors import CodecError
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
    h: pb.UpdateHeader, pid: str, payload: bytes, cert: x509.Certificate, compression: CompressionRecord | None = None
) -> tuple[SignedCommitment, dict[str, str]]:
    """The commitment must be H(round, id, H(payload)) and carry the sender's signature (its certificate
    key) over a body that states ``compression`` (the codec and measured error the header declared).
    Returns it with the app code and data manifest hashes it states."""
    rnd = int(h.round)
    provenance = {k: str(getattr(h, k)) for k in PROVENANCE_KEYS if h.HasField(k)}
    for key, digest in provenance.items():
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise MessageRejected("bad_provenance", f"{key} must be 64 lowercase hex digits")
    evaluation = evaluation_of(dict(h.metrics))
    stated = compression.to_body() if compression is not None else None
    body = commitment_body(rnd, pid, payload, int(h.num_examples), provenance, evaluation, stated)
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


def declared_compression(h: pb.UpdateHeader, pid: str, policy: CompressionPolicy) -> CompressionRecord | None:
    """The compression an upload's header declares: the federation's codec and block, with a measured error
    that is finite, >= 0 and within ``max_error`` (None: the update travels as float32)."""
    codec = h.compression if h.HasField("compression") else "none"
    block = int(h.compression_block) if h.HasField("compression_block") else policy.block
    if codec != policy.codec or (codec != "none" and block != policy.block):
        raise MessageRejected(
            "compression_mismatch",
            f"{pid} sent {codec!r} (blocks of {block}); this federation's uploads are {policy.codec!r} "
            f"(blocks of {policy.block}): check [transport] compression in its federation file",
        )
    if codec == "none":
        return None
    nan = math.nan
    err = float(h.max_abs_error) if h.HasField("max_abs_error") else nan
    rel = float(h.rel_l2_error) if h.HasField("rel_l2_error") else nan
    record = CompressionRecord(codec, block, err, rel)
    bad = record.problems()
    if bad:
        raise MessageRejected("bad_compression", f"the update of {pid} for round {h.round}: {'; '.join(bad)}")
    over = record.problems(policy.max_error)
    if over:
        raise MessageRejected("error_bound_exceeded", f"the update of {pid} for round {h.round}: {over[0]}")
    return record


def received_update(
    h: pb.UpdateHeader,
    pid: str,
    buf: bytearray,
    spec: ParamSpec,
    *,
    sealed: bool,
    compression: CompressionRecord | None = None,
    base: bytes | None = None,
) -> Update:
    """The update the bytes of an accepted upload carry: its parameters, or sealed ones for the enclave.
    Compressed: ``base`` (the round's global model, float32 bytes) plus the decoded delta."""
    if compression is not None:
        if base is None:
            raise MessageRejected("round_not_open", f"round {h.round} closed while the update of {pid} streamed")
        try:
            params = restore(from_bytes(base, spec), buf, compression.codec, compression.block)
        except CodecError as exc:
            raise MessageRejected("bad_compression", f"the update of {pid} for round {h.round}: {exc}") from None
        payload = bytes(buf)
        return CompressedUpdate(pid, params, int(h.num_examples), dict(h.metrics), payload, compression)
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
BEHAVIOUR_REASONS = ("non_finite", "too_many_examples", "bad_compression", "error_bound_exceeded")


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
