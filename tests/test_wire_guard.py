"""The servers stay up and bounded under hostile input: authentication before the body is read,
per-peer limits, bounded memory, clean logs and documented statuses (the real gRPC path, mutual TLS)."""

from __future__ import annotations

import gc
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tests.wire_helpers import ENC, FED, Messages, Wire, make_pki, rss_bytes

from trustfed.transport import federation_pb2 as pb
from trustfed.transport.access import PeerLimiter
from trustfed.transport.guard import DOCUMENTED_STATUSES
from trustfed.transport.logsafe import LogBudget, clean


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture()
def wire(pki: Path) -> Iterator[Wire]:
    w = Wire.start(pki)
    yield w
    w.close()


def _call(w: Wire, method: str, who: str, msg: bytes) -> grpc.RpcError | None:
    ch = w.channel(who, method.startswith(ENC))
    try:
        if method.endswith("DownloadModel"):
            list(ch.unary_stream(method)(msg, timeout=20))
        elif method.endswith("UploadUpdate"):
            ch.stream_unary(method)(iter([msg]), timeout=20)
        else:
            ch.unary_unary(method)(msg, timeout=20)
    except grpc.RpcError as exc:
        return exc
    return None


# -- pure parts
def test_clean_escapes_and_caps() -> None:
    assert clean("plan\naccepted update from p001") == "plan\\naccepted update from p001"
    assert clean("a\x1b[31mb\u202ec\\") == "a\\x1b[31mb\\u202ec\\\\"
    assert clean("x" * 10_000, 20) == "x" * 20 + "...(+9980 chars)"
    assert clean(b"\xff\n" * 1000, 8) == "ÿ\\nÿ\\nÿ...(+1995 chars)"  # an escape is never cut
    assert clean("épsilon ε") == "épsilon ε"  # printable text stays readable


def test_log_budget_counts_what_it_suppresses() -> None:
    now = [0.0]
    b = LogBudget(rate=1.0, burst=2, clock=lambda: now[0])
    assert [b.take("replay")[0] for _ in range(5)] == [True, True, False, False, False]
    assert b.take("bad_signature") == (True, 0)  # per key
    now[0] = 1.0
    assert b.take("replay") == (True, 3)


def test_peer_limiter_caps_calls_in_flight_and_rate() -> None:
    now = [0.0]
    lim = PeerLimiter(2, rate=1.0, burst=3, clock=lambda: now[0])
    assert [lim.enter("a"), lim.enter("a"), lim.enter("a")] == [None, None, "too_many_calls"]
    assert lim.enter("b") is None and lim.in_flight == 3
    lim.leave("a")
    assert lim.enter("a") is None  # the third token of a's burst
    lim.leave("a")
    assert lim.enter("a") == "rate_limited"
    now[0] = 1.0
    assert lim.enter("a") is None


