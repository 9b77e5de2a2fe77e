"""Byzantine-robust aggregators, vectorised in torch and registered by name.

Every aggregator takes ``updates: Tensor[n, d]`` (float32) and ``weights: Tensor[n]`` and returns an
:class:`~trustfed.core.aggregator.AggregateResult`. Pick one in the federation TOML::

    [strategy]
    aggregator = "bucketing"
    aggregator_params = { bucket_size = 2, inner = "centered_clipping", inner_iters = 3 }

Conventions
-----------
* Robust statistics (median, trimmed mean, Krum, Bulyan, geometric median, centered clipping) ignore
  the example counts by default: a malicious participant can claim any count. ``multi_krum`` and
  ``norm_bound`` average with the weights (as Flower's Multi-Krum and Sun et al.'s norm bounding do);
  pass ``weighted = false`` to ignore them.
* ``operates_on = "deltas"`` marks aggregators that need updates relative to the global model
  (centered clipping, FLTrust, norm bounding, server momentum); FedAvg passes ``model_i - global``.
  The others are translation-equivariant and work on either.
* Definitions follow Flower's ``flwr.server.strategy.aggregate`` where Flower has the same rule
  (median: numpy's definition, the mean of the two middle values for even ``n``; trimmed mean:
  ``int(beta * n)`` cut at each end; Krum: sum of squared distances to the ``n - f - 2`` nearest;
  Bulyan: ``n - 2f`` rounds of Krum then the mean of the ``n - 4f`` values closest to the median).
* Stateful aggregators (centered clipping's centre, server momentum, bucketing's shuffle counter)
  expose ``state_dict()`` / ``load_state_dict()`` so a coordinator can checkpoint them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from trustfed.core.aggregator import (
    AggregateResult,
    check_inputs,
    register_aggregator,
    weighted_mean,
)
from trustfed.core.robust_kernels import (
    CHUNK,
    RobustBase,
    check_f,
    coordinate_median,
    krum_scores,
    lift_rows,
    median_distance,
    pairwise_sq_distances,
    trimmed_mean,
    unit_weights,
    weighted_mean_f32,
)
from trustfed.errors import AggregationError

log = logging.getLogger("trustfed.robust")


@register_aggregator("median")
class CoordinateMedian(RobustBase):
    """Coordinate-wise median (Yin et al. 2018); equals Flower's ``aggregate_median``."""

    name = "median"

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights)
        return AggregateResult(coordinate_median(updates), tuple(range(updates.shape[0])))


