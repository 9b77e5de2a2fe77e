"""Secure aggregation over gRPC + mutual TLS: participant processes reach the same model as the in-process
secure simulation; a participant lost after masking is left out of the sum; and both sides refuse
what the protocol must not accept (a substituted key in the roster, steps out of order, wrong
recipient sets, clear updates in a secure federation)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.participant_threads import run_with_participants

from trustfed.apps.builtin_parts import build_data, build_trainer, model_factory
from trustfed.config import load_federation_config, validate_federation_config
from trustfed.coordinator.local_federation import prepare, run_local_federation, write_participant_configs
from trustfed.coordinator.network import GrpcTransport
from trustfed.coordinator.run import spec_for
from trustfed.coordinator.secagg import SHARE_CIPHERTEXT_BYTES, SecAggRound
from trustfed.core.codec import flatten
from trustfed.core.strategy import RoundPlan
from trustfed.errors import AggregationError
from trustfed.participant.assembly import build_participant
from trustfed.participant.client import ParticipantClient
from trustfed.participant.rounds import ReceivedPlan
from trustfed.participant.secagg import SecAggParticipant
from trustfed.participant.settings import load_participant_config
from trustfed.secagg.protocol import SecAggError, share_points
from trustfed.secagg.settings import SecAggSettings
from trustfed.simulation import run_simulation
from trustfed.transport import federation_pb2 as pb
from trustfed.transport.errors import MessageRejected


def raw(participants: int = 3, rounds: int = 2, **secagg: Any) -> dict[str, Any]:
    return {
        "federation": {"name": "secagg-grpc", "rounds": rounds, "participants": participants, "seed": 6},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"local_epochs": 1, "batch_size": 64, "lr": 0.05},
        "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 2},
        "secagg": {"enabled": True, "clip": 0.5, "bits": 24, **secagg},
    }


def test_participant_processes_match_the_secure_simulation_and_the_run_verifies(tmp_path: Path) -> None:
    """Three participant processes, secure aggregation, central DP and the ledger: the same model as the
    secure simulation; each participant checks its commitment to its masked input in the root on chain."""
    from trustfed.ledger.verify import verify_run

    dp = {"mode": "central", "noise_multiplier": 0.8, "max_grad_norm": 0.1}  # each participant clips its own delta
    r = {**raw(), "ledger": {"enabled": True}, "privacy": dp}
    params, metrics = run_local_federation(r, tmp_path / "run", round_timeout_s=120)
    sim = run_simulation(validate_federation_config(r))
    assert torch.max(torch.abs(params - sim.params)).item() <= 1e-6
    assert metrics["model_hash"] == sim.metrics["model_hash"]
    assert [r["participants"] for r in metrics["rounds"]] == [["p000", "p001", "p002"]] * 2
    for pid in ("p000", "p001", "p002"):
        log = (tmp_path / "run" / "logs" / f"{pid}.log").read_text()
        assert "2 round(s), included in 2" in log
        assert "secure aggregation done (3 of 3 survived)" in log
        assert log.count("is included in the root on chain") == 2
    v = verify_run(tmp_path / "run")
    assert v.ok, [str(f) for f in v.failures]
    assert v.checked["commitments"] == 6 and v.checked["chain_rounds"] == 3


class Seen:
    """A RoundObserver keeping the updates the coordinator's round loop received."""

    def __init__(self) -> None:
        self.updates: list[list[tuple[str, dict[str, float]]]] = []
        self.start: list[torch.Tensor] = []

    def on_round_start(self, plan: Any, params: torch.Tensor) -> None:
        self.start.append(params.clone())

    def on_round_end(self, plan: Any, updates: Any, result: Any, record: Any) -> None:
        self.updates.append([(u.participant_id, dict(u.metrics)) for u in updates])


class Lost(Exception):
    """The participant vanishes after computing its masked input (it is never delivered)."""


