"""The enclave as its own process: gRPC over mutual TLS serving evidence and aggregation.

``trustfed enclave --config enclave.toml`` runs :func:`serve`. The server requires a client
certificate from the federation CA; ``Aggregate`` is accepted from coordinator (or admin)
certificates only, ``GetEvidence`` / ``GetPublicKey`` from any federation identity, each checked from
the TLS certificate before any byte of the request is read (:class:`~trustfed.transport.guard.ServerGuard`):
only an ``Aggregate`` from a coordinator or admin may be ``max_message_mb`` large, every other request
``small_message_kb``; each certificate has a few calls in flight at most. The enclave's
certificate must carry the DNS name :data:`ENCLAVE_TLS_NAME` (``trustfed pki issue --role enclave
--host enclave.trustfed.internal``); clients check it. TLS protects the channel; what makes the
enclave trustworthy is attestation (the evidence binds the enclave key, not the TLS key) and the
signed receipts, so the TLS terminating outside a TEE does not weaken them.

:class:`GrpcEnclaveClient` implements :class:`~trustfed.enclave.core.EnclaveClient`, so the
coordinator's :class:`EnclaveStrategy` and participants' :class:`AttestedEnclave` use a remote
enclave exactly like an in-process one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from trustfed.core.codec import ParamSpec, from_bytes, to_bytes
from trustfed.enclave import enclave_pb2 as pb
from trustfed.enclave import enclave_pb2_grpc as pb_grpc
from trustfed.enclave.core import AggregationRequest, AggregationResponse, Enclave
from trustfed.enclave.dcap import DcapBackend, GramineQuoteProvider, TdxConfigfsQuoteProvider
from trustfed.enclave.errors import EnclaveError
from trustfed.enclave.evidence import MIN_NONCE_BYTES
from trustfed.enclave.receipts import Receipt
from trustfed.enclave.sealing import SealedUpdate, StaticKeyring
from trustfed.enclave.settings import EnclaveServiceConfig
from trustfed.errors import CodecError, TrustFedError
from trustfed.pki.ca import ROLES, PkiError, RevocationList
from trustfed.transport.access import CertificateCheck, PeerLimiter
from trustfed.transport.guard import Caller, ServerGuard, status_detail

log = logging.getLogger("trustfed.enclave.service")

ENCLAVE_TLS_NAME = "enclave.trustfed.internal"
AGGREGATE_ROLES = ("coordinator", "admin")
MAX_UPDATES = 100_000


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes for mutual TLS: the federation CA, this side's certificate and key."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def from_files(cls, ca: Path, cert: Path, key: Path) -> TlsMaterial:
        try:
            return cls(Path(ca).read_bytes(), Path(cert).read_bytes(), Path(key).read_bytes())
        except OSError as exc:
            raise EnclaveError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None


def _grpc_options(max_bytes: int) -> list[tuple[str, int | str]]:
    return [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]


def _peer_role(context: grpc.ServicerContext) -> str | None:
    """The trustfed role of the client certificate (from the PKI's SAN URI), if any."""
    auth = context.auth_context()
    for uri in auth.get("x509_subject_alternative_name", []):
        text = uri.decode(errors="replace")
        if text.startswith("urn:trustfed:role:"):
            return str(text.removeprefix("urn:trustfed:role:"))
    ous = auth.get("x509_pem_cert", [])
    if ous:
        try:
            from cryptography import x509
            from cryptography.x509.oid import NameOID

            cert = x509.load_pem_x509_certificate(ous[0])
            attrs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
            return str(attrs[0].value) if attrs else None
        except ValueError:
            return None
    return None


class EnclaveServicer(pb_grpc.EnclaveServicer):
    def __init__(self, enclave: Enclave, *, check_roles: bool = True) -> None:
        self.enclave = enclave
        self.check_roles = check_roles
        self._lock = threading.Lock()  # one aggregation at a time: strategy state is per round

    @staticmethod
    def _check_nonce(nonce: bytes, context: grpc.ServicerContext) -> None:
        if len(nonce) < MIN_NONCE_BYTES or len(nonce) > 1024:
            detail = status_detail("GetEvidence", "bad_nonce", f"nonce must be {MIN_NONCE_BYTES}..1024 bytes")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)

    def GetEvidence(self, request: pb.EvidenceRequest, context: grpc.ServicerContext) -> pb.EvidenceReply:
        self._check_nonce(request.nonce, context)
        try:
            ev = self.enclave.evidence(bytes(request.nonce))
        except TrustFedError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, status_detail("GetEvidence", "no_evidence", str(exc)))
        return pb.EvidenceReply(evidence=ev, backend=self.enclave.backend.name, public_key=self.enclave.public_key())

    def GetPublicKey(self, request: pb.PublicKeyRequest, context: grpc.ServicerContext) -> pb.PublicKeyReply:
        return pb.PublicKeyReply(
            public_key=self.enclave.public_key(),
            backend=self.enclave.backend.name,
            measurement=self.enclave.measurement,
        )

    def GetState(self, request: pb.StateRequest, context: grpc.ServicerContext) -> pb.StateReply:
        self._check_nonce(request.nonce, context)
        with self._lock:  # not in the middle of an aggregation
            statement = self.enclave.state(bytes(request.nonce))
        return pb.StateReply(statement=statement.to_json())

    def Aggregate(self, request: pb.AggregateRequest, context: grpc.ServicerContext) -> pb.AggregateReply:
        if self.check_roles:
            role = _peer_role(context)
            if role not in AGGREGATE_ROLES:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    status_detail("Aggregate", "wrong_role", f"needs a coordinator certificate, not role {role}"),
                )
        try:
            spec = ParamSpec.from_json(request.spec_json)
            if spec.size > self.enclave.aggregation.max_params:
                raise EnclaveError(f"model of {spec.size} values exceeds max_params")
            if len(request.updates) > MAX_UPDATES or len(request.selected) > MAX_UPDATES:
                raise EnclaveError(f"more than {MAX_UPDATES} updates or selected participants")
            params = from_bytes(request.params, spec)
            updates = [
                SealedUpdate(
                    participant_id=u.participant_id,
                    params=from_bytes(b""),
                    num_examples=0,
                    round=int(u.round),
                    enclave_key_id=u.enclave_key_id,
                    sealed=bytes(u.sealed),
                    commitment=bytes(u.commitment),
                    signature=bytes(u.signature),
                )
                for u in request.updates
            ]
            with self._lock:
                resp = self.enclave.aggregate(
                    AggregationRequest(
                        int(request.round),
                        params,
                        spec,
                        updates,
                        tuple(str(p) for p in request.selected),
                        int(request.available),
                        bool(request.redo),
                    )
                )
        except (EnclaveError, CodecError) as exc:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, status_detail("Aggregate", "aggregation_refused", str(exc))
            )
        return pb.AggregateReply(
            params=to_bytes(resp.params),
            receipt=resp.receipt.to_json(),
            metrics=resp.metrics,
            selected=list(resp.selected),
        )