@register_aggregator("trimmed_mean")
class TrimmedMean(RobustBase):
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop ``int(beta * n)`` values at each end.

    Equals Flower's ``aggregate_trimmed_avg(results, proportiontocut=beta)``.
    """

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1) -> None:
        if not 0.0 <= beta < 0.5:
            raise AggregationError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
        self.beta = float(beta)

    def _params(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights)
        n = updates.shape[0]
        return AggregateResult(trimmed_mean(updates, int(self.beta * n)), tuple(range(n)))


@register_aggregator("krum")
class Krum(RobustBase):
    """Krum (Blanchard et al. 2017): the update with the smallest Krum score."""

    name = "krum"

    def __init__(self, num_malicious: int = 0) -> None:
        self.num_malicious = int(num_malicious)

    def _params(self) -> dict[str, Any]:
        return {"num_malicious": self.num_malicious}

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights, finite=False)  # pairwise_sq_distances checks the values
        check_f(self.name, self.num_malicious, updates.shape[0], 1)
        scores = krum_scores(pairwise_sq_distances(updates), self.num_malicious)
        best = int(torch.argmin(scores))
        return AggregateResult(updates[best].clone(), (best,), {"krum": scores})


@register_aggregator("multi_krum")
class MultiKrum(RobustBase):
    """Multi-Krum: the (weighted) mean of the ``to_keep`` updates with the lowest Krum scores.

    ``to_keep = 0`` (default) keeps ``n - num_malicious``. Equals Flower's
    ``aggregate_krum(results, num_malicious, to_keep)`` for ``to_keep > 0``. The mean accumulates in
    float32 like Flower's (``accumulate = "float64"``: in float64, rounded once, about twice as slow).
    """

    name = "multi_krum"

    def __init__(
        self, num_malicious: int = 0, to_keep: int = 0, weighted: bool = True, accumulate: str = "float32"
    ) -> None:
        if accumulate not in ("float32", "float64"):
            raise AggregationError(f"multi_krum: accumulate must be 'float32' or 'float64', got {accumulate!r}")
        self.num_malicious = int(num_malicious)
        self.to_keep = int(to_keep)
        self.weighted = bool(weighted)
        self.accumulate = accumulate

    def _params(self) -> dict[str, Any]:
        return {
            "num_malicious": self.num_malicious,
            "to_keep": self.to_keep,
            "weighted": self.weighted,
            "accumulate": self.accumulate,
        }

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights, finite=False)  # pairwise_sq_distances checks the values
        n = updates.shape[0]
        check_f(self.name, self.num_malicious, n, 1)
        m = self.to_keep if self.to_keep > 0 else max(1, n - self.num_malicious)
        if m > n:
            raise AggregationError(f"multi_krum: to_keep={m} exceeds the {n} updates received")
        scores = krum_scores(pairwise_sq_distances(updates), self.num_malicious)
        keep = torch.sort(torch.argsort(scores, stable=True)[:m]).values
        w = unit_weights(weights[keep], self.weighted)
        sel = tuple(int(i) for i in keep)
        full = torch.zeros(n, dtype=w.dtype)  # zero weight for the rest: no copy of the kept rows
        full[keep] = w
        mean = weighted_mean_f32 if self.accumulate == "float32" else weighted_mean
        return AggregateResult(mean(updates, full), sel, {"krum": scores})


def bulyan_select(d2: torch.Tensor, f: int) -> list[int]:
    """Bulyan's selection: ``n - 2f`` rounds of Krum, each over the updates not yet selected."""
    n = d2.shape[0]
    remaining = list(range(n))
    chosen: list[int] = []
    for _ in range(n - 2 * f):
        idx = torch.tensor(remaining)
        scores = krum_scores(d2[idx][:, idx], f)
        best = remaining[int(torch.argmin(scores))]
        chosen.append(best)
        remaining.remove(best)
    return chosen


def mean_closest_to(x: torch.Tensor, centre: torch.Tensor, beta: int) -> torch.Tensor:
    """Coordinate-wise mean of the ``beta`` values of each column closest to ``centre``; ``beta`` must be
    in ``[1, n]`` (Flower's ``_aggregate_n_closest_weights`` refuses more values than there are too)."""
    n = x.shape[0]
    if not 1 <= beta <= n:
        raise AggregationError(f"mean_closest_to: beta must be between 1 and the {n} updates, got {beta}")
    if beta == n:
        return x.to(torch.float64).mean(dim=0).to(torch.float32)
    out = torch.empty(x.shape[1], dtype=torch.float32, device=x.device)
    for j in range(0, x.shape[1], CHUNK):
        b = x[:, j : j + CHUNK].T
        idx = (b - centre[j : j + CHUNK, None]).abs().topk(beta, dim=1, largest=False).indices
        out[j : j + CHUNK] = b.gather(1, idx).to(torch.float64).mean(dim=1).to(torch.float32)
    return out


@register_aggregator("bulyan")
class Bulyan(RobustBase):
    """Bulyan (El Mhamdi et al. 2018) over Krum; needs ``n >= 4f + 3``. Equals Flower's
    ``aggregate_bulyan(results, f, aggregate_krum, to_keep=0)``."""

    name = "bulyan"

    def __init__(self, num_malicious: int = 0) -> None:
        self.num_malicious = int(num_malicious)

    def _params(self) -> dict[str, Any]:
        return {"num_malicious": self.num_malicious}

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights, finite=False)  # pairwise_sq_distances checks the values
        f = self.num_malicious
        n = updates.shape[0]
        check_f(self.name, f, n, 4 * f + 3)
        chosen = bulyan_select(pairwise_sq_distances(updates), f)
        sel = updates[torch.tensor(chosen)]
        params = mean_closest_to(sel, coordinate_median(sel), len(chosen) - 2 * f)
        return AggregateResult(params, tuple(sorted(chosen)), {"bulyan_order": torch.tensor(chosen)})


