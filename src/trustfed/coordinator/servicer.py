"""The coordinator's gRPC servicer: serves plans, models, uploads, secure-aggregation steps and receipts.

Every request is checked before it is acted on: TLS 1.3, a client certificate from the
federation CA with role participant and not revoked, a signature by that certificate over the
body, a fresh nonce and timestamp, and every size. Refusals are logged with their reason and
returned to the caller as gRPC errors.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from typing import NoReturn

import grpc
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustfed.coordinator.admission import Admission
from trustfed.coordinator.board import MAX_POLL_S, MAX_SECAGG_PARTICIPANTS, Refusal, RoundBoard
from trustfed.coordinator.secagg import SecAggRound
from trustfed.coordinator.uploads import (
    BEHAVIOUR_REASONS,
    check_declared_examples,
    check_finite,
    declared_compression,
    received_update,
    signed_commitment,
    signed_refusal,
)
from trustfed.core.codec import ParamSpec
from trustfed.core.compression import CompressionPolicy
from trustfed.ledger.participant import SignedCommitment
from trustfed.primitives.merkle import MerkleTree
from trustfed.secagg.settings import SecAggSettings
from trustfed.transport import federation_pb2 as pb
from trustfed.transport import federation_pb2_grpc as pb_grpc
from trustfed.transport.envelope import Signer, Verified, Verifier
from trustfed.transport.errors import MessageRejected
from trustfed.transport.guard import status_detail
from trustfed.transport.logsafe import clean
from trustfed.transport.settings import Limits
from trustfed.transport.streaming import (
    StreamDeclaration,
    check_declaration,
    expect_end,
    iter_chunks,
    receive_payload,
)

log = logging.getLogger("trustfed.coordinator.service")


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
    "already_refused": grpc.StatusCode.FAILED_PRECONDITION,
    # what the update carries (recorded as the participant's behaviour and flagged; see uploads.py)
    "non_finite": grpc.StatusCode.INVALID_ARGUMENT,
    "too_many_examples": grpc.StatusCode.INVALID_ARGUMENT,
    "bad_compression": grpc.StatusCode.INVALID_ARGUMENT,
    "error_bound_exceeded": grpc.StatusCode.INVALID_ARGUMENT,
    "compression_mismatch": grpc.StatusCode.INVALID_ARGUMENT,  # the participant's file disagrees with ours
    # not_registered / not_active (admission.py): PERMISSION_DENIED, the default
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
        admission: Admission | None = None,
        compression: CompressionPolicy | None = None,
    ) -> None:
        self.board = board
        self.admission = admission or Admission()  # the bound on declared counts (membership: the guard)
        self.session = secrets.token_hex(8)  # in every plan and receipt: a participant sees a restart
        self.signer = signer
        self.verifier = verifier
        self.spec = spec
        self.spec_json = spec.to_json()
        self.limits = limits
        self.require_commitment = require_commitment  # the ledger is on: every update carries a signed commitment
        self.sealed = sealed  # enclave mode: updates arrive sealed to the enclave; clear ones are refused
        self.secagg = secagg  # secure aggregation: masked inputs only, through the SecAgg steps
        self.compression = compression or CompressionPolicy()  # [transport] compression: what uploads must be
        self._certs: dict[bytes, x509.Certificate] = {}

    # -- checks shared by every RPC
    def _refuse(self, context: grpc.ServicerContext, exc: MessageRejected, rpc: str) -> NoReturn:
        code = _REJECT_CODES.get(exc.reason, grpc.StatusCode.PERMISSION_DENIED)
        _abort(context, code, status_detail(rpc, exc.reason, exc.detail))

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
        # membership (the roster, the registry on chain) was checked by the server guard before the body
        # was read (GrpcTransport._authenticate): only registered, active participants get here
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
                    and pid not in cur.refused
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
            if pid in cur.refused:
                self._reject(
                    context, rpc, pid, "already_refused", f"the update of {pid} for round {h.round} was refused"
                )
        if h.HasField("withdrawn_reason"):
            expect_end(parts, f"withdrawal of {pid}")
            try:  # a refusal of the round comes signed: it goes into the audit log as the participant's
                refusal = signed_refusal(h, pid, self._peer_cert(context, rpc)) if h.HasField("refusal") else None
            except MessageRejected as exc:
                self._reject(context, rpc, pid, exc.reason, exc.detail)
            reason = clean(h.withdrawn_reason, 200)  # the participant's own words: escaped and capped
            log.info("round %d: %s withdrew: %s", h.round, pid, reason)
            with self.board.cond:
                self.board.withdrawn[pid] = f"withdrew: {reason}"
                self.board.refusals += [refusal] if refusal is not None else []
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
        try:
            check_declared_examples(h, pid, self.admission.max_examples, sealed=sealed)
            record = declared_compression(h, pid, self.compression)
        except MessageRejected as exc:
            self._refuse_update(context, pid, h.round, exc)
        if len(h.metrics) > 64:
            self._reject(context, rpc, pid, "too_many_metrics", f"{len(h.metrics)} metrics (at most 64)")
        if self.require_commitment and not (h.HasField("commitment") and h.HasField("commitment_signature")):
            self._reject(
                context, rpc, pid, "commitment_missing", "the ledger is on: sign your update commitment and send it"
            )
        decl = StreamDeclaration(h.total_bytes, h.chunk_bytes, h.num_chunks, h.model_hash)
        where = f"update from {pid} for round {h.round}"
        try:
            size = self.compression.payload_size(self.spec.size)
            check_declaration(decl, self.spec, self.limits, where, sealed=sealed, payload_bytes=size)
            buf = receive_payload(parts, decl, self.spec_json, where)
            expect_end(parts, where)
        except MessageRejected as exc:
            self._reject(context, rpc, pid, exc.reason, exc.detail)
        signed: SignedCommitment | None = None
        if h.HasField("commitment_signature"):
            try:
                signed, provenance = signed_commitment(h, pid, bytes(buf), self._peer_cert(context, rpc), record)
            except MessageRejected as exc:
                self._reject(context, rpc, pid, exc.reason, exc.detail)
            if provenance:
                with self.board.cond:
                    self.board.provenance[pid] = provenance
        if masked:
            return self._receive_masked(context, pid, h, buf, signed)
        base = self.board.model_of(h.round) if record is not None else None  # what a compressed delta is to
        if not sealed:
            try:
                update = received_update(h, pid, buf, self.spec, sealed=False, compression=record, base=base)
                check_finite(update, h.round)
            except MessageRejected as exc:
                self._refuse_update(context, pid, h.round, exc)
        else:
            update = received_update(h, pid, buf, self.spec, sealed=True)
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

    def _refuse_update(self, context: grpc.ServicerContext, pid: str, rnd: int, exc: MessageRejected) -> NoReturn:
        """Refuse an update for what it carries: the round records it (a behaviour record and a flag against
        ``pid``, when the run is recorded) and stops waiting for ``pid``; the others go on."""
        if exc.reason in BEHAVIOUR_REASONS:
            with self.board.cond:
                cur = self.board.current
                if cur is not None and cur.plan.round == rnd and not cur.closed:
                    cur.refused[pid] = Refusal(exc.reason, exc.detail)
                    self.board.cond.notify_all()
        self._reject(context, "UploadUpdate", pid, exc.reason, exc.detail)

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
