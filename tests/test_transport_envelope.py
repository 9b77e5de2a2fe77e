"""Signing envelope, replay cache and chunked streams: pure checks, no sockets."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

from trustfed.core.codec import ParamSpec, TensorSpec, model_hash, to_bytes
from trustfed.pki import RevocationList, init_ca, issue, load_certificate, load_private_key
from trustfed.transport import federation_pb2 as pb
from trustfed.transport.envelope import NonceCache, Signer, Verifier
from trustfed.transport.errors import MessageRejected
from trustfed.transport.settings import Limits
from trustfed.transport.streaming import (
    StreamDeclaration,
    check_declaration,
    expect_end,
    iter_chunks,
    model_hasher,
    receive_payload,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_ca(d)
    issue(d, "participant", "p000")
    issue(d, "participant", "p001")
    issue(d, "coordinator", "coordinator")
    return d


def _signer(pki: Path, name: str, with_cert: bool = False) -> Signer:
    cert = load_certificate(pki / f"{name}.pem") if with_cert else None
    return Signer(name, load_private_key(pki / f"{name}.key"), cert)


def _verifier(pki: Path, **kw: float) -> Verifier:
    return Verifier(
        load_certificate(pki / "ca.pem"),
        RevocationList.empty,
        window_s=kw.get("window_s", 60),
        nonce_cache_size=int(kw.get("size", 1000)),
        where="test",
        clock=time.time,
    )


def test_roundtrip_and_identity(pki: Path) -> None:
    msg = _signer(pki, "p000").sign("plan_request", 3, b"hello")
    v = _verifier(pki).verify(
        msg, expected_type="plan_request", peer_cert=load_certificate(pki / "p000.pem"), role="participant"
    )
    assert v.identity.name == "p000" and v.body == b"hello" and v.envelope.round == 3


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: setattr(m, "body", b"hellO"), "body_hash_mismatch"),
        (lambda m: setattr(m.envelope, "round", 4), "bad_signature"),
        (lambda m: setattr(m.envelope, "msg_type", "receipt_request"), "wrong_type"),
        (lambda m: setattr(m.envelope, "sender_id", "p001"), "sender_mismatch"),
        (lambda m: setattr(m.envelope, "timestamp_ms", m.envelope.timestamp_ms - 3_600_000), "stale_timestamp"),
    ],
)
def test_tampering_is_refused_and_logged(pki: Path, caplog: pytest.LogCaptureFixture, mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    msg = _signer(pki, "p000").sign("plan_request", 3, b"hello")
    mutate(msg)
    with caplog.at_level(logging.WARNING, "trustfed.transport"), pytest.raises(MessageRejected) as ei:
        v = _verifier(pki)
        v.verify(
            msg,
            expected_type=msg.envelope.msg_type if reason != "wrong_type" else "plan_request",
            peer_cert=load_certificate(pki / "p000.pem"),
            role="participant",
        )
    assert ei.value.reason == reason
    assert f"({reason})" in caplog.text


def test_signature_of_another_key_is_refused(pki: Path) -> None:
    msg = _signer(pki, "p001").sign("plan_request", 1, b"x")
    msg.envelope.sender_id = "p000"  # claims to be p000, signed by p001, over p000's TLS channel
    with pytest.raises(MessageRejected) as ei:
        _verifier(pki).verify(
            msg, expected_type="plan_request", peer_cert=load_certificate(pki / "p000.pem"), role="participant"
        )
    assert ei.value.reason == "bad_signature"


def test_replay_is_refused(pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    v = _verifier(pki)
    msg = _signer(pki, "p000").sign("plan_request", 1, b"x")
    cert = load_certificate(pki / "p000.pem")
    v.verify(msg, expected_type="plan_request", peer_cert=cert, role="participant")
    with caplog.at_level(logging.WARNING), pytest.raises(MessageRejected) as ei:
        v.verify(msg, expected_type="plan_request", peer_cert=cert, role="participant")
    assert ei.value.reason == "replay" and "replayed message" in caplog.text


def test_role_and_carried_certificate(pki: Path) -> None:
    coord = _signer(pki, "coordinator", with_cert=True).sign("round_plan", 1, b"plan")
    assert (
        _verifier(pki).verify(coord, expected_type="round_plan", peer_cert=None, role="coordinator").identity.role
        == "coordinator"
    )
    fake = _signer(pki, "p000", with_cert=True).sign("round_plan", 1, b"plan")
    with pytest.raises(MessageRejected, match="expected 'coordinator'"):
        _verifier(pki).verify(fake, expected_type="round_plan", peer_cert=None, role="coordinator")


def test_nonce_cache_is_bounded_and_fails_closed() -> None:
    c = NonceCache(capacity=4, window_s=1.0)
    now = 1_000_000
    for i in range(4):
        assert c.check_and_add("p", bytes([i]) * 16, now, now) is None
    assert c.check_and_add("p", b"\x09" * 16, now, now) == "nonce_cache_full"
    assert c.check_and_add("p", b"\x00" * 16, now, now) == "replay"
    later = now + 5_000  # the old entries left the window: they are dropped, memory stays bounded
    assert c.check_and_add("p", b"\x09" * 16, later, later) is None
    assert len(c) == 1


SPEC = ParamSpec((TensorSpec("w", (1000,), "float32"), TensorSpec("b", (10,), "float32")))


def _stream(vec: torch.Tensor, chunk: int) -> tuple[StreamDeclaration, list[pb.StreamPart]]:
    payload = to_bytes(vec)
    parts = list(iter_chunks(payload, chunk))
    return StreamDeclaration(len(payload), chunk, len(parts), model_hash(vec, SPEC)), parts


def test_model_hasher_matches_codec() -> None:
    vec = torch.randn(SPEC.size, generator=torch.Generator().manual_seed(0))
    h = model_hasher(SPEC.to_json())
    h.update(to_bytes(vec))
    assert h.hexdigest() == model_hash(vec, SPEC)


def test_stream_roundtrip_and_checks() -> None:
    limits = Limits(chunk_bytes=4096, max_model_bytes=8192)
    vec = torch.randn(SPEC.size, generator=torch.Generator().manual_seed(1))
    decl, parts = _stream(vec, 4096)
    check_declaration(decl, SPEC, limits, "t")
    it = iter(parts)
    buf = receive_payload(it, decl, SPEC.to_json(), "t")
    expect_end(it, "t")
    assert bytes(buf) == to_bytes(vec)
    # a flipped byte breaks the signed hash
    bad = [pb.StreamPart(chunk=pb.Chunk(index=p.chunk.index, data=p.chunk.data)) for p in parts]
    bad[0].chunk.data = b"\x01" + bad[0].chunk.data[1:]
    with pytest.raises(MessageRejected, match="hash"):
        receive_payload(iter(bad), decl, SPEC.to_json(), "t")
    with pytest.raises(MessageRejected, match="ended after"):
        receive_payload(iter(parts[:-1]), decl, SPEC.to_json(), "t")
    with pytest.raises(MessageRejected, match="beyond the declared"):
        expect_end(iter(parts), "t")


def test_oversized_declaration_refused_before_allocation() -> None:
    limits = Limits(chunk_bytes=4096, max_model_bytes=8192)
    huge = StreamDeclaration(10 * limits.max_model_bytes, 4096, 200, "0" * 64)
    with pytest.raises(MessageRejected) as ei:
        check_declaration(huge, SPEC, limits, "t")
    assert ei.value.reason == "too_large"
    lying = StreamDeclaration(4 * SPEC.size, 8192, 5, "0" * 64)
    with pytest.raises(MessageRejected, match="chunk size"):
        check_declaration(lying, SPEC, limits, "t")


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    """Regenerating the stubs from federation.proto gives the committed files."""
    import shutil
    import subprocess
    import sys

    src = Path(__file__).resolve().parents[1] / "src"
    rel = Path("trustfed/transport")
    (tmp_path / rel).mkdir(parents=True)
    shutil.copy(src / rel / "federation.proto", tmp_path / rel / "federation.proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            str(rel / "federation.proto"),
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    for name in ("federation_pb2.py", "federation_pb2.pyi", "federation_pb2_grpc.py"):
        assert (tmp_path / rel / name).read_bytes() == (src / rel / name).read_bytes(), (
            f"{name} is stale: regenerate it"
        )