@register_aggregator("geometric_median")
class GeometricMedian(RobustBase):
    """Geometric median by smoothed Weiszfeld iterations (RFA, Pillutla et al. 2022).

    Minimises ``sum_i a_i max(nu, |x_i - z|)``; ``a_i`` uniform unless ``weighted``. Stops when the
    objective improves by less than ``tol`` (relative) or after ``max_iter`` iterations.
    """

    name = "geometric_median"

    def __init__(self, max_iter: int = 100, tol: float = 1e-6, nu: float = 1e-6, weighted: bool = False) -> None:
        if max_iter < 1 or tol < 0 or nu <= 0:
            raise AggregationError("geometric_median: need max_iter >= 1, tol >= 0, nu > 0")
        self.max_iter, self.tol, self.nu, self.weighted = int(max_iter), float(tol), float(nu), bool(weighted)

    def _params(self) -> dict[str, Any]:
        return {"max_iter": self.max_iter, "tol": self.tol, "nu": self.nu, "weighted": self.weighted}

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights)
        x = updates.to(torch.float64)
        a = unit_weights(weights, self.weighted).to(torch.float64)
        a = a / a.sum()
        z = a @ x
        dist = torch.linalg.vector_norm(x - z, dim=1)
        obj = float(a @ dist.clamp_min(self.nu))
        iters = 0
        for iters in range(1, self.max_iter + 1):  # noqa: B007
            beta = a / dist.clamp_min(self.nu)
            z = (beta @ x) / beta.sum()
            dist = torch.linalg.vector_norm(x - z, dim=1)
            new = float(a @ dist.clamp_min(self.nu))
            done = abs(obj - new) <= self.tol * max(new, 1e-30)
            obj = new
            if done:
                break
        log.debug("geometric_median: %d Weiszfeld iterations, objective %.6g", iters, obj)
        return AggregateResult(z.to(torch.float32), tuple(range(updates.shape[0])), {"distance": dist})


