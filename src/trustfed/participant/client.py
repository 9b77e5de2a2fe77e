"""The participant runtime: pull rounds from the coordinator over mutual TLS and train.

One round is a chain of small steps, each a method, so later components slot in:

    fetch_plan -> verify_plan -> download_model -> check_model -> train -> seal -> upload -> fetch_receipt

(the ledger checks the model hash against the chain in ``check_model`` and verifies a Merkle
proof in ``fetch_receipt``; the enclave seals the update in ``seal``). Every message from the
coordinator is verified: its signature, a coordinator certificate from the federation CA (not
revoked), a fresh nonce and timestamp, and the model's hash over the streamed bytes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import grpc
import torch

from trustfed.core.codec import ParamSpec, model_hash
from trustfed.core.compression import compression_body
from trustfed.core.strategy import RoundPlan, Update
from trustfed.enclave.errors import AttestationRefused
from trustfed.enclave.receipts import Receipt, verify_receipt
from trustfed.errors import ParticipantWithdrew
from trustfed.ledger.audit import EcdsaSigner
from trustfed.ledger.participant import (
    ChainView,
    InclusionError,
    ModelMismatchError,
    evaluation_of,
    sign_commitment,
    update_bytes,
)
from trustfed.ledger.refusals import SignedRefusal
from trustfed.models.trainer import Trainer, close_trainer
from trustfed.participant.refusal import keep_refusal
from trustfed.participant.rounds import ReceivedPlan, RoundGone, RoundOutcome
from trustfed.participant.secagg import SecAggParticipant
from trustfed.participant.settings import ParticipantConfig
from trustfed.pki.ca import RevocationList, identity_of, load_certificate, load_private_key
from trustfed.primitives.merkle import InclusionProof
from trustfed.secagg.protocol import SecAggError, TooFewParticipants
from trustfed.secagg.settings import SecAggSettings
from trustfed.transport import federation_pb2 as pb
from trustfed.transport import federation_pb2_grpc as pb_grpc
from trustfed.transport.envelope import Signer, Verified, Verifier
from trustfed.transport.errors import MessageRejected, TransportError
from trustfed.transport.guard import throttled
from trustfed.transport.streaming import (
    StreamDeclaration,
    as_vector,
    check_declaration,
    expect_end,
    iter_chunks,
    payload_hash,
    receive_payload,
)
from trustfed.transport.tls import channel, diagnose_tls

log = logging.getLogger("trustfed.participant")

T = TypeVar("T")
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class ParticipantClient:
    """Runs one participant against a coordinator until the federation is done."""

    def __init__(
        self,
        cfg: ParticipantConfig,
        trainer: Trainer,
        spec: ParamSpec,
        *,
        chain: ChainView | None = None,
        commit: bool = False,
        secagg: SecAggSettings | None = None,
        provenance: Mapping[str, str] | None = None,
    ) -> None:
        """``commit``: sign every update's ledger commitment with this participant's certificate key;
        ``provenance``: the app code and data manifest hashes it signs into every commitment;
        ``chain``: this participant's own view of the chain, to check models and inclusion proofs;
        ``secagg``: aggregate securely (the federation's ``[secagg]``): upload masked inputs only."""
        self.cfg = cfg
        self.pid = cfg.participant.id
        self.address = cfg.participant.coordinator
        self.poll_wait_ms = cfg.retry.poll_wait_ms
        self.trainer = trainer
        self.provenance = dict(provenance or {})
        self.spec = spec
        self.spec_json = spec.to_json()
        self.limits = cfg.limits
        tls = cfg.tls
        cert = load_certificate(tls.cert)
        key = load_private_key(tls.key)
        self.signer = Signer(self.pid, key)
        self.relay_signer = Signer(self.pid, key, cert)  # for messages relayed to peers: carries the certificate
        self.secagg = secagg
        self.commit = commit
        self.commit_signer = EcdsaSigner(self.pid, key)  # the same PKI key signs the ledger commitment
        self.chain = chain
        self.commitments: dict[int, bytes] = {}
        ca_cert = load_certificate(tls.ca)
        crl = RevocationList.load(tls.crl, ca_cert) if tls.crl else RevocationList.empty()
        self.verifier = Verifier(
            ca_cert,
            lambda: crl,
            window_s=self.limits.timestamp_window_s,
            nonce_cache_size=self.limits.nonce_cache_size,
            where=f"participant {self.pid}",
        )

        ident = identity_of(cert)
        if ident.name != self.pid or ident.role != "participant":
            raise TransportError(
                f"{tls.cert} is the {ident.role} certificate of {ident.name!r}, but this is participant {self.pid!r}"
            )
        self.channel = channel(self.address, tls.ca, tls.cert, tls.key, self.limits.max_message_bytes + 64 * 1024)
        self.stub = pb_grpc.FederationStub(self.channel)  # type: ignore[no-untyped-call]
        self.refusal: str | None = None  # why this participant refused a round and left, if it did
        self.dropped: list[int] = []  # rounds given up because they closed or the coordinator restarted
        # Hooks: extra checks of the downloaded model (the chain's, below), and sealing.
        self.model_checks: list[Callable[[ReceivedPlan, torch.Tensor], None]] = []
        if chain is not None:  # before training: the model must be the one committed on chain
            self.model_checks.append(lambda rp, params: log_ok(chain.check_model(rp.round, params, spec), rp.round))

        def log_ok(h: str, rnd: int) -> None:
            log.info("participant %s: round %d model %s… matches the chain", self.pid, rnd, h[:12])

    def close(self) -> None:
        self.channel.close()
        if self.chain is not None:
            self.chain.close()
        close_trainer(self.trainer)

    # -- calls with retry, backoff and a clear final error
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        r = self.cfg.retry
        backoff = r.initial_backoff_s
        t0 = time.monotonic()
        last = ""
        for attempt in range(1, r.attempts + 1):
            try:
                return fn()
            except grpc.RpcError as exc:
                code = exc.code()
                detail = exc.details() or ""
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    raise RoundGone(f"{what}: {detail}") from None
                if code not in _RETRYABLE and not throttled(code, detail):
                    raise TransportError(
                        f"the coordinator at {self.address} refused {what}: {code.name}: {detail}"
                    ) from None
                last = f"{code.name}: {detail}"
                if "handshake" in detail.lower() or "ssl" in detail.lower():
                    d = diagnose_tls(self.address, self.cfg.tls.ca, self.cfg.tls.cert, self.cfg.tls.key)
                    if d.reachable:
                        log.error("participant %s: TLS with %s refused: %s", self.pid, self.address, d.reason)
                        raise TransportError(f"{what}: {d.reason}") from None
                if attempt < r.attempts:
                    log.info(
                        "participant %s: %s failed (%s); retry %d in %.1f s",
                        self.pid,
                        what,
                        code.name,
                        attempt,
                        backoff,
                    )
                    time.sleep(backoff)
                    backoff = min(backoff * 2, r.max_backoff_s)
        d = diagnose_tls(self.address, self.cfg.tls.ca, self.cfg.tls.cert, self.cfg.tls.key)
        raise TransportError(
            f"could not reach the coordinator at {self.address} for {what}: {r.attempts} attempts over "
            f"{time.monotonic() - t0:.1f} s with backoff {r.initial_backoff_s}-{r.max_backoff_s} s; last error {last}; "
            f"{d.reason}. Is `trustfed server` running there, and is [participant].coordinator right?"
        )

    def _check(self, msg: pb.SignedMessage, msg_type: str) -> Verified:
        return self.verifier.verify(msg, expected_type=msg_type, peer_cert=None, role="coordinator")

    def secagg_call(self, what: str, rnd: int, req: pb.SecAggRequest, timeout: float) -> Verified:
        """One secure-aggregation request, signed afresh on each retry; the coordinator's reply, verified."""

        def call() -> pb.SignedMessage:
            msg = self.signer.sign("secagg_request", rnd, req.SerializeToString())
            out: pb.SignedMessage = self.stub.SecAgg(msg, timeout=timeout)
            return out

        return self._check(self._call(what, call), "secagg_reply")

    # -- the steps of one round
    def fetch_plan(self, after_round: int) -> pb.RoundPlan:
        req = pb.PlanRequest(participant_id=self.pid, after_round=after_round, wait_ms=self.cfg.retry.poll_wait_ms)
        timeout = self.cfg.retry.poll_wait_ms / 1000 + 15

        def call() -> pb.SignedMessage:
            msg = self.signer.sign("plan_request", after_round, req.SerializeToString())
            out: pb.SignedMessage = self.stub.GetRoundPlan(msg, timeout=timeout)
            return out

        v = self._check(self._call("the round plan", call), "round_plan")
        plan: pb.RoundPlan = pb.RoundPlan.FromString(v.body)
        if plan.round != v.envelope.round:
            raise self.verifier.reject("round_mismatch", "plan round differs from its signed round", "round_plan")
        return plan

    def verify_plan(self, raw: pb.RoundPlan, after_round: int) -> ReceivedPlan:
        def bad(reason: str, detail: str) -> MessageRejected:
            return self.verifier.reject(reason, f"round {raw.round}: {detail}", "round_plan", "coordinator")

        if raw.round <= after_round:
            raise bad("stale_round", f"round {raw.round} is not after round {after_round}")
        if self.pid not in raw.participants:
            raise bad("not_selected", f"{self.pid} is not among the plan's participants")
        if raw.spec_json != self.spec_json:
            raise bad("spec_mismatch", "the model spec differs from this participant's model")
        if raw.model_bytes != 4 * self.spec.size or raw.model_bytes > self.limits.max_model_bytes:
            raise bad("size_mismatch", f"model of {raw.model_bytes} bytes; expected {4 * self.spec.size}")
        if len(raw.config_json) > 64 * 1024:
            raise bad("too_large", "training config over 64 KiB")
        try:
            config = json.loads(raw.config_json) if raw.config_json else {}
        except json.JSONDecodeError as exc:
            raise bad("bad_config", f"training config is not JSON: {exc}") from None
        if not isinstance(config, dict) or not all(isinstance(v, bool | int | float | str) for v in config.values()):
            raise bad("bad_config", "training config must be a JSON object of scalars")
        plan = RoundPlan(int(raw.round), tuple(raw.participants), config, raw.model_hash)
        return ReceivedPlan(
            int(raw.round), plan, raw.spec_json, int(raw.model_bytes), int(raw.chunk_bytes), int(raw.deadline_ms), raw
        )

    def download_model(self, rp: ReceivedPlan) -> torch.Tensor:
        req = pb.ModelRequest(round=rp.round, model_hash=rp.plan.model_hash)
        where = f"model for round {rp.round}"

        def call() -> torch.Tensor:
            msg = self.signer.sign("model_request", rp.round, req.SerializeToString())
            parts: Iterator[pb.StreamPart] = iter(self.stub.DownloadModel(msg, timeout=600))
            first = next(parts, None)
            if first is None or first.WhichOneof("part") != "header":
                raise self.verifier.reject(
                    "no_header", f"{where}: stream does not start with a signed header", "model_header"
                )
            v = self._check(first.header, "model_header")
            h = pb.ModelHeader.FromString(v.body)
            if h.round != rp.round or h.spec_json != self.spec_json or h.model_hash != rp.plan.model_hash:
                raise self.verifier.reject(
                    "header_mismatch", f"{where}: header does not match the plan", "model_header"
                )
            decl = StreamDeclaration(h.total_bytes, h.chunk_bytes, h.num_chunks, h.model_hash)
            try:
                check_declaration(decl, self.spec, self.limits, where)
                buf = receive_payload(parts, decl, self.spec_json, where)
                expect_end(parts, where)
            except MessageRejected as exc:
                raise self.verifier.reject(exc.reason, exc.detail, "model_stream", "coordinator") from None
            return as_vector(buf, self.spec)

        return self._call(f"the model of round {rp.round}", call)

    def check_model(self, rp: ReceivedPlan, params: torch.Tensor) -> None:
        """The streamed bytes already matched the signed hash; later checks (ledger) hook in here."""
        for check in self.model_checks:
            check(rp, params)

    def train(self, rp: ReceivedPlan, params: torch.Tensor) -> Update:
        return self.trainer.fit(params, rp.plan)

    def seal(self, rp: ReceivedPlan, update: Update) -> bytes:
        """The payload to upload: raw float32, or in enclave mode the bytes the trainer sealed to the
        attested enclave key (:class:`trustfed.enclave.participant.SealingTrainer`)."""
        return update_bytes(update)

    def upload(self, rp: ReceivedPlan, update: Update, payload: bytes) -> None:
        c = self.limits.chunk_bytes
        header = pb.UpdateHeader(
            round=rp.round,
            participant_id=self.pid,
            num_examples=update.num_examples,
            metrics={k: float(v) for k, v in update.metrics.items()},
            total_bytes=len(payload),
            chunk_bytes=c,
            num_chunks=-(-len(payload) // c),
            model_hash=payload_hash(self.spec_json, payload),
        )
        compression = compression_body(update)  # the codec and measured error, signed below with the payload hash
        if compression is not None:
            header.compression, header.compression_block = compression["codec"], compression["block"]
            header.max_abs_error, header.rel_l2_error = compression["max_abs_error"], compression["rel_l2_error"]
        if getattr(update, "masked", b""):  # secure aggregation: a masked input, never the update itself
            header.secagg_masked = True
        sealed = getattr(update, "sealed", b"")
        if sealed:
            header.sealed = True
            header.enclave_key_id = str(getattr(update, "enclave_key_id", ""))
            header.enclave_signature = bytes(getattr(update, "signature", b""))
        for key, value in self.provenance.items():
            setattr(header, key, value)
        if self.commit:  # H(round, id, H(payload)), signed with this participant's own key
            sc = sign_commitment(
                self.commit_signer,
                rp.round,
                payload,
                update.num_examples,
                self.provenance,
                evaluation_of(header.metrics),
                compression,
            )
            if sealed and sc.commitment != bytes(getattr(update, "commitment", b"")):
                raise TransportError(f"round {rp.round}: the sealed update's commitment differs from the ledger's")
            header.commitment = sc.commitment
            header.commitment_signature = sc.sig
            self.commitments[rp.round] = sc.commitment
        self._send_update(rp.round, header, payload)

    def withdraw(self, rp: ReceivedPlan, reason: str, refusal: SignedRefusal | None = None) -> None:
        header = pb.UpdateHeader(round=rp.round, participant_id=self.pid, withdrawn_reason=reason)
        if refusal is not None:  # the coordinator must put it in the audit log
            header.refusal, header.refusal_signature = refusal.body_bytes(), refusal.sig
        self._send_update(rp.round, header, b"")

    def _send_update(self, rnd: int, header: pb.UpdateHeader, payload: bytes) -> None:
        def call() -> pb.SignedMessage:
            signed = self.signer.sign("update_header", rnd, header.SerializeToString())

            def parts() -> Iterator[pb.StreamPart]:
                yield pb.StreamPart(header=signed)
                yield from iter_chunks(payload, self.limits.chunk_bytes)

            out: pb.SignedMessage = self.stub.UploadUpdate(parts(), timeout=600)
            return out

        v = self._check(self._call(f"the update of round {rnd}", call), "upload_ack")
        ack = pb.UploadAck.FromString(v.body)
        if not ack.accepted:
            raise TransportError(
                f"the coordinator at {self.address} did not accept the update of round {rnd}: {ack.reason}"
            )

    def fetch_receipt(self, rp: ReceivedPlan, timeout_s: float = 600.0) -> RoundOutcome:
        end = time.monotonic() + timeout_s
        while True:
            req = pb.ReceiptRequest(round=rp.round, wait_ms=self.cfg.retry.poll_wait_ms)

            def call(req: pb.ReceiptRequest = req) -> pb.SignedMessage:
                msg = self.signer.sign("receipt_request", rp.round, req.SerializeToString())
                out: pb.SignedMessage = self.stub.GetReceipt(msg, timeout=self.cfg.retry.poll_wait_ms / 1000 + 15)
                return out

            v = self._check(self._call(f"the receipt of round {rp.round}", call), "receipt")
            r = pb.Receipt.FromString(v.body)
            if rp.raw.session and r.session != rp.raw.session:
                raise RoundGone(
                    f"the coordinator restarted while round {rp.round} was in flight (session {rp.raw.session} -> "
                    f"{r.session or '?'})"
                )
            if r.round != rp.round:
                raise self.verifier.reject(
                    "round_mismatch", f"receipt for round {r.round}, asked {rp.round}", "receipt"
                )
            if r.ready:
                proof = None
                if r.HasField("leaf_count"):
                    proof = InclusionProof(
                        int(r.proof_index), int(r.leaf_count), tuple(bytes(x) for x in r.merkle_proof)
                    )
                return RoundOutcome(
                    rp.round,
                    r.included,
                    r.new_model_hash,
                    bytes(r.merkle_root),
                    proof,
                    bytes(r.enclave_receipt),
                )
            if time.monotonic() > end:
                raise TransportError(f"no receipt for round {rp.round} from {self.address} within {timeout_s:.0f} s")

    # -- the loop
    def run_round(self, raw: pb.RoundPlan, after_round: int) -> RoundOutcome | None:
        rp = self.verify_plan(raw, after_round)
        params = self.download_model(rp)
        try:
            self.check_model(rp, params)
            update = self.train(rp, params)
        except ParticipantWithdrew as exc:
            log.warning("participant %s withdraws in round %d: %s", self.pid, rp.round, exc.reason)
            self.withdraw(rp, exc.reason)
            return None
        except (ModelMismatchError, AttestationRefused) as exc:
            # The coordinator served a model that is not on chain, or the enclave failed attestation:
            # train nothing, keep a signed refusal record, send it with the withdrawal, and leave.
            log.error("participant %s refuses round %d and leaves: %s", self.pid, rp.round, exc)
            folder = self.cfg.state.dir if self.cfg.state is not None else None
            record = keep_refusal(self.commit_signer, folder, rp, model_hash(params, self.spec), exc)
            self.withdraw(rp, f"refused: {exc}"[:1000], record)
            self.refusal = str(exc)
            return None
        if self.secagg is not None:
            if not self.aggregate_securely(rp, params, update):
                return None
        else:
            payload = self.seal(rp, update)
            self.upload(rp, update, payload)
        outcome = self.fetch_receipt(rp)
        self.check_outcome(rp, outcome)
        log.info(
            "participant %s: round %d %s; new model %s…",
            self.pid,
            rp.round,
            "included" if outcome.included else "NOT included",
            outcome.new_model_hash[:12],
        )
        return outcome

    def aggregate_securely(self, rp: ReceivedPlan, params: torch.Tensor, update: Update) -> bool:
        """Secure aggregation of this round's delta (:mod:`trustfed.participant.secagg`). A request the
        protocol finds unsafe (a forged roster entry, a survivor set that grew) is refused: the
        participant withdraws and leaves, as for a model that is not on chain. False: it left."""
        assert self.secagg is not None
        try:
            SecAggParticipant(self, self.secagg, rp).run(params, update)
        except TooFewParticipants as exc:  # others dropped out: nobody misbehaved, sit this round out
            raise RoundGone(f"round {rp.round}: {exc}") from None
        except SecAggError as exc:
            log.error("participant %s refuses round %d and leaves: %s", self.pid, rp.round, exc)
            self.refusal = str(exc)
            try:
                self.withdraw(rp, f"refused: {exc}"[:1000])
            except TransportError as why:
                log.warning("participant %s: could not record the withdrawal: %s", self.pid, why)
            return False
        return True

    def check_outcome(self, rp: ReceivedPlan, outcome: RoundOutcome) -> None:
        """After the round: my commitment is in the Merkle root on chain (and in the enclave's receipt)."""
        mine = self.commitments.get(rp.round)
        if self.chain is not None and mine is not None:
            if outcome.proof is None:
                raise InclusionError(
                    f"round {rp.round}: the coordinator sent no Merkle proof for {self.pid}'s commitment"
                )
            self.chain.check_inclusion(rp.round, mine, outcome.proof)
            log.info(
                "participant %s: round %d commitment %s… is included in the root on chain",
                self.pid,
                rp.round,
                mine.hex()[:12],
            )
        enclave = getattr(self.trainer, "enclave", None)
        if outcome.enclave_receipt and enclave is not None and enclave.key is not None:
            receipt = Receipt.from_json(outcome.enclave_receipt)
            verdict = verify_receipt(
                receipt,
                enclave_public_key=enclave.key.to_bytes(),
                output_model_hash=outcome.new_model_hash,
                rnd=rp.round,
                allow_simulated=enclave.policy.allow_simulated_tee,
            )
            reasons = list(verdict.reasons)
            root = receipt.body.get("commitments_root")
            if outcome.merkle_root and not receipt.body.get("rejected") and root != outcome.merkle_root.hex():
                reasons.append("the receipt's commitments root differs from the round's Merkle root")
            if reasons:
                raise TransportError(f"round {rp.round}: the enclave receipt does not hold: {'; '.join(reasons)}")
            label = "[SIMULATED TEE] " if receipt.simulated else ""
            log.info("%sparticipant %s: round %d enclave receipt verified", label, self.pid, rp.round)

    def run(self, on_round: Callable[[RoundOutcome], None] | None = None) -> list[RoundOutcome]:
        """Take part in rounds until the coordinator says the federation is done."""
        after = 0
        outcomes: list[RoundOutcome] = []
        while True:
            raw = self.fetch_plan(after)
            if raw.status == pb.DONE:
                log.info("participant %s: federation done after %d round(s)", self.pid, len(outcomes))
                return outcomes
            if raw.status != pb.TRAIN:
                time.sleep(min(raw.retry_after_ms, 5000) / 1000)
                continue
            try:
                outcome = self.run_round(raw, after)
            except RoundGone as exc:
                log.warning(
                    "participant %s: round %d dropped (%s); waiting for the next plan", self.pid, raw.round, exc
                )
                self.dropped.append(int(raw.round))
                continue
            if outcome is None:
                return outcomes
            outcomes.append(outcome)
            after = outcome.round
            if on_round:
                on_round(outcome)