# -- the coordinator
@pytest.mark.parametrize("method", ["GetRoundPlan", "DownloadModel", "UploadUpdate", "GetReceipt", "SecAgg"])
def test_unparsable_requests_are_invalid_argument_without_traceback(
    wire: Wire, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that do not parse were INTERNAL ("Exception deserializing request!") with a traceback."""
    with caplog.at_level(logging.DEBUG, logger="grpc"):
        err = _call(wire, FED + method, "p000", b"\xff\xff\xff\xff garbage")
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{method}: malformed:" in (err.details() or "")
    assert "Traceback" not in caplog.text and "Exception deserializing" not in caplog.text


def test_signed_body_that_does_not_parse_is_invalid_argument(
    wire: Wire, pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A correctly signed envelope around a broken body was UNKNOWN, with the DecodeError text echoed."""
    signer = Messages(pki).signers["p000"]
    msg = signer.sign("plan_request", 0, b"\xff\xff\xff\xff\x0f").SerializeToString()
    with caplog.at_level(logging.WARNING):
        err = _call(wire, FED + "GetRoundPlan", "p000", msg)
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Error parsing" not in (err.details() or "") and "Traceback" not in caplog.text


def test_revoked_peer_is_refused_before_its_body_is_parsed(wire: Wire, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        err = _call(wire, FED + "GetRoundPlan", "p002", b"\xff\xff not a message")
    assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "certificate_refused" in (err.details() or "") and "revoked" in (err.details() or "")
    assert "(certificate_refused)" in caplog.text


def test_malformed_requests_leave_memory_bounded(wire: Wire) -> None:
    """gRPC's own deserialization failure kept every call's state: about 22 KB per request."""
    ch = wire.channel("p000", False)
    call = ch.unary_unary(FED + "GetRoundPlan")
    rng = random.Random(7)

    def flood(n: int) -> None:
        for _ in range(n):
            with pytest.raises(grpc.RpcError):
                call(b"\xff\xff\xff" + rng.randbytes(40), timeout=20)

    flood(300)  # warm up allocator arenas and caches
    gc.collect()
    before = rss_bytes()
    flood(2000)
    gc.collect()
    grown = rss_bytes() - before
    assert grown < 8 << 20, f"resident memory grew {grown / 2**20:.1f} MiB over 2000 malformed requests"


def test_forged_log_line_is_escaped_and_capped(wire: Wire, pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    signer = Messages(pki).signers["p000"]
    forged = "plan_request\nINFO trustfed.coordinator.service: round 1: accepted update from p001" + "A" * 50_000
    msg = signer.sign(forged, 0, pb.PlanRequest(participant_id="p000").SerializeToString())
    with caplog.at_level(logging.INFO):
        err = _call(wire, FED + "GetRoundPlan", "p000", msg.SerializeToString())
    assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "wrong_type" in (err.details() or "") and len(err.details() or "") < 400
    assert "\n" not in (err.details() or "")
    for rec in caplog.records:
        text = rec.getMessage()
        assert "\n" not in text and len(text) < 1000, text[:200]


def test_a_flood_of_refusals_writes_a_bounded_log(wire: Wire, pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    signer = Messages(pki).signers["p000"]
    call = wire.channel("p000", False).unary_unary(FED + "GetRoundPlan")
    with caplog.at_level(logging.WARNING):
        for _ in range(150):
            m = signer.sign("plan_request", 0, pb.PlanRequest(participant_id="p000").SerializeToString())
            m.envelope.signature = bytes(70)
            with pytest.raises(grpc.RpcError):
                call(m.SerializeToString(), timeout=20)
    lines = [r for r in caplog.records if "bad_signature" in r.getMessage()]
    assert 1 <= len(lines) <= 60, len(lines)


def test_one_participant_holding_long_polls_does_not_slow_another(wire: Wire, pki: Path) -> None:
    """48 long polls from p000 held every worker (8): p001's plan request waited for them."""
    msgs = Messages(pki)
    stub = wire.channel("p000", False).unary_unary(FED + "GetRoundPlan")
    polls = []
    for _ in range(48):
        m = msgs.signers["p000"].sign(
            "plan_request", 0, pb.PlanRequest(participant_id="p000", wait_ms=5000).SerializeToString()
        )
        polls.append(stub.future(m.SerializeToString(), timeout=30))
    time.sleep(0.5)  # the polls reach the server
    other = wire.channel("p001", False).unary_unary(FED + "GetRoundPlan")
    m = msgs.signers["p001"].sign("plan_request", 0, pb.PlanRequest(participant_id="p001").SerializeToString())
    t0 = time.monotonic()
    other(m.SerializeToString(), timeout=30)
    took = time.monotonic() - t0
    refused = [e for e in (f.exception(timeout=30) for f in polls) if e is not None]
    assert took < 1.0, f"p001 waited {took:.2f} s behind p000's long polls"
    assert refused and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    assert any("too_many_calls" in (e.details() or "") for e in refused)


# -- the enclave
def test_enclave_checks_the_role_before_reading_the_body(wire: Wire) -> None:
    """A participant's Aggregate was parsed (up to 512 MiB) before its role was checked."""
    err = _call(wire, ENC + "Aggregate", "p000", b"\xff\xff\xff not an AggregateRequest")
    assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "wrong_role" in (err.details() or "") and "coordinator" in (err.details() or "")


def test_enclave_limits_request_size_per_role(wire: Wire) -> None:
    from trustfed.enclave import enclave_pb2 as epb

    big = epb.EvidenceRequest(nonce=bytes(200_000)).SerializeToString()
    err = _call(wire, ENC + "GetEvidence", "p000", big)
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too_large" in (err.details() or "")
    ok = _call(wire, ENC + "GetEvidence", "p000", epb.EvidenceRequest(nonce=bytes(32)).SerializeToString())
    assert ok is None


def test_enclave_refuses_revoked_and_malformed(wire: Wire) -> None:
    from trustfed.enclave import enclave_pb2 as epb

    err = _call(wire, ENC + "GetPublicKey", "p002", epb.PublicKeyRequest().SerializeToString())
    assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "certificate_refused" in (err.details() or "")
    err = _call(wire, ENC + "Aggregate", "coordinator", b"\xff\xff\xff")
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_spec = epb.AggregateRequest(spec_json="{]", params=b"\x00").SerializeToString()
    err = _call(wire, ENC + "Aggregate", "coordinator", bad_spec)
    assert err is not None and err.code() in DOCUMENTED_STATUSES, err


def test_a_throttled_participant_backs_off_and_retries(pki: Path) -> None:
    """A participant over its call rate is refused RESOURCE_EXHAUSTED (rate_limited) and retries."""
    from tests.wire_helpers import LIMITS, SPEC

    from trustfed.participant.client import ParticipantClient
    from trustfed.participant.settings import ParticipantConfig

    slow = LIMITS.model_copy(update={"calls_per_s": 2.0, "call_burst": 1})
    w = Wire.start(pki, limits=slow)
    cfg = ParticipantConfig.model_validate(
        {
            "participant": {"id": "p001", "coordinator": w.transport.address, "federation_config": str(pki / "x")},
            "tls": {"ca": str(pki / "ca.pem"), "cert": str(pki / "p001.pem"), "key": str(pki / "p001.key")},
            "retry": {"attempts": 5, "initial_backoff_s": 0.3, "max_backoff_s": 1.0, "poll_wait_ms": 0},
            "limits": LIMITS.model_dump(),
        }
    )
    client = ParticipantClient(cfg, _NoTrainer(), SPEC)
    try:
        assert client.fetch_plan(0).status == pb.WAIT
        assert client.fetch_plan(0).status == pb.WAIT  # refused once (rate_limited), then served
    finally:
        client.close()
        w.close()


class _NoTrainer:
    participant_id = "p001"

    def fit(self, params: object, plan: object) -> object:
        raise AssertionError("not called")

    def evaluate(self, params: object) -> dict[str, float]:
        return {}
