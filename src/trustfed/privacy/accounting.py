"""Privacy accounting: epsilon of a composition of (Poisson-)subsampled Gaussian mechanisms.

A thin layer over maintained accountants: Google's ``dp-accounting`` (RDP and PLD) and
Opacus' PRV accountant, chosen by name. A run is described by plain values
(:class:`GaussianSteps`: noise multiplier, sampling rate, number of steps), so a participant,
the aggregator and an auditor all recompute the same epsilon from the same record.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from trustfed.errors import TrustFedError

AccountantName = Literal["rdp", "pld", "prv"]
ACCOUNTANTS: tuple[AccountantName, ...] = ("rdp", "pld", "prv")

# dp-accounting's default RDP orders without those below 2: its series for fractional orders < 2
# fails to converge at large sampling rates (it logs and drops them), and they only tighten the
# bound when epsilon is already very large (> ~20).
RDP_ORDERS: tuple[float, ...] = (
    *(round(2 + 0.1 * i, 1) for i in range(90)),
    *range(11, 64),
    128,
    256,
    512,
    1024,
)


class PrivacyError(TrustFedError):
    """A privacy parameter or accounting request is invalid."""


@dataclass(frozen=True)
class GaussianSteps:
    """``steps`` applications of the Gaussian mechanism with noise std ``noise_multiplier`` x
    sensitivity, each on a Poisson sample of rate ``sample_rate`` (1.0: no sampling)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0 or not math.isfinite(self.noise_multiplier):
            raise PrivacyError(f"noise_multiplier must be finite and > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise PrivacyError(f"steps must be >= 0, got {self.steps}")

    def to_json(self) -> dict[str, float | int]:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": self.steps}


def merge(events: Sequence[GaussianSteps]) -> list[GaussianSteps]:
    """Merge repeated (noise, rate) pairs: composition is commutative, so order does not matter."""
    counts: dict[tuple[float, float], int] = {}
    for e in events:
        if e.steps:
            key = (e.noise_multiplier, e.sample_rate)
            counts[key] = counts.get(key, 0) + e.steps
    return [GaussianSteps(z, q, n) for (z, q), n in counts.items()]


def epsilon(events: Sequence[GaussianSteps], delta: float, accountant: AccountantName = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (0.0 for an empty composition)."""
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    merged = merge(events)
    if not merged:
        return 0.0
    if accountant in ("rdp", "pld"):
        import dp_accounting
        from dp_accounting import pld, rdp

        acc: dp_accounting.PrivacyAccountant = (
            rdp.RdpAccountant(list(RDP_ORDERS)) if accountant == "rdp" else pld.PLDAccountant()
        )
        for e in merged:
            ev: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(e.noise_multiplier)
            if e.sample_rate < 1:
                ev = dp_accounting.PoissonSampledDpEvent(e.sample_rate, ev)
            acc.compose(dp_accounting.SelfComposedDpEvent(ev, e.steps))
        return float(acc.get_epsilon(delta))
    if accountant == "prv":
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in merged]
        return float(prv.get_epsilon(delta))
    raise PrivacyError(f"unknown accountant {accountant!r}; expected one of {', '.join(ACCOUNTANTS)}")


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName = "rdp",
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (to ``tolerance`` in epsilon) whose ``steps`` steps spend at most
    ``target_epsilon``: bisection over :func:`epsilon`."""
    if target_epsilon <= 0:
        raise PrivacyError(f"target_epsilon must be > 0, got {target_epsilon}")

    def eps(z: float) -> float:
        return epsilon([GaussianSteps(z, sample_rate, steps)], delta, accountant)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise PrivacyError(f"no noise multiplier <= 1e4 reaches epsilon {target_epsilon} at delta {delta}")
    while True:
        mid = (lo + hi) / 2
        e = eps(mid)
        if e > target_epsilon:
            lo = mid
        else:
            hi = mid
            if target_epsilon - e < tolerance:
                return hi
        if hi - lo < 1e-6:
            return hi


class PrivacyAccountant:
    """Stateful record of one party's spend: the events composed so far and their epsilon."""

    def __init__(self, delta: float, accountant: AccountantName = "rdp") -> None:
        if not 0 < delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {delta}")
        self.delta = delta
        self.accountant: AccountantName = accountant
        self.history: list[GaussianSteps] = []

    def epsilon(self) -> float:
        return epsilon(self.history, self.delta, self.accountant)

    def projected(self, event: GaussianSteps) -> float:
        """Epsilon after composing ``event``, without recording it."""
        return epsilon([*self.history, event], self.delta, self.accountant)

    def step(self, event: GaussianSteps) -> None:
        self.history.append(event)
