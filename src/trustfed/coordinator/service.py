"""The coordinator's gRPC service and :class:`GrpcTransport`, its network Transport.

Participants pull: they long-poll for a round plan, download the global model as a stream,
upload their update as a stream and fetch a receipt. ``GrpcTransport.fit(plan, params)``
publishes the plan and waits until every selected participant has uploaded or the round's
deadline passes; it is also a :class:`~trustfed.coordinator.engine.RoundObserver`, so receipts
are written when the :class:`~trustfed.coordinator.engine.Coordinator` closes a round.

Every request is checked before it is acted on: TLS 1.3, a client certificate from the
federation CA with role participant and not revoked (the CRL file is re-read when it changes),
a signature by that certificate over the body, a fresh nonce and timestamp, and every size.
Refusals are logged with their reason and returned to the caller as gRPC errors.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustfed.coordinator.engine import Coordinator, RoundObserver, RoundRecord
from trustfed.coordinator.ha import LeadershipLost, LeaseHeartbeat
from trustfed.coordinator.state import CheckpointObserver
from trustfed.core.codec import ParamSpec, model_hash, to_bytes
from trustfed.core.strategy import RoundPlan, RoundResult, Update
from trustfed.pki.ca import PkiError, RevocationList, identity_of, load_certificate, load_private_key
from trustfed.primitives.merkle import MerkleTree
from trustfed.transport import federation_pb2 as pb
from trustfed.transport import federation_pb2_grpc as pb_grpc
from trustfed.transport.envelope import Signer, Verified, Verifier
from trustfed.transport.errors import MessageRejected, TransportError
from trustfed.transport.settings import Limits, TransportSettings
from trustfed.transport.streaming import (
    StreamDeclaration,
    as_vector,
    check_declaration,
    expect_end,
    iter_chunks,
    receive_payload,
)
from trustfed.transport.tls import grpc_options, server_credentials

if TYPE_CHECKING:
    from trustfed.coordinator.recorders import EnclaveRecord
    from trustfed.coordinator.secagg import SecAggRound
    from trustfed.ledger.participant import SignedCommitment
    from trustfed.secagg.settings import SecAggSettings

log = logging.getLogger("trustfed.coordinator.service")

MAX_POLL_S = 5.0  # a long poll holds a server thread at most this long
MAX_SECAGG_PARTICIPANTS = 4096  # bounds the maps of one secure-aggregation message


class CrlSource:
    """The federation's revocation list, re-read whenever its file changes."""

    def __init__(self, path: Path | None, ca_cert: x509.Certificate) -> None:
        self.path = path
        self.ca_cert = ca_cert
        self._mtime: float | None = None
        self._crl = RevocationList.empty()
        self._lock = threading.Lock()
        self.current()

    def current(self) -> RevocationList:
        if self.path is None:
            return self._crl
        with self._lock:
            mtime = self.path.stat().st_mtime_ns if self.path.exists() else None
            if mtime is None:
                raise PkiError(
                    f"revocation list {self.path} has disappeared; refusing every certificate until it is back"
                )
            if mtime != self._mtime:
                self._crl = RevocationList.load(self.path, self.ca_cert)
                self._mtime = mtime
                log.info("loaded revocation list %s: %d revoked serial(s)", self.path, len(self._crl.serials))
            return self._crl


@dataclass
class _OpenRound:
    plan: RoundPlan
    config_json: str
    payload: bytes
    deadline: float
    updates: dict[str, Update] = field(default_factory=dict)
    commitments: dict[str, SignedCommitment] = field(default_factory=dict)  # participant-signed (ledger)
    closed: bool = False
    secagg: SecAggRound | None = None  # secure aggregation: the protocol state of this round


@dataclass(frozen=True)
class _ReceiptInfo:
    new_model_hash: str
    participants: tuple[str, ...]
    included: frozenset[str]
    leaves: tuple[bytes, ...] = ()  # the round's commitments, in the ledger's order
    enclave_receipt: bytes | None = None


