"""Model-poisoning attacks as pure functions on update deltas (``update - global``).

Local attacks transform one participant's own delta. Omniscient attacks (ALIE, IPM, min-max,
min-sum, Fang's trimmed-mean attack) see every participant's delta ``[n, d]`` and replace the
malicious rows; in simulation they run on the collected updates before aggregation, as the
registered attacks of :mod:`trustfed.attacks.builtin`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from statistics import NormalDist

import torch

from trustfed.attacks.api import AttackError

Params = Mapping[str, float | int | bool | str]


def _f(params: Params, key: str, default: float) -> float:
    v = params.get(key, default)
    if isinstance(v, str):
        raise AttackError(f"attack parameter {key!r} must be a number, got {v!r}")
    return float(v)


# --------------------------------------------------------------------------- local


def sign_flip(delta: torch.Tensor, params: Params, gen: torch.Generator) -> torch.Tensor:
    """Send ``-scale * delta`` (default scale 4: the honest direction, reversed and amplified)."""
    return -_f(params, "scale", 4.0) * delta


def gaussian_noise(delta: torch.Tensor, params: Params, gen: torch.Generator) -> torch.Tensor:
    """Send N(0, sigma^2) noise instead of the delta (default sigma 1)."""
    return torch.randn(delta.shape, generator=gen, dtype=delta.dtype) * _f(params, "sigma", 1.0)


def free_ride(delta: torch.Tensor, params: Params, gen: torch.Generator) -> torch.Tensor:
    """Train nothing: return the global model (``mode = "global"``) or it plus small noise (``"noise"``)."""
    mode = params.get("mode", "global")
    if mode == "global":
        return torch.zeros_like(delta)
    if mode == "noise":
        return torch.randn(delta.shape, generator=gen, dtype=delta.dtype) * _f(params, "sigma", 1e-3)
    raise AttackError(f"free_rider mode must be 'global' or 'noise', got {mode!r}")


def boost(delta: torch.Tensor, params: Params, gen: torch.Generator) -> torch.Tensor:
    """Model replacement (Bagdasaryan et al. 2020): scale the (backdoored) delta by ``boost``."""
    return _f(params, "boost", 10.0) * delta


# --------------------------------------------------------------------------- omniscient


def _benign_stats(deltas: torch.Tensor, benign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = deltas[benign].to(torch.float64)
    std = b.std(dim=0, unbiased=False) if b.shape[0] > 1 else torch.zeros_like(b[0])
    return b.mean(dim=0), std


def alie_z(n: int, m: int) -> float:
    """ALIE's z_max (Baruch et al. 2019): s = floor(n/2 + 1) - m supporters, z = Phi^-1((n - s)/n)."""
    s = math.floor(n / 2 + 1) - m
    p = (n - s) / n
    if not 0.0 < p < 1.0:
        return 0.0
    return NormalDist().inv_cdf(p)


def alie(deltas: torch.Tensor, malicious: torch.Tensor, params: Params) -> torch.Tensor:
    """ "A little is enough": every malicious delta is ``mean - z * std`` of the benign deltas."""
    benign = ~malicious
    mu, sd = _benign_stats(deltas, benign)
    z = _f(params, "z", alie_z(deltas.shape[0], int(malicious.sum())))
    return _replace(deltas, malicious, mu - z * sd)


def ipm(deltas: torch.Tensor, malicious: torch.Tensor, params: Params) -> torch.Tensor:
    """Inner-product manipulation (Xie et al. 2020): ``-epsilon * mean(benign)`` (default 0.5)."""
    mu, _ = _benign_stats(deltas, ~malicious)
    return _replace(deltas, malicious, -_f(params, "epsilon", 0.5) * mu)


def _direction(mu: torch.Tensor, sd: torch.Tensor, kind: object) -> torch.Tensor:
    if kind == "std":
        return -sd
    if kind == "unit":
        unit: torch.Tensor = -mu / mu.norm().clamp_min(1e-30)
        return unit
    if kind == "sign":
        return -torch.sign(mu)
    raise AttackError(f"min-max/min-sum direction must be 'std', 'unit' or 'sign', got {kind!r}")


def _largest_gamma(check: Callable[[float], bool], hi: float = 1.0, iters: int = 40) -> float:
    """Largest gamma >= 0 with check(gamma) true, assuming it holds up to a threshold (bisection)."""
    if not check(0.0):
        return 0.0
    while check(hi) and hi < 1e12:
        hi *= 2.0
    lo = hi / 2.0 if hi > 1.0 else 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if check(mid) else (lo, mid)
    return lo


