from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trustfed.apps.runtime import Runtime
from trustfed.config import participant_ids, validate_federation_config
from trustfed.coordinator.engine import Coordinator
from trustfed.coordinator.ha import FileLease, LeadershipLost, run_as_leader
from trustfed.coordinator.state import CheckpointObserver, latest_state, list_checkpoints, load_state
from trustfed.errors import CheckpointError
from trustfed.simulation.transports import InProcessTransport

RAW = {
    "federation": {"rounds": 4, "participants": 3, "seed": 2},
    "data": {"dataset": "synthetic", "partition": {"kind": "iid"}},
    "training": {"local_epochs": 1},
    "strategy": {"name": "fedadam", "server_lr": 0.05},
}


def make_coordinator(ckpt: Path | None, raw: dict[str, object] = RAW) -> Coordinator:
    cfg = validate_federation_config(raw)
    rt = Runtime(cfg)
    params, spec = rt.initial
    strategy = rt.strategy(rt.evaluate_fn())
    trainers = {pid: rt.simulated_trainer(pid) for pid in participant_ids(3)}
    observers = [CheckpointObserver(ckpt, strategy, spec)] if ckpt else []
    return Coordinator(strategy, InProcessTransport(trainers), params, spec, observers=observers)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_standby_takes_over_and_finishes_with_the_same_model(tmp_path: Path) -> None:
    reference = make_coordinator(None)
    reference.run(4)

    clock = FakeClock()
    lease_path, ckpt = tmp_path / "lease.json", tmp_path / "ckpt"
    primary = FileLease(lease_path, "coord-a", ttl=10, clock=clock)
    standby = FileLease(lease_path, "coord-b", ttl=10, clock=clock)

    a = make_coordinator(ckpt)
    assert primary.try_acquire() and primary.epoch == 1
    a.run(2)  # then coord-a crashes: it stops renewing
    assert not standby.try_acquire()  # the lease is still valid
    clock.t += 11
    b = make_coordinator(ckpt)
    run_as_leader(b, standby, ckpt, total_rounds=4, heartbeat=False)
    assert standby.epoch == 2
    assert b.round == 4
    assert torch.equal(b.params, reference.params)  # optimizer moments restored too
    # the old leader finds out it lost the lease
    assert not primary.renew()
    with pytest.raises(LeadershipLost):
        _lost(a, primary, ckpt)


def _lost(coord: Coordinator, lease: FileLease, ckpt: Path) -> None:
    # a stale leader that skips the election (e.g. woke from a long pause) is stopped by renew()
    lease.try_acquire = lambda: True  # type: ignore[method-assign]
    run_as_leader(coord, lease, ckpt, total_rounds=6, heartbeat=False)


def test_checkpoints_verify_and_report_tampering(tmp_path: Path) -> None:
    c = make_coordinator(tmp_path)
    c.run(4)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round_0002", "round_0003", "round_0004"]
    state = latest_state(tmp_path)
    assert state is not None and state.round == 4 and torch.equal(state.params, c.params)
    assert set(state.strategy_state) == {"m", "v", "t"}

    model = tmp_path / "round_0004" / "model.f32"
    data = bytearray(model.read_bytes())
    data[10] ^= 0x40
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.f32: SHA-256 does not match"):
        load_state(tmp_path / "round_0004")

    (tmp_path / "round_0003" / "strategy.m.bin").unlink()
    with pytest.raises(CheckpointError, match=r"strategy\.m\.bin: missing"):
        load_state(tmp_path / "round_0003")

    manifest = tmp_path / "round_0002" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["files"]["../escape"] = {"sha256": "", "bytes": 0}
    manifest.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="not allowed"):
        load_state(tmp_path / "round_0002")


def test_resume_refuses_a_different_federation(tmp_path: Path) -> None:
    make_coordinator(tmp_path).run(1)
    state = latest_state(tmp_path)
    assert state is not None
    other = make_coordinator(None)
    other.strategy.name = "fedyogi"
    from trustfed.coordinator.state import resume

    with pytest.raises(CheckpointError, match="strategy"):
        resume(other, state)


@pytest.mark.parametrize(
    "extra",
    [
        {"privacy": {"mode": "central", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "budget_epsilon": 1e6}},
        {"strategy": {"name": "fedavg", "aggregator": "centered_clipping", "aggregator_params": {"momentum": 0.9}}},
    ],
    ids=["central-dp", "stateful-aggregator"],
)
def test_wrapped_and_aggregator_state_round_trips_through_checkpoints(tmp_path: Path, extra: dict[str, object]) -> None:
    """Wrappers nest their state keys ("inner.x", "dp.history", "aggregator.centre"): checkpoints keep them."""
    coord = make_coordinator(tmp_path, {**RAW, **extra})
    coord.run(2)
    state = load_state(list_checkpoints(tmp_path)[-1])
    saved = coord.strategy.state_dict()
    assert any("." in k for k in saved) and set(state.strategy_state) == set(saved)
    for k, v in saved.items():
        assert torch.equal(state.strategy_state[k], v), k
