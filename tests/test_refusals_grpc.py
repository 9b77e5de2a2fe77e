"""A split view over gRPC: a coordinator serves two participants a model other than the round's plan.

Each of them checks the model against its own view of the chain, refuses, keeps a signed refusal record
in its state folder and sends it with its withdrawal. The coordinator logs one of them and drops the
other: ``audit verify`` fails on the logged one (two models in one round), and with the participants'
records it also fails on the one left out of the log.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tests.ledger_helpers import has, read_lines
from tests.participant_threads import run_with_participants
from typer.testing import CliRunner

from trustfed.config import load_federation_config
from trustfed.coordinator.local_federation import prepare, write_participant_configs
from trustfed.coordinator.network import GrpcTransport
from trustfed.coordinator.run import spec_for
from trustfed.coordinator.servicer import FederationServicer
from trustfed.ledger.audit import parse_entry
from trustfed.ledger.audit_cli import app as audit_app
from trustfed.ledger.refusals import read_refusals
from trustfed.ledger.verify import verify_run
from trustfed.participant.assembly import build_participant
from trustfed.participant.client import ParticipantClient
from trustfed.participant.settings import load_participant_config
from trustfed.transport import federation_pb2 as pb
from trustfed.transport.streaming import iter_chunks, model_hasher

IDS = ["p000", "p001", "p002", "p003"]
VICTIMS = {"p002", "p003"}  # served another model; p003's refusal is then left out of the log


def _raw() -> dict[str, Any]:
    return {
        "federation": {"name": "split-view", "rounds": 1, "participants": len(IDS), "seed": 3},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"local_epochs": 1, "batch_size": 64, "lr": 0.05},
        "strategy": {"name": "fedavg", "min_participants": 2},
        "ledger": {"enabled": True},
    }


def _split_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """The servicer signs, for the victims, a plan and a model header naming another model, and streams it."""
    real_plan, real_model = FederationServicer.GetRoundPlan, FederationServicer.DownloadModel
    other: dict[str, bytes] = {}

    def other_model(self: FederationServicer) -> tuple[str, bytes]:
        cur = self.board.current
        assert cur is not None
        payload = bytearray(cur.payload)
        payload[0] ^= 0x01  # one bit of the first weight
        h = model_hasher(self.spec_json)
        h.update(bytes(payload))
        other[h.hexdigest()] = bytes(payload)
        return h.hexdigest(), bytes(payload)

    def plan(self: FederationServicer, request: pb.SignedMessage, context: grpc.ServicerContext) -> pb.SignedMessage:
        out = real_plan(self, request, context)
        p = pb.RoundPlan.FromString(out.body)
        if p.status != pb.TRAIN or pb.PlanRequest.FromString(request.body).participant_id not in VICTIMS:
            return out
        p.model_hash = other_model(self)[0]
        return self.signer.sign("round_plan", p.round, p.SerializeToString())

    def model(self: FederationServicer, request: pb.SignedMessage, context: grpc.ServicerContext) -> Iterator[Any]:
        req = pb.ModelRequest.FromString(request.body)
        if req.model_hash not in other:
            yield from real_model(self, request, context)
            return
        payload, c = other[req.model_hash], self.limits.chunk_bytes
        header = pb.ModelHeader(
            round=req.round,
            spec_json=self.spec_json,
            total_bytes=len(payload),
            chunk_bytes=c,
            num_chunks=-(-len(payload) // c),
            model_hash=req.model_hash,
        )
        yield pb.StreamPart(header=self.signer.sign("model_header", req.round, header.SerializeToString()))
        yield from iter_chunks(payload, c)

    monkeypatch.setattr(FederationServicer, "GetRoundPlan", plan)
    monkeypatch.setattr(FederationServicer, "DownloadModel", model)
    real_refusals = GrpcTransport.refusals_in
    monkeypatch.setattr(
        GrpcTransport,
        "refusals_in",
        lambda self, rnd: [r for r in real_refusals(self, rnd) if r.participant_id != "p003"],
    )


def test_a_split_view_is_recorded_and_fails_the_audit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _split_view(monkeypatch)
    fed = prepare(tmp_path, _raw(), IDS, round_timeout_s=60)
    cfg = load_federation_config(fed.federation_file)
    transport = GrpcTransport(cfg.transport.resolved(tmp_path), spec_for(cfg), max_workers=16, require_commitment=True)
    write_participant_configs(fed, transport.address, IDS, ledger_view=True)
    refusals: dict[str, str | None] = {}

    def keep_refusal(pid: str, client: ParticipantClient) -> None:
        refusals[pid] = client.refusal

    def client_of(pid: str) -> ParticipantClient:
        return build_participant(load_participant_config(fed.participant_files[pid]))

    errors, (_, metrics) = run_with_participants(cfg, transport, IDS, client_of, after=keep_refusal, out_dir=tmp_path)
    assert not errors, errors
    assert metrics["rounds"][0]["updated_by"] == ["p000", "p001"]
    assert {pid for pid, why in refusals.items() if why} == VICTIMS
    # each victim holds its signed refusal: both hashes and the reason
    folder = tmp_path / "participants"
    for pid in VICTIMS:
        ((_, r),) = list(read_refusals(folder / f"{pid}.refusals.jsonl"))
        assert r.participant_id == pid and r.round == 1 and r.body["reason"] == "model_not_on_chain"
        assert r.body["served_model_hash"] == r.body["plan_model_hash"] != r.body["expected_model_hash"]
    # the coordinator logged p002's refusal as p002's own signed entry (and dropped p003's)
    logged = [e for e in map(parse_entry, read_lines(tmp_path)) if e.kind == "refusal"]
    assert [(e.author, e.round) for e in logged] == [("p002", 1)]
    v = verify_run(tmp_path)
    assert not v.ok
    assert has(v.failures, file="audit.jsonl", rnd=1, field="refusal.served_model_hash")
    assert any("p002" in f.message and "two different models" in f.message for f in v.failures)
    assert not any("p003" in f.message for f in v.failures)  # without its record nobody knows
    # with the participants' records: p003's refusal is missing from the log, and shows the split view too
    v = verify_run(tmp_path, participant_records=[folder])
    p003 = str(folder / "p003.refusals.jsonl")
    assert has(v.failures, file=p003, line=1, rnd=1, field="refusal")
    assert any(f.file == p003 and "missing from the audit log" in f.message for f in v.failures)
    assert has(v.failures, file=p003, line=1, rnd=1, field="refusal.served_model_hash")
    assert v.checked["participant_refusals"] == 2
    out = CliRunner().invoke(audit_app, ["verify", str(tmp_path), "--participant-records", str(folder)])
    assert out.exit_code == 1 and "p003" in out.output and "missing from the audit log" in out.output
