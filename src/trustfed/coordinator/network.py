""":class:`GrpcTransport`: the coordinator's network Transport over gRPC and mutual TLS 1.3.

Participants pull: they long-poll for a round plan, download the global model as a stream,
upload their update as a stream and fetch a receipt (served by
:class:`~trustfed.coordinator.servicer.FederationServicer`). ``GrpcTransport.fit(plan, params)``
publishes the plan on the :class:`~trustfed.coordinator.board.RoundBoard` and waits until every
selected participant has uploaded or the round's deadline passes; with secure aggregation it
drives the protocol's steps. It is also a :class:`~trustfed.core.rounds.RoundObserver`,
so receipts are written when the :class:`~trustfed.coordinator.engine.Coordinator` closes a round.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from pathlib import Path

import grpc
import torch

from trustfed.coordinator.admission import Admission
from trustfed.coordinator.board import OpenRound, ReceiptInfo, Refusal, RoundBoard
from trustfed.coordinator.crl import CrlSource
from trustfed.coordinator.secagg import SecAggRound
from trustfed.coordinator.servicer import FederationServicer
from trustfed.core.codec import ParamSpec, model_hash, to_bytes
from trustfed.core.rounds import RoundRecord
from trustfed.core.strategy import RoundPlan, RoundResult, Update
from trustfed.errors import AggregationError
from trustfed.ledger.participant import SignedCommitment
from trustfed.ledger.records import LedgerError
from trustfed.ledger.refusals import SignedRefusal
from trustfed.pki.ca import PkiError, identity_of, load_certificate, load_private_key
from trustfed.secagg.protocol import SecAggError
from trustfed.secagg.settings import SecAggSettings
from trustfed.secagg.updates import SECAGG_ID, MaskedInput, SecureSumUpdate, mean_of_sum
from trustfed.transport import federation_pb2_grpc as pb_grpc
from trustfed.transport.access import CertificateCheck, PeerLimiter
from trustfed.transport.envelope import Signer, Verifier
from trustfed.transport.errors import MessageRejected, TransportError
from trustfed.transport.guard import Caller, ServerGuard
from trustfed.transport.guard import Refusal as CallRefused
from trustfed.transport.settings import TransportSettings
from trustfed.transport.tls import grpc_options, server_credentials

log = logging.getLogger("trustfed.coordinator.service")

SMALL_REQUEST_BYTES = 64 * 1024  # a plan, model or receipt request is a signed message of a few hundred bytes
_BULK_RPCS = frozenset({"UploadUpdate", "SecAgg"})


def required_tls_paths(settings: TransportSettings) -> tuple[Path, Path, Path]:
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
        participants: Sequence[str] | None = None,
    ) -> None:
        """``participants``: the federation's participant ids, the only ones served from the first RPC on
        (without them every participant certificate of the CA is, until :meth:`admit` is called)."""
        ca, cert_path, key_path = required_tls_paths(settings)
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
        self.admission = Admission(participants)
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
            admission=self.admission,
            compression=settings.compression_policy,
        )
        self.secagg = secagg
        self.secagg_survivors: dict[int, tuple[str, ...]] = {}  # round -> whose masked inputs are in the sum
        self.enclave_receipts: Callable[[int], bytes | None] = lambda _rnd: None  # set in enclave mode
        self.peers = PeerLimiter(self.limits.max_calls_per_peer, self.limits.calls_per_s, self.limits.call_burst)
        self.certificates = CertificateCheck(ca_cert, self.crl.current, default_roles=("participant",))
        self.guard = ServerGuard(
            "coordinator",
            self._authenticate,
            self._request_limit,
            self.peers,
            log,
        )
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="trustfed-grpc"),
            interceptors=[self.guard],
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

    def _authenticate(self, context: grpc.ServicerContext, rpc: str) -> Caller:
        """The certificate first (CA, validity, revocation, role), then membership (the roster and the
        registry on chain): a certificate of the CA for an id outside the federation is refused before
        any byte of its request is read."""
        caller = self.certificates(context, rpc)
        try:
            self.admission.check(caller.name, self.certificates.certificate_of(context))
        except MessageRejected as exc:
            raise CallRefused(exc.reason, exc.detail) from None
        return caller

    def _request_limit(self, caller: Caller, rpc: str) -> int:
        """Uploads and secure-aggregation steps carry data; every other request is a small signed message."""
        if rpc in _BULK_RPCS:
            return self.limits.max_message_bytes + 64 * 1024
        return SMALL_REQUEST_BYTES

    # -- joining
    def admit(self, participants: Sequence[str], max_examples: int) -> None:
        """Serve these participants only (anyone else already checked in is dropped) and refuse updates
        declaring more than ``max_examples`` examples."""
        self.admission.set_roster(participants)
        self.admission.max_examples = max_examples
        with self.board.cond:
            for pid in [p for p in self.board.checked_in if not self.admission.admits(p)]:
                log.warning("%s is not a participant of this federation: dropped", pid)
                del self.board.checked_in[pid]
                self.board.certificates.pop(pid, None)
            self.board.cond.notify_all()

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
        open_round = OpenRound(plan, json.dumps(dict(plan.config), sort_keys=True), payload, deadline)
        if self.secagg is not None:
            return self._fit_secure(open_round, params)
        selected = set(plan.participants)
        with self.board.cond:
            self.board.current = open_round
            self.board.cond.notify_all()
            self._wait(open_round, lambda: selected <= self._answered(open_round), deadline)
            open_round.closed = True
            self.board.cond.notify_all()
            got = dict(open_round.updates)
            missing = sorted(selected - self._answered(open_round))
        if missing:
            log.warning("round %d: no update from %s before the deadline", plan.round, ", ".join(missing))
        return [got[pid] for pid in plan.participants if pid in got]

    def _answered(self, open_round: OpenRound) -> set[str]:
        """Who the round need not wait for any more (board lock held): uploaded, withdrew or was refused."""
        return set(open_round.updates) | self.board.withdrawn.keys() | open_round.refused.keys()

    def refusals(self, rnd: int) -> dict[str, Refusal]:
        """The updates of round ``rnd`` refused for what they carried (participant -> why), while that round
        is the board's current one (the recorders read it when the round ends)."""
        with self.board.cond:
            cur = self.board.current
            return dict(cur.refused) if cur is not None and cur.plan.round == rnd else {}

    def _wait(self, open_round: OpenRound, done: Callable[[], bool], deadline: float) -> None:
        """With the board lock held: wait until ``done()`` or ``deadline`` (wall clock), or abort."""
        while not done():
            if self.board.aborted is not None:
                open_round.closed = True
                self.board.check_aborted()
            left = deadline - time.time()
            if left <= 0:
                return
            self.board.cond.wait(min(left, 1.0))

    def _fit_secure(self, open_round: OpenRound, params: torch.Tensor) -> list[Update]:
        """One round by secure aggregation: relay the protocol's steps (see
        :mod:`trustfed.coordinator.secagg`) and return one ``secagg`` update, the global model plus the
        mean of the survivors' clipped deltas (weighted by example counts with ``[secagg] weighted``)."""
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

    def refusals_in(self, rnd: int) -> list[SignedRefusal]:
        """The signed refusals participants sent with their withdrawals in round ``rnd``."""
        with self.board.cond:
            return [r for r in self.board.refusals if r.round == rnd]

    def commitment_for(self, plan: RoundPlan, update: Update) -> SignedCommitment:
        """The ledger's CommitmentSource: the commitment ``update``'s participant signed and sent with it."""
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
        info = ReceiptInfo(record.model_hash, ids, included, leaves, self.enclave_receipts(plan.round))
        with self.board.cond:
            self.board.receipts[plan.round] = info
            self.board.cond.notify_all()
