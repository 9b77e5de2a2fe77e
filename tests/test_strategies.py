from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustfed.core import FedAdam, FedAvg, FedProx, FedYogi, RoundPlan, Update, get_aggregator
from trustfed.core.aggregator import WeightedMean, available_aggregators
from trustfed.errors import AggregationError


def _updates(vectors: list[torch.Tensor], counts: list[int]) -> list[Update]:
    return [Update(f"p{i}", v, c) for i, (v, c) in enumerate(zip(vectors, counts, strict=True))]


PLAN = RoundPlan(1, ("p0",), {})


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 8),
    st.integers(1, 50),
    st.integers(0, 2**31 - 1),
)
def test_fedavg_of_identical_updates_returns_them_exactly(n: int, d: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=g) * torch.exp(torch.randn(d, generator=g) * 5)
    counts = torch.randint(1, 10_000, (n,), generator=g).tolist()
    res = FedAvg().aggregate(PLAN, torch.zeros(d), _updates([x.clone() for _ in range(n)], counts))
    assert torch.equal(res.params, x)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 10), st.integers(1, 200), st.integers(0, 2**31 - 1))
def test_weighted_fedavg_matches_float64_numpy_oracle(n: int, d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    xs = rng.normal(0, 3, size=(n, d)).astype(np.float32)
    counts = rng.integers(1, 5000, size=n)
    res = FedAvg().aggregate(PLAN, torch.zeros(d), _updates([torch.from_numpy(r) for r in xs], counts.tolist()))
    # oracle: plain loops in float64
    oracle = np.zeros(d, dtype=np.float64)
    for i in range(n):
        oracle += float(counts[i]) * xs[i].astype(np.float64)
    oracle /= float(counts.sum())
    np.testing.assert_allclose(res.params.numpy().astype(np.float64), oracle, rtol=0, atol=1e-6)


def test_weights_follow_example_counts() -> None:
    res = FedAvg().aggregate(PLAN, torch.zeros(1), _updates([torch.tensor([0.0]), torch.tensor([1.0])], [1, 3]))
    assert res.params.item() == pytest.approx(0.75)
    assert res.metrics["num_examples"] == 4


def test_aggregation_rejects_bad_updates() -> None:
    with pytest.raises(AggregationError, match="shape"):
        FedAvg().aggregate(PLAN, torch.zeros(3), _updates([torch.zeros(2)], [1]))
    with pytest.raises(AggregationError, match="NaN"):
        FedAvg().aggregate(PLAN, torch.zeros(2), _updates([torch.tensor([1.0, float("nan")])], [1]))
    with pytest.raises(AggregationError, match="examples"):
        FedAvg().aggregate(PLAN, torch.zeros(2), _updates([torch.zeros(2)], [0]))
    with pytest.raises(AggregationError, match="no updates"):
        FedAvg().aggregate(PLAN, torch.zeros(2), [])


def test_selection_is_seeded_and_respects_minimum() -> None:
    ids = [f"p{i}" for i in range(10)]
    s = FedAvg(fraction_fit=0.3, min_participants=2, seed=5)
    a = s.configure_round(4, torch.zeros(1), ids).participants
    assert (
        a == FedAvg(fraction_fit=0.3, min_participants=2, seed=5).configure_round(4, torch.zeros(1), ids).participants
    )
    assert len(a) == 3 and set(a) <= set(ids)
    assert (
        FedAvg(fraction_fit=0.1, min_participants=2).configure_round(1, torch.zeros(1), ids).participants.__len__() == 2
    )
    with pytest.raises(AggregationError, match="only 1"):
        FedAvg(min_participants=2).configure_round(1, torch.zeros(1), ["p0"])


def test_fedprox_sends_mu_to_participants() -> None:
    plan = FedProx(proximal_mu=0.1).configure_round(1, torch.zeros(1), ["a", "b"])
    assert plan.config["proximal_mu"] == 0.1


def _adam_reference(
    x0: np.ndarray, deltas: list[np.ndarray], lr: float, b1: float, b2: float, tau: float, yogi: bool
) -> np.ndarray:
    x = x0.astype(np.float64).copy()
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if yogi:
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        else:
            v = b2 * v + (1 - b2) * d * d
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("cls,yogi", [(FedAdam, False), (FedYogi, True)])
def test_server_optimisers_match_reference(cls: type[FedAdam], yogi: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=20).astype(np.float32)
    s = cls(server_lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
    params = torch.from_numpy(x)
    deltas = []
    for r in range(4):
        target = rng.normal(size=20).astype(np.float32)
        deltas.append(target.astype(np.float64) - params.numpy().astype(np.float64))
        params = s.aggregate(RoundPlan(r + 1, ("p0",), {}), params, _updates([torch.from_numpy(target)], [1])).params
    # replay the reference with the same pseudo-gradients
    ref = _adam_reference(x, deltas, 0.05, 0.9, 0.99, 1e-3, yogi)
    np.testing.assert_allclose(params.numpy(), ref, atol=1e-5)
    # state survives a checkpoint
    s2 = cls(server_lr=0.05)
    s2.load_state_dict(s.state_dict())
    assert s2.t == 4 and s2.m is not None and torch.equal(s2.m, s.m)  # type: ignore[arg-type]


def test_aggregator_registry() -> None:
    assert "mean" in available_aggregators()
    assert isinstance(get_aggregator("mean"), WeightedMean)
    with pytest.raises(AggregationError, match="unknown aggregator 'nope'"):
        get_aggregator("nope")


@pytest.mark.parametrize("strategy_cls", [FedAvg, FedAdam])
def test_strategy_state_carries_the_aggregator_state(strategy_cls: type[FedAvg]) -> None:
    """A checkpointed strategy resumes with its aggregator's memory (centered clipping + momentum)."""
    g = torch.Generator().manual_seed(7)
    params = torch.zeros(6)
    rounds = [[Update(f"p{i}", torch.randn(6, generator=g), 10) for i in range(4)] for _ in range(3)]

    def make() -> FedAvg:
        return strategy_cls(aggregator="centered_clipping", aggregator_params={"momentum": 0.9})

    straight = make()
    p = params
    for ups in rounds:
        p = straight.aggregate(PLAN, p, ups).params
    first = make()
    q = first.aggregate(PLAN, params, rounds[0]).params
    state = first.state_dict()
    assert {"aggregator.center", "aggregator.momentum_buffer"} <= set(state)
    resumed = make()
    resumed.load_state_dict(state)
    for ups in rounds[1:]:
        q = resumed.aggregate(PLAN, q, ups).params
    assert torch.equal(p, q)
    with pytest.raises(AggregationError, match="unknown"):
        make().load_state_dict({"bogus": torch.zeros(1)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_aggregator_names_the_non_finite_update(bad: float) -> None:
    """The fast row-sum check finds a single bad value anywhere, for every registered aggregator."""
    from trustfed.core.aggregator import check_inputs

    x = torch.randn(6, 5000)
    x[4, 3217] = bad
    with pytest.raises(AggregationError, match=r"updates \[4\] contain NaN or infinite"):
        check_inputs(x, torch.ones(6))
    huge = torch.full((2, 4), 3e38)  # finite, but no aggregate of them fits in float32
    with pytest.raises(AggregationError, match=r"updates \[0, 1\] are too large"):
        check_inputs(huge, torch.ones(2))
    for name in available_aggregators():
        with pytest.raises(AggregationError):
            get_aggregator(name)(x, torch.ones(6))


def test_weighted_mean_blocked_path_matches_the_float64_oracle() -> None:
    """Wide updates take the column-blocked path; it equals one float64 dot product per column."""
    from trustfed.core.aggregator import _MEAN_BLOCK, weighted_mean

    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 2 * _MEAN_BLOCK + 123, generator=g) * 10 + 5
    w = torch.tensor([3.0, 0.0, 1.0, 7.0, 2.0, 0.0, 5.0])
    oracle = (w.double().numpy() / w.double().sum().item()) @ x.double().numpy()
    got = weighted_mean(x, w)
    assert got.dtype == torch.float32
    assert np.abs(got.double().numpy() - oracle).max() <= 1e-6 * np.abs(oracle).max()
