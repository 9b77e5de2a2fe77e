"""The history guard's opposition reference: the round's aggregate, or the round's trimmed mean, which a
minority cannot capture whatever example counts it claims."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.test_attacks_adaptive import ATTACKERS, DEFAULT_RULES, HONEST, _centre_and_state, _craft, _ctx, _honest

from trustfed.config import validate_federation_config
from trustfed.core.history_guard import HistoryGuard, SuspensionRule, trimmed_reference
from trustfed.core.robust_kernels import trimmed_mean
from trustfed.core.strategy import FedAvg, Update
from trustfed.errors import AggregationError, ConfigError
from trustfed.simulation.adversary import guard_description

N, DIM = 20, 60


def _federation(seed: int) -> tuple[list[str], set[str]]:
    ids = [f"p{i:03d}" for i in range(N)]
    bad = {ids[int(i)] for i in torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:4]}  # 20%, seeded
    return ids, bad


def _round(seed: int, rnd: int, ids: list[str], bad: set[str], params: torch.Tensor) -> list[Update]:
    """Honest deltas: a direction shared by all plus each one's own (same every round) and a round's noise,
    on shards of 10-400 examples; the attackers: against the shared direction by a random factor plus a
    random sideways push of their own, claiming a million examples each."""
    common = torch.randn(DIM, generator=torch.Generator().manual_seed(seed)) / DIM**0.5
    g = torch.Generator().manual_seed(1000 * seed + rnd)
    out = []
    for i, pid in enumerate(ids):
        own = torch.randn(DIM, generator=torch.Generator().manual_seed(7919 * seed + i)) / DIM**0.5
        if pid in bad:
            k = 0.5 + 2.5 * float(torch.rand(1, generator=g))
            delta = -k * common + float(torch.rand(1, generator=g)) * own
            count = 1_000_000
        else:
            delta = common + 0.7 * own + 0.3 * torch.randn(DIM, generator=g) / DIM**0.5
            count = 10 + (37 * i) % 390
        out.append(Update(pid, params + 0.01 * delta, count))
    return out


def _suspended_after(seed: int, rule: SuspensionRule, rounds: int = 4) -> tuple[set[str], set[str]]:
    ids, bad = _federation(seed)
    guard = HistoryGuard(FedAvg(aggregator="mean"), rule)  # weighs the claimed counts: captured
    params = torch.zeros(DIM)
    for rnd in range(1, rounds + 1):
        plan = guard.configure_round(rnd, params, ids)
        params = guard.aggregate(plan, params, _round(seed, rnd, list(plan.participants), bad, params)).params
    return set(guard.suspended), bad


def test_a_captured_aggregate_turns_the_aggregate_reference_against_the_honest_majority() -> None:
    hit = 0
    for seed in range(5):
        suspended, bad = _suspended_after(seed, SuspensionRule())
        hit += bool(suspended - bad)
    assert hit == 5  # with the aggregate as reference, honest participants are suspended on every seed


@pytest.mark.parametrize("seed", range(10))
def test_the_trimmed_mean_reference_suspends_exactly_the_claiming_attackers(seed: int) -> None:
    suspended, bad = _suspended_after(seed, SuspensionRule(reference="trimmed_mean"))
    assert suspended == bad


def test_the_reference_is_checked_described_and_handed_to_the_attacks() -> None:
    with pytest.raises(AggregationError, match="reference"):
        SuspensionRule(reference="median")
    with pytest.raises(AggregationError, match="trim"):
        SuspensionRule(reference="trimmed_mean", trim=0.5)
    guard = HistoryGuard(FedAvg(aggregator="mean"), SuspensionRule(reference="trimmed_mean", trim=0.1))
    desc = guard_description(guard)
    assert desc["reference"] == "trimmed_mean" and desc["trim"] == 0.1 and "inner" not in desc
    assert guard_description(FedAvg(aggregator="mean")) == {}
    base = {
        "federation": {"name": "t", "rounds": 1, "participants": 4},
        "data": {"dataset": "digits"},
        "model": {"name": "mlp"},
    }
    for key, value in (("reference", "median"), ("trim", 0.5), ("trim", -0.1)):
        raw = {**base, "strategy": {"suspension": {"enabled": True, key: value}}}
        with pytest.raises(ConfigError, match=rf"strategy\.suspension\.{key}"):
            validate_federation_config(raw, "test")


@pytest.mark.parametrize("min_cosine", [-0.2, -0.4, 0.1])
def test_guard_edge_keeps_the_floor_of_the_guard_it_is_given(min_cosine: float) -> None:
    honest = _honest()
    glob, _, state = _centre_and_state(honest)
    ctx = dataclasses.replace(
        _ctx(honest, rnd=2, glob=glob, state=state, aggregator={**DEFAULT_RULES, "clamp": 0.2}),
        guard={"name": "history_guard", "reference": "trimmed_mean", "trim": 0.2, "min_cosine": min_cosine},
    )
    rows = _craft("guard_edge", ctx)
    assert rows.shape == (len(ATTACKERS), honest.shape[1])
    ref = trimmed_mean(torch.cat([rows.float(), honest]), int(0.2 * (len(ATTACKERS) + len(HONEST)))).double()
    to_ref = rows @ ref / (rows.norm(dim=1) * ref.norm())
    floor = min_cosine + 0.05  # just above the guard's threshold (+ margin 0.05)
    assert floor - 1e-3 <= float(to_ref.min()) < floor + 0.02


def test_the_trimmed_reference_counts_only_the_rows_the_rule_kept() -> None:
    g = torch.Generator().manual_seed(3)
    common = torch.ones(DIM, dtype=torch.float64) / DIM**0.5
    honest = common + 0.8 * torch.randn(15, DIM, generator=g, dtype=torch.float64) / DIM**0.5
    copies = honest[0:1].repeat(5, 1) - 2.0 * common  # five equal rows: the rule leaves such copies out
    deltas = torch.cat([honest, copies])
    kept = list(range(15))
    ref = trimmed_reference(deltas, kept, 0.2)
    assert torch.allclose(ref, trimmed_mean(honest.float(), 4).double())  # cut as from all 20
    pulled = trimmed_reference(deltas, list(range(20)), 0.2)
    assert float(ref @ common / ref.norm()) > float(pulled @ common / pulled.norm())  # the copies pull it away
    assert torch.allclose(trimmed_reference(deltas, [0], 0.2), pulled)  # a rule that keeps few: every row


def test_the_trimmed_mean_reference_never_suspends_more_than_its_cut() -> None:
    ids = [f"p{i:03d}" for i in range(N)]
    bad = set(ids[:7])  # more attackers than the 20% the trimmed mean assumes
    guard = HistoryGuard(FedAvg(aggregator="mean"), SuspensionRule(reference="trimmed_mean", trim=0.2))
    params = torch.zeros(DIM)
    for rnd in range(1, 7):
        plan = guard.configure_round(rnd, params, ids)
        params = guard.aggregate(plan, params, _round(4, rnd, list(plan.participants), bad, params)).params
    assert len(guard.suspended) == 4 and guard.most_suspended(N) == 4  # int(0.2 * 20), however many oppose
    assert HistoryGuard(FedAvg(aggregator="mean"), SuspensionRule()).most_suspended(N) == 9  # fewer than half
