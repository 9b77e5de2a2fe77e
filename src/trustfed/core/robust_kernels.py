"""Building blocks of the robust aggregators: pairwise distances (a blocked, multi-threaded Gram
matrix), coordinate-wise median and trimmed mean, Krum scores, and the aggregators' common base."""

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
    check_finite,
)
from trustfed.errors import AggregationError

log = logging.getLogger("trustfed.robust")

# Above this many values the pairwise-distance Gram matrix is computed in float32 (after centring,
# which removes the common offset that would otherwise cancel); below it, in float64.
_F64_GRAM_LIMIT = 2_000_000
CHUNK = 16_384
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
        out[j : j + CHUNK] = fn(np.ascontiguousarray(a[:, j : j + CHUNK].T))

    _for_each_block(range(0, d, CHUNK), run)
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
        out[j : j + CHUNK] = wn @ a[:, j : j + CHUNK]

    _for_each_block(range(0, a.shape[1], CHUNK), run)
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


def unit_weights(weights: torch.Tensor, weighted: bool) -> torch.Tensor:
    return weights if weighted else torch.ones_like(weights)


def check_f(name: str, f: int, n: int, need: int) -> None:
    if f < 0:
        raise AggregationError(f"{name}: num_malicious must be >= 0, got {f}")
    if n < need:
        raise AggregationError(
            f"{name} with num_malicious={f} needs at least {need} updates, got {n}; "
            "lower num_malicious or select more participants"
        )


def median_distance(norms: torch.Tensor) -> float:
    """numpy-style median of a small 1-D tensor, as a float."""
    return float(np.median(norms.detach().cpu().numpy()))


def consensus_direction(x: torch.Tensor, trim: float = 0.2, ordered: torch.Tensor | None = None) -> torch.Tensor:
    """The unit direction of the coordinate-wise trimmed mean of the rows of ``x`` (``int(trim * n)`` cut at
    each end of every coordinate; zero when that mean is zero): where the round's majority moves.
    ``ordered``: ``x`` already sorted in each coordinate, when the caller has it."""
    n = x.shape[0]
    cut = min(int(trim * n), (n - 1) // 2)
    ranked = x.sort(dim=0).values if ordered is None else ordered
    ref = ranked[cut : n - cut].mean(dim=0)
    norm = float(ref.norm())
    return ref / norm if norm > 0 else torch.zeros_like(ref)


def lift_rows(x: torch.Tensor, quantile: float, steps: int = 3, ordered: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` with every row's component along the round's consensus direction raised to at least the
    ``int(quantile * n)``-th lowest of them, its other components kept: no row pulls against where the
    majority moves by more than that share of the rows do. The direction starts at
    :func:`consensus_direction` and then follows the mean of the lifted rows (``steps`` lifts), so that a
    minority pulling together cannot turn it away from the majority's. ``ordered``: ``x`` sorted in each
    coordinate, when the caller has it (see :func:`consensus_direction`)."""
    n = x.shape[0]
    k = min(int(quantile * n), n - 1)
    u = consensus_direction(x, ordered=ordered)
    for _ in range(steps):
        proj = x @ u
        x = x + (proj.sort().values[k] - proj).clamp_min(0.0)[:, None] * u[None, :]
        m = x.mean(dim=0)
        if float(m.norm()) == 0:
            break
        u = m / m.norm()
    return x


# --------------------------------------------------------------------------- aggregators


class RobustBase:
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