@pytest.mark.parametrize(
    ("neighbours", "weighted"),
    [(0, False), (2, False), (0, True)],
    ids=["secagg", "secagg+ (2 neighbours each)", "weighted by examples"],
)
def test_a_participant_lost_after_masking_is_left_out_of_the_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, neighbours: int, weighted: bool
) -> None:
    ids = ["p000", "p001", "p002", "p003"]
    r = raw(participants=4, rounds=1, step_timeout_s=3.0, neighbours=neighbours, weighted=weighted)
    if weighted:  # unequal shards, so that the weights matter
        r["data"] = {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}}
    r["transport"] = {"linger_s": 1.0}
    fed = prepare(tmp_path, r, ids, round_timeout_s=60)
    cfg = load_federation_config(fed.federation_file)
    transport = GrpcTransport(cfg.transport.resolved(tmp_path), spec_for(cfg), max_workers=16, secagg=cfg.secagg)
    write_participant_configs(fed, transport.address, ids)
    real_upload = SecAggParticipant.upload_masked

    def upload(self: SecAggParticipant, y: np.ndarray, num_examples: int) -> None:
        if self.client.pid == "p003":
            raise Lost("p003 is gone")
        real_upload(self, y, num_examples)

    monkeypatch.setattr(SecAggParticipant, "upload_masked", upload)
    seen = Seen()

    def client_of(pid: str) -> ParticipantClient:
        return build_participant(load_participant_config(fed.participant_files[pid]))

    errors, (params, _) = run_with_participants(
        cfg, transport, ids, client_of, join_s=30, write=False, observers=[seen]
    )
    assert set(errors) == {"p003"} and isinstance(errors["p003"], Lost)
    assert seen.updates == [[("secagg", {"secagg_survivors": 3.0, "secagg_dropped": 1.0})]]
    # the three survivors' unweighted mean, trained here in the clear from the model the coordinator sent
    data = build_data(cfg)
    p0 = seen.start[0]
    assert torch.equal(
        p0, flatten(model_factory(cfg, data.train.input_shape, data.train.num_classes)().state_dict())[0]
    )
    plan = RoundPlan(1, tuple(ids), {})
    fits = {pid: build_trainer(cfg, data, pid).fit(p0.clone(), plan) for pid in ids}
    deltas = {pid: u.params - p0 for pid, u in fits.items()}
    w = torch.tensor([float(fits[p].num_examples) if weighted else 1.0 for p in ids])

    def mean_of(who: list[str]) -> torch.Tensor:
        k = [ids.index(p) for p in who]
        return p0 + (torch.stack([deltas[p] for p in who]) * w[k, None]).sum(0) / w[k].sum()

    # a few quantisation steps of the sum, divided by the sum of the weights (examples / max_weight)
    scale = 3 / (w[:3].sum().item() / cfg.secagg.max_weight) if weighted else 1.0
    assert torch.max(torch.abs(mean_of(ids[:3]) - params)).item() <= 3 * 2 * 0.5 / (2**24 - 1) * 4 * scale
    assert torch.max(torch.abs(mean_of(ids) - params)).item() > 1e-4


def test_too_few_after_a_step_fails_the_round(tmp_path: Path) -> None:
    ids = ["p000", "p001", "p002"]
    r = raw(participants=3, rounds=1, step_timeout_s=1.0, threshold=3)
    fed = prepare(tmp_path, r, ids, round_timeout_s=3)
    cfg = load_federation_config(fed.federation_file)
    transport = GrpcTransport(cfg.transport.resolved(tmp_path), spec_for(cfg), max_workers=8, secagg=cfg.secagg)
    try:
        # nobody checks in with keys: the keys step closes with 0 of threshold 3
        params = torch.zeros(transport.spec.size)
        with pytest.raises(AggregationError, match="secure aggregation failed: 0 participant"):
            transport.fit(RoundPlan(1, tuple(ids), {}), params)
    finally:
        transport.close()


# -- refusals, on each side


@pytest.fixture()
def federation(tmp_path: Path) -> Any:
    ids = ["p000", "p001", "p002"]
    fed = prepare(tmp_path, raw(participants=3), ids)
    write_participant_configs(fed, "127.0.0.1:1", ids)
    return fed


def _client(fed: Any, pid: str) -> ParticipantClient:
    return build_participant(load_participant_config(fed.participant_files[pid]))


def _plan(session: str = "s1") -> ReceivedPlan:
    plan = RoundPlan(1, ("p000", "p001", "p002"), {}, "h" * 64)
    raw_plan = pb.RoundPlan(status=pb.TRAIN, round=1, participants=list(plan.participants), session=session)
    return ReceivedPlan(1, plan, "", 0, 0, 0, raw_plan)


