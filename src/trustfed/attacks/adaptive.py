"""Adaptive model-poisoning attacks as pure functions on deltas (``update - global``).

Attacks from the literature that know the aggregation rule, and attacks adapted to trustfed's own
default rule (centered clipping with far-update rejection and a colluding-copies rule):

* :func:`fang_krum`: Fang et al. 2020's full-knowledge attack on Krum (``-lambda * sign(mean)``, the
  largest ``lambda`` that Krum still selects, halved from the paper's upper bound);
* :func:`mimic_choice`: Karimireddy, He and Jaggi 2022's mimic attack (every attacker copies the honest
  participant farthest along the honest updates' top principal direction);
* :func:`at_radius`: updates at a chosen distance from the centre of centered clipping, in one harmful
  direction, pairwise cosine below the colluding-copies threshold;
* :func:`at_cosine`: as :func:`at_radius`, turned just enough to keep a chosen cosine to the honest
  mean (an attacker that knows a history rule on that cosine);
* :func:`spread_copies`: one crafted vector made into ``m`` copies whose pairwise cosine is exactly a
  chosen value (just below a duplicate rule's threshold);
* :func:`tailored_gamma`: Shejwalkar and Houmansadr 2021's aggregator-tailored search: the step along
  a perturbation that moves the given aggregator's output farthest from the honest mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from trustfed.attacks.api import AttackError
from trustfed.core.robust_kernels import krum_scores, pairwise_sq_distances

Aggregate = Callable[[torch.Tensor], torch.Tensor]


def _orthonormal(m: int, against: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``m`` random orthonormal rows ``[m, d]`` (float64), each orthogonal to every row of ``against``."""
    d = against.shape[1]
    if m + against.shape[0] > d:
        raise AttackError(f"cannot draw {m} orthogonal directions in dimension {d}")
    raw = torch.randn((d, m), generator=gen, dtype=torch.float64)
    basis = torch.cat([against.T.to(torch.float64), raw], dim=1)
    q, _ = torch.linalg.qr(basis)
    rows: torch.Tensor = q[:, against.shape[0] :].T.contiguous()
    return rows