@register_aggregator("centered_clipping")
class CenteredClipping(RobustBase):
    """Centered clipping (Karimireddy et al. 2021), on deltas, with memory across rounds.

    ``v`` starts at the previous round's aggregate (its "history"; zero in the first round) and
    ``iters`` times moves by ``mean_i clip(x_i - v, tau)``. ``tau = 0`` (default) picks the radius
    each iteration as the median of ``|x_i - v|``, which a malicious minority cannot inflate.
    With ``momentum > 0`` the returned delta is ``m = momentum * m + (1 - momentum) * v``.
    With ``reject > 0`` an update farther than ``reject * tau`` from ``v`` gets no weight in that
    iteration (the others' weights are renormalised) instead of being clipped to ``tau``: a far
    attacker then pulls the centre by nothing rather than by ``tau`` in its direction.
    With ``clamp > 0`` each coordinate of the result is clamped to the range that remains after cutting
    ``int(clamp * n)`` updates at each end in that coordinate (the trimmed mean's range): a coordinate
    that only a minority moves (a backdoor trigger's weights, which honest data never touches) keeps the
    majority's value there, which clipping a whole vector to a radius cannot give.
    With ``weighted`` the updates count by their example counts; ``weight_cap > 0`` then caps each count
    at ``weight_cap`` times the round's median positive count, so a participant claiming more examples than that
    counts as that many (a claim cannot buy more than ``weight_cap`` median participants' say).
    With ``lift > 0`` every update's component along the round's consensus direction is first raised to at
    least the ``int(lift * n)``-th lowest (:func:`lift_rows`): the harm a clipped attacker does comes from
    pulling against the direction the majority moves, and this bounds that pull by the majority's own.
    """

    name = "centered_clipping"
    operates_on = "deltas"

    def __init__(
        self,
        tau: float = 0.0,
        iters: int = 3,
        momentum: float = 0.0,
        weighted: bool = False,
        reject: float = 0.0,
        max_cosine: float = 0.0,
        clamp: float = 0.0,
        weight_cap: float = 0.0,
        lift: float = 0.0,
    ) -> None:
        if not 0.0 <= lift < 1.0:
            raise AggregationError("centered_clipping: need 0 <= lift < 1 (0 = off)")
        self.lift = float(lift)
        if weight_cap < 0 or (weight_cap > 0 and not weighted):
            raise AggregationError("centered_clipping: need weight_cap >= 0 (0 = off), and weighted = true with it")
        self.weight_cap = float(weight_cap)
        if tau < 0 or iters < 1 or not 0.0 <= momentum < 1.0 or not (reject == 0 or reject >= 1):
            raise AggregationError(
                "centered_clipping: need tau >= 0, iters >= 1, 0 <= momentum < 1, reject = 0 or reject >= 1"
            )
        self.tau, self.iters, self.momentum, self.weighted = float(tau), int(iters), float(momentum), bool(weighted)
        self.reject = float(reject)
        if not 0.0 <= max_cosine <= 1.0:
            raise AggregationError("centered_clipping: need 0 <= max_cosine <= 1 (0 = off)")
        self.max_cosine = float(max_cosine)
        if not 0.0 <= clamp < 0.5:
            raise AggregationError("centered_clipping: need 0 <= clamp < 0.5 (0 = off)")
        self.clamp = float(clamp)
        self.center: torch.Tensor | None = None
        self.buffer: torch.Tensor | None = None

    def _params(self) -> dict[str, Any]:
        p = {"tau": self.tau, "iters": self.iters, "momentum": self.momentum, "weighted": self.weighted}
        if self.reject:
            p["reject"] = self.reject
        if self.max_cosine:
            p["max_cosine"] = self.max_cosine
        if self.clamp:
            p["clamp"] = self.clamp
        if self.weight_cap:
            p["weight_cap"] = self.weight_cap
        if self.lift:
            p["lift"] = self.lift
        return p

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights)
        sent = x = updates.to(torch.float64)
        cut = int(self.clamp * sent.shape[0])
        ordered = sent.sort(dim=0).values if cut or self.lift else None  # one sort for the clamp and the lift
        if self.lift:  # the clipping runs on the lifted rows; the copies check and the clamp on those sent
            x = lift_rows(sent, self.lift, ordered=ordered)
        a = unit_weights(weights, self.weighted).to(torch.float64)
        if self.weight_cap:  # the median of the positive counts (their sum is positive, checked above)
            a = a.clamp_max(self.weight_cap * median_distance(a[a > 0]))
        a = a / a.sum()
        d = x.shape[1]
        v = self.center.clone() if self.center is not None and self.center.numel() == d else torch.zeros(d).double()
        n = x.shape[0]
        scale = torch.ones(n, dtype=torch.float64)
        twins = self._near_duplicates(sent) if self.max_cosine else torch.zeros(n, dtype=torch.bool)
        for _ in range(self.iters):
            r = x - v
            norms = torch.linalg.vector_norm(r, dim=1)
            tau = self.tau if self.tau > 0 else median_distance(norms[~twins])
            scale = torch.where(norms > tau, tau / norms.clamp_min(1e-30), torch.ones_like(norms))
            drop = twins
            if self.reject:
                far = twins | (norms > self.reject * tau)
                if not bool(far.all()):
                    drop = far
            step = a
            if bool(drop.any()):
                scale = scale.masked_fill(drop, 0.0)
                step = a.masked_fill(drop, 0.0)
                step = step / step.sum()
            v = v + (step * scale) @ r
        if cut and ordered is not None:
            v = torch.minimum(torch.maximum(v, ordered[cut]), ordered[n - 1 - cut])
        self.center = v
        out = v
        if self.momentum > 0:
            m = self.buffer if self.buffer is not None and self.buffer.numel() == d else torch.zeros_like(v)
            self.buffer = out = self.momentum * m + (1.0 - self.momentum) * v
        kept = tuple(int(i) for i in (scale > 0).nonzero().flatten())
        return AggregateResult(out.to(torch.float32), kept, {"clip_scale": scale})

    def _near_duplicates(self, x: torch.Tensor) -> torch.Tensor:
        """Updates whose cosine similarity to another update reaches ``max_cosine`` (colluding
        participants that send one vector, as FoolsGold assumes of sybils); none when that would
        leave out half of the updates or more."""
        norms = torch.linalg.vector_norm(x, dim=1)
        cos = (x @ x.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
        cos.fill_diagonal_(-1.0)
        cos[norms == 0] = -1.0
        cos[:, norms == 0] = -1.0  # zero updates have no direction
        twins = cos.max(dim=1).values >= self.max_cosine - 1e-12
        return twins if 2 * int(twins.sum()) < x.shape[0] else torch.zeros_like(twins)

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = {}
        if self.center is not None:
            s["center"] = self.center
        if self.buffer is not None:
            s["momentum_buffer"] = self.buffer
        return s

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = set(state) - {"center", "momentum_buffer"}
        if unknown:
            raise AggregationError(f"centered_clipping: unknown state keys {sorted(unknown)}")
        c, b = state.get("center"), state.get("momentum_buffer")
        self.center = c.to(torch.float64).clone() if c is not None else None
        self.buffer = b.to(torch.float64).clone() if b is not None else None


@register_aggregator("norm_bound")
class NormBound(RobustBase):
    """Norm bounding (Sun et al. 2019): clip each delta to ``max_norm`` then average.

    ``max_norm = 0`` (default) uses the median of this round's delta norms.
    """

    name = "norm_bound"
    operates_on = "deltas"

    def __init__(self, max_norm: float = 0.0, weighted: bool = True) -> None:
        if max_norm < 0:
            raise AggregationError(f"norm_bound: max_norm must be >= 0, got {max_norm}")
        self.max_norm, self.weighted = float(max_norm), bool(weighted)

    def _params(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "weighted": self.weighted}

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights)
        x = updates.to(torch.float64)
        norms = torch.linalg.vector_norm(x, dim=1)
        bound = self.max_norm if self.max_norm > 0 else median_distance(norms)
        scale = torch.where(norms > bound, bound / norms.clamp_min(1e-30), torch.ones_like(norms))
        a = unit_weights(weights, self.weighted).to(torch.float64)
        a = a / a.sum()
        out = (a * scale) @ x
        return AggregateResult(out.to(torch.float32), tuple(range(x.shape[0])), {"norm": norms})