def build_enclave(cfg: EnclaveServiceConfig) -> Enclave:
    """The Enclave a config describes: backend, measured aggregation config, participant keys."""
    keys: dict[str, Any] = {}
    for pid, path in cfg.participants.items():
        keys[pid] = Path(path).read_bytes()
    e = cfg.enclave
    backend = None
    if e.backend in ("sgx-dcap", "tdx-dcap"):
        provider: Any = None
        if e.quote_device is not None:
            provider = (
                GramineQuoteProvider(e.quote_device)
                if e.backend == "sgx-dcap"
                else TdxConfigfsQuoteProvider(e.quote_device)
            )
        backend = DcapBackend(e.backend, provider, e.report_data_hash)
    return Enclave(
        cfg.aggregation,
        StaticKeyring(keys),
        backend=backend,
        allow_simulated_tee=e.allow_simulated_tee,
        binding=e.report_data_hash,
    )


def _guard(cfg: EnclaveServiceConfig, tls: TlsMaterial, revocations: RevocationList | None) -> ServerGuard:
    """Authenticate by certificate and role, bound each certificate's calls, size requests per role."""
    if revocations is None and cfg.tls is not None and cfg.tls.crl is not None:
        try:
            revocations = RevocationList.load(cfg.tls.crl, x509.load_pem_x509_certificate(tls.ca))
        except PkiError as exc:
            raise EnclaveError(f"[tls].crl: {exc}") from None
    crl = revocations or RevocationList.empty()
    check = CertificateCheck(
        x509.load_pem_x509_certificate(tls.ca),
        lambda: crl,
        default_roles=ROLES,
        roles={"Aggregate": AGGREGATE_ROLES},
        tls13_only=False,
    )
    e = cfg.enclave
    big, small = e.max_message_mb * 1024 * 1024, e.small_message_kb * 1024

    def limit(caller: Caller, rpc: str) -> int:
        return big if rpc == "Aggregate" and caller.role in AGGREGATE_ROLES else small

    peers = PeerLimiter(e.max_calls_per_peer, e.calls_per_s, e.call_burst)
    return ServerGuard("enclave", check, limit, peers, log)


