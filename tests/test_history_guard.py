"""The history guard: participants that oppose the aggregate round after round are suspended, recorded,
and flagged; a participant that opposes it once is not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.ledger_helpers import find, read_lines, resign
from typer.testing import CliRunner

from trustfed.cli import app
from trustfed.config import validate_federation_config
from trustfed.coordinator.state import CoordinatorState, load_state, save_state
from trustfed.core.codec import ParamSpec, TensorSpec
from trustfed.core.history_guard import HistoryGuard, SuspensionRule
from trustfed.core.strategy import FedAvg, Update
from trustfed.errors import AggregationError, ConfigError
from trustfed.ledger.verify import verify_run
from trustfed.simulation import run_simulation

IDS = [f"p{i:03d}" for i in range(10)]
DIM = 40


def _guard(rounds: int = 3, aggregator: str = "centered_clipping", min_consistency: float = -1.0) -> HistoryGuard:
    return HistoryGuard(FedAvg(aggregator=aggregator), SuspensionRule(rounds=rounds, min_consistency=min_consistency))


def _round_updates(
    rnd: int,
    params: torch.Tensor,
    chosen: tuple[str, ...],
    opposed: dict[str, set[int]],
    erratic: dict[str, str] | None = None,
) -> list[Update]:
    """Honest deltas: a shared direction plus their own noise; ``opposed[pid]``: the rounds ``pid`` sends
    the shared direction reversed (at the honest norm). ``erratic[pid]``: ``"fresh"`` sends the shared
    direction plus a large new random push every round, ``"zero"`` sends no change (a free rider)."""
    g = torch.Generator().manual_seed(rnd)
    common = torch.ones(DIM) / DIM**0.5
    out = []
    for i, pid in enumerate(chosen):
        own = torch.Generator().manual_seed(1000 + int(pid[1:]))  # the same data every round
        noise = 0.8 * torch.randn(DIM, generator=own) / DIM**0.5 + 0.2 * torch.randn(DIM, generator=g) / DIM**0.5
        delta = -common + 0.1 * noise if rnd in opposed.get(pid, set()) else common + noise
        kind = (erratic or {}).get(pid)
        if kind == "fresh":
            delta = (
                0.5 * common + 2.0 * torch.randn(DIM, generator=torch.Generator().manual_seed(97 * rnd + i)) / DIM**0.5
            )
        elif kind == "zero":
            delta = torch.zeros(DIM)
        out.append(Update(pid, params + 0.01 * delta, 10))
    return out


def _run(
    guard: HistoryGuard, rounds: int, opposed: dict[str, set[int]], erratic: dict[str, str] | None = None
) -> list[tuple[str, ...]]:
    params = torch.zeros(DIM)
    chosen_per_round = []
    for rnd in range(1, rounds + 1):
        plan = guard.configure_round(rnd, params, IDS)
        chosen_per_round.append(plan.participants)
        res = guard.aggregate(plan, params, _round_updates(rnd, params, plan.participants, opposed, erratic))
        params = res.params
    return chosen_per_round


def test_a_persistent_opposer_is_suspended_after_k_rounds_and_never_selected_again() -> None:
    guard = _guard(rounds=3)
    chosen = _run(guard, 6, {"p003": set(range(1, 7))})
    assert list(guard.suspended) == ["p003"]
    s = guard.suspended["p003"]
    assert s.round == 3 and s.rounds == 3 and s.score < -0.5
    assert [("p003" in c) for c in chosen] == [True, True, True, False, False, False]
    assert [x.participant for x in guard.suspended_in(3)] == ["p003"] and guard.suspended_in(4) == []


def test_an_honest_outlier_that_opposes_once_is_not_suspended() -> None:
    guard = _guard(rounds=3)
    _run(guard, 6, {"p005": {2}})
    assert guard.suspended == {}
    assert min(guard.scores["p005"]) > 0  # its last three rounds agree with the aggregate again


def test_suspensions_never_reach_half_of_the_participants() -> None:
    guard = _guard(rounds=2, aggregator="mean")
    _run(guard, 4, {pid: set(range(1, 5)) for pid in IDS[:6]})  # a majority opposes: the guard cannot tell
    assert 2 * len(guard.suspended) < len(IDS)


def test_a_late_update_from_a_suspended_participant_is_refused_and_the_selection_keeps_its_indices() -> None:
    guard = _guard(rounds=1)
    _run(guard, 1, {"p003": {1}})
    assert "p003" in guard.suspended
    params = torch.zeros(DIM)
    plan = guard.inner.configure_round(2, params, IDS)  # a plan made as if p003 were still in
    updates = _round_updates(2, params, plan.participants, {})
    res = guard.aggregate(plan, params, updates)
    assert 3 not in res.aggregate.selected and all(0 <= i < len(updates) for i in res.aggregate.selected)
    assert res.metrics["num_suspended"] == 1.0


def test_participants_whose_updates_do_not_follow_from_their_last_are_suspended_for_inconsistency() -> None:
    erratic = {"p002": "fresh", "p006": "zero"}
    guard = _guard(rounds=3, min_consistency=0.3)
    chosen = _run(guard, 6, {}, erratic)
    assert set(guard.suspended) == {"p002", "p006"}
    for pid in ("p002", "p006"):
        s = guard.suspended[pid]
        assert (s.round, s.rounds, s.reason) == (4, 3, "inconsistent_updates")  # 3 scores need 4 updates
        assert s.score < 0.3 and "to its update before is below 0.3" in s.detail(guard.rule)
    assert [("p002" in c) for c in chosen] == [True] * 4 + [False] * 2
    honest = [min(h) for p, h in guard.consistency.items() if p not in erratic]
    assert min(honest) > 0.5  # the same data every round: consecutive updates agree
    assert min(guard.scores["p002"]) > -0.2  # it never opposed the aggregate: only the new rule sees it
    off = _guard(rounds=3)  # min_consistency -1 (the default): off, and no deltas kept
    _run(off, 6, {}, erratic)
    assert off.suspended == {} and off.previous == {} and off.consistency == {}


def test_state_round_trips_and_is_checked() -> None:
    guard = _guard(rounds=3)
    _run(guard, 4, {"p003": set(range(1, 5))})
    state = guard.state_dict()
    back = _guard(rounds=3)
    back.load_state_dict(state)
    assert back.suspended == guard.suspended
    assert {p: list(h) for p, h in back.scores.items()} == {p: list(h) for p, h in guard.scores.items()}
    with pytest.raises(AggregationError, match="unknown state keys"):
        back.load_state_dict({**state, "other": torch.zeros(1)})
    with pytest.raises(AggregationError, match=r"\[10, 2\]"):
        _guard(rounds=2).load_state_dict(state)


def test_the_consistency_state_round_trips_and_older_states_still_load() -> None:
    guard = _guard(rounds=3, min_consistency=0.3)
    _run(guard, 5, {}, {"p002": "fresh"})
    state = guard.state_dict()
    assert state["guard.previous"].shape == (len(IDS), DIM)
    back = _guard(rounds=3, min_consistency=0.3)
    back.load_state_dict(state)
    assert back.suspended == guard.suspended and back.suspended["p002"].reason == "inconsistent_updates"
    assert {p: list(h) for p, h in back.consistency.items()} == {p: list(h) for p, h in guard.consistency.items()}
    assert all(torch.equal(back.previous[p], guard.previous[p]) for p in guard.previous)
    # the next round scores the same way after a resume as without one
    params = torch.zeros(DIM)
    for g in (guard, back):
        plan = g.configure_round(6, params, IDS)
        g.aggregate(plan, params, _round_updates(6, params, plan.participants, {}))
    assert {p: list(h) for p, h in back.consistency.items()} == {p: list(h) for p, h in guard.consistency.items()}
    old = {k: v for k, v in state.items() if k not in ("guard.consistency", "guard.reason", "guard.previous")}
    older = _guard(rounds=3)
    older.load_state_dict(old)  # a checkpoint written before the consistency rule existed
    assert set(older.suspended) == {"p002"} and older.previous == {}
    with pytest.raises(AggregationError, match="reason outside"):
        back.load_state_dict({**state, "guard.reason": torch.full((len(IDS),), 7, dtype=torch.int64)})


def test_a_coordinator_checkpoint_keeps_the_suspensions(tmp_path: Path) -> None:
    guard = _guard(rounds=3)
    _run(guard, 4, {"p003": set(range(1, 5))})
    spec = ParamSpec((TensorSpec("w", (DIM,), "float32"),))
    folder = save_state(tmp_path, CoordinatorState(4, torch.zeros(DIM), spec, guard.name, guard.state_dict()))
    back = _guard(rounds=3)
    back.load_state_dict(load_state(folder).strategy_state)
    assert back.suspended == guard.suspended and set(back.scores) == set(guard.scores)
    assert "p003" not in back.configure_round(5, torch.zeros(DIM), IDS).participants


def test_the_rule_is_checked() -> None:
    with pytest.raises(AggregationError, match="rounds"):
        SuspensionRule(rounds=0)
    with pytest.raises(AggregationError, match="min_cosine"):
        SuspensionRule(min_cosine=2.0)
    with pytest.raises(AggregationError, match="min_consistency"):
        SuspensionRule(min_consistency=-1.5)
    raw = _raw()
    raw["strategy"] = {**raw["strategy"], "suspension": {"enabled": True, "min_consistency": 1.5}}
    with pytest.raises(ConfigError, match=r"strategy\.suspension\.min_consistency"):
        validate_federation_config(raw, "test")


def _raw(**over: Any) -> dict[str, Any]:
    """Non-IID MNIST-5k, 20 participants, 4 of them at the clipping radius, recorded with incentives."""
    raw: dict[str, Any] = {
        "federation": {"name": "guard", "rounds": 4, "participants": 20, "seed": 0},
        "data": {"dataset": "mnist5k", "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "strategy": {
            "aggregator": "centered_clipping",
            "aggregator_params": {"reject": 3.0, "max_cosine": 0.99, "clamp": 0.2},
            "min_participants": 2,
            "suspension": {"enabled": True},
        },
        "attack": {"kind": "clip_radius", "fraction": 0.2, "seed": 0},
        "ledger": {"enabled": True},
        "incentives": {"enabled": True, "reward_per_round": 1000},
    }
    raw.update(over)
    return raw


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("guard") / "run"
    run_simulation(validate_federation_config(_raw(), "test"), out, plot=False)
    return out


@pytest.fixture
def run(recorded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(recorded, tmp_path / "run"))


def test_the_suspension_is_recorded_flagged_and_verified(run: Path) -> None:
    bad = set(validate_federation_config(_raw(), "test").attack.malicious([f"p{i:03d}" for i in range(20)]))
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["suspensions"]) == bad  # the attackers at the clipping radius, nobody honest
    entries = [json.loads(line) for line in read_lines(run)]
    behaviour = [e for e in entries if e["kind"] == "participant_behaviour"]
    assert {e["body"]["participant"] for e in behaviour} == bad
    assert all(e["round"] == 3 and e["body"]["source"] == "suspension" for e in behaviour)
    assert all(e["body"]["reason"] == "persistent_opposition" and e["body"]["score"] < 0 for e in behaviour)
    flagged = {e["round"]: set(e["body"]["flagged"]) for e in entries if e["kind"] == "incentives"}
    assert bad <= flagged[3]
    plans = {e["round"]: set(e["body"]["participants"]) for e in entries if e["kind"] == "round_plan"}
    assert plans[3] >= bad and not plans[4] & bad
    report = verify_run(run)
    assert report.ok, report.failures
    assert report.checked["behaviour_records"] == len(bad)
    r = CliRunner().invoke(app, ["audit", "verify", str(run)])
    assert r.exit_code == 0, r.output


def test_attackers_that_change_direction_every_round_are_suspended_for_inconsistency(tmp_path: Path) -> None:
    raw = _raw(attack={"kind": "history_edge", "fraction": 0.2, "seed": 0})
    raw["federation"] = {**raw["federation"], "rounds": 5}
    raw["strategy"] = {**raw["strategy"], "suspension": {"enabled": True, "min_consistency": 0.3}}
    cfg = validate_federation_config(raw, "test")
    bad = set(cfg.attack.malicious([f"p{i:03d}" for i in range(20)]))
    run_simulation(cfg, tmp_path / "run", plot=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["suspensions"]) == bad  # nobody honest
    assert {(v["round"], v["reason"]) for v in metrics["suspensions"].values()} == {(4, "inconsistent_updates")}
    behaviour = [e for e in map(json.loads, read_lines(tmp_path / "run")) if e["kind"] == "participant_behaviour"]
    assert {e["body"]["participant"] for e in behaviour} == bad
    assert all(e["body"]["reason"] == "inconsistent_updates" and e["body"]["min_consistency"] == 0.3 for e in behaviour)
    report = verify_run(tmp_path / "run")
    assert report.ok, report.failures


def test_audit_verify_fails_a_log_that_selects_a_suspended_participant_again(run: Path) -> None:
    pid = json.loads(read_lines(run)[find(read_lines(run), "participant_behaviour", 3)])["body"]["participant"]
    resign(run, run / "keys" / "coordinator.pem", "round_plan", 4, lambda b: b["participants"].append(pid))
    failures = verify_run(run).failures
    assert any(f.field == "body.participants" and "suspended by the history guard" in f.message for f in failures)


def test_audit_verify_fails_a_suspension_left_unflagged(run: Path) -> None:
    pid = json.loads(read_lines(run)[find(read_lines(run), "participant_behaviour", 3)])["body"]["participant"]
    resign(run, run / "keys" / "coordinator.pem", "incentives", 3, lambda b: b["flagged"].remove(pid))
    assert any(f.field == "body.flagged" and f.round == 3 for f in verify_run(run).failures)


@pytest.mark.parametrize(
    ("section", "where"),
    [
        ({"secagg": {"enabled": True}}, "secagg.enabled"),
        ({"enclave": {"enabled": True}}, "enclave.enabled"),
        ({"privacy": {"mode": "central"}}, "privacy.mode"),
    ],
)
def test_the_config_refuses_the_guard_where_updates_are_not_in_the_clear(section: dict[str, Any], where: str) -> None:
    raw = _raw(**section)
    raw["strategy"] = {**raw["strategy"], "aggregator": "mean", "aggregator_params": {}}
    with pytest.raises(ConfigError, match=rf"{where}: strategy.suspension scores"):
        validate_federation_config(raw, "test")
    raw["strategy"]["suspension"] = {"enabled": False}
    validate_federation_config(raw, "test")  # without the guard the same file is fine


class _Opposed:
    """Wraps an honest participant's trainer: trains, then sends its delta reversed, every round."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.participant_id = inner.participant_id

    def fit(self, params: torch.Tensor, plan: Any) -> Update:
        u = self.inner.fit(params, plan)
        return Update(u.participant_id, (params - (u.params - params)).contiguous(), u.num_examples, dict(u.metrics))

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return dict(self.inner.evaluate(params))


def test_a_networked_coordinator_suspends_records_and_verifies(tmp_path: Path) -> None:
    from tests.test_hostile_uploads import raw, run_federation

    r = raw(ledger={"enabled": True}, incentives={"enabled": True})
    r["federation"]["rounds"] = 4
    r["strategy"] = {**r["strategy"], "suspension": {"enabled": True, "rounds": 2}}
    errors, metrics, run = run_federation(tmp_path, r, {}, wrap={"p002": _Opposed})
    assert errors == {}  # the suspended participant is simply not selected again
    assert set(metrics["suspensions"]) == {"p002"} and metrics["suspensions"]["p002"]["round"] == 2
    assert [("p002" in rnd["participants"]) for rnd in metrics["rounds"]] == [True, True, False, False]
    behaviour = [e for e in map(json.loads, read_lines(run)) if e["kind"] == "participant_behaviour"]
    assert [(e["round"], e["body"]["participant"], e["body"]["source"]) for e in behaviour] == [
        (2, "p002", "suspension")
    ]
    report = verify_run(run)
    assert report.ok, [str(f) for f in report.failures]