@register_aggregator("fltrust")
class FLTrust(RobustBase):
    """FLTrust (Cao et al. 2021): trust each delta by ``relu(cos(delta_i, g0))`` and rescale it to
    ``|g0|``, where ``g0`` is the server's own delta from a small root dataset.

    The server delta comes from ``set_root_update(g0)`` (called each round before aggregation) or from
    ``root_update_fn()``; the simulation wires one up from ``root_size`` examples of the training set.
    """

    name = "fltrust"
    operates_on = "deltas"

    def __init__(self, root_size: int = 100, root_update_fn: Callable[[], torch.Tensor] | None = None) -> None:
        if root_size < 1:
            raise AggregationError(f"fltrust: root_size must be >= 1, got {root_size}")
        self.root_size = int(root_size)
        self.root_update_fn = root_update_fn
        self._root: torch.Tensor | None = None

    def _params(self) -> dict[str, Any]:
        return {"root_size": self.root_size}

    def set_root_update(self, g0: torch.Tensor) -> None:
        self._root = g0.detach().to(torch.float32).flatten()

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights)
        g0 = self.root_update_fn() if self.root_update_fn is not None else self._root
        self._root = None
        if g0 is None:
            raise AggregationError(
                "fltrust needs the server's root-data update for this round: call set_root_update(g0) "
                "or give root_update_fn (run_simulation does this for you)"
            )
        if g0.shape != (updates.shape[1],):
            raise AggregationError(f"fltrust: root update has shape {tuple(g0.shape)}, updates have {updates.shape[1]}")
        x = updates.to(torch.float64)
        g = g0.to(torch.float64)
        gn = torch.linalg.vector_norm(g)
        xn = torch.linalg.vector_norm(x, dim=1)
        cos = (x @ g) / (xn * gn).clamp_min(1e-30)
        ts = cos.clamp_min(0.0)
        if float(ts.sum()) <= 0.0:
            return AggregateResult(torch.zeros_like(updates[0]), (), {"trust": ts})
        scaled = x * (gn / xn.clamp_min(1e-30))[:, None]
        out = (ts @ scaled) / ts.sum()
        sel = tuple(int(i) for i in torch.nonzero(ts > 0).flatten())
        return AggregateResult(out.to(torch.float32), sel, {"trust": ts})