class RoundBoard:
    """State shared by the gRPC threads and the coordinator's round loop."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.checked_in: dict[str, int] = {}  # participant id -> certificate serial
        self.certificates: dict[str, bytes] = {}  # participant id -> its TLS certificate (PEM), for the ledger
        self.withdrawn: dict[str, str] = {}  # participant -> why it left (its signed withdrawal's reason)
        self.current: _OpenRound | None = None
        self.receipts: dict[int, _ReceiptInfo] = {}
        self.done = False
        self.told_done: set[str] = set()
        self.aborted: str | None = None
        # participant -> the app code and data manifest hashes in its latest signed commitment
        self.provenance: dict[str, dict[str, str]] = {}

    def check_aborted(self) -> None:
        if self.aborted is not None:
            raise TransportError(f"federation aborted: {self.aborted}")


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, detail: str) -> NoReturn:
    context.abort(code, detail)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


_REJECT_CODES = {
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "too_many_chunks": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "nonce_cache_full": grpc.StatusCode.RESOURCE_EXHAUSTED,
    # the round closed or this coordinator never opened it (it restarted): participants drop the round
    # and ask for the next plan instead of leaving
    "round_not_open": grpc.StatusCode.FAILED_PRECONDITION,
    # secure aggregation went on without this participant (it came after a step closed): the same
    "wrong_step": grpc.StatusCode.FAILED_PRECONDITION,
    "not_in_roster": grpc.StatusCode.FAILED_PRECONDITION,
    "not_a_survivor": grpc.StatusCode.FAILED_PRECONDITION,
    "already_in_round": grpc.StatusCode.FAILED_PRECONDITION,
}


class FederationServicer(pb_grpc.FederationServicer):  # type: ignore[misc]
    """Serves plans, models, uploads and receipts; checks everything it receives."""

    def __init__(
        self,
        board: RoundBoard,
        signer: Signer,
        verifier: Verifier,
        spec: ParamSpec,
        limits: Limits,
        *,
        require_commitment: bool = False,
        sealed: bool = False,
        secagg: SecAggSettings | None = None,
    ) -> None:
        self.board = board
        self.session = secrets.token_hex(8)  # in every plan and receipt: a participant sees a restart
        self.signer = signer
        self.verifier = verifier
        self.spec = spec
        self.spec_json = spec.to_json()
        self.limits = limits
        self.require_commitment = require_commitment  # the ledger is on: every update carries a signed commitment
        self.sealed = sealed  # enclave mode: updates arrive sealed to the enclave; clear ones are refused
        self.secagg = secagg  # secure aggregation: masked inputs only, through the SecAgg steps
        self._certs: dict[bytes, x509.Certificate] = {}

    # -- checks shared by every RPC
    def _refuse(self, context: grpc.ServicerContext, exc: MessageRejected, rpc: str) -> NoReturn:
        _abort(context, _REJECT_CODES.get(exc.reason, grpc.StatusCode.PERMISSION_DENIED), f"{rpc}: {exc}")

    def _peer_cert(self, context: grpc.ServicerContext, rpc: str) -> x509.Certificate:
        auth = context.auth_context()
        version = (auth.get("ssl_tls_version") or [b"?"])[0].decode()
        if version != "TLSv1.3":
            log.warning(
                "coordinator refused %s from %s: TLS version %s (only TLSv1.3 is accepted)",
                rpc,
                context.peer(),
                version,
            )
            _abort(context, grpc.StatusCode.PERMISSION_DENIED, f"{rpc}: TLS {version} refused; TLS 1.3 only")
        pems = auth.get("x509_pem_cert")
        if not pems:
            log.warning("coordinator refused %s from %s: no client certificate", rpc, context.peer())
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, f"{rpc}: no client certificate")
        pem = pems[0]
        cert = self._certs.get(pem)
        if cert is None:
            cert = x509.load_pem_x509_certificate(pem)
            if len(self._certs) > 4096:
                self._certs.clear()
            self._certs[pem] = cert
        return cert

    def _verify(self, msg: pb.SignedMessage, msg_type: str, context: grpc.ServicerContext, rpc: str) -> Verified:
        cert = self._peer_cert(context, rpc)
        try:
            v = self.verifier.verify(msg, expected_type=msg_type, peer_cert=cert, role="participant")
        except MessageRejected as exc:
            self._refuse(context, exc, rpc)
        with self.board.cond:
            if v.identity.name in self.board.checked_in or msg_type == "plan_request":
                self.board.checked_in[v.identity.name] = v.identity.serial
                self.board.certificates[v.identity.name] = cert.public_bytes(serialization.Encoding.PEM)
                self.board.cond.notify_all()
        return v

    def _reject(self, context: grpc.ServicerContext, rpc: str, who: str, reason: str, detail: str) -> NoReturn:
        exc = self.verifier.reject(reason, detail, rpc, who)
        self._refuse(context, exc, rpc)

    # -- RPCs
    def GetRoundPlan(self, request: pb.SignedMessage, context: grpc.ServicerContext) -> pb.SignedMessage:
        v = self._verify(request, "plan_request", context, "GetRoundPlan")
        req = pb.PlanRequest.FromString(v.body)
        pid = v.identity.name
        if req.participant_id != pid:
            self._reject(context, "GetRoundPlan", pid, "sender_mismatch", f"asks as {req.participant_id!r}")
        wait_s = min(req.wait_ms / 1000, MAX_POLL_S)
        deadline = time.monotonic() + wait_s
        b = self.board
        with b.cond:
            while True:
                cur = b.current
                if b.done:
                    b.told_done.add(pid)
                    b.cond.notify_all()
                    plan = pb.RoundPlan(status=pb.DONE, round=cur.plan.round if cur else 0, session=self.session)
                    break
                if (
                    cur is not None
                    and not cur.closed
                    and cur.plan.round > req.after_round
                    and pid in cur.plan.participants
                    and pid not in cur.updates
                    and not (cur.secagg is not None and cur.secagg.joined(pid))  # its keys are out: sits it out
                ):
                    plan = pb.RoundPlan(
                        status=pb.TRAIN,
                        round=cur.plan.round,
                        participants=list(cur.plan.participants),
                        config_json=cur.config_json,
                        model_hash=cur.plan.model_hash,
                        spec_json=self.spec_json,
                        model_bytes=len(cur.payload),
                        chunk_bytes=self.limits.chunk_bytes,
                        deadline_ms=int(cur.deadline * 1000),
                        session=self.session,
                    )
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    plan = pb.RoundPlan(status=pb.WAIT, retry_after_ms=200, session=self.session)
                    break
                b.cond.wait(left)
        return self.signer.sign("round_plan", plan.round, plan.SerializeToString())

    def DownloadModel(self, request: pb.SignedMessage, context: grpc.ServicerContext) -> Iterator[pb.StreamPart]:
        v = self._verify(request, "model_request", context, "DownloadModel")
        req = pb.ModelRequest.FromString(v.body)
        pid = v.identity.name
        with self.board.cond:
            cur = self.board.current
            ok = cur is not None and not cur.closed and cur.plan.round == req.round and pid in cur.plan.participants
        if not ok or cur is None:
            self._reject(context, "DownloadModel", pid, "round_not_open", f"round {req.round} is not open for {pid}")
        if req.model_hash != cur.plan.model_hash:
            self._reject(
                context, "DownloadModel", pid, "hash_mismatch", "asked for a model hash that is not this round's"
            )
        payload = cur.payload
        c = self.limits.chunk_bytes
        header = pb.ModelHeader(
            round=req.round,
            spec_json=self.spec_json,
            total_bytes=len(payload),
            chunk_bytes=c,
            num_chunks=-(-len(payload) // c),
            model_hash=cur.plan.model_hash,
        )
        yield pb.StreamPart(header=self.signer.sign("model_header", req.round, header.SerializeToString()))
        yield from iter_chunks(payload, c)

    def UploadUpdate(
        self, request_iterator: Iterator[pb.StreamPart], context: grpc.ServicerContext
    ) -> pb.SignedMessage:
        rpc = "UploadUpdate"
        parts = iter(request_iterator)
        first = next(parts, None)
        if first is None or first.WhichOneof("part") != "header":
            self._reject(context, rpc, "?", "no_header", "an upload must start with its signed header")
        v = self._verify(first.header, "update_header", context, rpc)
        pid = v.identity.name
        h = pb.UpdateHeader.FromString(v.body)
        if h.participant_id != pid or v.envelope.round != h.round:
            self._reject(context, rpc, pid, "sender_mismatch", f"header names {h.participant_id!r} round {h.round}")
        with self.board.cond:
            cur = self.board.current
            if cur is None or cur.plan.round != h.round or cur.closed:
                why = (
                    "is closed (deadline passed or all updates in)"
                    if cur and cur.plan.round == h.round
                    else "is not open"
                )
                self._reject(context, rpc, pid, "round_not_open", f"round {h.round} {why}")
            if pid not in cur.plan.participants:
                self._reject(context, rpc, pid, "not_selected", f"{pid} is not selected for round {h.round}")
            if pid in cur.updates:
                self._reject(context, rpc, pid, "duplicate", f"{pid} already uploaded for round {h.round}")
        if h.HasField("withdrawn_reason"):
            expect_end(parts, f"withdrawal of {pid}")
            log.info("round %d: %s withdrew: %s", h.round, pid, h.withdrawn_reason)
            with self.board.cond:
                self.board.withdrawn[pid] = f"withdrew: {h.withdrawn_reason}"[:300]
                self.board.cond.notify_all()
            return self._ack(h.round, True, "withdrawal recorded")
        masked = h.HasField("secagg_masked") and h.secagg_masked
        if masked and self.secagg is None:
            self._reject(context, rpc, pid, "secagg_unsupported", "masked input sent, but secure aggregation is off")
        if self.secagg is not None and not masked:
            self._reject(
                context, rpc, pid, "not_masked", "this federation aggregates securely: upload the masked input only"
            )
        if masked:
            with self.board.cond:
                try:
                    self._secagg_state(h.round).check_masked(pid)
                except MessageRejected as exc:
                    self._reject(context, rpc, pid, exc.reason, exc.detail)
        sealed = h.HasField("sealed") and h.sealed
        if sealed and not self.sealed:
            self._reject(
                context, rpc, pid, "sealed_unsupported", "sealed updates need an enclave, which is not configured"
            )
        if self.sealed and not sealed:
            self._reject(
                context, rpc, pid, "not_sealed", "this federation aggregates in an enclave: seal the update to it"
            )
        if not (0 <= h.num_examples <= 2**40 if sealed else 0 < h.num_examples <= 2**40):
            self._reject(context, rpc, pid, "bad_num_examples", f"num_examples {h.num_examples} out of range")
        if len(h.metrics) > 64:
            self._reject(context, rpc, pid, "too_many_metrics", f"{len(h.metrics)} metrics (at most 64)")
        if self.require_commitment and not (h.HasField("commitment") and h.HasField("commitment_signature")):
            self._reject(
                context, rpc, pid, "commitment_missing", "the ledger is on: sign your update commitment and send it"
            )
        decl = StreamDeclaration(h.total_bytes, h.chunk_bytes, h.num_chunks, h.model_hash)
        where = f"update from {pid} for round {h.round}"
        try:
            check_declaration(decl, self.spec, self.limits, where, sealed=sealed)
            buf = receive_payload(parts, decl, self.spec_json, where)
            expect_end(parts, where)
        except MessageRejected as exc:
            self._reject(context, rpc, pid, exc.reason, exc.detail)
        signed: SignedCommitment | None = None
        if h.HasField("commitment_signature"):
            signed = self._check_commitment(context, h, pid, bytes(buf), v)
        if masked:
            return self._receive_masked(context, pid, h, buf, signed)
        update: Update
        if sealed:
            from trustfed.enclave.sealing import SealedUpdate

            update = SealedUpdate(
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
        else:
            update = Update(pid, as_vector(buf, self.spec), int(h.num_examples), dict(h.metrics))
        del buf
        with self.board.cond:
            cur = self.board.current
            if cur is None or cur.plan.round != h.round or cur.closed:
                self._reject(context, rpc, pid, "round_not_open", f"round {h.round} closed while the update streamed")
            cur.updates[pid] = update
            if signed is not None:
                cur.commitments[pid] = signed
            self.board.cond.notify_all()
        log.info("round %d: accepted update from %s (%d examples)", h.round, pid, h.num_examples)
        return self._ack(h.round, True, "accepted")

    def _check_commitment(
        self, context: grpc.ServicerContext, h: pb.UpdateHeader, pid: str, payload: bytes, v: Verified
    ) -> SignedCommitment:
        """The commitment must be H(round, id, H(payload)) and carry the sender's signature (its certificate key)."""
        from trustfed.ledger.audit import entry_digest, verify_signature
        from trustfed.ledger.participant import (
            COMMITMENT_KIND,
            PROVENANCE_KEYS,
            SignedCommitment,
            commitment_body,
            evaluation_of,
        )

        rnd = int(h.round)
        provenance = {k: str(getattr(h, k)) for k in PROVENANCE_KEYS if h.HasField(k)}
        for key, digest in provenance.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                self._reject(context, "UploadUpdate", pid, "bad_provenance", f"{key} must be 64 lowercase hex digits")
        body = commitment_body(rnd, pid, payload, int(h.num_examples), provenance, evaluation_of(dict(h.metrics)))
        if body["commitment"] != bytes(h.commitment).hex():
            self._reject(
                context, "UploadUpdate", pid, "bad_commitment", f"commitment is not H(round {rnd}, {pid}, H(update))"
            )
        cert = self._peer_cert(context, "UploadUpdate")
        pem = cert.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        sig = bytes(h.commitment_signature)
        if not verify_signature(pem, entry_digest(COMMITMENT_KIND, rnd, pid, body), sig):
            self._reject(
                context,
                "UploadUpdate",
                pid,
                "bad_commitment_signature",
                f"the commitment's signature does not verify with the certificate of {pid}",
            )
        if provenance:
            with self.board.cond:
                self.board.provenance[pid] = provenance
        return SignedCommitment(pid, rnd, body, sig)

    def _secagg_state(self, rnd: int) -> SecAggRound:
        """The current round's secure-aggregation state (board lock held); refused if it is not that round."""
        cur = self.board.current
        if cur is None or cur.plan.round != rnd or cur.secagg is None:
            raise MessageRejected("round_not_open", f"round {rnd} is not the open secure-aggregation round")
        return cur.secagg

    def _receive_masked(
        self,
        context: grpc.ServicerContext,
        pid: str,
        h: pb.UpdateHeader,
        buf: bytearray,
        signed: SignedCommitment | None,
    ) -> pb.SignedMessage:
        import numpy as np

        y = np.frombuffer(bytes(buf), dtype="<u4").astype(np.uint32)
        with self.board.cond:
            try:
                self._secagg_state(h.round).submit_masked(pid, y, int(h.num_examples))
            except MessageRejected as exc:
                self._reject(context, "UploadUpdate", pid, exc.reason, exc.detail)
            cur = self.board.current
            if signed is not None and cur is not None:
                cur.commitments[pid] = signed  # the ledger commits to the masked input as it travelled
            self.board.cond.notify_all()
        log.info("round %d: accepted the masked input of %s", h.round, pid)
        return self._ack(h.round, True, "masked input accepted")

    def _relayed(self, context: grpc.ServicerContext, msg: pb.SignedMessage, msg_type: str, pid: str) -> bytes:
        """A message the participant signed for its peers (the coordinator relays it unchanged): its own."""
        try:
            v = self.verifier.verify_relayed(msg, expected_type=msg_type, role="participant")
        except MessageRejected as exc:
            self._refuse(context, exc, "SecAgg")
        if v.identity.name != pid:
            self._reject(
                context, "SecAgg", pid, "sender_mismatch", f"{msg_type} signed by {v.identity.name!r}, sent by {pid!r}"
            )
        return v.body

    def SecAgg(self, request: pb.SignedMessage, context: grpc.ServicerContext) -> pb.SignedMessage:
        """One secure-aggregation step: store what the participant submits, then long-poll for the
        step's outcome (the roster, its inbox, the survivors, or the acknowledgement of its shares)."""
        rpc = "SecAgg"
        v = self._verify(request, "secagg_request", context, rpc)
        pid = v.identity.name
        req = pb.SecAggRequest.FromString(v.body)
        if v.envelope.round != req.round:
            self._reject(
                context, rpc, pid, "round_mismatch", f"request for round {req.round} signed for {v.envelope.round}"
            )
        if self.secagg is None:
            self._reject(
                context, rpc, pid, "secagg_unsupported", "secure aggregation is not enabled in this federation"
            )
        cap = 4 * MAX_SECAGG_PARTICIPANTS
        if max(len(req.shares), len(req.self_mask_shares), len(req.key_shares)) > cap:
            self._reject(context, rpc, pid, "too_large", f"more than {cap} entries in one secure-aggregation map")
        keys: pb.SecAggKeys | None = None
        seen: pb.SecAggSurvivors | None = None
        if req.step == pb.SECAGG_KEYS and req.HasField("keys"):
            keys = pb.SecAggKeys.FromString(self._relayed(context, req.keys, "secagg_keys", pid))
        if req.step == pb.SECAGG_CONSISTENCY and req.HasField("survivors_signed"):
            seen = pb.SecAggSurvivors.FromString(self._relayed(context, req.survivors_signed, "secagg_survivors", pid))
        deadline = time.monotonic() + min(req.wait_ms / 1000, MAX_POLL_S)
        b = self.board
        with b.cond:
            try:
                sa = self._secagg_state(req.round)
                if keys is not None:
                    sa.submit_keys(pid, req.keys, keys)
                elif seen is not None:
                    sa.submit_consistency(pid, req.survivors_signed, seen)
                elif req.step == pb.SECAGG_SHARES and req.shares:
                    sa.submit_shares(pid, dict(req.shares))
                elif req.step == pb.SECAGG_UNMASK and (req.self_mask_shares or req.key_shares):
                    sa.submit_unmask(pid, dict(req.self_mask_shares), dict(req.key_shares))
                b.cond.notify_all()
                while (reply := sa.reply(pid, req.step)) is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        reply = pb.SecAggReply(round=req.round, step=req.step, ready=False, session=self.session)
                        break
                    b.cond.wait(left)
                    sa = self._secagg_state(req.round)
            except MessageRejected as exc:
                self._reject(context, rpc, pid, exc.reason, exc.detail)
        return self.signer.sign("secagg_reply", req.round, reply.SerializeToString())

    def _ack(self, rnd: int, accepted: bool, reason: str) -> pb.SignedMessage:
        return self.signer.sign("upload_ack", rnd, pb.UploadAck(accepted=accepted, reason=reason).SerializeToString())

    def GetReceipt(self, request: pb.SignedMessage, context: grpc.ServicerContext) -> pb.SignedMessage:
        v = self._verify(request, "receipt_request", context, "GetReceipt")
        req = pb.ReceiptRequest.FromString(v.body)
        pid = v.identity.name
        deadline = time.monotonic() + min(req.wait_ms / 1000, MAX_POLL_S)
        with self.board.cond:
            while req.round not in self.board.receipts and not self.board.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.board.cond.wait(left)
            info = self.board.receipts.get(req.round)
        if info is None:
            receipt = pb.Receipt(round=req.round, ready=False, session=self.session)
        else:
            receipt = pb.Receipt(
                round=req.round,
                ready=True,
                session=self.session,
                included=pid in info.included,
                new_model_hash=info.new_model_hash,
                participants=list(info.participants),
            )
            if info.leaves and pid in info.participants:
                tree = MerkleTree(list(info.leaves))
                index = info.participants.index(pid)
                receipt.merkle_root = tree.root
                receipt.merkle_proof.extend(tree.proof(index).siblings)
                receipt.proof_index = index
                receipt.leaf_count = len(info.leaves)
            if info.enclave_receipt is not None:
                receipt.enclave_receipt = info.enclave_receipt
        return self.signer.sign("receipt", req.round, receipt.SerializeToString())


