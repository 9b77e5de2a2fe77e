"""Robust aggregators: each against a slow numpy-loop oracle, and against Flower where it has the rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustfed.core import FedAvg, RoundPlan, Update, available_aggregators, get_aggregator
from trustfed.core import robust as R
from trustfed.core import robust_kernels as K
from trustfed.errors import AggregationError

# ----------------------------------------------------------------------------- slow oracles


def ref_median(x: np.ndarray) -> np.ndarray:
    n, d = x.shape
    out = np.empty(d)
    for j in range(d):
        col = sorted(float(v) for v in x[:, j])
        out[j] = col[n // 2] if n % 2 else (col[n // 2 - 1] + col[n // 2]) / 2
    return out


def ref_trimmed(x: np.ndarray, beta: float) -> np.ndarray:
    n, d = x.shape
    k = int(beta * n)
    return np.array([sum(sorted(float(v) for v in x[:, j])[k : n - k]) / (n - 2 * k) for j in range(d)])


def ref_sqdist(x: np.ndarray) -> np.ndarray:
    n = len(x)
    x64 = x.astype(np.float64)
    return np.array([[float(np.sum((x64[i] - x64[j]) ** 2)) for j in range(n)] for i in range(n)])


def ref_krum_scores(d2: np.ndarray, f: int) -> list[float]:
    n = len(d2)
    k = min(max(1, n - f - 2), n - 1)
    return [sum(sorted(d2[i, j] for j in range(n) if j != i)[:k]) for i in range(n)]


def ref_krum(x: np.ndarray, f: int) -> int:
    s = ref_krum_scores(ref_sqdist(x), f)
    return min(range(len(s)), key=lambda i: (s[i], i))


def ref_multi_krum(x: np.ndarray, w: np.ndarray, f: int, m: int) -> tuple[list[int], np.ndarray]:
    s = ref_krum_scores(ref_sqdist(x), f)
    keep = sorted(sorted(range(len(s)), key=lambda i: (s[i], i))[:m])
    tot = sum(float(w[i]) for i in keep)
    return keep, sum(float(w[i]) * x[i].astype(np.float64) for i in keep) / tot


def ref_bulyan(x: np.ndarray, f: int) -> tuple[list[int], np.ndarray]:
    d2 = ref_sqdist(x)
    remaining = list(range(len(x)))
    chosen: list[int] = []
    for _ in range(len(x) - 2 * f):
        sub = d2[np.ix_(remaining, remaining)]
        s = ref_krum_scores(sub, f)
        best = remaining[min(range(len(s)), key=lambda i: (s[i], i))]
        chosen.append(best)
        remaining.remove(best)
    sel = x[chosen]
    med = ref_median(sel)
    beta = len(chosen) - 2 * f
    out = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        closest = sorted(range(len(sel)), key=lambda i: abs(float(sel[i, j]) - med[j]))[:beta]
        out[j] = sum(float(sel[i, j]) for i in closest) / beta
    return sorted(chosen), out


def ref_geomed(x: np.ndarray, iters: int, nu: float = 1e-6) -> np.ndarray:
    x64 = x.astype(np.float64)
    n = len(x64)
    z = sum(x64) / n
    for _ in range(iters):
        b = [1.0 / max(nu, math.sqrt(float(np.sum((x64[i] - z) ** 2)))) for i in range(n)]
        z = sum(b[i] * x64[i] for i in range(n)) / sum(b)
    return z


def ref_centered_clip(x: np.ndarray, v: np.ndarray, tau: float, iters: int, reject: float = 0.0) -> np.ndarray:
    x64 = x.astype(np.float64)
    n = len(x64)
    for _ in range(iters):
        acc = np.zeros_like(v)
        rs = [x64[i] - v for i in range(n)]
        nrs = [math.sqrt(float(np.sum(r * r))) for r in rs]
        far = [bool(reject) and nr > reject * tau for nr in nrs]
        if all(far):
            far = [False] * n
        for r, nr, out in zip(rs, nrs, far, strict=True):
            if not out:
                acc += r * min(1.0, tau / nr) if nr > 0 else r
        v = v + acc / far.count(False)
    return v


def ref_fltrust(x: np.ndarray, g0: np.ndarray) -> np.ndarray:
    x64, g = x.astype(np.float64), g0.astype(np.float64)
    gn = math.sqrt(float(g @ g))
    num, den = np.zeros_like(g), 0.0
    for xi in x64:
        xn = math.sqrt(float(xi @ xi))
        ts = max(0.0, float(xi @ g) / (xn * gn))
        num += ts * xi * gn / xn
        den += ts
    return num / den


def ref_norm_bound(x: np.ndarray, w: np.ndarray, bound: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    out = np.zeros(x.shape[1])
    for xi, wi in zip(x64, w, strict=True):
        nr = math.sqrt(float(xi @ xi))
        out += float(wi) * xi * min(1.0, bound / nr)
    return out / float(w.sum())


# ----------------------------------------------------------------------------- fixtures


def _data(seed: int, n: int, d: int, outliers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.normal(0, 1, size=(n, d)) + rng.normal(0, 3, size=d)).astype(np.float32)
    if outliers:
        x[:outliers] += rng.normal(0, 30, size=(outliers, d)).astype(np.float32)
    w = rng.integers(1, 500, size=n).astype(np.float32)
    return x, w


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def test_all_builtin_aggregators_are_registered() -> None:
    names = set(available_aggregators())
    expected = {"median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median"}
    expected |= {"centered_clipping", "fltrust", "norm_bound", "bucketing", "server_momentum", "krum_filter"}
    assert expected <= names


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_median_matches_oracle_for_odd_and_even_n(n: int, d: int, seed: int) -> None:
    x, w = _data(seed, n, d)
    res = get_aggregator("median")(_t(x), _t(w))
    np.testing.assert_allclose(res.params.numpy(), ref_median(x), rtol=1e-6, atol=1e-6)


def test_median_even_n_averages_the_two_middle_values_unlike_torch_median() -> None:
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    assert float(get_aggregator("median")(x, torch.ones(4)).params[0]) == 2.0
    assert float(torch.median(x, dim=0).values[0]) == 1.0  # what we must not return


def test_median_large_input_uses_threaded_chunks_and_matches_numpy() -> None:
    x, w = _data(3, 10, 3 * K.CHUNK + 7)
    torch.set_num_threads(2)
    try:
        res = get_aggregator("median")(_t(x), _t(w))
    finally:
        torch.set_num_threads(1)
    assert np.array_equal(res.params.numpy(), np.median(x, axis=0))


@pytest.mark.parametrize(("threads", "offset", "centred"), [(1, 100.0, True), (2, 100.0, True), (2, 0.005, False)])
def test_large_input_distances_use_the_float32_gram_and_survive_a_large_common_offset(
    threads: int, offset: float, centred: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, d = 12, K._F64_GRAM_LIMIT // 12 + 5 * K._GRAM_BLOCK + 3  # above the float64 limit, ragged last block
    rng = np.random.default_rng(7)
    # offset 100: a shared part 10,000x the spread, on which the plain X @ X.T would cancel; 0.005: small
    x = (rng.normal(0, 1, d) * offset + rng.normal(0, 0.01, (n, d))).astype(np.float32)
    x[3] += 0.05  # one update clearly apart
    x64 = x.astype(np.float64)
    ref = np.array([[float(np.sum((x64[i] - x64[j]) ** 2)) for j in range(n)] for i in range(n)])
    calls: list[bool] = []
    real = K._blocked_gram

    def spy(a: np.ndarray, threads: int, centre: bool) -> np.ndarray:
        calls.append(centre)
        return real(a, threads, centre)

    monkeypatch.setattr(K, "_blocked_gram", spy)
    torch.set_num_threads(threads)
    try:
        got = R.pairwise_sq_distances(torch.from_numpy(x)).numpy()
    finally:
        torch.set_num_threads(1)
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert np.array_equal(got, got.T) and not got.diagonal().any()
    assert calls == ([False, True] if centred else [False])  # centred blocks only when the offset needs them


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 20), st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.45]), st.integers(0, 2**31 - 1))
def test_trimmed_mean_matches_oracle(n: int, d: int, beta: float, seed: int) -> None:
    x, w = _data(seed, n, d)
    res = get_aggregator("trimmed_mean", beta=beta)(_t(x), _t(w))
    np.testing.assert_allclose(res.params.numpy(), ref_trimmed(x, beta), rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 12), st.integers(1, 20), st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_krum_and_multi_krum_match_oracle(n: int, d: int, f: int, seed: int) -> None:
    x, w = _data(seed, n, d, outliers=min(f, n - 1))
    res = get_aggregator("krum", num_malicious=f)(_t(x), _t(w))
    ref = np.array(ref_krum_scores(ref_sqdist(x), f))
    np.testing.assert_allclose(res.scores["krum"].numpy(), ref, rtol=1e-9)
    (best,) = res.selected
    # Exact ties (two mutual nearest neighbours when n - f - 2 = 1) may go either way.
    assert ref[best] <= ref.min() * (1 + 1e-9)
    if np.sum(ref <= ref.min() * (1 + 1e-9)) == 1:
        assert best == ref_krum(x, f)
    assert np.array_equal(res.params.numpy(), x[best])
    m = max(1, n - f)
    mk = get_aggregator("multi_krum", num_malicious=f)(_t(x), _t(w))
    keep, mean = ref_multi_krum(x, w, f, m)
    cut = np.sort(ref)[m - 1]
    if np.sum(np.abs(ref - cut) <= cut * 1e-9) == 1:  # no tie at the boundary of the kept set
        assert list(mk.selected) == keep
        np.testing.assert_allclose(mk.params.numpy(), mean, rtol=1e-6, atol=1e-6)
    assert len(mk.selected) == m and all(ref[i] <= cut * (1 + 1e-9) for i in mk.selected)


def test_krum_rejects_the_outliers() -> None:
    x, w = _data(7, 10, 50, outliers=3)
    res = get_aggregator("multi_krum", num_malicious=3)(_t(x), _t(w))
    assert not set(res.selected) & {0, 1, 2}
    assert get_aggregator("krum", num_malicious=3)(_t(x), _t(w)).selected[0] >= 3


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2), st.integers(0, 3), st.integers(1, 15), st.integers(0, 2**31 - 1))
def test_bulyan_matches_oracle(f: int, extra: int, d: int, seed: int) -> None:
    n = 4 * f + 3 + extra
    x, w = _data(seed, n, d, outliers=f)
    res = get_aggregator("bulyan", num_malicious=f)(_t(x), _t(w))
    chosen, out = ref_bulyan(x, f)
    assert list(res.selected) == chosen
    np.testing.assert_allclose(res.params.numpy(), out, rtol=1e-6, atol=1e-6)


def test_bulyan_refuses_too_few_updates() -> None:
    x, w = _data(0, 6, 4)
    with pytest.raises(AggregationError, match="at least 7"):
        get_aggregator("bulyan", num_malicious=1)(_t(x), _t(w))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 10), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_geometric_median_matches_weiszfeld_oracle(n: int, d: int, seed: int) -> None:
    x, w = _data(seed, n, d)
    agg = get_aggregator("geometric_median", max_iter=25, tol=0.0)
    res = agg(_t(x), _t(w))
    np.testing.assert_allclose(res.params.numpy(), ref_geomed(x, 25), rtol=1e-5, atol=1e-5)


def test_geometric_median_is_robust_and_minimises_the_sum_of_distances() -> None:
    x, w = _data(5, 11, 8, outliers=4)
    z = get_aggregator("geometric_median", max_iter=500, tol=1e-12)(_t(x), _t(w)).params.double().numpy()
    obj = lambda c: float(np.linalg.norm(x.astype(np.float64) - c, axis=1).sum())  # noqa: E731
    rng = np.random.default_rng(0)
    assert all(obj(z) <= obj(z + rng.normal(0, 1e-2, size=8)) + 1e-9 for _ in range(20))
    honest = x[4:].astype(np.float64).mean(axis=0)
    assert np.linalg.norm(z - honest) < np.linalg.norm(x.astype(np.float64).mean(axis=0) - honest)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 10), st.integers(1, 20), st.floats(0.1, 10.0), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_centered_clipping_matches_oracle_across_two_rounds(n: int, d: int, tau: float, iters: int, seed: int) -> None:
    x, w = _data(seed, n, d)
    agg = get_aggregator("centered_clipping", tau=tau, iters=iters)
    r1 = agg(_t(x), _t(w))
    v1 = ref_centered_clip(x, np.zeros(d), tau, iters)
    np.testing.assert_allclose(r1.params.numpy(), v1, rtol=1e-5, atol=1e-5)
    x2 = (x + 1.0).astype(np.float32)
    r2 = agg(_t(x2), _t(w))  # starts from last round's centre
    np.testing.assert_allclose(r2.params.numpy(), ref_centered_clip(x2, v1, tau, iters), rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 10), st.integers(1, 20), st.sampled_from([1.0, 1.5, 3.0]), st.integers(0, 2**31 - 1))
def test_centered_clipping_with_rejection_matches_oracle(n: int, d: int, reject: float, seed: int) -> None:
    x, w = _data(seed, n, d, outliers=n // 4)
    agg = get_aggregator("centered_clipping", tau=2.0, iters=3, reject=reject)
    res = agg(_t(x), _t(w))
    np.testing.assert_allclose(
        res.params.numpy(), ref_centered_clip(x, np.zeros(d), 2.0, 3, reject), rtol=1e-5, atol=1e-5
    )
    assert agg.describe()["reject"] == reject


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 12), st.integers(1, 16), st.floats(1.0, 1e6), st.integers(0, 2**31 - 1))
def test_centered_clipping_weight_cap_makes_a_larger_claim_worthless(n: int, d: int, boost: float, seed: int) -> None:
    """With weighted = true and weight_cap = 1, a participant that already claims at least the median
    count gains nothing by claiming more (the median does not move, its count is capped at it)."""
    x, _ = _data(seed, n, d, outliers=n // 4)
    w = np.random.default_rng(seed).integers(1, 500, size=n).astype(np.float32)
    i = int(np.argmax(w))
    inflated = w.copy()
    inflated[i] = w[i] * boost
    params = {"iters": 3, "reject": 3.0, "clamp": 0.2, "weighted": True, "weight_cap": 1.0}
    honest = get_aggregator("centered_clipping", **params)(_t(x), _t(w)).params
    lying = get_aggregator("centered_clipping", **params)(_t(x), _t(inflated)).params
    torch.testing.assert_close(lying, honest, rtol=0, atol=0)


def test_centered_clipping_weight_cap_with_equal_counts_is_the_unweighted_rule() -> None:
    x, _ = _data(7, 10, 6, outliers=2)
    w = np.full(10, 37.0, dtype=np.float32)
    capped = get_aggregator("centered_clipping", iters=3, weighted=True, weight_cap=1.0)
    plain = get_aggregator("centered_clipping", iters=3)
    torch.testing.assert_close(capped(_t(x), _t(w)).params, plain(_t(x), _t(w)).params)
    assert capped.describe()["weight_cap"] == 1.0
    claims = w.copy()
    claims[0] = 1e6  # without the cap, one claim of a million examples moves the result; with it, not

    def once(claimed: np.ndarray, **params: float | bool) -> torch.Tensor:  # a fresh rule: it keeps a centre
        return get_aggregator("centered_clipping", iters=3, **params)(_t(x), _t(claimed)).params

    assert not torch.allclose(once(claims, weighted=True), once(w, weighted=True))
    torch.testing.assert_close(once(claims, weighted=True, weight_cap=1.0), once(w))
    with pytest.raises(AggregationError, match="weight_cap"):
        get_aggregator("centered_clipping", weight_cap=1.0)  # needs weighted = true
    with pytest.raises(AggregationError, match="weight_cap"):
        get_aggregator("centered_clipping", weighted=True, weight_cap=-1.0)


def test_centered_clipping_rejection_ignores_a_far_update_that_plain_clipping_follows() -> None:
    x = np.array([[1.0, 0.0], [1.2, 0.0], [0.8, 0.0], [-50.0, 0.0]], dtype=np.float32)
    w = np.ones(4, dtype=np.float32)
    plain = get_aggregator("centered_clipping", iters=3)(_t(x), _t(w))
    rej = get_aggregator("centered_clipping", iters=3, reject=3.0)(_t(x), _t(w))
    assert float(rej.params[0]) == pytest.approx(1.0, abs=0.05)  # the mean of the three that agree
    assert float(plain.params[0]) < float(rej.params[0]) - 0.1  # clipping still moves towards the attacker
    assert rej.selected == (0, 1, 2) and float(rej.scores["clip_scale"][3]) == 0.0
    with pytest.raises(AggregationError, match="reject"):
        get_aggregator("centered_clipping", reject=0.5)


def test_centered_clipping_leaves_out_colluding_copies_of_one_vector() -> None:
    x, w = _data(5, 10, 12)
    x[7] = x[8] = x[9] = -0.5 * x[:7].mean(axis=0)  # three colluders send one vector (IPM)
    agg = get_aggregator("centered_clipping", tau=2.0, iters=3, max_cosine=0.99)
    res = agg(_t(x), _t(w))
    assert res.selected == tuple(range(7))
    np.testing.assert_allclose(res.params.numpy(), ref_centered_clip(x[:7], np.zeros(12), 2.0, 3), rtol=1e-5, atol=1e-5)
    assert agg.describe()["max_cosine"] == 0.99
    # A zero update has no direction, and a majority of look-alikes is not left out.
    z = x.copy()
    z[8] = z[9] = 0.0
    assert 8 in get_aggregator("centered_clipping", max_cosine=0.99)(_t(z), _t(w)).selected
    same = np.repeat(x[:1], 10, axis=0) + np.random.default_rng(0).normal(0, 1e-6, (10, 12)).astype(np.float32)
    assert len(get_aggregator("centered_clipping", max_cosine=0.99)(_t(same), _t(w)).selected) == 10
    with pytest.raises(AggregationError, match="max_cosine"):
        get_aggregator("centered_clipping", max_cosine=1.5)


def test_centered_clipping_state_round_trips_and_bounds_an_attacker() -> None:
    x, w = _data(1, 10, 30)
    x[0] = 1e6
    agg = get_aggregator("centered_clipping", momentum=0.5)
    out1 = agg(_t(x), _t(w)).params
    assert float(out1.abs().max()) < 100  # one huge update moves the centre by at most tau / n per iteration
    state = agg.state_dict()  # type: ignore[attr-defined]
    assert set(state) == {"center", "momentum_buffer"}
    twin = get_aggregator("centered_clipping", momentum=0.5)
    twin.load_state_dict(state)  # type: ignore[attr-defined]
    assert torch.equal(agg(_t(x), _t(w)).params, twin(_t(x), _t(w)).params)
    with pytest.raises(AggregationError, match="unknown state"):
        twin.load_state_dict({"bogus": torch.zeros(1)})  # type: ignore[attr-defined]


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 10), st.integers(2, 20), st.integers(0, 2**31 - 1))
def test_fltrust_matches_oracle(n: int, d: int, seed: int) -> None:
    x, w = _data(seed, n, d)
    g0 = x.mean(axis=0) + np.random.default_rng(seed).normal(0, 0.5, size=d).astype(np.float32)
    agg = get_aggregator("fltrust")
    agg.set_root_update(_t(g0))  # type: ignore[attr-defined]
    res = agg(_t(x), _t(w))
    ts = res.scores["trust"].numpy()
    if ts.sum() == 0:
        assert res.selected == ()
        return
    np.testing.assert_allclose(res.params.numpy(), ref_fltrust(x, g0), rtol=1e-5, atol=1e-5)


def test_fltrust_without_root_update_fails_with_a_clear_error() -> None:
    x, w = _data(0, 4, 3)
    with pytest.raises(AggregationError, match="set_root_update"):
        get_aggregator("fltrust")(_t(x), _t(w))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 10), st.integers(1, 20), st.floats(0.0, 5.0), st.integers(0, 2**31 - 1))
def test_norm_bound_matches_oracle(n: int, d: int, bound: float, seed: int) -> None:
    x, w = _data(seed, n, d)
    res = get_aggregator("norm_bound", max_norm=bound)(_t(x), _t(w))
    b = bound if bound > 0 else float(np.median(np.linalg.norm(x.astype(np.float64), axis=1)))
    np.testing.assert_allclose(res.params.numpy(), ref_norm_bound(x, w, b), rtol=1e-5, atol=1e-5)


def test_bucketing_matches_manual_bucket_means_and_is_seeded() -> None:
    x, w = _data(2, 9, 6)
    agg = get_aggregator("bucketing", bucket_size=2, inner="median", seed=4)
    res = agg(_t(x), _t(w))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(4 * 1_000_003)).tolist()
    buckets = [perm[i : i + 2] for i in range(0, 9, 2)]
    means = np.stack([x[b].astype(np.float64).mean(axis=0) for b in buckets])
    np.testing.assert_allclose(res.params.numpy(), ref_median(means), rtol=1e-6, atol=1e-6)
    assert agg.state_dict()["calls"] == 1  # type: ignore[attr-defined]
    again = get_aggregator("bucketing", bucket_size=2, inner="median", seed=4)(_t(x), _t(w))
    assert torch.equal(res.params, again.params)


def test_bucketing_passes_inner_params_and_rejects_unknown_ones() -> None:
    agg = get_aggregator("bucketing", inner="centered_clipping", inner_iters=2, inner_tau=1.0)
    assert agg.describe()["inner"] == {
        "name": "centered_clipping",
        "tau": 1.0,
        "iters": 2,
        "momentum": 0.0,
        "weighted": False,
    }
    assert getattr(agg, "operates_on", None) == "deltas"
    with pytest.raises(AggregationError, match="inner_"):
        get_aggregator("bucketing", inner="median", tau=1.0)


@settings(max_examples=25, deadline=None)
@given(st.integers(4, 12), st.integers(1, 8), st.sampled_from([0.1, 0.2, 0.3]), st.integers(0, 2**31 - 1))
def test_krum_filter_drops_the_highest_krum_scores_then_applies_the_inner_rule(
    n: int, d: int, fraction: float, seed: int
) -> None:
    f = int(fraction * n)
    x, w = _data(seed, n, d, outliers=f)
    res = get_aggregator("krum_filter", fraction=fraction, inner="median")(_t(x), _t(w))
    scores = ref_krum_scores(ref_sqdist(x), f)
    keep = sorted(sorted(range(n), key=lambda i: (scores[i], i))[: n - f])
    assert res.selected == tuple(keep)
    np.testing.assert_allclose(res.params.numpy(), ref_median(x[keep]), rtol=1e-6, atol=1e-6)
    if f:
        np.testing.assert_allclose(res.scores["krum"].numpy(), scores, rtol=1e-9)
    else:  # nothing to drop: the inner rule alone, no distances computed
        assert "krum" not in res.scores


def test_krum_filter_names_its_count_keeps_inner_state_and_maps_inner_scores() -> None:
    x, w = _data(3, 10, 5, outliers=2)
    agg = get_aggregator("krum_filter", num_malicious=2, inner="centered_clipping", inner_iters=2)
    assert agg.describe() == {
        "name": "krum_filter",
        "num_malicious": 2,
        "fraction": 0.2,
        "inner": {"name": "centered_clipping", "tau": 0.0, "iters": 2, "momentum": 0.0, "weighted": False},
    }
    assert getattr(agg, "operates_on", None) == "deltas"
    res = agg(_t(x), _t(w))
    assert set(res.selected).isdisjoint({0, 1})  # the two far outliers are dropped
    scale = res.scores["clip_scale"]
    assert scale.shape == (10,) and bool(scale[:2].isnan().all()) and not bool(scale[2:].isnan().any())
    state = agg.state_dict()  # type: ignore[attr-defined]
    assert set(state) == {"inner.center"}
    again = get_aggregator("krum_filter", num_malicious=2, inner="centered_clipping", inner_iters=2)
    again.load_state_dict(state)  # type: ignore[attr-defined]
    assert torch.equal(again(_t(x), _t(w)).params, agg(_t(x), _t(w)).params)
    with pytest.raises(AggregationError, match="fraction"):
        get_aggregator("krum_filter", fraction=0.5)
    with pytest.raises(AggregationError, match="needs at least"):
        get_aggregator("krum_filter", num_malicious=3)(_t(x[:3]), _t(w[:3]))


def test_server_momentum_accumulates_and_checkpoints() -> None:
    x, w = _data(0, 5, 4)
    agg = get_aggregator("server_momentum", beta=0.5, dampening=0.0, inner="median")
    m1 = agg(_t(x), _t(w)).params.double().numpy()
    med = ref_median(x)
    np.testing.assert_allclose(m1, med, rtol=1e-6)
    m2 = agg(_t(x), _t(w)).params.double().numpy()
    np.testing.assert_allclose(m2, 1.5 * med, rtol=1e-6)
    twin = get_aggregator("server_momentum", beta=0.5, dampening=0.0, inner="median")
    twin.load_state_dict(agg.state_dict())  # type: ignore[attr-defined]
    assert torch.equal(twin(_t(x), _t(w)).params, agg(_t(x), _t(w)).params)


def test_delta_aggregators_plug_into_fedavg() -> None:
    g = torch.full((4,), 10.0)
    ups = [Update(f"p{i}", g + torch.tensor([1.0, 0, 0, 0]) * (i + 1), 10) for i in range(4)]
    ups.append(Update("bad", g + 1e5, 10))
    res = FedAvg(aggregator="norm_bound", aggregator_params={"max_norm": 1.0}).aggregate(RoundPlan(1, (), {}), g, ups)
    assert float((res.params - g).norm()) <= 1.0 + 1e-5


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "norm_bound"])
def test_aggregators_reject_nan_updates(name: str) -> None:
    x = torch.ones(5, 3)
    x[2, 1] = float("nan")
    with pytest.raises(AggregationError, match=r"\[2\]"):
        get_aggregator(name)(x, torch.ones(5))


@pytest.mark.parametrize("name", ["krum", "multi_krum", "bulyan"])
def test_gram_based_aggregators_reject_non_finite_and_overflowing_wide_updates(name: str) -> None:
    """Krum, Multi-Krum and Bulyan skip check_inputs' pass over the values: the squared norms on the
    Gram diagonal (float32 path for wide updates) catch NaN, infinity and overflow instead."""
    n, d = 6, K._F64_GRAM_LIMIT // 6 + 11
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[4, d - 3] = bad
        with pytest.raises(AggregationError, match=r"updates \[4\] contain NaN or infinite"):
            get_aggregator(name)(y, torch.ones(n))
    y = x.clone()
    y[1, :5] = 3e19  # finite, and so are the row sums, but the squared norm overflows float32
    with pytest.raises(AggregationError, match=r"updates \[1\] are too large to aggregate: their squared norms"):
        get_aggregator(name)(y, torch.ones(n))


def test_float32_weighted_mean_is_close_to_float64_and_independent_of_the_thread_count() -> None:
    n, d = 9, 3 * K.CHUNK + 17
    rng = np.random.default_rng(11)
    x = (rng.normal(0, 1, (n, d)) * 0.01 + rng.normal(0, 1, d) * 0.01).astype(np.float32)
    w = rng.integers(1, 1000, n).astype(np.float32)
    w[[2, 6]] = 0.0
    x[2] = 1e30  # a dropped row does not leak into the mean
    oracle = (w.astype(np.float64) / w.astype(np.float64).sum()) @ x.astype(np.float64)
    got = {}
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            got[threads] = R.weighted_mean_f32(_t(x), _t(w)).numpy()
        finally:
            torch.set_num_threads(1)
    assert got[1].dtype == np.float32
    assert np.array_equal(got[1], got[2]) and np.array_equal(got[1], got[3])
    # The float32 rounding bound of an n-term weighted sum (weights rounded too): (n + 1) eps sum |w x|.
    wn = w.astype(np.float64) / w.astype(np.float64).sum()
    bound = (n + 1) * np.finfo(np.float32).eps * (wn @ np.abs(x.astype(np.float64)))
    assert np.all(np.abs(got[1] - oracle) <= bound)


def test_multi_krum_accumulates_in_float32_or_in_float64_on_request() -> None:
    x, w = _data(3, 12, 5000, outliers=2)
    fast = get_aggregator("multi_krum", num_malicious=2)(_t(x), _t(w))
    exact = get_aggregator("multi_krum", num_malicious=2, accumulate="float64")(_t(x), _t(w))
    assert fast.selected == exact.selected
    keep = list(exact.selected)
    ww = np.zeros(len(w))
    ww[keep] = w[keep]
    ref = (ww / ww.sum()) @ x.astype(np.float64)
    assert np.array_equal(exact.params.numpy(), ref.astype(np.float32))
    np.testing.assert_allclose(fast.params.numpy(), ref, rtol=1e-6, atol=1e-7)
    assert get_aggregator("multi_krum").describe()["accumulate"] == "float32"
    with pytest.raises(AggregationError, match="accumulate must be 'float32' or 'float64'"):
        get_aggregator("multi_krum", accumulate="float16")


# ----------------------------------------------------------------------------- Flower


flwr_agg = pytest.importorskip("flwr.server.strategy.aggregate", reason="flwr (dev extra) not installed")


def _as_flower(x: np.ndarray, w: np.ndarray, split: int) -> list[tuple[list[np.ndarray], int]]:
    # Flower works on lists of layers: split each vector into two layers to exercise that too.
    return [([row[:split].copy(), row[split:].copy()], int(c)) for row, c in zip(x, w, strict=True)]


def _flat(layers: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a).ravel() for a in layers])


def _index_of(vec: np.ndarray, x: np.ndarray) -> int:
    return next(i for i in range(len(x)) if np.array_equal(x[i], vec))


@pytest.mark.parametrize("seed", range(6))
def test_same_as_flower_median_and_trimmed_mean(seed: int) -> None:
    n = 7 + seed
    x, w = _data(seed, n, 40)
    res = _as_flower(x, w, 13)
    ours = get_aggregator("median")(_t(x), _t(w)).params.numpy()
    np.testing.assert_allclose(ours, _flat(flwr_agg.aggregate_median(res)), rtol=1e-6, atol=1e-6)
    tm = get_aggregator("trimmed_mean", beta=0.2)(_t(x), _t(w)).params.numpy()
    np.testing.assert_allclose(tm, _flat(flwr_agg.aggregate_trimmed_avg(res, 0.2)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_same_selection_as_flower_krum_and_multi_krum(seed: int) -> None:
    n, f = 8 + seed, 1 + seed % 3
    x, w = _data(seed, n, 40, outliers=f)
    res = _as_flower(x, w, 11)
    ours = get_aggregator("krum", num_malicious=f)(_t(x), _t(w))
    theirs = _flat(flwr_agg.aggregate_krum(res, f, 0))
    assert ours.selected == (_index_of(theirs, x),)
    np.testing.assert_allclose(ours.params.numpy(), theirs, rtol=1e-6, atol=1e-6)
    m = n - f - 1
    mk = get_aggregator("multi_krum", num_malicious=f, to_keep=m)(_t(x), _t(w))
    np.testing.assert_allclose(mk.params.numpy(), _flat(flwr_agg.aggregate_krum(res, f, m)), rtol=1e-6, atol=1e-6)
    # Flower's selection, recomputed from its own distance matrix, is ours.
    d2 = flwr_agg._compute_distances([[row] for row in x])
    k = max(1, n - f - 2)
    scores = [np.sum(d2[i, np.argsort(d2[i])[1 : k + 1]]) for i in range(n)]
    assert sorted(np.argsort(scores)[::-1][n - m :].tolist()) == list(mk.selected)


@pytest.mark.parametrize("seed", range(4))
def test_same_selection_as_flower_bulyan(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    f = 1 + seed % 2
    n = 4 * f + 3 + seed
    x, w = _data(seed, n, 30, outliers=f)
    ours = get_aggregator("bulyan", num_malicious=f)(_t(x), _t(w))
    chosen: list[int] = []
    real_krum = flwr_agg.aggregate_krum

    def spy(results: list[tuple[list[np.ndarray], int]], num_malicious: int, to_keep: int) -> list[np.ndarray]:
        out: list[np.ndarray] = real_krum(results, num_malicious, to_keep)
        chosen.append(_index_of(_flat(out), x))
        return out

    # Bulyan only accepts rules it knows, looked up by identity: install the spy as Flower's Krum.
    monkeypatch.setattr(flwr_agg, "aggregate_krum", spy)
    theirs = _flat(flwr_agg.aggregate_bulyan(_as_flower(x, w, 7), f, spy, to_keep=0))
    assert sorted(chosen) == list(ours.selected)
    assert [int(i) for i in ours.scores["bulyan_order"]] == chosen
    np.testing.assert_allclose(ours.params.numpy(), theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(available_aggregators()))
def test_a_strategy_leaves_out_non_finite_updates_with_every_aggregator(name: str) -> None:
    """One hostile or diverged update (NaN, or values whose squared norm overflows float32) must not stop
    the round: FedAvg leaves it out, marks it, and aggregates the others with any aggregator."""
    g = torch.zeros(6)
    gen = torch.Generator().manual_seed(1)
    ups = [Update(f"p{i:03d}", g + 0.1 * torch.randn(6, generator=gen), 10 + i) for i in range(9)]
    nan = ups[2].params.clone()
    nan[3] = float("nan")
    ups[2] = Update("p002", nan, 12)
    ups[5] = Update("p005", torch.full((6,), 3e19), 15)

    def strategy() -> FedAvg:
        agg = get_aggregator(name)
        if name == "fltrust":  # scores updates against the server's own root-data update
            agg.set_root_update(torch.full((6,), 0.05))  # type: ignore[attr-defined]
        return FedAvg(aggregator=agg)

    res = strategy().aggregate(RoundPlan(1, (), {}), g, ups)
    assert bool(torch.isfinite(res.params).all())
    assert not {2, 5} & set(res.aggregate.selected)
    assert res.aggregate.scores["non_finite"].tolist() == [i in (2, 5) for i in range(9)]
    assert res.metrics["num_non_finite"] == 2.0
    # the others' result is what the aggregator makes of them alone
    clean = [u for i, u in enumerate(ups) if i not in (2, 5)]
    assert torch.equal(res.params, strategy().aggregate(RoundPlan(1, (), {}), g, clean).params)


def test_central_dp_leaves_out_non_finite_updates() -> None:
    from trustfed.privacy.central import DPFedAvg

    g = torch.zeros(4)
    ups = [Update(f"p{i}", g + 0.1, 10) for i in range(3)] + [Update("bad", torch.full((4,), float("inf")), 10)]
    res = DPFedAvg(FedAvg(), noise_multiplier=0.5, clip_norm=1.0, seed=1).aggregate(RoundPlan(1, (), {}), g, ups)
    assert bool(torch.isfinite(res.params).all()) and res.aggregate.selected == (0, 1, 2)
    assert res.metrics["num_non_finite"] == 1.0
