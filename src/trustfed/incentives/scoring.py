"""Contribution scores, reputation and rewards: pure functions over one round's updates.

- contribution: how much each update moved the global model along the direction the federation
  took (the positive part of its projection onto the aggregate step), so free riders (no movement)
  and updates pushing the other way score zero;
- reputation: an exponential moving average of contribution, with a multiplicative penalty for
  updates that the robust aggregator rejected or that anomaly detection flagged;
- rewards: an integer pool split by contribution x reputation with the largest-remainder method,
  so the amounts always sum to the pool exactly (they are written on chain as integers);
- slashing: a fixed fraction of a flagged participant's stake, rounded down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from trustfed.errors import TrustFedError


class IncentiveError(TrustFedError):
    """Inputs to scoring or rewards are inconsistent."""


def contribution_scores(deltas: torch.Tensor, aggregate_delta: torch.Tensor) -> torch.Tensor:
    """Scores in [0, 1] summing to 1 (or all zero when nobody moved the model forward).

    ``deltas``: [n, d] each participant's model minus the previous global model;
    ``aggregate_delta``: [d] the new global model minus the previous one.
    """
    if deltas.dim() != 2 or aggregate_delta.shape != (deltas.shape[1],):
        raise IncentiveError(f"shapes {tuple(deltas.shape)} and {tuple(aggregate_delta.shape)} do not match")
    g = aggregate_delta.to(torch.float64)
    norm = g.norm()
    if float(norm) == 0.0:
        return torch.zeros(deltas.shape[0], dtype=torch.float64)
    proj = (deltas.to(torch.float64) @ g) / norm
    pos = proj.clamp(min=0.0)
    total = pos.sum()
    out: torch.Tensor = pos / total if float(total) > 0 else pos
    return out


@dataclass(frozen=True)
class ReputationPolicy:
    decay: float = 0.7  # weight of the past in the moving average
    penalty: float = 0.5  # multiplier for a flagged participant
    initial: float = 0.5
    floor: float = 0.0

    def __post_init__(self) -> None:
        if not (0 <= self.decay < 1 and 0 <= self.penalty <= 1 and 0 <= self.floor <= self.initial <= 1):
            raise IncentiveError("need 0 <= decay < 1, 0 <= penalty <= 1 and 0 <= floor <= initial <= 1")


def update_reputation(
    reputation: Mapping[str, float],
    ids: Sequence[str],
    scores: torch.Tensor,
    flagged: set[str],
    policy: ReputationPolicy = ReputationPolicy(),
) -> dict[str, float]:
    """New reputations for ``ids`` (others unchanged). Scores are rescaled so that a fair share
    (1/n) maps to 1.0 before averaging; reputations stay in [floor, 1]."""
    if len(ids) != scores.shape[0]:
        raise IncentiveError(f"{len(ids)} ids but {scores.shape[0]} scores")
    out = dict(reputation)
    n = len(ids)
    for pid, s in zip(ids, scores.tolist(), strict=True):
        prev = out.get(pid, policy.initial)
        rel = min(1.0, s * n)
        new = policy.decay * prev + (1 - policy.decay) * rel
        if pid in flagged:
            new *= policy.penalty
        out[pid] = max(policy.floor, min(1.0, new))
    return out


def allocate_rewards(pool: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split an integer ``pool`` in proportion to ``weights`` (largest remainder, ties by id)."""
    if pool < 0 or any(w < 0 for w in weights.values()):
        raise IncentiveError("pool and weights must be non-negative")
    total = sum(weights.values())
    if total <= 0 or pool == 0:
        return dict.fromkeys(weights, 0)
    exact = {k: pool * w / total for k, w in weights.items()}
    out = {k: int(v) for k, v in exact.items()}
    left = pool - sum(out.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - out[k]), k))[:left]:
        out[k] += 1
    return out


def slash(stake: int, fraction: float) -> int:
    """Amount to take from ``stake`` (rounded down)."""
    if stake < 0 or not 0 <= fraction <= 1:
        raise IncentiveError("stake must be >= 0 and fraction in [0, 1]")
    return int(stake * fraction)


def reputation_weighted_selection(
    available: Sequence[str], reputation: Mapping[str, float], k: int, seed: int, rnd: int, floor: float = 0.05
) -> tuple[str, ...]:
    """Pick ``k`` participants without replacement, with probability proportional to reputation
    (participants at or below ``floor`` are excluded while enough others remain)."""
    pool = sorted(available)
    if k > len(pool):
        raise IncentiveError(f"asked for {k} of {len(pool)} participants")
    eligible = [p for p in pool if reputation.get(p, 1.0) > floor]
    if len(eligible) < k:
        eligible = pool
    w = torch.tensor([max(reputation.get(p, 1.0), 1e-6) for p in eligible], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rnd)
    idx = torch.multinomial(w, k, replacement=False, generator=gen).tolist()
    return tuple(sorted(eligible[i] for i in idx))