def _required(settings: TransportSettings) -> tuple[Path, Path, Path]:
    missing = [n for n in ("ca", "cert", "key") if getattr(settings, n) is None]
    if missing:
        raise TransportError(
            f"[transport] needs {', '.join(missing)} (paths to the CA certificate, the coordinator's certificate "
            "and key); create them with `trustfed pki init` and `trustfed pki issue --role coordinator`"
        )
    assert settings.ca and settings.cert and settings.key
    return settings.ca, settings.cert, settings.key


class GrpcTransport:
    """The coordinator's Transport over gRPC + mutual TLS, and a RoundObserver for receipts."""

    def __init__(
        self,
        settings: TransportSettings,
        spec: ParamSpec,
        *,
        max_workers: int = 32,
        require_commitment: bool = False,
        sealed: bool = False,
        secagg: SecAggSettings | None = None,
    ) -> None:
        ca, cert_path, key_path = _required(settings)
        self.settings = settings
        self.limits = settings.limits
        self.spec = spec
        ca_cert = load_certificate(ca)
        cert = load_certificate(cert_path)
        key = load_private_key(key_path)
        ident = identity_of(cert)
        if ident.role != "coordinator":
            raise PkiError(f"{cert_path} is a {ident.role} certificate; the server needs one of role coordinator")
        self.crl = CrlSource(settings.crl, ca_cert)
        self.board = RoundBoard()
        self.signer = Signer(ident.name, key, cert)
        self.verifier = Verifier(
            ca_cert,
            self.crl.current,
            window_s=self.limits.timestamp_window_s,
            nonce_cache_size=self.limits.nonce_cache_size,
            where="coordinator",
        )
        self.servicer = FederationServicer(
            self.board,
            self.signer,
            self.verifier,
            spec,
            self.limits,
            require_commitment=require_commitment,
            sealed=sealed,
            secagg=secagg,
        )
        self.secagg = secagg
        self.secagg_survivors: dict[int, tuple[str, ...]] = {}  # round -> whose masked inputs are in the sum
        self.enclave_receipts: Callable[[int], bytes | None] = lambda _rnd: None  # set in enclave mode
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="trustfed-grpc"),
            # no SO_REUSEPORT: a second coordinator on the same address fails to bind instead of sharing it
            options=[*grpc_options(self.limits.max_message_bytes + 64 * 1024), ("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_FederationServicer_to_server(self.servicer, self.server)  # type: ignore[no-untyped-call]
        host = settings.listen.rpartition(":")[0]
        try:
            port = self.server.add_secure_port(settings.listen, server_credentials(ca, cert_path, key_path))
        except RuntimeError as exc:
            raise TransportError(
                f"cannot listen on {settings.listen}: {exc}; pick a free port in [transport].listen"
            ) from None
        if port == 0:
            raise TransportError(f"cannot listen on {settings.listen}; is the port in use?")
        self.address = f"{host}:{port}"
        self._closed = False
        self.server.start()
        log.info("coordinator %s listening on %s (mutual TLS 1.3)", ident.name, self.address)

    # -- joining
    def wait_for_participants(self, expected: Sequence[str], timeout_s: float, minimum: int = 1) -> list[str]:
        """Wait until every expected participant has checked in (or ``timeout_s``); return who did."""
        end = time.monotonic() + timeout_s
        with self.board.cond:
            while not set(expected) <= set(self.board.checked_in):
                self.board.check_aborted()
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.board.cond.wait(left)
            present = sorted(self.board.checked_in)
        if len(present) < minimum:
            raise TransportError(
                f"only {len(present)} participant(s) checked in at {self.address} within {timeout_s:.0f} s; "
                f"{minimum} needed. Missing: {', '.join(sorted(set(expected) - set(present))) or '-'}"
            )
        missing = sorted(set(expected) - set(present))
        if missing:
            log.warning("starting without %s (not checked in after %.0f s)", ", ".join(missing), timeout_s)
        return present

    def provenance(self) -> dict[str, dict[str, str]]:
        """Each participant's app code and data manifest hashes, as its latest signed commitment gave them."""
        with self.board.cond:
            return {pid: dict(p) for pid, p in sorted(self.board.provenance.items())}

    def exclude(self, reasons: Mapping[str, str]) -> None:
        """Leave these participants out from now on (a resumed run: the log has them leave earlier)."""
        with self.board.cond:
            self.board.withdrawn.update(reasons)
            self.board.cond.notify_all()

    def departure(self, participant_id: str) -> str:
        """Why a participant left the federation: ``"revoked"`` (its certificate is on the CRL) or its
        signed withdrawal's reason."""
        with self.board.cond:
            serial = self.board.checked_in.get(participant_id)
            reason = self.board.withdrawn.get(participant_id, "withdrew")
        if serial is not None and self.crl.current().is_revoked(serial):
            return "revoked"
        return reason

    # -- Transport
    def available(self) -> Sequence[str]:
        crl = self.crl.current()
        with self.board.cond:
            return sorted(
                pid
                for pid, serial in self.board.checked_in.items()
                if pid not in self.board.withdrawn and not crl.is_revoked(serial)
            )

    def fit(self, plan: RoundPlan, params: torch.Tensor) -> list[Update]:
        mh = plan.model_hash or model_hash(params, self.spec)
        plan = RoundPlan(plan.round, plan.participants, plan.config, mh)
        payload = to_bytes(params)
        if len(payload) > self.limits.max_model_bytes:
            raise TransportError(
                f"the model has {len(payload)} bytes, over [transport.limits].max_model_bytes = {self.limits.max_model_bytes}"
            )
        deadline = time.time() + self.settings.round_timeout_s
        open_round = _OpenRound(plan, json.dumps(dict(plan.config), sort_keys=True), payload, deadline)
        if self.secagg is not None:
            return self._fit_secure(open_round, params)
        selected = set(plan.participants)
        with self.board.cond:
            self.board.current = open_round
            self.board.cond.notify_all()
            self._wait(open_round, lambda: selected <= set(open_round.updates) | self.board.withdrawn.keys(), deadline)
            open_round.closed = True
            self.board.cond.notify_all()
            got = dict(open_round.updates)
            missing = sorted(selected - set(got) - self.board.withdrawn.keys())
        if missing:
            log.warning("round %d: no update from %s before the deadline", plan.round, ", ".join(missing))
        return [got[pid] for pid in plan.participants if pid in got]

    def _wait(self, open_round: _OpenRound, done: Callable[[], bool], deadline: float) -> None:
        """With the board lock held: wait until ``done()`` or ``deadline`` (wall clock), or abort."""
        while not done():
            if self.board.aborted is not None:
                open_round.closed = True
                self.board.check_aborted()
            left = deadline - time.time()
            if left <= 0:
                return
            self.board.cond.wait(min(left, 1.0))

    def _fit_secure(self, open_round: _OpenRound, params: torch.Tensor) -> list[Update]:
        """One round by secure aggregation: relay the protocol's steps (see
        :mod:`trustfed.coordinator.secagg`) and return one ``secagg`` update, the global model plus the
        mean of the survivors' clipped deltas (weighted by example counts with ``[secagg] weighted``)."""
        from trustfed.coordinator.secagg import SecAggRound
        from trustfed.errors import AggregationError
        from trustfed.secagg.protocol import SecAggError
        from trustfed.secagg.updates import SECAGG_ID, MaskedInput, SecureSumUpdate, mean_of_sum

        assert self.secagg is not None
        plan, step_s = open_round.plan, self.secagg.step_timeout_s
        try:
            sa = SecAggRound.open(self.secagg, plan, self.servicer.session, self.spec.size)
        except SecAggError as exc:
            raise AggregationError(f"round {plan.round}: cannot aggregate securely: {exc}") from None
        open_round.secagg = sa
        selected = set(plan.participants)
        b = self.board
        with b.cond:
            b.current = open_round
            b.cond.notify_all()
            # the keys wait for the round deadline (a withdrawal counts as an answer), each later step step_s
            expected = selected
            late: dict[str, set[str]] = {}
            try:
                for step in ("keys", "shares", "masked", "consistency", "unmask"):
                    first = step == "keys"
                    end, gone = (open_round.deadline, b.withdrawn.keys()) if first else (time.time() + step_s, set())
                    self._wait(open_round, lambda: expected <= sa.completed(step) | gone, end)  # noqa: B023
                    late[step] = expected - sa.completed(step) - gone
                    sa.close(step)
                    b.cond.notify_all()
                    expected = sa.completed(step)  # the next step waits for those who did this one
            except SecAggError as exc:
                raise AggregationError(f"round {plan.round}: secure aggregation failed: {exc}") from None
            finally:
                open_round.closed = True
                b.cond.notify_all()
        for step, who in late.items():
            if who:
                log.warning("round %d: no secure-aggregation %s from %s", plan.round, step, ", ".join(sorted(who)))
        try:  # the steps are closed: nothing changes sa any more
            total, survivors, examples = sa.result()  # e.g. a neighbourhood with too few unmasking shares fails
            mean = mean_of_sum(total, self.secagg, [sa.examples[sa.index[p]] for p in survivors])
        except SecAggError as exc:
            raise AggregationError(f"round {plan.round}: secure aggregation failed: {exc}") from None
        self.secagg_survivors[plan.round] = tuple(survivors)
        dropped = len(selected) - len(survivors)
        log.info(
            "round %d: secure aggregation of %d masked input(s), %d selected participant(s) missing",
            plan.round,
            len(survivors),
            dropped,
        )
        metrics = {"secagg_survivors": float(len(survivors)), "secagg_dropped": float(dropped)}
        parts = tuple(MaskedInput.of(p, sa.server.masked[sa.index[p]], sa.examples[sa.index[p]]) for p in survivors)
        return [SecureSumUpdate(SECAGG_ID, params + mean, max(examples, 1), metrics, parts, sa.params.step)]

    def abort(self, reason: str) -> None:
        """Make a waiting ``fit`` / ``wait_for_participants`` raise (e.g. a participant process died)."""
        log.error("aborting the federation: %s", reason)
        with self.board.cond:
            self.board.aborted = reason
            self.board.cond.notify_all()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self.board.cond:
            self.board.done = True
            self.board.cond.notify_all()
            end = time.monotonic() + self.settings.linger_s
            while not set(self.board.checked_in) <= self.board.told_done | self.board.withdrawn.keys():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.board.cond.wait(left)
        self.server.stop(grace=1.0).wait()

    # -- RoundObserver
    def on_round_start(self, plan: RoundPlan, params: torch.Tensor) -> None:
        pass

    def commitment_for(self, plan: RoundPlan, update: Update) -> SignedCommitment:
        """The ledger's CommitmentSource: the commitment ``update``'s participant signed and sent with it."""
        from trustfed.ledger.records import LedgerError

        with self.board.cond:
            cur = self.board.current
            signed = cur.commitments.get(update.participant_id) if cur and cur.plan.round == plan.round else None
        if signed is None:
            raise LedgerError(
                f"round {plan.round}: no signed commitment arrived with the update of {update.participant_id}"
            )
        return signed

    def on_round_end(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> None:
        """Publish the round's receipts. Attach after the recorders, so the round is on chain first."""
        included = frozenset(updates[i].participant_id for i in result.aggregate.selected)
        with self.board.cond:
            cur = self.board.current
            signed = dict(cur.commitments) if cur and cur.plan.round == plan.round else {}
        ids = tuple(u.participant_id for u in updates)
        if plan.round in self.secagg_survivors:  # one summed update: the survivors are in it
            ids = self.secagg_survivors.pop(plan.round)
            included = frozenset(ids) if included else frozenset()
        leaves = tuple(signed[p].commitment for p in ids) if ids and all(p in signed for p in ids) else ()
        info = _ReceiptInfo(record.model_hash, ids, included, leaves, self.enclave_receipts(plan.round))
        with self.board.cond:
            self.board.receipts[plan.round] = info
            self.board.cond.notify_all()


def run_coordinator(
    cfg: Any,
    transport: GrpcTransport,
    *,
    out_dir: Path | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    observers: Sequence[RoundObserver] = (),
    write: bool = True,
    resume: bool = False,
    heartbeat: LeaseHeartbeat | None = None,  # started when the lease was taken; renews it meanwhile
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the federation in ``cfg`` (a FederationConfig) over ``transport``: the same
    Coordinator round loop as the simulation, with the same recorders (privacy, ledger; see
    :func:`trustfed.coordinator.recorders.recorders_for`) when ``out_dir`` is given. The ledger
    records the commitments participants signed with their own keys and registers them by their
    certificates. With ``[enclave] enabled`` aggregation runs in the attested enclave service at
    ``[enclave].address``; this process relays sealed updates only. Returns the final parameters
    and the metrics (written to ``out_dir`` unless ``write`` is false)."""
    from trustfed.app.runtime import Runtime, participant_ids
    from trustfed.coordinator.recorders import (
        NetworkIdentities,
        recorders_for,
        use_reputation_selection,
    )
    from trustfed.ledger.audit import EcdsaSigner
    from trustfed.ledger.recorder import COORDINATOR_ID
    from trustfed.simulation.runner import run_rounds, write_results

    rt = Runtime(cfg)
    params, spec = rt.initial
    if spec != transport.spec:
        raise TransportError("the transport was built for another model spec than the federation config's")
    evaluate_fn = rt.evaluate_fn()
    # With an enclave, central DP runs inside it (its measured config), never here on the coordinator.
    strategy = rt.base_strategy(evaluate_fn) if cfg.enclave.enabled else rt.strategy(evaluate_fn)
    expected = participant_ids(cfg.federation.participants)
    enclave: EnclaveRecord | None = None
    if cfg.enclave.enabled:
        strategy, enclave = _enclave_strategy(cfg, strategy, spec, transport.settings)
        transport.enclave_receipts = enclave.receipt_json
    present = transport.wait_for_participants(
        expected, transport.settings.join_timeout_s, cfg.strategy.min_participants
    )
    _ca, cert_path, key_path = _required(transport.settings)
    with transport.board.cond:
        certificates = {pid: transport.board.certificates[pid] for pid in present}
    network = NetworkIdentities(
        EcdsaSigner.load(COORDINATOR_ID, key_path),
        {COORDINATOR_ID: cert_path.read_bytes(), **certificates},
        transport.commitment_for,
    )
    recorders = recorders_for(
        cfg, out_dir, spec, present, network=network, enclave=enclave, resume=resume, app=rt.identity
    )
    use_reputation_selection(cfg, strategy, recorders)
    # Coordinator state (model + server-side strategy state) after every round, before the ledger records
    # it: what a restarted or standby coordinator resumes from.
    state: list[RoundObserver] = [] if out_dir is None else [CheckpointObserver(out_dir / STATE_DIR, strategy, spec)]
    # The transport publishes receipts (with Merkle proofs) last, once the round is on chain.
    watchers: list[RoundObserver] = [*observers, *state, *recorders, transport]
    if cfg.secagg.enabled and transport.secagg is None:
        raise TransportError("[secagg] is enabled but the transport was built without it (GrpcTransport(secagg=...))")
    min_updates = 1 if cfg.secagg.enabled else cfg.strategy.min_participants  # secagg: one summed update
    coord = Coordinator(strategy, transport, params, spec, min_updates=min_updates, observers=watchers)
    resumed = _resume(cfg, coord, out_dir, recorders, enclave) if resume else 0

    def each_round(rec: RoundRecord) -> None:
        if heartbeat is not None and (heartbeat.lost.is_set() or not heartbeat.lease.renew()):
            transport.abort("this coordinator lost its lease: another one has taken over")
            raise LeadershipLost(
                f"{heartbeat.lease.holder} lost the lease {heartbeat.lease.path} after round {rec.round}"
            )
        if on_round:
            on_round(rec)

    try:
        metrics = run_rounds(coord, cfg, transport, strategy, spec, each_round)
    finally:
        if heartbeat is not None:
            heartbeat.stop.set()
    if heartbeat is not None:
        heartbeat.lease.release()
    if resumed:
        metrics["resumed_after_round"] = resumed
    metrics["transport"] = {"kind": "grpc-mtls", "address": transport.address}
    metrics["app"] = rt.identity.describe()
    provenance = transport.provenance()
    if provenance:
        metrics["participants_provenance"] = provenance
    if enclave is not None:
        metrics["enclave"] = enclave.describe()
    if out_dir is not None and write:
        write_results(out_dir, metrics, coord.params, spec.to_json())
    return coord.params, metrics


STATE_DIR = "state"


def _resume(
    cfg: Any,
    coord: Coordinator,
    out_dir: Path | None,
    recorders: Sequence[RoundObserver],
    enclave: EnclaveRecord | None = None,
) -> int:
    """Continue a run that stopped: from the coordinator state of the last round on chain (recorded
    runs; the audit log cut back to that round's anchor) or the newest state (unrecorded runs). In
    enclave mode the enclave must be the same one, at the same round (:meth:`EnclaveRecord.check_resume`).
    Returns the round resumed after (0: nothing to resume, a fresh start)."""
    from trustfed.coordinator.recorders import IncentivesRecord, StatusRecord
    from trustfed.coordinator.state import latest_state, load_state, resume
    from trustfed.errors import CheckpointError
    from trustfed.ledger.recorder import LedgerRecorder
    from trustfed.privacy.report import PrivacyRecorder

    if out_dir is None:
        raise CheckpointError("resuming needs the run folder (--out) of the run to continue")
    state_dir = out_dir / STATE_DIR
    recorder = next((o for o in recorders if isinstance(o, LedgerRecorder)), None)
    if recorder is not None:
        last = recorder.prepare_resume()
        if last == 0:
            return 0
        folder = state_dir / f"round_{last:04d}"
        if not folder.is_dir():
            raise CheckpointError(
                f"cannot resume: the chain is at round {last} but {folder} (the coordinator state of that round) is "
                "missing"
            )
        state = load_state(folder)
        for rec in recorders:
            if isinstance(rec, PrivacyRecorder):
                rec.keep_rounds_upto(last)
            if isinstance(rec, IncentivesRecord):
                rec.check_resume(recorder.audit_path, last)
        gone = StatusRecord.check_resume(recorder.audit_path, last, recorder.ledger)
        exclude = getattr(coord.transport, "exclude", None)
        if gone and callable(exclude):
            exclude({pid: f"{status} before the resume" for pid, status in gone.items()})
        lost = enclave.check_resume(last, recorder.audit_path) if enclave is not None else None
        for rec in recorders:
            if lost is not None and isinstance(rec, PrivacyRecorder):
                rec.count_lost(lost)
    else:
        found = latest_state(state_dir)
        if found is None:
            return 0
        state = found
        if enclave is not None:
            enclave.check_resume(state.round, None)
    resume(coord, state)
    log.warning("resumed after round %d from %s", state.round, state_dir)
    return state.round


def _enclave_strategy(cfg: Any, inner: Any, spec: ParamSpec, settings: TransportSettings) -> tuple[Any, Any]:
    """Aggregate through the enclave service at ``[enclave].address``: attest it first (fail closed)."""
    from trustfed.coordinator.recorders import EnclaveRecord, attest_enclave
    from trustfed.enclave.errors import EnclaveError
    from trustfed.enclave.service import GrpcEnclaveClient, TlsMaterial
    from trustfed.enclave.simulation import enclave_aggregation, simulated_policy
    from trustfed.enclave.strategy import EnclaveStrategy

    section = cfg.enclave
    if section.address is None:
        raise EnclaveError(
            "[enclave] enabled over the network needs [enclave].address: the host:port of a `trustfed enclave` "
            "service that participants and the coordinator both reach"
        )
    if section.backend == "simulated" and not section.allow_simulated_tee:
        raise EnclaveError(
            "enclave.backend is 'simulated' (software only) but the federation has allow_simulated_tee = false"
        )
    ca, cert, key = _required(settings)
    client = GrpcEnclaveClient(section.address, TlsMaterial.from_files(ca, cert, key))
    aggregation = enclave_aggregation(cfg)
    policy = simulated_policy(aggregation, section.policy) if section.policy.allow_simulated_tee else section.policy
    attestation = attest_enclave(client, policy, "coordinator")
    strategy = EnclaveStrategy(
        inner, client, spec, allow_simulated=section.allow_simulated_tee, central_dp=aggregation.central_dp
    )
    label = "SIMULATED " if attestation.claims.get("simulated") else ""
    log.warning(
        "aggregating through the %senclave at %s (measurement %s…)",
        label,
        section.address,
        str(attestation.claims.get("measurement", ""))[:16],
    )
    return strategy, EnclaveRecord(strategy, attestation)


def spec_for(cfg: Any) -> ParamSpec:
    """The parameter spec of the federation's model (built from the app, no participant data needed)."""
    from trustfed.app.runtime import Runtime

    return Runtime(cfg).spec
