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


def _flower_fedopt(name: str, x0: np.ndarray, rounds: list[list[tuple[np.ndarray, int]]], **hyper: float) -> np.ndarray:
    """Flower's own strategy (``flwr.server.strategy``) on the same inputs: its parameters after the rounds."""
    flwr = pytest.importorskip(
        "flwr", reason="flwr (the benchmark peer) is not installed: no Flower numbers to compare"
    )
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    cls = {"fedadagrad": flwr.server.strategy.FedAdagrad, "fedadam": flwr.server.strategy.FedAdam}
    cls["fedyogi"] = flwr.server.strategy.FedYogi
    s = cls[name](initial_parameters=ndarrays_to_parameters([x0]), **hyper)
    out = x0
    for r, ups in enumerate(rounds, start=1):
        res = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([u]), n, {})) for u, n in ups]
        params, _ = s.aggregate_fit(r, res, [])
        (out,) = parameters_to_ndarrays(params)
    return np.asarray(out, dtype=np.float64)


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_server_optimisers_flower_convention_matches_flower(name: str) -> None:
    """With ``convention = "flower"`` FedAdagrad/FedAdam/FedYogi give Flower's numbers (v starts at 0;
    Adam's step is bias-corrected with Flower's round count); the default (Reddi et al.'s v0 = tau^2,
    no bias correction) differs from them, as docs/robust.md says."""
    from trustfed.core.strategy import STRATEGIES

    rng = np.random.default_rng(3)
    x0 = rng.normal(size=30).astype(np.float32)
    rounds = [[(rng.normal(size=30).astype(np.float32), int(n)) for n in rng.integers(1, 50, size=3)] for _ in range(4)]
    b1 = 0.0 if name == "fedadagrad" else 0.9  # Flower's FedAdagrad fixes beta_1 = 0 (no momentum)
    hyper = (
        {"eta": 0.05, "tau": 1e-3} if name == "fedadagrad" else {"eta": 0.05, "beta_1": b1, "beta_2": 0.99, "tau": 1e-3}
    )
    want = _flower_fedopt(name, x0, rounds, **hyper)

    def ours(convention: str) -> np.ndarray:
        s = STRATEGIES[name](server_lr=0.05, beta1=b1, beta2=0.99, tau=1e-3, convention=convention)  # type: ignore[call-arg]
        params = torch.from_numpy(x0)
        for r, ups in enumerate(rounds, start=1):
            upd = _updates([torch.from_numpy(u) for u, _ in ups], [n for _, n in ups])
            params = s.aggregate(RoundPlan(r, tuple(u.participant_id for u in upd), {}), params, upd).params
        return params.numpy().astype(np.float64)

    np.testing.assert_allclose(ours("flower"), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ours("reddi"), want, rtol=1e-3, atol=1e-3)


def test_server_optimiser_convention_is_checked_and_described() -> None:
    assert FedAdam(convention="flower").describe()["convention"] == "flower"  # type: ignore[call-arg]
    assert FedAdam().describe()["convention"] == "reddi"
    with pytest.raises(ValueError, match="convention"):
        FedYogi(convention="keras")  # type: ignore[call-arg]


def test_mean_closest_to_refuses_an_invalid_beta_like_flower() -> None:
    """Bulyan's coordinate-wise step keeps the ``beta`` values closest to a centre; Flower's
    ``_aggregate_n_closest_weights`` refuses more than there are, and so does trustfed, and a beta
    below one (no value to average) too, instead of quietly returning the plain mean."""
    from trustfed.core.robust import mean_closest_to

    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    centre = x.median(dim=0).values
    assert torch.allclose(mean_closest_to(x, centre, 4), x.mean(0))
    for beta in (0, -1, 5):
        with pytest.raises(AggregationError, match=rf"beta.*{beta}"):
            mean_closest_to(x, centre, beta)
    flwr_agg = pytest.importorskip("flwr.server.strategy.aggregate", reason="flwr is not installed")
    with pytest.raises(ValueError):
        flwr_agg._aggregate_n_closest_weights([centre.numpy()], [([r.numpy()], 1) for r in x], beta_closest=5)


def test_fedopt_convention_is_a_strategy_setting() -> None:
    from trustfed.apps.runtime import Runtime
    from trustfed.config import validate_federation_config
    from trustfed.core.strategy import FedOpt
    from trustfed.errors import ConfigError

    raw = {"federation": {"participants": 3}, "strategy": {"name": "fedyogi", "fedopt_convention": "flower"}}
    made = Runtime(validate_federation_config(raw)).base_strategy(None)
    assert isinstance(made, FedOpt) and made.convention == "flower"
    with pytest.raises(ConfigError, match=r"strategy\.fedopt_convention: the enclave"):
        validate_federation_config({**raw, "enclave": {"enabled": True}})
