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
import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from trustfed.core.aggregator import (
    AggregateResult,
    Aggregator,
    check_finite,
    check_inputs,
    get_aggregator,
    register_aggregator,
    weighted_mean,
)
from trustfed.errors import AggregationError

log = logging.getLogger("trustfed.robust")

# Above this many values the pairwise-distance Gram matrix is computed in float32 (after centring,
# which removes the common offset that would otherwise cancel); below it, in float64.
_F64_GRAM_LIMIT = 2_000_000
_CHUNK = 16_384
_GRAM_BLOCK = 8_192  # columns per Gram block (100 updates x 8k floats = 3 MiB: stays in cache)
_MAX_CANCELLATION = 4.0  # |x|^2 / |x - mean|^2 above which the float32 Gram is computed on centred blocks


# --------------------------------------------------------------------------- building blocks


def pairwise_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[n, n]`` (float64) from one Gram matrix ``X @ X.T``.

    The columns are centred so the expansion ``|a|^2 + |b|^2 - 2ab`` does not cancel the (often
    large) common part of model vectors. Centring is per column, so it is done block by block of
    columns, each block centred while it is in cache and its Gram added in float64: one pass over
    ``x`` and no ``[n, d]`` temporary. Small inputs are done in float64; large ones on the CPU in
    float32 with a symmetric rank-k update (BLAS ``syrk``, half the work of a general product),
    the column blocks split over ``torch.get_num_threads()`` threads, and centred only when the
    common part is large enough to need it (see :func:`_centred_gram_f32`).
    """
    n, d = x.shape
    if x.device.type == "cpu" and x.numel() > _F64_GRAM_LIMIT:
        g = torch.from_numpy(_centred_gram_f32(x.detach().numpy(), torch.get_num_threads()))
    else:
        g = torch.zeros(n, n, dtype=torch.float64, device=x.device)
        for j in range(0, d, _GRAM_BLOCK):
            b = x[:, j : j + _GRAM_BLOCK].to(torch.float64)
            b = b - b.mean(dim=0)
            g += b @ b.T
    sq = g.diagonal()
    # A NaN or an infinity in a row makes its squared norm NaN or infinite: callers that take these
    # distances skip check_inputs' own pass over the values (``finite=False``) and rely on this.
    check_finite(x, sq, "squared norms")
    d2 = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min_(0.0)
    d2 = (d2 + d2.T) * 0.5  # exactly symmetric, so tied Krum scores tie exactly (lowest index wins)
    d2.fill_diagonal_(0.0)
    if not bool(torch.isfinite(d2).all()):
        raise AggregationError("updates are too large to aggregate: their pairwise distances overflow")
    return d2


def _centred_gram_f32(a: np.ndarray, threads: int) -> np.ndarray:
    """A Gram matrix of ``a``'s rows (float64) that gives their pairwise distances to float32 accuracy.

    First the plain Gram of float32 column blocks: if no row's norm exceeds its distance from the
    mean by more than ``_MAX_CANCELLATION`` (a common part small enough that ``|a|^2 + |b|^2 - 2ab``
    loses at most two bits), that is the answer. Otherwise each block is centred before its
    product. numpy's ``b @ b.T`` is a BLAS ``syrk``; each worker thread takes every
    ``threads``-th block with a single-threaded BLAS (numpy releases the GIL), which is faster than
    one multi-threaded BLAS call per small block."""
    g = _blocked_gram(a, threads, centre=False)
    sq = g.diagonal()
    if not bool(np.all(np.isfinite(sq))):
        return g  # NaN, infinity or overflow: pairwise_sq_distances names the rows
    centred_sq = sq - 2.0 * g.mean(axis=1) + g.mean()  # |x_i - mean|^2, from the same Gram
    if bool(np.all(sq <= _MAX_CANCELLATION * centred_sq)):
        return g
    return _blocked_gram(a, threads, centre=True)


def _blocked_gram(a: np.ndarray, threads: int, centre: bool) -> np.ndarray:
    n, d = a.shape
    starts = range(0, d, _GRAM_BLOCK)
    workers = max(1, min(threads, len(starts)))

    def part(k: int) -> np.ndarray:
        g = np.zeros((n, n))
        # Non-finite values propagate to the diagonal, which the caller checks (errstate is per thread).
        with np.errstate(over="ignore", invalid="ignore"):
            for j in starts[k::workers]:
                b = a[:, j : j + _GRAM_BLOCK]
                if centre:
                    b = b - b.mean(axis=0)
                g += b @ b.T
        return g

    with _single_threaded_blas():
        if workers == 1:
            return part(0)
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(part, range(workers)))
    total: np.ndarray = sum(parts[1:], parts[0])
    return total


_THREADPOOLS: ThreadpoolController | None = None


def _single_threaded_blas() -> Any:
    """A context that limits BLAS to one thread (for BLAS calls made from our own worker threads).

    The controller is built once: ``threadpool_limits`` rescans the loaded libraries on every call
    (about 1 ms), a cached controller does not."""
    global _THREADPOOLS
    if _THREADPOOLS is None:
        _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS.limit(limits=1, user_api="blas")


def _for_each_block(starts: range, run: Callable[[int], None]) -> None:
    """``run(j)`` for every block start ``j``, over ``torch.get_num_threads()`` worker threads, each
    with a single-threaded BLAS (numpy releases the GIL in its kernels). Each block's result does not
    depend on which thread ran it, so neither does the whole."""
    threads = max(1, min(torch.get_num_threads(), len(starts)))
    with _single_threaded_blas():
        if threads == 1:
            for j in starts:
                run(j)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, starts))


def _columns_by_chunk(x: torch.Tensor, fn: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
    """Reduce every column of ``x`` ([n, d] -> [d]) with ``fn``, block by block of columns.

    ``fn`` gets a block transposed to a contiguous ``[columns, n]`` array and reduces along axis 1:
    numpy's selection kernels then run on contiguous rows, about twice as fast as along the strided
    axis 0. Blocks run in a small thread pool (introselect releases the GIL).
    """
    a = x.detach().cpu().numpy()
    d = a.shape[1]
    out = np.empty(d, dtype=np.float32)

    def run(j: int) -> None:
        out[j : j + _CHUNK] = fn(np.ascontiguousarray(a[:, j : j + _CHUNK].T))

    _for_each_block(range(0, d, _CHUNK), run)
    return torch.from_numpy(out).to(x.device)


def weighted_mean_f32(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean accumulated in float32, as Flower's ``aggregate`` does (a zero weight drops a row).

    About twice as fast as :func:`~trustfed.core.aggregator.weighted_mean` (float64, rounded once);
    the difference is a few float32 ulps of the result. On the CPU each block of columns is one
    single-threaded BLAS ``sgemv``, so the result does not depend on the thread count."""
    w = weights.to(torch.float64)
    w32 = (w / w.sum()).to(torch.float32)
    if x.device.type != "cpu":
        return w32.to(x.device) @ x
    a, wn = x.detach().numpy(), w32.numpy()
    out = np.empty(a.shape[1], dtype=np.float32)

    def run(j: int) -> None:
        out[j : j + _CHUNK] = wn @ a[:, j : j + _CHUNK]

    _for_each_block(range(0, a.shape[1], _CHUNK), run)
    return torch.from_numpy(out)


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median with numpy's definition (mean of the two middle values for even n)."""
    n = x.shape[0]
    if x.device.type != "cpu":
        s = x.sort(dim=0).values
        return s[(n - 1) // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) * 0.5
    if n % 2:
        k = n // 2
        return _columns_by_chunk(x, lambda b: np.partition(b, k, axis=1)[:, k])
    lo, hi = n // 2 - 1, n // 2

    def med(b: np.ndarray) -> np.ndarray:
        p = np.partition(b, (lo, hi), axis=1)
        r: np.ndarray = (p[:, lo] + p[:, hi]) * np.float32(0.5)
        return r

    return _columns_by_chunk(x, med)


def trimmed_mean(x: torch.Tensor, cut: int) -> torch.Tensor:
    """Coordinate-wise mean after dropping the ``cut`` smallest and ``cut`` largest values."""
    n = x.shape[0]
    if not 0 <= 2 * cut < n:
        raise AggregationError(f"trimmed mean cannot cut {cut} from each end of {n} updates")
    if cut == 0:
        return x.to(torch.float64).mean(dim=0).to(torch.float32)
    if x.device.type != "cpu":
        s = x.sort(dim=0).values
        return s[cut : n - cut].to(torch.float64).mean(dim=0).to(torch.float32)

    def tm(b: np.ndarray) -> np.ndarray:
        p = np.partition(b, (cut, n - cut - 1), axis=1)
        r: np.ndarray = p[:, cut : n - cut].mean(axis=1, dtype=np.float64).astype(np.float32)
        return r

    return _columns_by_chunk(x, tm)


def krum_scores(d2: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each update: sum of squared distances to its ``n - f - 2`` nearest others."""
    n = d2.shape[0]
    k = min(max(1, n - f - 2), n - 1)
    if k <= 0:
        return torch.zeros(n, dtype=torch.float64)
    off = d2.clone()
    off.fill_diagonal_(math.inf)
    return off.topk(k, dim=1, largest=False).values.sum(dim=1)


def _unit_weights(weights: torch.Tensor, weighted: bool) -> torch.Tensor:
    return weights if weighted else torch.ones_like(weights)


def _check_f(name: str, f: int, n: int, need: int) -> None:
    if f < 0:
        raise AggregationError(f"{name}: num_malicious must be >= 0, got {f}")
    if n < need:
        raise AggregationError(
            f"{name} with num_malicious={f} needs at least {need} updates, got {n}; "
            "lower num_malicious or select more participants"
        )


def _median_distance(norms: torch.Tensor) -> float:
    """numpy-style median of a small 1-D tensor, as a float."""
    return float(np.median(norms.detach().cpu().numpy()))


# --------------------------------------------------------------------------- aggregators


class _Base:
    name = "robust"
    operates_on = "models"

    def _params(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self._params()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise AggregationError(f"aggregator {self.name} keeps no state but got {sorted(state)}")


@register_aggregator("median")
class CoordinateMedian(_Base):
    """Coordinate-wise median (Yin et al. 2018); equals Flower's ``aggregate_median``."""

    name = "median"

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights)
        return AggregateResult(coordinate_median(updates), tuple(range(updates.shape[0])))


@register_aggregator("trimmed_mean")
class TrimmedMean(_Base):
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
class Krum(_Base):
    """Krum (Blanchard et al. 2017): the update with the smallest Krum score."""

    name = "krum"

    def __init__(self, num_malicious: int = 0) -> None:
        self.num_malicious = int(num_malicious)

    def _params(self) -> dict[str, Any]:
        return {"num_malicious": self.num_malicious}

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights, finite=False)  # pairwise_sq_distances checks the values
        _check_f(self.name, self.num_malicious, updates.shape[0], 1)
        scores = krum_scores(pairwise_sq_distances(updates), self.num_malicious)
        best = int(torch.argmin(scores))
        return AggregateResult(updates[best].clone(), (best,), {"krum": scores})


