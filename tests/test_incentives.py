from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustfed.incentives import (
    IncentiveError,
    ReputationPolicy,
    allocate_rewards,
    contribution_scores,
    reputation_weighted_selection,
    slash,
    update_reputation,
)


def test_free_riders_and_opposers_score_zero() -> None:
    g = torch.tensor([1.0, 0.0, 0.0])
    deltas = torch.stack([torch.tensor([2.0, 1.0, 0.0]), torch.zeros(3), torch.tensor([-1.0, 0.0, 0.0]), g])
    s = contribution_scores(deltas, g)
    assert s[1] == 0 and s[2] == 0
    assert s[0] == pytest.approx(2 / 3) and s[3] == pytest.approx(1 / 3)
    assert float(s.sum()) == pytest.approx(1.0)
    assert torch.equal(contribution_scores(deltas, torch.zeros(3)), torch.zeros(4, dtype=torch.float64))


def test_reputation_rewards_contributors_and_penalises_flagged() -> None:
    ids = ["a", "b", "c"]
    rep: dict[str, float] = {}
    for _ in range(5):
        rep = update_reputation(rep, ids, torch.tensor([0.5, 0.5, 0.0]), flagged={"c"})
    assert rep["a"] == rep["b"] > 0.9
    assert rep["c"] < 0.01
    with pytest.raises(IncentiveError):
        ReputationPolicy(decay=1.0)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(0, 10**9), st.dictionaries(st.text(min_size=1, max_size=3), st.floats(0, 100), min_size=1, max_size=8)
)
def test_rewards_sum_to_the_pool_exactly(pool: int, weights: dict[str, float]) -> None:
    out = allocate_rewards(pool, weights)
    assert set(out) == set(weights)
    assert all(v >= 0 for v in out.values())
    if sum(weights.values()) > 0:
        assert sum(out.values()) == pool
        total = sum(weights.values())
        for k, w in weights.items():
            assert abs(out[k] - pool * w / total) < 1.0 + 1e-6


def test_slash_and_selection() -> None:
    assert slash(1000, 0.25) == 250
    with pytest.raises(IncentiveError):
        slash(10, 1.5)
    ids = [f"p{i}" for i in range(10)]
    rep = {p: (0.0 if p == "p3" else 1.0) for p in ids}
    picks = {reputation_weighted_selection(ids, rep, 5, seed=1, rnd=r) for r in range(30)}
    assert all("p3" not in p and len(p) == 5 for p in picks)
    assert len(picks) > 1  # varies with the round
    assert reputation_weighted_selection(ids, rep, 5, 1, 7) == reputation_weighted_selection(ids, rep, 5, 1, 7)