def _roster(fed: Any, rp: ReceivedPlan) -> tuple[list[SecAggParticipant], pb.SecAggReply]:
    sides = [SecAggParticipant(_client(fed, pid), SecAggSettings(enabled=True), rp) for pid in rp.plan.participants]
    reply = pb.SecAggReply(round=1, step=pb.SECAGG_KEYS, ready=True, session="s1")
    reply.roster.extend(s.advertisement() for s in sides)
    return sides, reply


def test_the_roster_check_accepts_the_signed_keys(federation: Any) -> None:
    sides, reply = _roster(federation, _plan())
    roster = sides[0].check_roster(reply)
    assert sorted(roster) == [1, 2, 3]
    assert roster[2] == sides[1].protocol.advertise_keys()
    assert set(sides[0].protocol.share_keys(roster)) == {2, 3}


def test_a_substituted_key_in_the_roster_is_refused(federation: Any) -> None:
    sides, reply = _roster(federation, _plan())
    body = pb.SecAggKeys.FromString(reply.roster[1].body)
    body.mask_pk = bytes(32)  # the coordinator swaps p001's mask key for one it knows
    reply.roster[1].body = body.SerializeToString()
    with pytest.raises(SecAggError, match="does not verify"):
        sides[0].check_roster(reply)
    # ... nor may it sign p001's keys itself, nor pass p001's keys off as another share point
    _, reply = _roster(federation, _plan())
    body = pb.SecAggKeys.FromString(reply.roster[1].body)
    body.index = 3
    reply.roster[1].CopyFrom(sides[1].client.relay_signer.sign("secagg_keys", 1, body.SerializeToString()))
    with pytest.raises(SecAggError, match="wrong index"):
        sides[0].check_roster(reply)


def test_keys_from_another_session_are_refused(federation: Any) -> None:
    _, reply = _roster(federation, _plan(session="s0"))
    fresh = SecAggParticipant(_client(federation, "p000"), SecAggSettings(enabled=True), _plan("s1"))
    with pytest.raises(SecAggError, match="wrong session"):
        fresh.check_roster(reply)


def test_different_survivor_sets_for_different_participants_are_caught(federation: Any) -> None:
    """The consistency check: every survivor signs the set it was shown; a participant unmasks only when
    threshold survivors signed exactly its own set."""
    from trustfed.secagg.protocol import TooFewParticipants

    rp = _plan()
    sides, _ = _roster(federation, rp)  # p000, p001, p002 at share points 1, 2, 3; threshold 2

    def copies(*sets: list[int]) -> pb.SecAggReply:
        reply = pb.SecAggReply(round=1, step=pb.SECAGG_CONSISTENCY, ready=True, session="s1")
        reply.consistency.extend(side.sign_survivors(s) for side, s in zip(sides, sets, strict=False))
        return reply

    sides[0].check_consistency([1, 2, 3], copies([1, 2, 3], [1, 2, 3], [1, 2, 3]))  # all saw the same set
    with pytest.raises(SecAggError, match="another survivor set"):  # p001 was told 3 had dropped
        sides[0].check_consistency([1, 2, 3], copies([1, 2, 3], [1, 2]))
    with pytest.raises(TooFewParticipants, match="1 survivor"):
        sides[0].check_consistency([1, 2, 3], copies([1, 2, 3]))
    with pytest.raises(SecAggError, match="my own copy"):
        reply = copies([1, 2, 3], [1, 2, 3], [1, 2, 3])
        del reply.consistency[0]
        sides[0].check_consistency([1, 2, 3], reply)
    reply = copies([1, 2, 3], [1, 2, 3])
    body = pb.SecAggSurvivors.FromString(reply.consistency[1].body)
    body.survivors[:] = [1, 2]  # the coordinator edits a copy: its signature no longer holds
    reply.consistency[1].body = body.SerializeToString()
    with pytest.raises(SecAggError, match="does not verify"):
        sides[0].check_consistency([1, 2, 3], reply)