def orthogonal_part(v: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """The unit part of ``v`` orthogonal to every row of ``against`` (float64)."""
    q, _ = torch.linalg.qr(against.T.to(torch.float64))
    v64 = v.to(torch.float64)
    return unit(v64 - q @ (q.T @ v64))


def unit(v: torch.Tensor) -> torch.Tensor:
    """``v`` scaled to length 1 (zero stays zero)."""
    out: torch.Tensor = v / v.norm().clamp_min(1e-30)
    return out


def pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of rows ``[n, n]`` (float64; the diagonal is 1)."""
    y = x.to(torch.float64)
    n = torch.linalg.vector_norm(y, dim=1).clamp_min(1e-30)
    cos: torch.Tensor = (y @ y.T) / (n[:, None] * n[None, :])
    return cos


def spread_copies(q: torch.Tensor, m: int, cosine: float, gen: torch.Generator) -> torch.Tensor:
    """``m`` rows ``q + s * e_i`` (``e_i`` orthonormal and orthogonal to ``q``) whose pairwise cosine is
    exactly ``cosine``: ``s = |q| sqrt(1 / cosine - 1)``. ``cosine >= 1`` (or one row) gives plain copies."""
    q64 = q.to(torch.float64)
    if m <= 1 or cosine >= 1.0:
        return q64.expand(m, -1).clone().to(q.dtype)
    if not 0.0 < cosine < 1.0:
        raise AttackError(f"spread_copies: cosine must be in (0, 1], got {cosine}")
    s = float(q64.norm()) * math.sqrt(1.0 / cosine - 1.0)
    e = _orthonormal(m, q64[None, :], gen)
    return (q64[None, :] + s * e).to(q.dtype)


def at_radius(
    honest: torch.Tensor,
    centre: torch.Tensor,
    m: int,
    radius: float,
    max_cosine: float,
    gen: torch.Generator,
    direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """``m`` deltas at distance ``radius * tau`` from ``centre`` (``tau`` the median distance of the honest
    deltas from it: centered clipping's radius), each ``centre + radius * tau * (a p + b e_i)`` with ``p``
    the unit ``direction`` (default: opposite the honest mean) and ``e_i`` orthonormal, orthogonal to
    ``p`` and the centre; ``a`` (``a^2 + b^2 = 1``) is the largest whose pairwise cosine stays at or below
    ``max_cosine`` (bisection), so a rule that leaves out near-copies does not see them."""
    h = honest.to(torch.float64)
    c = centre.to(torch.float64)
    tau = float(torch.linalg.vector_norm(h - c, dim=1).median())
    p = unit(direction.to(torch.float64)) if direction is not None else -unit(h.mean(dim=0))
    against = torch.stack([p, c]) if float(c.norm()) > 0 else p[None, :]
    e = _orthonormal(m, against, gen)

    def rows(a: float) -> torch.Tensor:
        return c[None, :] + radius * tau * (a * p[None, :] + math.sqrt(max(0.0, 1.0 - a * a)) * e)

    return rows(_share(float(c @ c), float(c @ p), radius * tau, m, max_cosine)).to(honest.dtype)


def _share(cc: float, cp: float, big_r: float, m: int, max_cosine: float) -> float:
    """The largest ``a`` in ``[0, 1]`` (``a^2 + b^2 = 1``) whose ``m`` rows ``c + R (a p + b e_i)`` keep a
    pairwise cosine at or below ``max_cosine`` (bisection). Every pair has one cosine when the ``e_i`` are
    orthonormal and orthogonal to the unit ``p`` and to ``c``: ``(|c|^2 + 2 R a c.p + R^2 a^2) /
    (|c|^2 + 2 R a c.p + R^2)``, ``cc = |c|^2``, ``cp = c.p``."""

    def ok(a: float) -> bool:
        if m <= 1:
            return True
        common = cc + 2.0 * big_r * a * cp
        den = common + big_r * big_r
        return den <= 0 or (common + big_r * big_r * a * a) / den <= max_cosine

    lo, hi = 0.0, 1.0
    if ok(hi):
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def at_cosine(
    honest: torch.Tensor,
    centre: torch.Tensor,
    m: int,
    radius: float,
    max_cosine: float,
    gen: torch.Generator,
    target: float,
    toward: torch.Tensor | None = None,
) -> torch.Tensor:
    """As :func:`at_radius`, the harmful direction turned toward a direction ``w`` orthogonal to the honest
    mean ``u`` (``p = -cos(t) u + sin(t) w``) just enough that every row's cosine to ``u`` is at least
    ``target`` (bisection on ``t`` in ``[0, pi/2]``): an attacker that knows a rule on the cosine to the
    aggregate, and stays just inside it. ``t = 0`` (:func:`at_radius`'s rows) when those already are.
    ``w`` is ``toward`` made orthogonal to ``u`` and the centre, or a random such direction."""
    h = honest.to(torch.float64)
    u = unit(h.mean(dim=0))
    c = centre.to(torch.float64)
    against = torch.stack([u, c]) if float(c.norm()) > 0 else u[None, :]
    w = _orthonormal(1, against, gen)[0] if toward is None else orthogonal_part(toward, against)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))

    def rows(t: float) -> torch.Tensor:
        p = -math.cos(t) * u + math.sin(t) * w
        return at_radius(h, c, m, radius, max_cosine, torch.Generator().manual_seed(seed), p)

    def ok(t: float) -> bool:
        r = rows(t)
        cos = (r @ u) / torch.linalg.vector_norm(r, dim=1).clamp_min(1e-30)
        return float(cos.min()) >= target

    lo, hi = 0.0, math.pi / 2
    if ok(lo):
        return rows(lo).to(honest.dtype)
    for _ in range(40):
        mid = (lo + hi) / 2.0
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return rows(hi).to(honest.dtype)


def krum_selects_crafted(honest: torch.Tensor, crafted: torch.Tensor, f: int) -> bool:
    """Whether Krum with ``f`` assumed attackers picks one of the ``crafted`` rows (placed first)."""
    x = torch.cat([crafted, honest.to(crafted.dtype)])
    scores = krum_scores(pairwise_sq_distances(x), f)
    return int(torch.argmin(scores)) < crafted.shape[0]


def fang_krum(
    honest: torch.Tensor, m: int, gen: torch.Generator, eps: float = 1e-3, min_lambda: float = 1e-5
) -> torch.Tensor:
    """Fang et al. 2020's full-knowledge attack on Krum, on deltas: ``m`` rows ``-lambda * s`` (``s`` the sign
    of the honest mean: the direction the model would move), the other attackers within ``eps * lambda *
    sqrt(d)`` of the first to support it. ``lambda`` starts at the paper's upper bound and is halved until
    Krum (told ``f = m``) selects a crafted row, or falls below ``min_lambda``."""
    h = honest.to(torch.float64)
    nh, d = h.shape
    n = nh + m
    s = torch.sign(h.mean(dim=0))
    d2 = pairwise_sq_distances(h)
    k = max(1, min(nh - 1, n - 2 * m - 2))
    near = d2.sqrt().sort(dim=1).values[:, 1 : k + 1].sum(dim=1) if nh > 1 else torch.zeros(1, dtype=h.dtype)
    lam = float(near.min()) / (max(1, n - 2 * m - 1) * math.sqrt(d)) + float(h.norm(dim=1).max()) / math.sqrt(d)
    noise = torch.randn((max(0, m - 1), d), generator=gen, dtype=torch.float64)
    noise = noise / torch.linalg.vector_norm(noise, dim=1, keepdim=True).clamp_min(1e-30)

    def rows(lam_: float) -> torch.Tensor:
        first = -lam_ * s
        return torch.cat([first[None, :], first[None, :] + eps * lam_ * math.sqrt(d) * noise])

    while lam > min_lambda and not krum_selects_crafted(h, rows(lam), m):
        lam /= 2.0
    return rows(lam).to(honest.dtype)


def mimic_choice(honest: torch.Tensor) -> int:
    """The mimic attack's target (Karimireddy, He and Jaggi 2022): the index of the honest delta farthest
    along the top principal direction of the honest deltas (the heterogeneity the attackers amplify by
    copying it, so that the aggregate over-represents one participant's data)."""
    h = honest.to(torch.float64)
    centred = h - h.mean(dim=0)
    if h.shape[0] < 2 or float(centred.abs().max()) == 0.0:
        return 0
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    z = vh[0]
    return int(torch.argmax((centred @ z).abs()))


def tailored_gamma(
    honest: torch.Tensor,
    direction: torch.Tensor,
    craft: Callable[[torch.Tensor], torch.Tensor],
    aggregate: Aggregate,
    grid: int = 16,
    refine: int = 4,
) -> float:
    """Shejwalkar and Houmansadr 2021's aggregator-tailored step: the ``gamma`` (on a geometric grid from
    ``2^-4`` to ``2^(grid - 5)`` times the honest spread, then refined between its neighbours) that
    maximises ``|aggregate(craft(mean + gamma * direction) ; honest) - mean(honest)|``. ``craft`` turns the
    malicious point into the attackers' rows; ``aggregate`` runs the target rule on all rows."""
    h = honest.to(torch.float64)
    mu = h.mean(dim=0)
    spread = float(torch.linalg.vector_norm(h - mu, dim=1).median()) or 1.0
    along = unit(direction.to(torch.float64))

    def damage(gamma: float) -> float:
        rows = craft(mu + gamma * along)
        out = aggregate(torch.cat([rows.to(torch.float64), h]))
        return float((out.to(torch.float64) - mu).norm())

    gammas = [spread * 2.0 ** (i - 4) for i in range(grid)]
    scores = [damage(g) for g in gammas]
    best = max(range(grid), key=lambda i: scores[i])
    lo = gammas[max(0, best - 1)]
    hi = gammas[min(grid - 1, best + 1)]
    for _ in range(refine):  # golden-section refinement of a unimodal neighbourhood
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        lo, hi = (lo, b) if damage(a) >= damage(b) else (a, hi)
    mid = (lo + hi) / 2.0
    return mid if damage(mid) >= scores[best] else gammas[best]


def turned_rows(
    centre: torch.Tensor,
    u: torch.Tensor,
    w: torch.Tensor,
    spread: torch.Tensor,
    radius: float,
    max_cosine: float,
    t: float,
) -> torch.Tensor:
    """Rows ``centre + radius (a p + b e_i)``, ``p = -cos(t) u + sin(t) w`` (``t = 0``: against the unit
    ``u``; ``pi / 2``: along the unit ``w``, orthogonal to it), ``e_i`` the rows of ``spread`` (orthonormal,
    orthogonal to ``u``, ``w`` and the centre), ``a`` the largest (``a^2 + b^2 = 1``) whose pairwise cosine
    stays at or below ``max_cosine`` (closed form of the cosine, bisection on ``a``)."""
    c = centre.to(torch.float64)
    p = -math.cos(t) * u + math.sin(t) * w
    a = _share(float(c @ c), float(c @ p), radius, spread.shape[0], max_cosine)
    return c[None, :] + radius * (a * p[None, :] + math.sqrt(max(0.0, 1.0 - a * a)) * spread)


def least_turn(
    rows_at: Callable[[float], torch.Tensor], score: Callable[[torch.Tensor], float], floor: float
) -> torch.Tensor:
    """``rows_at(t)`` for the smallest ``t`` in ``[0, pi]`` whose ``score`` is at least ``floor`` (bisection,
    12 steps; ``score`` is taken to grow with ``t``): the most harmful rows a score rule lets through."""
    if score(rows_at(0.0)) >= floor:
        return rows_at(0.0)
    lo, hi = 0.0, math.pi
    for _ in range(12):
        mid = (lo + hi) / 2.0
        lo, hi = (lo, mid) if score(rows_at(mid)) >= floor else (mid, hi)
    return rows_at(hi)
