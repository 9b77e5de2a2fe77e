"""The gRPC service over mutual TLS, in one process: a round end to end, then every refusal
(each asserting the refusal and its logged reason)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch

from trustfed.coordinator.network import GrpcTransport
from trustfed.core.codec import ParamSpec, TensorSpec, model_hash
from trustfed.core.strategy import RoundPlan, Update
from trustfed.participant.client import ParticipantClient
from trustfed.participant.settings import ParticipantConfig
from trustfed.pki import init_ca, issue, load_certificate, load_private_key, revoke
from trustfed.transport import federation_pb2 as pb
from trustfed.transport import federation_pb2_grpc as pb_grpc
from trustfed.transport.envelope import Signer
from trustfed.transport.errors import TransportError
from trustfed.transport.settings import Limits, TransportSettings
from trustfed.transport.tls import channel, diagnose_tls, server_credentials

SPEC = ParamSpec((TensorSpec("w", (4000,), "float32"),))  # 16,000 bytes
LIMITS = Limits(chunk_bytes=4096, max_model_bytes=64 * 1024, max_message_bytes=64 * 1024)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_ca(d)
    issue(d, "coordinator", "coordinator")
    for pid in ("p000", "p001", "p002"):
        issue(d, "participant", pid)
    revoke(d, name="p002")
    other = d / "other"
    init_ca(other)
    issue(other, "participant", "p000")
    return d


def _transport(pki: Path, linger_s: float = 0.0) -> GrpcTransport:
    s = TransportSettings(
        listen="127.0.0.1:0",
        ca=pki / "ca.pem",
        cert=pki / "coordinator.pem",
        key=pki / "coordinator.key",
        crl=pki / "crl.pem",
        round_timeout_s=20,
        linger_s=linger_s,
        limits=LIMITS,
    )
    return GrpcTransport(s, SPEC, max_workers=8)


@pytest.fixture()
def transport(pki: Path) -> Iterator[GrpcTransport]:
    t = _transport(pki)
    yield t
    t.close()


class PlusOne:
    def __init__(self, pid: str) -> None:
        self.participant_id = pid

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        return Update(self.participant_id, params + 1.0, 10, {"loss": 0.5})

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return {}


def _client(
    pki: Path, address: str, pid: str = "p000", *, cert_dir: Path | None = None, attempts: int = 2
) -> ParticipantClient:
    d = cert_dir or pki
    cfg = ParticipantConfig.model_validate(
        {
            "participant": {"id": pid, "coordinator": address, "federation_config": str(pki / "unused.toml")},
            "tls": {"ca": str(pki / "ca.pem"), "cert": str(d / f"{pid}.pem"), "key": str(d / f"{pid}.key")},
            "retry": {"attempts": attempts, "initial_backoff_s": 0.05, "max_backoff_s": 0.1, "poll_wait_ms": 500},
            "limits": LIMITS.model_dump(),
        }
    )
    return ParticipantClient(cfg, PlusOne(pid), SPEC)


def _stub(pki: Path, address: str, pid: str = "p000") -> pb_grpc.FederationStub:
    return pb_grpc.FederationStub(channel(address, pki / "ca.pem", pki / f"{pid}.pem", pki / f"{pid}.key", 1 << 20))


def _plan_request(pki: Path, pid: str = "p000") -> pb.SignedMessage:
    signer = Signer(pid, load_private_key(pki / f"{pid}.key"))
    return signer.sign("plan_request", 0, pb.PlanRequest(participant_id=pid, wait_ms=0).SerializeToString())


def test_one_round_over_mtls(pki: Path) -> None:
    transport = _transport(pki, linger_s=10)
    clients = [_client(pki, transport.address, pid) for pid in ("p000", "p001")]
    outcomes: dict[str, object] = {}

    def run(c: ParticipantClient) -> None:
        outcomes[c.pid] = c.run()

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for th in threads:
        th.start()
    assert transport.wait_for_participants(["p000", "p001"], 20) == ["p000", "p001"]
    params = torch.arange(SPEC.size, dtype=torch.float32)
    plan = RoundPlan(1, ("p000", "p001"), {"lr": 0.1}, model_hash(params, SPEC))
    updates = transport.fit(plan, params)
    assert [u.participant_id for u in updates] == ["p000", "p001"]
    assert all(torch.equal(u.params, params + 1) for u in updates)
    from trustfed.core.aggregator import AggregateResult
    from trustfed.core.rounds import RoundRecord
    from trustfed.core.strategy import RoundResult

    new = params + 1
    rec = RoundRecord(1, plan.participants, model_hash(new, SPEC), {}, 0.0)
    transport.on_round_end(plan, updates, RoundResult(new, {}, AggregateResult(new, (0, 1))), rec)
    transport.close()
    for th in threads:
        th.join(20)
    for c in clients:
        c.close()
    got = outcomes["p000"]
    assert isinstance(got, list) and len(got) == 1 and got[0].included and got[0].new_model_hash == rec.model_hash


def test_no_client_certificate(pki: Path, transport: GrpcTransport, caplog: pytest.LogCaptureFixture) -> None:
    stub = pb_grpc.FederationStub(channel(transport.address, pki / "ca.pem", None, None, 1 << 20))
    with pytest.raises(grpc.RpcError) as ei:
        stub.GetRoundPlan(_plan_request(pki), timeout=5)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    with caplog.at_level(logging.WARNING):
        d = diagnose_tls(transport.address, pki / "ca.pem", None, None)
    assert "no client certificate was presented" in d.reason
    assert "no client certificate was presented" in caplog.text


def test_certificate_from_another_ca(pki: Path, transport: GrpcTransport, caplog: pytest.LogCaptureFixture) -> None:
    c = _client(pki, transport.address, "p000", cert_dir=pki / "other")
    with caplog.at_level(logging.WARNING), pytest.raises(TransportError, match="was refused"):
        c.fetch_plan(0)
    c.close()
    assert "closed the connection after the handshake" in caplog.text


def test_revoked_certificate(pki: Path, transport: GrpcTransport, caplog: pytest.LogCaptureFixture) -> None:
    c = _client(pki, transport.address, "p002")
    with caplog.at_level(logging.WARNING), pytest.raises(TransportError, match=r"PERMISSION_DENIED.*revoked"):
        c.fetch_plan(0)
    c.close()
    assert "is revoked" in caplog.text and "(certificate_refused)" in caplog.text
    assert "p002" not in transport.available()


def test_participant_certificate_presented_as_coordinator(pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    impostor = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_FederationServicer_to_server(pb_grpc.FederationServicer(), impostor)
    port = impostor.add_secure_port(
        "127.0.0.1:0", server_credentials(pki / "ca.pem", pki / "p001.pem", pki / "p001.key")
    )
    impostor.start()
    try:
        c = _client(pki, f"127.0.0.1:{port}", "p000")
        with caplog.at_level(logging.WARNING), pytest.raises(TransportError, match="not a coordinator certificate"):
            c.fetch_plan(0)
        c.close()
    finally:
        impostor.stop(0)
    assert "participant certificate of 'p001'" in caplog.text


def test_tampered_body(pki: Path, transport: GrpcTransport, caplog: pytest.LogCaptureFixture) -> None:
    msg = _plan_request(pki)
    msg.body = pb.PlanRequest(participant_id="p000", after_round=7).SerializeToString()
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as ei:
        _stub(pki, transport.address).GetRoundPlan(msg, timeout=5)
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED and "body_hash_mismatch" in ei.value.details()
    assert "(body_hash_mismatch)" in caplog.text


def test_replayed_message(pki: Path, transport: GrpcTransport, caplog: pytest.LogCaptureFixture) -> None:
    stub = _stub(pki, transport.address)
    msg = _plan_request(pki)
    stub.GetRoundPlan(msg, timeout=5)
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as ei:
        stub.GetRoundPlan(msg, timeout=5)
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED and "replay" in ei.value.details()
    assert "(replay)" in caplog.text


def _open_round(transport: GrpcTransport) -> threading.Thread:
    params = torch.zeros(SPEC.size)
    plan = RoundPlan(1, ("p000",), {}, model_hash(params, SPEC))
    th = threading.Thread(target=transport.fit, args=(plan, params), daemon=True)
    th.start()
    _stub_ready = threading.Event()
    _stub_ready.wait(0.3)
    return th


def test_upload_ten_times_over_the_limit(pki: Path, transport: GrpcTransport, caplog: pytest.LogCaptureFixture) -> None:
    """Declared 10x over max_model_bytes: refused on the header, after reading at most one chunk."""
    _open_round(transport)
    signer = Signer("p000", load_private_key(pki / "p000.key"))
    total = 10 * LIMITS.max_model_bytes
    pulled = 0

    def parts(declared: int) -> Iterator[pb.StreamPart]:
        nonlocal pulled
        h = pb.UpdateHeader(
            round=1,
            participant_id="p000",
            num_examples=1,
            total_bytes=declared,
            chunk_bytes=LIMITS.chunk_bytes,
            num_chunks=total // LIMITS.chunk_bytes,
            model_hash="0" * 64,
        )
        yield pb.StreamPart(header=signer.sign("update_header", 1, h.SerializeToString()))
        for i in range(total // LIMITS.chunk_bytes):
            pulled += 1
            yield pb.StreamPart(chunk=pb.Chunk(index=i, data=bytes(LIMITS.chunk_bytes)))

    stub = _stub(pki, transport.address)
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as ei:
        stub.UploadUpdate(parts(total), timeout=10)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "over the limit" in ei.value.details()
    assert "(too_large)" in caplog.text
    # A sender that declares the right size but keeps streaming is cut off at the first extra chunk.
    caplog.clear()
    pulled = 0
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as ei:
        stub.UploadUpdate(parts(4 * SPEC.size), timeout=10)
    assert "bad_chunk_count" in ei.value.details() or "too_many_chunks" in ei.value.details()
    # One oversize message (10x the per-message limit) is refused by gRPC itself before Python sees it.
    with pytest.raises(grpc.RpcError) as ei:
        stub.GetRoundPlan(pb.SignedMessage(body=bytes(10 * LIMITS.max_message_bytes)), timeout=10)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_stale_timestamp(pki: Path, transport: GrpcTransport, caplog: pytest.LogCaptureFixture) -> None:
    import time

    signer = Signer("p000", load_private_key(pki / "p000.key"))
    msg = signer.sign(
        "plan_request",
        0,
        pb.PlanRequest(participant_id="p000").SerializeToString(),
        timestamp_ms=int((time.time() - 3600) * 1000),
    )
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError):
        _stub(pki, transport.address).GetRoundPlan(msg, timeout=5)
    assert "(stale_timestamp)" in caplog.text


def test_unreachable_coordinator_names_the_address(pki: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    c = _client(pki, f"127.0.0.1:{port}", attempts=3)
    with pytest.raises(TransportError, match=rf"127\.0\.0\.1:{port}.*3 attempts"):
        c.fetch_plan(0)
    c.close()


def test_server_refuses_a_participant_certificate(pki: Path) -> None:
    s = TransportSettings(listen="127.0.0.1:0", ca=pki / "ca.pem", cert=pki / "p000.pem", key=pki / "p000.key")
    from trustfed.pki import PkiError

    with pytest.raises(PkiError, match="role coordinator"):
        GrpcTransport(s, SPEC)
    assert load_certificate(pki / "p000.pem")  # untouched


@pytest.mark.parametrize("mb", [pytest.param(4, id="4MB"), pytest.param(100, id="100MB", marks=pytest.mark.slow)])
def test_large_model_round_trip(pki: Path, mb: int) -> None:
    """A model of MB megabytes streams down and back up in 1 MiB chunks, bit for bit."""
    n = mb * 1_000_000 // 4
    spec = ParamSpec((TensorSpec("w", (n,), "float32"),))
    limits = Limits(chunk_bytes=1 << 20, max_model_bytes=4 * n)
    s = TransportSettings(
        listen="127.0.0.1:0",
        ca=pki / "ca.pem",
        cert=pki / "coordinator.pem",
        key=pki / "coordinator.key",
        linger_s=0,
        limits=limits,
    )
    t = GrpcTransport(s, spec, max_workers=4)
    cfg = ParticipantConfig.model_validate(
        {
            "participant": {"id": "p000", "coordinator": t.address, "federation_config": str(pki / "unused.toml")},
            "tls": {"ca": str(pki / "ca.pem"), "cert": str(pki / "p000.pem"), "key": str(pki / "p000.key")},
            "limits": limits.model_dump(),
        }
    )
    c = ParticipantClient(cfg, PlusOne("p000"), spec)
    params = torch.randn(n, generator=torch.Generator().manual_seed(0))
    result: list[list[Update]] = []
    fitter = threading.Thread(
        target=lambda: result.append(t.fit(RoundPlan(1, ("p000",), {}, model_hash(params, spec)), params))
    )
    fitter.start()
    try:
        rp = c.verify_plan(c.fetch_plan(0), 0)
        got = c.download_model(rp)
        assert torch.equal(got, params)
        upd = c.train(rp, got)
        c.upload(rp, upd, c.seal(rp, upd))
        fitter.join(60)
        assert torch.equal(result[0][0].params, params + 1)
    finally:
        c.close()
        t.close()
