"""Centered clipping's lift: no update pulls against the round's consensus direction by more than the
``lift`` share of the updates do."""

from __future__ import annotations

import pytest
import torch

from trustfed.core import get_aggregator
from trustfed.core.robust_kernels import consensus_direction, lift_rows
from trustfed.errors import AggregationError

N, BAD = 20, 4


def _round(seed: int, d: int = 300, against: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-IID-looking honest deltas (a common direction plus a larger per-participant part), and BAD rows at
    the honest radius pushing ``against`` the honest mean (1: straight against it), spread apart."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g, dtype=torch.float64)
    honest = 0.01 * (common + 1.6 * torch.randn(N - BAD, d, generator=g, dtype=torch.float64))
    mean = honest.mean(0)
    u = mean / mean.norm()
    radius = float((honest - mean).norm(dim=1).median())
    spread = torch.randn(BAD, d, generator=g, dtype=torch.float64)
    spread = spread - (spread @ u)[:, None] * u[None, :]
    spread = spread / spread.norm(dim=1, keepdim=True)
    bad = mean + radius * (-against * u + (1 - against**2) ** 0.5 * spread)
    return torch.cat([bad, honest]), mean


def test_lift_raises_only_the_low_rows_and_only_along_the_consensus() -> None:
    x, mean = _round(0)
    out = lift_rows(x, 0.35, steps=1)
    moved = out - x
    changed = moved.norm(dim=1) > 0
    assert bool(changed[:BAD].all())  # the rows pulling against the majority are raised
    assert int(changed.sum()) <= int(0.35 * N)  # the others are kept as they were
    u = consensus_direction(x)
    assert torch.allclose(moved, (moved @ u)[:, None] * u[None, :], atol=1e-12)  # along the consensus only
    assert float((out @ u).min()) >= float((x @ u).sort().values[int(0.35 * N)]) - 1e-12  # up to the floor
    steps = lift_rows(x, 0.35) - x  # later lifts follow the lifted mean, which stays the majority's
    assert float(((steps @ mean) / (steps.norm(dim=1) * mean.norm()))[:BAD].min()) > 0.8


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("against", [1.0, 0.8, 0.5])
def test_lift_bounds_the_pull_of_a_minority_at_the_radius(seed: int, against: float) -> None:
    x, mean = _round(seed, against=against)
    u = mean / mean.norm()
    w = torch.ones(N)
    honest_only = get_aggregator("centered_clipping", reject=3.0)(x[BAD:].float(), w[BAD:]).params.double() @ u
    plain = get_aggregator("centered_clipping", reject=3.0)(x.float(), w).params.double() @ u
    lifted = get_aggregator("centered_clipping", reject=3.0, lift=0.35)(x.float(), w).params.double() @ u
    assert float(plain) < float(honest_only)  # the minority pulls the rule against the honest mean
    assert float(honest_only - lifted) < 0.5 * float(honest_only - plain)  # the lift takes most of it away


def test_the_consensus_direction_is_the_majoritys_and_zero_for_zero_rows() -> None:
    x, mean = _round(1)
    assert float(consensus_direction(x) @ (mean / mean.norm())) > 0.9
    assert torch.equal(consensus_direction(torch.zeros(5, 3)), torch.zeros(3))
    assert torch.equal(lift_rows(torch.zeros(5, 3), 0.35), torch.zeros(5, 3))


def test_lift_changes_nothing_when_every_row_agrees() -> None:
    x = torch.ones(N, 7) * torch.arange(7.0)
    ref = get_aggregator("centered_clipping")(x, torch.ones(N)).params
    assert torch.equal(get_aggregator("centered_clipping", lift=0.35)(x, torch.ones(N)).params, ref)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_lift_is_checked(bad: float) -> None:
    with pytest.raises(AggregationError, match="lift"):
        get_aggregator("centered_clipping", lift=bad)
    assert get_aggregator("centered_clipping", lift=0.35).describe()["lift"] == 0.35
