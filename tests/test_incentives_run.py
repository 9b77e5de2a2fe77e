"""Incentives driven by a recorded run: contributions, reputation and rewards each round, in the audit
log and on the embedded chain, recomputed by ``audit verify``; tampering on either side is located."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from tests.ledger_helpers import find, has, read_lines, rechain, resign, write_lines

from trustfed.config import validate_federation_config
from trustfed.errors import ConfigError
from trustfed.incentives.book import REPUTATION_SCALE, IncentiveBook, selection_shares
from trustfed.incentives.scoring import IncentiveError, ReputationPolicy
from trustfed.ledger.backends import EmbeddedLedger
from trustfed.ledger.records import LedgerError
from trustfed.ledger.verify import verify_run
from trustfed.simulation import run_simulation

AUDIT = "audit.jsonl"


def raw_config(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "federation": {"name": "incentives", "rounds": 3, "participants": 5, "seed": 2},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"local_epochs": 1, "batch_size": 64, "lr": 0.05},
        "strategy": {
            "name": "fedavg",
            "min_participants": 3,
            "aggregator": "multi_krum",
            "aggregator_params": {"num_malicious": 1},
        },
        "ledger": {"enabled": True},
        "incentives": {"enabled": True, "reward_per_round": 1000},
        "attack": {"kind": "free_rider", "fraction": 0.2, "seed": 0},
    }
    raw.update(over)
    return raw


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inc") / "run"
    run_simulation(validate_federation_config(raw_config(), "test"), out)
    return out


@pytest.fixture
def run(recorded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(recorded, tmp_path / "run"))


def _bodies(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line)["body"] for line in read_lines(run) if json.loads(line)["kind"] == "incentives"]


def test_a_recorded_run_pays_contributors_on_chain_and_verifies(recorded: Path) -> None:
    from trustfed.attacks.settings import AttackSettings

    (rider,) = AttackSettings(kind="free_rider", fraction=0.2, seed=0).malicious([f"p{i:03d}" for i in range(5)])
    bodies = _bodies(recorded)
    assert len(bodies) == 3 and {b["source"] for b in bodies} == {"coordinator"}
    for b in bodies:
        assert sum(b["rewards"].values()) == 1000
        assert b["rewards"][rider] == 0 and b["contributions"][rider] == pytest.approx(0.0, abs=1e-6)
    ledger = EmbeddedLedger(recorded / "ledger", read_only=True)
    accounts = {f"p{i:03d}": ledger.account(f"p{i:03d}") for i in range(5)}
    assert sum(a.balance for a in accounts.values()) == 3000 and accounts[rider].balance == 0
    assert accounts[rider].reputation < min(a.reputation for p, a in accounts.items() if p != rider)
    assert accounts[rider].reputation < 0.5 * REPUTATION_SCALE  # below where everybody started
    v = verify_run(recorded)
    assert v.ok, [str(f) for f in v.failures]
    assert v.checked["incentive_rounds"] == 3 and v.checked["incentive_accounts"] == 6


def _resign(run: Path, rnd: int, edit: Any) -> int:
    """Edit round ``rnd``'s incentives entry, re-signed with the coordinator's own key (kept in
    RUN_DIR/keys in a simulation)."""
    return resign(run, run / "keys" / "coordinator.pem", "incentives", rnd, edit)


@pytest.mark.parametrize(
    ("field", "edit"),
    [
        ("body.rewards", lambda b: b["rewards"].update(p000=b["rewards"]["p000"] + 1, p001=b["rewards"]["p001"] - 1)),
        ("body.reputation_ppm", lambda b: b["reputation_ppm"].update(p003=b["reputation_ppm"]["p003"] + 10)),
        ("body.flagged", lambda b: b.update(flagged=[])),
        ("body.contributions", lambda b: b["contributions"].update(p009=0.0)),
    ],
)
def test_a_coordinator_that_signs_other_numbers_is_caught(run: Path, field: str, edit: Any) -> None:
    i = _resign(run, 2, edit)
    v = verify_run(run)
    assert has(v.failures, file=AUDIT, line=i + 1, rnd=2, field=field), [str(f) for f in v.failures]
    assert not has(v.failures, file=AUDIT, field="sig")  # a valid signature: the numbers give it away


def test_a_transaction_outside_the_rules_is_caught_on_chain(run: Path) -> None:
    ledger = EmbeddedLedger(run / "ledger")
    ledger.apply_incentives(3, ["p004"], [0], [500])  # the admin key pays p004 extra, outside any round's entry
    v = verify_run(run)
    assert has(v.failures, file="chain", field="incentives.p004")
    assert [f.field for f in v.failures] == ["incentives.p004"]


def test_a_deleted_incentives_entry_is_reported(run: Path) -> None:
    lines = read_lines(run)
    i = find(lines, "incentives", 2)
    write_lines(run, rechain(lines[:i] + lines[i + 1 :], i))
    v = verify_run(run)
    assert any(f.field == "incentives" and f.round == 2 for f in v.failures)


def test_config_needs_the_ledger_and_refuses_flagging_under_krum() -> None:
    with pytest.raises(ConfigError, match=r"incentives.enabled: needs \[ledger\] enabled"):
        validate_federation_config(raw_config(ledger={"enabled": False}))
    krum = raw_config()
    krum["strategy"] = {**krum["strategy"], "aggregator": "krum"}
    with pytest.raises(ConfigError, match=r"incentives\.flag_unselected: krum keeps a single update"):
        validate_federation_config(krum)
    krum["incentives"] = {"enabled": True, "flag_unselected": False}
    validate_federation_config(krum)
    with pytest.raises(ConfigError, match=r"incentives\.reward_per_round"):
        validate_federation_config(raw_config(incentives={"enabled": True, "reward_per_round": -1}))


# ------------------------------------------------------------------ the book on its own


def test_book_pays_the_whole_pool_to_the_unflagged_by_contribution_times_reputation() -> None:
    book = IncentiveBook(ReputationPolicy(decay=0.5, penalty=0.5, initial=0.5))
    r1 = book.apply(1, ["a", "b", "c"], {"a": 0.6, "b": 0.4, "c": 0.0}, {"c"}, 1001)
    assert sum(r1.rewards.values()) == 1001 and r1.rewards["c"] == 0 and r1.rewards["a"] > r1.rewards["b"]
    assert r1.reputation_deltas == r1.reputation  # first round: the chain held 0 for everyone
    # reputation 0.5 -> 0.5*0.5 + 0.5*min(1, 3*s), then x0.5 if flagged; in ppm, at least 1
    assert r1.reputation == {"a": 750_000, "b": 750_000, "c": 125_000}
    r2 = book.apply(2, ["a", "c"], {"a": 1.0, "c": 0.0}, set(), 10)
    assert r2.reputation_deltas == {"a": r2.reputation["a"] - 750_000, "c": r2.reputation["c"] - 125_000}
    assert book.balances == {"a": r1.rewards["a"] + 10, "b": r1.rewards["b"], "c": 0}
    nobody = book.apply(3, ["c"], {"c": 0.0}, set(), 10)
    assert nobody.rewards == {"c": 0}  # no contribution: nothing paid


def test_book_keeps_a_scored_reputation_apart_from_never_scored() -> None:
    book = IncentiveBook(ReputationPolicy(decay=0.0, penalty=0.0, initial=0.5, floor=0.0))
    r = book.apply(1, ["a"], {"a": 0.0}, {"a"}, 0)
    assert r.reputation == {"a": 1}  # 0 would read back from the chain as "never scored" (= initial)
    assert book.current("a") == pytest.approx(1e-6) and book.current("zz") == 0.5


def test_book_rejects_inconsistent_rounds() -> None:
    book = IncentiveBook()
    with pytest.raises(IncentiveError, match="other participants"):
        book.apply(1, ["a", "b"], {"a": 1.0}, set(), 10)
    with pytest.raises(IncentiveError, match="other participants"):
        book.apply(1, ["a"], {"a": 1.0}, {"b"}, 10)
    with pytest.raises(IncentiveError, match=r"\[0, 1\]"):
        book.apply(1, ["a"], {"a": 1.5}, set(), 10)


def test_selection_shares_split_evenly_among_the_selected() -> None:
    assert selection_shares(["a", "b", "c", "d"], ["b", "d"]) == {"a": 0.0, "b": 0.5, "c": 0.0, "d": 0.5}
    assert selection_shares(["a"], []) == {"a": 0.0}


def test_a_resumed_coordinator_reads_the_book_back_from_the_chain(recorded: Path) -> None:
    from trustfed.coordinator.incentives_record import IncentivesRecord
    from trustfed.incentives.settings import IncentiveSettings

    rec = IncentivesRecord(IncentiveSettings(enabled=True))
    rec.ledger = EmbeddedLedger(recorded / "ledger", read_only=True)
    for pid in ("p000", "p001"):
        rec._restore(pid)
    last = _bodies(recorded)[-1]
    assert rec.book.reputation == {p: last["reputation_ppm"][p] for p in ("p000", "p001")}
    assert rec.book.balances == {p: sum(b["rewards"][p] for b in _bodies(recorded)) for p in ("p000", "p001")}


def test_enclave_releases_contributions_only_when_measured_to_and_never_with_central_dp() -> None:
    from pydantic import ValidationError

    from trustfed.enclave.settings import AggregationSettings, CentralDPSettings

    plain = AggregationSettings()
    assert "release_contributions" not in plain.measured()  # earlier configs keep their measurement
    assert AggregationSettings(release_contributions=True).measured()["release_contributions"] is True
    with pytest.raises(ValidationError, match="release_contributions cannot be combined with central_dp"):
        AggregationSettings(
            release_contributions=True, central_dp=CentralDPSettings(noise_multiplier=1.0, clip_norm=1.0)
        )


# ------------------------------------------------------------------ reputation-weighted selection


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("draw") / "run"
    raw = raw_config(federation={"name": "draw", "rounds": 4, "participants": 5, "seed": 3})
    raw["strategy"] = {**raw["strategy"], "fraction_fit": 0.6}
    raw["incentives"] = {"enabled": True, "selection": "reputation"}
    run_simulation(validate_federation_config(raw, "test"), out)
    return out


def test_reputation_weighted_draws_are_recorded_and_recomputed(drawn: Path) -> None:
    plans = [json.loads(line)["body"] for line in read_lines(drawn) if json.loads(line)["kind"] == "round_plan"]
    assert len(plans) == 4
    for p in plans:
        assert len(p["participants"]) == 3
        assert p["config"]["selection"] == "reputation" and p["config"]["selection_seed"] == 3
        assert p["config"]["selection_available"] == "p000,p001,p002,p003,p004"
    v = verify_run(drawn)
    assert v.ok, [str(f) for f in v.failures]
    assert v.checked["reputation_draws"] == 4 and v.checked["incentive_rounds"] == 4


def test_a_coordinator_that_picks_its_own_participants_is_caught(drawn: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(drawn, tmp_path / "run"))

    def pick_own(body: dict[str, Any]) -> None:
        chosen = body["participants"]
        others = [p for p in ("p000", "p001", "p002", "p003", "p004") if p not in chosen]
        body["participants"] = sorted([*chosen[:2], others[0]])

    i = resign(run, run / "keys" / "coordinator.pem", "round_plan", 3, pick_own)
    v = verify_run(run)
    assert has(v.failures, file=AUDIT, line=i + 1, rnd=3, field="body.participants")


def test_reputation_selection_config_problems() -> None:
    raw = raw_config(incentives={"enabled": False, "selection": "reputation"})
    with pytest.raises(ConfigError, match=r"incentives\.selection: 'reputation' needs incentives\.enabled"):
        validate_federation_config(raw)
    raw = raw_config(incentives={"enabled": True, "selection": "reputation"})
    raw["privacy"] = {"mode": "central", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "budget_epsilon": 100.0}
    raw["strategy"] = {**raw["strategy"], "aggregator": "mean", "aggregator_params": {}}
    with pytest.raises(ConfigError, match="sampling amplification assumes uniform sampling"):
        validate_federation_config(raw)
    with pytest.raises(LedgerError, match="needs the run to be recorded"):
        run_simulation(validate_federation_config(raw_config(incentives={"enabled": True, "selection": "reputation"})))


# ------------------------------------------------------------------ stakes and slashing


@pytest.fixture(scope="module")
def staked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stake") / "run"
    raw = raw_config(incentives={"enabled": True, "stake": 100, "slash_fraction": 0.5})
    run_simulation(validate_federation_config(raw, "test"), out)
    return out


def test_flagged_participants_lose_stake_on_chain_and_the_audit_recomputes_it(staked: Path) -> None:
    bodies = _bodies(staked)
    slashes: dict[str, list[int]] = {}
    for b in bodies:
        assert set(b["slashed"]) == set(b["flagged"]) and b["slash_fraction"] == 0.5
        for pid, amount in b["slashed"].items():
            slashes.setdefault(pid, []).append(amount)
    assert slashes  # multi_krum leaves one update out every round
    ledger = EmbeddedLedger(staked / "ledger", read_only=True)
    for pid in (f"p{i:03d}" for i in range(5)):
        stake = 100
        for amount in slashes.get(pid, []):
            assert amount == stake // 2  # half of what is left, rounded down
            stake -= amount
        assert ledger.account(pid).stake == stake
    v = verify_run(staked)
    assert v.ok, [str(f) for f in v.failures]
    kinds = [json.loads(line)["kind"] for line in read_lines(staked)]
    assert kinds.count("incentives_stake") == 1


def test_a_skipped_slash_is_caught(staked: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(staked, tmp_path / "run"))
    rnd = next(i + 1 for i, b in enumerate(_bodies(run)) if b["slashed"])
    i = _resign(
        run,
        rnd,
        lambda b: (b["stake"].update({p: b["stake"][p] + a for p, a in b["slashed"].items()}), b.update(slashed={})),
    )
    v = verify_run(run)
    assert has(v.failures, file=AUDIT, line=i + 1, rnd=rnd, field="body.slashed")


def test_slashing_needs_a_stake() -> None:
    with pytest.raises(ConfigError, match="slash_fraction > 0 needs a stake"):
        validate_federation_config(raw_config(incentives={"enabled": True, "slash_fraction": 0.5}))


def test_a_participant_whose_reputation_falls_below_suspend_below_is_suspended(tmp_path: Path) -> None:
    """A Gaussian-noise attacker is left out by Multi-Krum and flagged every round; once its reputation
    is below suspend_below it gets a signed participant_status entry, the registry marks it suspended,
    and it is never selected again. The audit recomputes the suspension from the reputations: a log
    that hides it fails."""
    from tests.ledger_helpers import rechain

    from trustfed.ledger.backends import EmbeddedLedger
    from trustfed.ledger.records import Status

    raw = raw_config(attack={"kind": "gaussian_noise", "fraction": 0.2, "seed": 0})
    raw["federation"] = {**raw["federation"], "rounds": 4}
    raw["incentives"] = {**raw["incentives"], "suspend_below": 0.2}
    out = tmp_path / "run"
    run_simulation(validate_federation_config(raw, "test"), out)
    v = verify_run(out)
    assert v.ok, [str(f) for f in v.failures]
    lines = read_lines(out)
    (status,) = [json.loads(x) for x in lines if json.loads(x)["kind"] == "participant_status"]
    pid, rnd = status["body"]["participant"], status["round"]
    assert status["body"]["status"] == "suspended" and "below 0.2" in status["body"]["reason"]
    flagged = {e["round"]: e["body"]["flagged"] for e in map(json.loads, lines) if e["kind"] == "incentives"}
    assert all(pid in flagged[r] for r in range(1, rnd + 1))  # flagged every round until suspended
    assert {i.id: i.status for i in EmbeddedLedger(out / "ledger", read_only=True).participants()}[
        pid
    ] == Status.SUSPENDED
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert pid in rounds[rnd - 1]["participants"] and all(pid not in r["participants"] for r in rounds[rnd:])
    # a coordinator that hides the suspension (entry removed, log re-chained) is caught
    i = find(lines, "participant_status", rnd)
    write_lines(out, rechain(lines[:i] + lines[i + 1 :], i))
    v = verify_run(out)
    assert has(v.failures, file=AUDIT, rnd=rnd, field="participant_status")
    assert any(f.field == f"registry.{pid}.status" for f in v.failures)