def _min_max_or_sum(deltas: torch.Tensor, malicious: torch.Tensor, params: Params, mode: str) -> torch.Tensor:
    benign = ~malicious
    b = deltas[benign].to(torch.float64)
    mu, sd = _benign_stats(deltas, benign)
    p = _direction(mu, sd, params.get("direction", "std"))
    # |mu + g p - b_i|^2 = c_i + 2 g p.(mu - b_i) + g^2 |p|^2 : a quadratic in gamma per benign update.
    diff = mu - b
    c = (diff * diff).sum(dim=1)
    lin = 2.0 * (diff @ p)
    quad = float(p @ p)
    g = b @ b.T
    sq = g.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min(0.0)
    if mode == "min_max":
        bound = float(d2.max())

        def ok(gam: float) -> bool:
            return float((c + gam * lin + gam * gam * quad).max()) <= bound
    else:
        bound = float(d2.sum(dim=1).max())

        def ok(gam: float) -> bool:
            return float((c + gam * lin + gam * gam * quad).sum()) <= bound

    gamma = _largest_gamma(ok)
    return _replace(deltas, malicious, mu + gamma * p)


def min_max(deltas: torch.Tensor, malicious: torch.Tensor, params: Params) -> torch.Tensor:
    """Min-max (Shejwalkar & Houmansadr 2021): ``mean + gamma * p``, the largest gamma whose distance
    to every benign delta stays within the largest benign pairwise distance. ``direction``: std
    (default, p = -std), unit (-mean/|mean|) or sign (-sign(mean))."""
    return _min_max_or_sum(deltas, malicious, params, "min_max")


def min_sum(deltas: torch.Tensor, malicious: torch.Tensor, params: Params) -> torch.Tensor:
    """Min-sum: as min-max, but the sum of squared distances to the benign deltas is bounded by the
    largest such sum of a benign delta."""
    return _min_max_or_sum(deltas, malicious, params, "min_sum")


def fang_trimmed_mean(benign: torch.Tensor, m: int, b: float, gen: torch.Generator) -> torch.Tensor:
    """Fang et al. 2020's full-knowledge attack on trimmed mean and median, on deltas: ``m`` crafted rows.

    ``s_j`` is the sign of the benign mean in coordinate j (where the model would move without attack).
    Each attacker sends, independently and uniformly at random, a value beyond the benign extreme on the
    other side: where ``s_j > 0``, in ``[min_j / b, min_j]`` if ``min_j > 0`` else ``[b * min_j, min_j]``;
    elsewhere in ``[max_j, b * max_j]`` if ``max_j > 0`` else ``[max_j, max_j / b]`` (``b > 1``; 2 in the
    paper). Trimming then removes benign values from the side the model should move to."""
    if b <= 1.0:
        raise AttackError(f"fang_trimmed_mean: b must be > 1, got {b}")
    x = benign.to(torch.float64)
    up = x.mean(dim=0) > 0
    edge = torch.where(up, x.min(dim=0).values, x.max(dim=0).values)
    # a factor in [1, b] that pushes |edge| outwards (beyond the extreme) or inwards (towards 0): the far
    # end of the range is edge * b when edge points away from the benign direction, edge / b otherwise.
    outward = (edge > 0) != up
    factor = 1.0 + (b - 1.0) * torch.rand((m, x.shape[1]), generator=gen, dtype=torch.float64)
    crafted = torch.where(outward, edge * factor, edge / factor)
    return crafted.to(benign.dtype)


def _replace(deltas: torch.Tensor, malicious: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    out = deltas.clone()
    out[malicious] = row.to(deltas.dtype)
    return out


def jitter_copies(
    poisoned: torch.Tensor, deltas: torch.Tensor, malicious: torch.Tensor, scale: float, gen: torch.Generator
) -> torch.Tensor:
    """Make colluders' copies of one vector distinct: add independent N(0, (scale * sigma_j)^2) noise to
    every malicious row, sigma_j the benign deltas' spread in coordinate j (``jitter`` parameter of the
    omniscient attacks; evades rules that look for identical updates, at the cost of some aim)."""
    if scale <= 0:
        return poisoned
    _, sd = _benign_stats(deltas, ~malicious)
    out = poisoned.clone()
    m = int(malicious.sum())
    noise = torch.randn((m, deltas.shape[1]), generator=gen, dtype=torch.float64) * (scale * sd)
    out[malicious] = (out[malicious].to(torch.float64) + noise).to(out.dtype)
    return out


LOCAL = {"sign_flip": sign_flip, "gaussian_noise": gaussian_noise, "free_rider": free_ride, "scaling_backdoor": boost}
OMNISCIENT_FNS = {"alie": alie, "ipm": ipm, "min_max": min_max, "min_sum": min_sum}
# (Fang's attack draws random values: it is registered in trustfed.attacks.builtin, not in this table.)
