"""Compressed uploads on the real gRPC path: the bytes an upload takes, the hash the commitment signs, and
the malformed payloads the coordinator refuses (with their documented status) and accepts nowhere."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.participant_threads import run_with_participants
from tests.test_hostile_uploads import BEHAVIOUR_KIND, Hostile, entries

from trustfed.config import load_federation_config
from trustfed.coordinator.local_federation import prepare, write_participant_configs
from trustfed.coordinator.network import GrpcTransport
from trustfed.coordinator.run import spec_for
from trustfed.core.compression import CompressedUpdate
from trustfed.core.strategy import Update
from trustfed.ledger.verify import verify_run
from trustfed.participant.assembly import build_participant
from trustfed.participant.client import ParticipantClient
from trustfed.participant.settings import load_participant_config
from trustfed.transport import federation_pb2 as pb


def raw(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "federation": {"name": "compressed", "rounds": 1, "participants": n, "seed": 3},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [256]},  # 19k parameters: the signed header is under 1% of an upload
        "training": {"local_epochs": 1, "batch_size": 64, "lr": 0.05},
        "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 1},
        "ledger": {"enabled": True},
        **extra,
    }


@dataclasses.dataclass
class Sent:
    """What one participant's upload put on the wire: serialized message bytes and the payload's bytes."""

    message_bytes: int = 0
    payload: bytes = b""


class CountingStub:
    """The participant's stub, counting every UploadUpdate message it sends."""

    def __init__(self, inner: Any, sent: Sent) -> None:
        self.inner, self.sent = inner, sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def UploadUpdate(self, parts: Iterator[pb.StreamPart], timeout: float | None = None) -> Any:
        def counted() -> Iterator[pb.StreamPart]:
            chunks = []
            for part in parts:
                self.sent.message_bytes += part.ByteSize()
                if part.WhichOneof("part") == "chunk":
                    chunks.append(part.chunk.data)
                yield part
            self.sent.payload = b"".join(chunks)

        return self.inner.UploadUpdate(counted(), timeout=timeout)


def run_federation(
    tmp_path: Path, r: dict[str, Any], poisons: dict[str, Callable[[Update], Update]], *, round_timeout_s: float = 60
) -> tuple[dict[str, BaseException], dict[str, Sent], Any]:
    ids = [f"p{i:03d}" for i in range(r["federation"]["participants"])]
    fed = prepare(tmp_path, r, ids, round_timeout_s=round_timeout_s)
    cfg = load_federation_config(fed.federation_file)
    transport = GrpcTransport(cfg.transport.resolved(tmp_path), spec_for(cfg), max_workers=24, require_commitment=True)
    write_participant_configs(fed, transport.address, ids, ledger_view=True)
    sent = {pid: Sent() for pid in ids}

    def client_of(pid: str) -> ParticipantClient:
        client: ParticipantClient = build_participant(load_participant_config(fed.participant_files[pid]))
        client.stub = CountingStub(client.stub, sent[pid])
        if pid in poisons:
            client.trainer = Hostile(client.trainer, poisons[pid])
        return client

    errors, (_, metrics) = run_with_participants(cfg, transport, ids, client_of, out_dir=tmp_path)
    return errors, sent, metrics


def test_upload_bytes_drop_to_a_half_and_a_quarter_and_the_commitment_hashes_them(tmp_path: Path) -> None:
    size: dict[str, float] = {}
    for codec in ("none", "fp16", "int8"):
        run = tmp_path / codec
        errors, sent, metrics = run_federation(run, raw(2, transport={"compression": codec}), {})
        assert not errors, errors
        assert metrics["rounds"][0]["updated_by"] == ["p000", "p001"]
        size[codec] = sum(s.message_bytes for s in sent.values()) / 2
        commitments = {e.author: e.body for e in entries(run, "commitment")}
        for pid, s in sent.items():  # the signed hash is that of the exact bytes that crossed the wire
            assert commitments[pid]["update_sha256"] == hashlib.sha256(s.payload).hexdigest()
            assert ("compression" in commitments[pid]) == (codec != "none")
        verdict = verify_run(run)
        assert verdict.ok, [str(f) for f in verdict.failures]
    n = spec_for(load_federation_config(tmp_path / "none" / "federation.toml")).size
    assert size["none"] == pytest.approx(4 * n, rel=0.02)
    assert size["fp16"] / size["none"] == pytest.approx(0.5, abs=0.01)
    assert size["int8"] / size["none"] == pytest.approx(0.25, abs=0.01)


def _payload(u: Update, edit: Callable[[bytearray], bytes]) -> Update:
    assert isinstance(u, CompressedUpdate)
    return dataclasses.replace(u, payload=edit(bytearray(u.payload)))


def nan_scale(u: Update) -> Update:
    return _payload(u, lambda b: bytes(b[:12] + struct.pack("<f", float("nan")) + b[16:]))


def bad_tag(u: Update) -> Update:
    return _payload(u, lambda b: bytes(b[:4] + b"\x09" + b[5:]))


def truncated(u: Update) -> Update:
    return _payload(u, lambda b: bytes(b[:-3]))


def understated(u: Update) -> Update:
    """A bound over max_error (what a sender measured on a worse quantiser), signed as measured."""
    assert isinstance(u, CompressedUpdate) and u.compression is not None
    return dataclasses.replace(u, compression=dataclasses.replace(u.compression, max_abs_error=0.5))


def test_malformed_compressed_payloads_are_refused_and_accepted_nowhere(tmp_path: Path) -> None:
    r = raw(5, transport={"compression": "int8", "compression_max_error": 0.05})
    poisons = {"p001": nan_scale, "p002": bad_tag, "p003": truncated, "p004": understated}
    errors, _, metrics = run_federation(tmp_path, r, poisons, round_timeout_s=20)
    assert set(errors) == set(poisons)
    for pid in ("p001", "p002"):
        assert "INVALID_ARGUMENT" in str(errors[pid]) and "bad_compression" in str(errors[pid]), errors[pid]
    assert "PERMISSION_DENIED" in str(errors["p003"]) and "size_mismatch" in str(errors["p003"])
    assert "INVALID_ARGUMENT" in str(errors["p004"]) and "error_bound_exceeded" in str(errors["p004"])
    # accepted nowhere: the round aggregated the honest update only, and only it was committed
    assert metrics["rounds"][0]["updated_by"] == ["p000"]
    assert [e.author for e in entries(tmp_path, "commitment")] == ["p000"]
    behaviour = {e.body["participant"]: e.body["reason"] for e in entries(tmp_path, BEHAVIOUR_KIND)}
    assert behaviour == {"p001": "bad_compression", "p002": "bad_compression", "p004": "error_bound_exceeded"}
    verdict = verify_run(tmp_path)
    assert verdict.ok, [str(f) for f in verdict.failures]
    assert verdict.checked["compression_records"] == 1