def test_the_coordinator_refuses_out_of_order_and_malformed_steps(federation: Any) -> None:
    rp = _plan()
    sides, reply = _roster(federation, rp)
    sa = SecAggRound.open(SecAggSettings(enabled=True), rp.plan, "s1", 10)
    adverts = {s.client.pid: (m, pb.SecAggKeys.FromString(m.body)) for s, m in zip(sides, reply.roster, strict=True)}
    with pytest.raises(MessageRejected, match="at the 'keys' step"):
        sa.submit_shares("p000", {})
    with pytest.raises(MessageRejected, match="wrong participant_id, index"):
        sa.submit_keys("p001", *adverts["p000"])  # p000's advertisement sent as p001
    for pid, (m, body) in adverts.items():
        assert sa.submit_keys(pid, m, body)
    assert not sa.submit_keys("p000", *adverts["p000"])  # a retry of the same message is a poll
    assert sa.joined("p000") and not sa.joined("p999")  # a joined participant is not served the plan again
    other = SecAggParticipant(_client(federation, "p000"), SecAggSettings(enabled=True), rp).advertisement()
    with pytest.raises(MessageRejected, match="already advertised other keys"):
        sa.submit_keys("p000", other, pb.SecAggKeys.FromString(other.body))
    with pytest.raises(MessageRejected, match="not selected"):
        sa.submit_keys("p999", *adverts["p000"])
    sa.close("keys")
    assert share_points(rp.plan.participants)["p002"] == 3
    good = {2: b"\0" * SHARE_CIPHERTEXT_BYTES, 3: b"\0" * SHARE_CIPHERTEXT_BYTES}
    with pytest.raises(MessageRejected, match="wrong set of recipients"):
        sa.submit_shares("p000", {2: good[2]})
    with pytest.raises(MessageRejected, match="bytes"):
        sa.submit_shares("p000", {2: b"short", 3: good[3]})
    assert sa.submit_shares("p000", good)
    with pytest.raises(MessageRejected, match="already sent other shares"):
        sa.submit_shares("p000", {2: good[2], 3: b"\1" * SHARE_CIPHERTEXT_BYTES})
    with pytest.raises(MessageRejected, match="at the 'shares' step"):
        sa.check_masked("p000")
    with pytest.raises(SecAggError, match="1 participant"):  # threshold 2 of 3
        sa.close("shares")
    with pytest.raises(MessageRejected, match="failed"):
        sa.reply("p000", pb.SECAGG_SHARES)


def test_clear_updates_are_refused_in_a_secure_federation(tmp_path: Path) -> None:
    """A participant that uploads its update in the clear is refused by name, the round goes on."""
    from trustfed.participant.rounds import RoundGone

    ids = ["p000", "p001"]
    r = raw(participants=2, rounds=1, step_timeout_s=1.0)
    fed = prepare(tmp_path, r, ids, round_timeout_s=5)
    cfg = load_federation_config(fed.federation_file)
    transport = GrpcTransport(cfg.transport.resolved(tmp_path), spec_for(cfg), max_workers=8, secagg=cfg.secagg)
    write_participant_configs(fed, transport.address, ids)
    client = build_participant(load_participant_config(fed.participant_files["p000"]))
    client.secagg = None  # this participant ignores [secagg] and uploads in the clear
    got: list[BaseException] = []

    def run() -> None:
        try:
            client.run()
        except BaseException as exc:  # asserted below
            got.append(exc)

    th = threading.Thread(target=run)
    th.start()
    try:
        transport.wait_for_participants(["p000"], 20)
        params = flatten(model_factory(cfg, (64,), 10)().state_dict())[0]
        with pytest.raises(AggregationError, match="secure aggregation failed"):
            transport.fit(RoundPlan(1, ("p000", "p001"), {}), params)
    finally:
        transport.close()
        th.join(30)
        client.close()
    assert got and not isinstance(got[0], RoundGone)
    assert "upload the masked input only" in str(got[0])


def test_the_benchmark_runs_and_its_sums_hold(tmp_path: Path) -> None:
    """benchmarks/secagg.py at its smallest size (no network part): the secure sums it times are right."""
    import json
    import subprocess
    import sys

    pytest.importorskip("flwr", reason="flwr (dev extra, Flower's masks are the peer) not installed")
    out = tmp_path / "secagg.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "secagg.py"
    subprocess.run(
        [sys.executable, str(script), "--quick", "--no-network", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    got = json.loads(out.read_text())
    assert [r["dropped_after_masking"] for r in got["protocol"]] == [0, 1]
    assert all(r["max_abs_error"] <= r["n"] * r["quantisation_step"] for r in got["protocol"])
    assert got["masks"][0]["seed_bits"] == {"trustfed": 256, "flower": 32}
