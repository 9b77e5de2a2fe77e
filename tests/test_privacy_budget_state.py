"""A participant's privacy spend persists in its own state file, so a restarted participant resumes it.

In process: the trainers the networked participant builds (``build_trainer(..., budget_state_dir=)``),
restarted by building them again from the same folder. Over the real gRPC path (slow): participant
processes doing local DP-SGD, then the same federation again in the same folder, where a participant
whose file holds most of its budget withdraws.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy_helpers import digits_dpsgd_trainer
from trustfed.config import FederationConfig, validate_federation_config
from trustfed.coordinator.engine import Coordinator
from trustfed.core.codec import flatten
from trustfed.core.strategy import RoundPlan
from trustfed.privacy.accounting import GaussianSteps, epsilon
from trustfed.privacy.budget import BudgetExhausted
from trustfed.privacy.budget_state import STATE_FORMAT, BudgetStateError, BudgetStateFile
from trustfed.privacy.dpsgd import CentralBudgetTrainer, DPSGDTrainer
from trustfed.privacy.report import PrivacyRecorder, load_records, summarize


def _dpsgd(state: Path, budget: float | None) -> tuple[DPSGDTrainer, torch.Tensor]:
    return digits_dpsgd_trainer(budget, hidden=16, budget_state=BudgetStateFile.in_dir(state, "p007"))


def test_restarted_dpsgd_participant_resumes_its_spend(tmp_path: Path) -> None:
    t, params = _dpsgd(tmp_path, None)
    event = t.plan_event(t.config)
    t.fit(params, RoundPlan(1, ("p007",), {}))
    t.fit(params, RoundPlan(2, ("p007",), {}))
    path = tmp_path / "p007.privacy-budget.json"
    doc = json.loads(path.read_text())
    assert doc["format"] == STATE_FORMAT and doc["participant_id"] == "p007" and doc["last_round"] == 2
    assert [e["round"] for e in doc["events"]] == [1, 2] and doc["events"][0]["steps"] == event.steps
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f".{path.name}.lock", path.name]  # the lock file stays; no temporary file left behind
    restarted, _ = _dpsgd(tmp_path, None)  # a new process: same folder, fresh objects
    assert restarted.guard.accountant.history == [event, event]
    assert restarted.guard.spent() == pytest.approx(epsilon([event] * 2, 1e-5))
    upd = restarted.fit(params, RoundPlan(3, ("p007",), {}))
    assert upd.metrics["dp_epsilon"] == pytest.approx(epsilon([event] * 3, 1e-5))


def test_participant_whose_file_holds_most_of_its_budget_refuses_the_next_round(tmp_path: Path) -> None:
    t, params = _dpsgd(tmp_path, None)
    event = t.plan_event(t.config)
    one, two = epsilon([event], 1e-5), epsilon([event] * 2, 1e-5)
    # the state another process of this participant left behind: one round already spent
    BudgetStateFile.in_dir(tmp_path, "p007").save("p007", "rdp", 1e-5, 4, [_step(4, event)])
    before = (tmp_path / "p007.privacy-budget.json").read_bytes()
    t, params = _dpsgd(tmp_path, (one + two) / 2)  # room for one round in all, which is spent
    model_before = flatten(t.model.state_dict())[0]
    with pytest.raises(BudgetExhausted, match=r"p007 withdrew: round 5 would raise its privacy spend from epsilon"):
        t.fit(params, RoundPlan(5, ("p007",), {}))
    assert torch.equal(flatten(t.model.state_dict())[0], model_before)  # nothing trained
    assert (tmp_path / "p007.privacy-budget.json").read_bytes() == before  # nothing recorded


def _step(rnd: int, event: GaussianSteps) -> Any:
    from trustfed.privacy.budget_state import RecordedStep

    return RecordedStep(rnd, event)


def _cfg(privacy: dict[str, Any], rounds: int = 2) -> FederationConfig:
    raw = {
        "federation": {"name": "dp-state", "rounds": rounds, "participants": 3, "seed": 0},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"local_epochs": 1, "batch_size": 64, "lr": 0.1, "momentum": 0.0},
        "strategy": {"name": "fedavg", "min_participants": 1},
        "privacy": privacy,
    }
    return validate_federation_config(raw, "test")


def _run(cfg: FederationConfig, state: Path, out: Path) -> list[dict[str, Any]]:
    """One run of the participants a networked deployment builds (their spend kept in ``state``)."""
    from trustfed.apps.runtime import Runtime
    from trustfed.config import participant_ids
    from trustfed.simulation.transports import InProcessTransport

    rt = Runtime(cfg)
    params, spec = rt.initial
    trainers = {pid: rt.simulated_trainer(pid, budget_state_dir=state) for pid in participant_ids(3)}
    recorder = PrivacyRecorder(out / "privacy.jsonl", cfg.privacy.mode)
    strategy = rt.strategy(rt.evaluate_fn())
    transport = InProcessTransport(trainers)
    Coordinator(strategy, transport, params, spec, observers=[recorder]).run(cfg.federation.rounds)
    transport.close()
    return load_records(out)


@pytest.mark.parametrize("mode", ["local", "central"])
def test_restarted_participant_withdraws_cleanly_when_its_file_says_the_budget_is_spent(
    tmp_path: Path, mode: str
) -> None:
    z = 1.5 if mode == "local" else 1.0
    free = _cfg({"mode": mode, "noise_multiplier": z})
    first = _run(free, tmp_path / "state", tmp_path / "run1")
    spent = {r["party"]: r["epsilon"] for r in first if r["kind"] == "participant" and r["round"] == 2}
    assert set(spent) == {"p000", "p001", "p002"}
    for pid in spent:
        doc = json.loads((tmp_path / "state" / f"{pid}.privacy-budget.json").read_text())
        assert [e["round"] for e in doc["events"]] == [1, 2]
    # the participants restart (new objects, same state folder); p001's budget leaves room for less than a round
    tight = _cfg({"mode": mode, "noise_multiplier": z, "budgets": {"p001": {"epsilon": spent["p001"] * 1.01}}})
    second = _run(tight, tmp_path / "state", tmp_path / "run2")
    p1 = [r for r in second if r["party"] == "p001"]
    assert [(r["round"], r["kind"]) for r in p1] == [(1, "absent")]  # withdrew in round 1, never trained again
    p0 = [r for r in second if r["party"] == "p000"]
    assert [r["round"] for r in p0] == [1, 2] and p0[0]["epsilon"] > spent["p000"]  # resumed, not restarted
    doc = json.loads((tmp_path / "state" / "p001.privacy-budget.json").read_text())
    assert len(doc["events"]) == 2  # the refused round recorded nothing
    assert summarize(first) and all(s.verified for s in summarize(first))


def test_central_budget_trainer_resumes_its_last_accounted_round(tmp_path: Path) -> None:
    class _Plain:
        participant_id = "p000"

        def fit(self, params: torch.Tensor, plan: RoundPlan) -> Any:
            from trustfed.core.strategy import Update

            return Update("p000", params, 1)

        def evaluate(self, params: torch.Tensor) -> dict[str, float]:
            return {}

    state = BudgetStateFile.in_dir(tmp_path, "p000")
    plan = {"dp_central_noise_multiplier": 1.0, "dp_central_sample_rate": 0.5}
    t = CentralBudgetTrainer(_Plain(), None, 1e-5, budget_state=state)
    t.fit(torch.zeros(2), RoundPlan(3, ("p000",), plan))  # rounds 1..3 count under sampling
    again = CentralBudgetTrainer(_Plain(), None, 1e-5, budget_state=state)
    assert again.accounted_round == 3
    assert again.plan_event(RoundPlan(5, ("p000",), plan)) == GaussianSteps(1.0, 0.5, 2)  # rounds 4 and 5
    # a new run (round numbers start again) counts every round of it so far, never fewer
    assert again.plan_event(RoundPlan(2, ("p000",), plan)) == GaussianSteps(1.0, 0.5, 2)


def test_two_processes_spending_one_participants_budget_are_caught(tmp_path: Path) -> None:
    """Each guard saves only over the file it read (compare and swap under a lock): the second of two
    guards that loaded the same state refuses to overwrite the first one's spend."""
    from trustfed.privacy.budget import BudgetGuard

    first = BudgetGuard("p000", 10.0, 1e-5, state=BudgetStateFile.in_dir(tmp_path, "p000"))
    second = BudgetGuard("p000", 10.0, 1e-5, state=BudgetStateFile.in_dir(tmp_path, "p000"))
    first.record(GaussianSteps(1.0, 0.1, 10), 1)
    before = (tmp_path / "p000.privacy-budget.json").read_bytes()
    with pytest.raises(BudgetStateError, match="another process is spending"):
        second.record(GaussianSteps(1.0, 0.1, 10), 1)
    assert (tmp_path / "p000.privacy-budget.json").read_bytes() == before  # nothing already stored is lost
    first.record(GaussianSteps(1.0, 0.1, 10), 2)  # the one that wrote last goes on
    again = BudgetGuard("p000", 10.0, 1e-5, state=BudgetStateFile.in_dir(tmp_path, "p000"))
    assert again.last_round == 2 and len(again.steps) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not UTF-8 JSON"),
        (b"[]", "(top level)"),
        (json.dumps({"format": "other"}).encode(), "format"),
        (None, "belongs to participant 'p999'"),
        ("negative", "events.0.noise_multiplier"),
        ("future", "after last_round"),
        ("extra", "events.0.extra"),
    ],
)
def test_corrupt_state_file_is_an_error_naming_it(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "p007.privacy-budget.json"
    good = {
        "format": STATE_FORMAT,
        "participant_id": "p007",
        "accountant": "rdp",
        "delta": 1e-5,
        "last_round": 1,
        "events": [{"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 4}],
    }
    if content is None:
        content = json.dumps({**good, "participant_id": "p999"}).encode()
    elif content == "negative":
        content = json.dumps({**good, "events": [{**good["events"][0], "noise_multiplier": -1.0}]}).encode()
    elif content == "future":
        content = json.dumps({**good, "last_round": 0}).encode()
    elif content == "extra":
        content = json.dumps({**good, "events": [{**good["events"][0], "extra": 1}]}).encode()
    path.write_bytes(content)
    with pytest.raises(BudgetStateError) as info:
        _dpsgd(tmp_path, 10.0)
    text = str(info.value)
    assert str(path) in text and message in text and "not silently reset" in text
    path.write_bytes(json.dumps(good).encode())
    t, _ = _dpsgd(tmp_path, 10.0)  # the well-formed file loads
    assert t.guard.accountant.history == [GaussianSteps(1.0, 0.5, 4)]


def test_participant_file_defaults_its_state_folder_to_its_own(tmp_path: Path) -> None:
    from trustfed.participant.settings import load_participant_config

    for name in ("ca.pem", "p.pem", "p.key", "federation.toml"):
        (tmp_path / name).write_text("")
    body = (
        '[participant]\nid = "p000"\ncoordinator = "127.0.0.1:1"\nfederation_config = "federation.toml"\n'
        '[tls]\nca = "ca.pem"\ncert = "p.pem"\nkey = "p.key"\n'
    )
    (tmp_path / "p.toml").write_text(body)
    cfg = load_participant_config(tmp_path / "p.toml")
    assert cfg.state is not None and cfg.state.dir == tmp_path
    (tmp_path / "q.toml").write_text(body + '[state]\ndir = "state"\n')
    cfg = load_participant_config(tmp_path / "q.toml")
    assert cfg.state is not None and cfg.state.dir == tmp_path / "state"


# ------------------------------------------------------------------ over gRPC, participant processes
@pytest.mark.slow
def test_local_dpsgd_over_grpc_and_a_restarted_participant_resumes_its_spend(tmp_path: Path) -> None:
    """Two runs of the same federation in the same folder: the participants' state files
    (``OUT/participants/<id>.privacy-budget.json``) survive, and in the second run p001, whose budget
    the first run nearly spent, withdraws in round 1 while the others train on."""
    from trustfed.coordinator.local_federation import run_local_federation
    from trustfed.simulation import run_simulation

    privacy: dict[str, Any] = {"mode": "local", "noise_multiplier": 1.5, "max_grad_norm": 1.0}
    raw: dict[str, Any] = {
        "federation": {"name": "dp-grpc", "rounds": 2, "participants": 3, "seed": 0},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"local_epochs": 1, "batch_size": 64, "lr": 0.1, "momentum": 0.0},
        "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 1},
        "privacy": {**privacy, "budgets": {"p001": {"epsilon": 2.4}}},  # 1.79 after one round, 2.26 after two
    }
    out = tmp_path / "run"
    params, _ = run_local_federation(raw, out, round_timeout_s=120)
    sim = run_simulation(validate_federation_config(raw))
    assert torch.max(torch.abs(params - sim.params)).item() <= 1e-6  # DP-SGD through gRPC = in process
    first = load_records(out)
    assert {r["party"] for r in first if r["kind"] == "participant"} == {"p000", "p001", "p002"}
    for pid in ("p000", "p001", "p002"):
        doc = json.loads((out / "participants" / f"{pid}.privacy-budget.json").read_text())
        assert [e["round"] for e in doc["events"]] == [1, 2]
    # the same federation again, same folder: every participant process starts afresh
    run_local_federation(raw, out, round_timeout_s=120)
    second = load_records(out)
    assert [(r["round"], r["kind"]) for r in second if r["party"] == "p001"] == [(1, "absent")]
    p0 = [r for r in second if r["party"] == "p000"]
    assert [r["round"] for r in p0] == [1, 2] and p0[0]["epsilon"] > max(
        r["epsilon"] for r in first if r["party"] == "p000"
    )
    assert "withdraws in round 1" in (out / "logs" / "p001.log").read_text()


_events = st.lists(
    st.tuples(
        st.integers(0, 10_000),
        st.floats(0.01, 100, allow_nan=False),
        st.floats(1e-6, 1.0, allow_nan=False),
        st.integers(0, 10_000),
    ),
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(_events, st.floats(1e-9, 0.5), st.sampled_from(["rdp", "pld", "prv"]))
def test_state_encoding_roundtrips(events: list[tuple[int, float, float, int]], delta: float, acc: str) -> None:
    from trustfed.privacy.budget_state import BudgetState, RecordedStep, decode_budget_state, encode_budget_state

    steps = tuple(RecordedStep(r, GaussianSteps(z, q, n)) for r, z, q, n in events)
    state = BudgetState("p001", acc, delta, max([r for r, *_ in events], default=0), steps)
    assert decode_budget_state(encode_budget_state(state), "f", "p001") == state


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_state_parser_refuses_garbage_with_its_own_error(data: bytes) -> None:
    from trustfed.privacy.budget_state import decode_budget_state

    with pytest.raises(BudgetStateError, match="not silently reset"):
        decode_budget_state(data, "f", "p001")