@register_aggregator("multi_krum")
class MultiKrum(_Base):
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
        _check_f(self.name, self.num_malicious, n, 1)
        m = self.to_keep if self.to_keep > 0 else max(1, n - self.num_malicious)
        if m > n:
            raise AggregationError(f"multi_krum: to_keep={m} exceeds the {n} updates received")
        scores = krum_scores(pairwise_sq_distances(updates), self.num_malicious)
        keep = torch.sort(torch.argsort(scores, stable=True)[:m]).values
        w = _unit_weights(weights[keep], self.weighted)
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
    """Coordinate-wise mean of the ``beta`` values of each column closest to ``centre``."""
    n = x.shape[0]
    if beta >= n:
        return x.to(torch.float64).mean(dim=0).to(torch.float32)
    out = torch.empty(x.shape[1], dtype=torch.float32, device=x.device)
    for j in range(0, x.shape[1], _CHUNK):
        b = x[:, j : j + _CHUNK].T
        idx = (b - centre[j : j + _CHUNK, None]).abs().topk(beta, dim=1, largest=False).indices
        out[j : j + _CHUNK] = b.gather(1, idx).to(torch.float64).mean(dim=1).to(torch.float32)
    return out


@register_aggregator("bulyan")
class Bulyan(_Base):
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
        _check_f(self.name, f, n, 4 * f + 3)
        chosen = bulyan_select(pairwise_sq_distances(updates), f)
        sel = updates[torch.tensor(chosen)]
        params = mean_closest_to(sel, coordinate_median(sel), len(chosen) - 2 * f)
        return AggregateResult(params, tuple(sorted(chosen)), {"bulyan_order": torch.tensor(chosen)})