def serve(
    cfg: EnclaveServiceConfig,
    *,
    enclave: Enclave | None = None,
    tls: TlsMaterial | None = None,
    listen: str | None = None,
    revocations: RevocationList | None = None,
) -> tuple[grpc.Server, int, Enclave]:
    """Start the service (non-blocking). Returns (server, bound port, enclave). Mutual TLS only.

    ``revocations``: refuse these certificates (default: the ``[tls].crl`` file, if any)."""
    enclave = enclave or build_enclave(cfg)
    if tls is None:
        if cfg.tls is None:
            raise EnclaveError("enclave.toml has no [tls] section; the service runs over mutual TLS only")
        tls = TlsMaterial.from_files(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
    max_bytes = cfg.enclave.max_message_mb * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="trustfed-enclave"),
        interceptors=[_guard(cfg, tls, revocations)],
        options=_grpc_options(max_bytes),
    )
    pb_grpc.add_EnclaveServicer_to_server(EnclaveServicer(enclave), server)  # type: ignore[no-untyped-call]
    creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True)
    address = listen or cfg.enclave.listen
    try:
        port = server.add_secure_port(address, creds)
    except RuntimeError as exc:
        raise EnclaveError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise EnclaveError(f"cannot listen on {address} (address in use or invalid)")
    server.start()
    label = "[SIMULATED TEE] " if enclave.simulated else ""
    log.info("%senclave service on %s (port %d), key %s…", label, address, port, enclave.key_id[:16])
    return server, port, enclave


class GrpcEnclaveClient:
    """An EnclaveClient over gRPC with mutual TLS."""

    def __init__(
        self,
        address: str,
        tls: TlsMaterial,
        *,
        timeout_s: float = 60.0,
        max_message_bytes: int = 512 * 1024 * 1024,
        server_name: str = ENCLAVE_TLS_NAME,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)
        opts = [*_grpc_options(max_message_bytes), ("grpc.ssl_target_name_override", server_name)]
        self._channel = grpc.secure_channel(address, creds, options=opts)
        self._stub = pb_grpc.EnclaveStub(self._channel)  # type: ignore[no-untyped-call]

    def _call(self, what: str, fn: Callable[..., Any], request: Any) -> Any:
        try:
            return fn(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            if code == grpc.StatusCode.UNAVAILABLE:
                raise EnclaveError(
                    f"cannot reach the enclave at {self.address} over mutual TLS ({detail}); check the address, that "
                    f"the enclave's certificate carries {ENCLAVE_TLS_NAME} and that both sides use the federation CA"
                ) from None
            raise EnclaveError(f"enclave at {self.address} refused {what}: {detail}") from None

    def public_key(self) -> bytes:
        reply = self._call("GetPublicKey", self._stub.GetPublicKey, pb.PublicKeyRequest())
        return bytes(reply.public_key)

    def evidence(self, nonce: bytes) -> bytes:
        reply = self._call("GetEvidence", self._stub.GetEvidence, pb.EvidenceRequest(nonce=nonce))
        return bytes(reply.evidence)

    def state(self, nonce: bytes) -> Receipt:
        reply = self._call("GetState", self._stub.GetState, pb.StateRequest(nonce=nonce))
        return Receipt.from_json(bytes(reply.statement))

    def aggregate(self, request: AggregationRequest) -> AggregationResponse:
        msg = pb.AggregateRequest(
            round=request.round,
            params=to_bytes(request.params),
            spec_json=request.spec.to_json(),
            updates=[
                pb.SealedUpdate(
                    participant_id=u.participant_id,
                    round=u.round,
                    enclave_key_id=u.enclave_key_id,
                    sealed=u.sealed,
                    commitment=u.commitment,
                    signature=u.signature,
                )
                for u in request.updates
            ],
            selected=list(request.selected),
            available=request.available,
            redo=request.redo,
        )
        reply = self._call("Aggregate", self._stub.Aggregate, msg)
        params = from_bytes(reply.params, request.spec)
        return AggregationResponse(
            params, Receipt.from_json(bytes(reply.receipt)), dict(reply.metrics), tuple(reply.selected)
        )

    def close(self) -> None:
        self._channel.close()