@register_aggregator("geometric_median")
class GeometricMedian(_Base):
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
        a = _unit_weights(weights, self.weighted).to(torch.float64)
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
class CenteredClipping(_Base):
    """Centered clipping (Karimireddy et al. 2021), on deltas, with memory across rounds.

    ``v`` starts at the previous round's aggregate (its "history"; zero in the first round) and
    ``iters`` times moves by ``mean_i clip(x_i - v, tau)``. ``tau = 0`` (default) picks the radius
    each iteration as the median of ``|x_i - v|``, which a malicious minority cannot inflate.
    With ``momentum > 0`` the returned delta is ``m = momentum * m + (1 - momentum) * v``.
    With ``reject > 0`` an update farther than ``reject * tau`` from ``v`` gets no weight in that
    iteration (the others' weights are renormalised) instead of being clipped to ``tau``: a far
    attacker then pulls the centre by nothing rather than by ``tau`` in its direction.
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
    ) -> None:
        if tau < 0 or iters < 1 or not 0.0 <= momentum < 1.0 or not (reject == 0 or reject >= 1):
            raise AggregationError(
                "centered_clipping: need tau >= 0, iters >= 1, 0 <= momentum < 1, reject = 0 or reject >= 1"
            )
        self.tau, self.iters, self.momentum, self.weighted = float(tau), int(iters), float(momentum), bool(weighted)
        self.reject = float(reject)
        if not 0.0 <= max_cosine <= 1.0:
            raise AggregationError("centered_clipping: need 0 <= max_cosine <= 1 (0 = off)")
        self.max_cosine = float(max_cosine)
        self.center: torch.Tensor | None = None
        self.buffer: torch.Tensor | None = None

    def _params(self) -> dict[str, Any]:
        p = {"tau": self.tau, "iters": self.iters, "momentum": self.momentum, "weighted": self.weighted}
        if self.reject:
            p["reject"] = self.reject
        if self.max_cosine:
            p["max_cosine"] = self.max_cosine
        return p

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights)
        x = updates.to(torch.float64)
        a = _unit_weights(weights, self.weighted).to(torch.float64)
        a = a / a.sum()
        d = x.shape[1]
        v = self.center.clone() if self.center is not None and self.center.numel() == d else torch.zeros(d).double()
        n = x.shape[0]
        scale = torch.ones(n, dtype=torch.float64)
        twins = self._near_duplicates(x) if self.max_cosine else torch.zeros(n, dtype=torch.bool)
        for _ in range(self.iters):
            r = x - v
            norms = torch.linalg.vector_norm(r, dim=1)
            tau = self.tau if self.tau > 0 else _median_distance(norms[~twins])
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
class NormBound(_Base):
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
        bound = self.max_norm if self.max_norm > 0 else _median_distance(norms)
        scale = torch.where(norms > bound, bound / norms.clamp_min(1e-30), torch.ones_like(norms))
        a = _unit_weights(weights, self.weighted).to(torch.float64)
        a = a / a.sum()
        out = (a * scale) @ x
        return AggregateResult(out.to(torch.float32), tuple(range(x.shape[0])), {"norm": norms})


@register_aggregator("fltrust")
class FLTrust(_Base):
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


def _inner(inner: str | Aggregator, params: Mapping[str, Any]) -> Aggregator:
    if not isinstance(inner, str):
        return inner
    sub = {k[len("inner_") :]: v for k, v in params.items() if k.startswith("inner_")}
    bad = [k for k in params if not k.startswith("inner_")]
    if bad:
        raise AggregationError(f"unknown parameters {bad}; parameters of the inner aggregator start with 'inner_'")
    return get_aggregator(inner, **sub)


def _inner_state(inner: Aggregator) -> dict[str, torch.Tensor]:
    """A wrapper's checkpoint entries for its inner aggregator's state, under ``inner.``."""
    state: dict[str, torch.Tensor] = getattr(inner, "state_dict", dict)()
    return {f"inner.{k}": v for k, v in state.items()}


def _load_inner_state(name: str, inner: Aggregator, state: Mapping[str, torch.Tensor]) -> None:
    sub = {k[len("inner.") :]: v for k, v in state.items() if k.startswith("inner.")}
    if hasattr(inner, "load_state_dict"):
        inner.load_state_dict(sub)
    elif sub:
        raise AggregationError(f"{name}: inner aggregator keeps no state but got {sorted(sub)}")


@register_aggregator("bucketing")
class Bucketing(_Base):
    """Bucketing (Karimireddy et al. 2022): shuffle, average buckets of ``bucket_size``, then apply
    the ``inner`` aggregator to the bucket means. Inner parameters are passed as ``inner_<name>``."""

    name = "bucketing"

    def __init__(self, bucket_size: int = 2, inner: str | Aggregator = "median", seed: int = 0, **inner_params: Any):
        if bucket_size < 1:
            raise AggregationError(f"bucketing: bucket_size must be >= 1, got {bucket_size}")
        self.bucket_size, self.seed = int(bucket_size), int(seed)
        self.inner = _inner(inner, inner_params)
        self.operates_on = getattr(self.inner, "operates_on", "models")
        self.calls = 0

    def _params(self) -> dict[str, Any]:
        return {"bucket_size": self.bucket_size, "seed": self.seed, "inner": self.inner.describe()}

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights)
        n = updates.shape[0]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        perm = torch.randperm(n, generator=gen)
        groups = [perm[i : i + self.bucket_size] for i in range(0, n, self.bucket_size)]
        means = torch.stack([updates[g].to(torch.float64).mean(dim=0) for g in groups]).to(torch.float32)
        bw = torch.stack([weights[g].sum() for g in groups])
        res = self.inner(means, bw)
        sel = tuple(sorted(int(i) for b in res.selected for i in groups[b]))
        scores = {
            **res.scores,
            "bucket": torch.tensor([next(b for b, g in enumerate(groups) if i in g) for i in range(n)]),
        }
        return AggregateResult(res.params, sel, scores)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"calls": torch.tensor(self.calls), **_inner_state(self.inner)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.calls = int(state["calls"]) if "calls" in state else 0
        _load_inner_state(self.name, self.inner, state)


@register_aggregator("krum_filter")
class KrumFilter(_Base):
    """A selection stage before any aggregator: drop the updates with the highest Krum scores, then
    apply ``inner`` to the rest (Multi-Krum's selection; El Mhamdi et al. 2018 use it the same way
    in front of a coordinate-wise rule).

    ``num_malicious`` (f) is the number dropped; with ``num_malicious = 0`` it is
    ``int(fraction * n)`` of the updates received in that round. The Krum scores use the same f.
    Far-away updates (sign flips, IPM with a large factor, boosted backdoors) are removed outright;
    the inner rule (default centered clipping) handles what stays close to the benign updates.
    Inner parameters are passed as ``inner_<name>``; scores of dropped updates are NaN.
    """

    name = "krum_filter"

    def __init__(
        self,
        num_malicious: int = 0,
        fraction: float = 0.2,
        inner: str | Aggregator = "centered_clipping",
        **inner_params: Any,
    ):
        if num_malicious < 0 or not 0.0 <= fraction < 0.5:
            raise AggregationError("krum_filter: need num_malicious >= 0 and 0 <= fraction < 0.5")
        self.num_malicious, self.fraction = int(num_malicious), float(fraction)
        self.inner = _inner(inner, inner_params)
        self.operates_on = getattr(self.inner, "operates_on", "models")

    def _params(self) -> dict[str, Any]:
        return {"num_malicious": self.num_malicious, "fraction": self.fraction, "inner": self.inner.describe()}

    def dropped_count(self, n: int) -> int:
        return self.num_malicious if self.num_malicious > 0 else int(self.fraction * n)

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights)
        n = updates.shape[0]
        f = self.dropped_count(n)
        _check_f(self.name, f, n, f + 1)
        if f == 0:
            return self.inner(updates, weights)
        scores = krum_scores(pairwise_sq_distances(updates), f)
        keep = torch.sort(torch.argsort(scores, stable=True)[: n - f]).values
        res = self.inner(updates[keep], weights[keep])
        out_scores = {"krum": scores}
        for k, v in res.scores.items():
            if v.shape[:1] == (n - f,):
                full = torch.full((n, *v.shape[1:]), math.nan, dtype=torch.float64)
                full[keep] = v.to(torch.float64)
                out_scores[k] = full
        return AggregateResult(res.params, tuple(int(keep[i]) for i in res.selected), out_scores)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _inner_state(self.inner)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_inner_state(self.name, self.inner, state)


@register_aggregator("server_momentum")
class ServerMomentum(_Base):
    """Server momentum around any aggregator, on deltas: ``m = beta * m + (1 - dampening) * agg``.

    ``inner`` names the aggregator (its parameters as ``inner_<name>``); the returned delta is ``m``.
    """

    name = "server_momentum"
    operates_on = "deltas"

    def __init__(
        self, beta: float = 0.9, dampening: float = 0.9, inner: str | Aggregator = "mean", **inner_params: Any
    ):
        if not 0.0 <= beta < 1.0 or not 0.0 <= dampening < 1.0:
            raise AggregationError("server_momentum: need 0 <= beta < 1 and 0 <= dampening < 1")
        self.beta, self.dampening = float(beta), float(dampening)
        self.inner = _inner(inner, inner_params)
        self.buffer: torch.Tensor | None = None

    def _params(self) -> dict[str, Any]:
        return {"beta": self.beta, "dampening": self.dampening, "inner": self.inner.describe()}

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        res = self.inner(updates, weights)
        g = res.params.to(torch.float64)
        m = self.buffer if self.buffer is not None and self.buffer.shape == g.shape else torch.zeros_like(g)
        self.buffer = self.beta * m + (1.0 - self.dampening) * g
        return AggregateResult(self.buffer.to(torch.float32), res.selected, res.scores)

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = _inner_state(self.inner)
        if self.buffer is not None:
            s["momentum_buffer"] = self.buffer
        return s

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        b = state.get("momentum_buffer")
        self.buffer = b.to(torch.float64).clone() if b is not None else None
        inner = {k[len("inner.") :]: v for k, v in state.items() if k.startswith("inner.")}
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(inner)
