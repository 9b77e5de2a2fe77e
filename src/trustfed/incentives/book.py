"""The incentive book: reputation and balances, moved round by round, exactly as the ledger holds them.

Reputation is held in integer parts per million (``REPUTATION_SCALE``), the unit of the on-chain
``Incentives`` contract, and every round starts from those integers: the coordinator that records a
round and the auditor who recomputes it from the audit log get the same numbers, also across a
restart that reads the book back from the chain. A participant the contract has never scored holds
0 there and ``initial`` here; a scored reputation is at least 1 ppm, so the two never meet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trustfed.incentives.scoring import (
    IncentiveError,
    ReputationPolicy,
    allocate_rewards,
    reputation_weighted_selection,
    slash,
    update_reputation,
)

REPUTATION_SCALE = 1_000_000


@dataclass(frozen=True)
class RoundIncentives:
    """One round's changes: what the audit log records and the chain applies."""

    round: int
    contributions: dict[str, float]
    flagged: tuple[str, ...]
    reputation: dict[str, int]  # after the round, parts per million
    reputation_deltas: dict[str, int]  # change of the on-chain value
    rewards: dict[str, int]
    slashed: dict[str, int] = field(default_factory=dict)  # stake taken from flagged participants
    stakes: dict[str, int] = field(default_factory=dict)  # after the round, for the round's participants

    def to_body(
        self, pool: int, source: str, policy: ReputationPolicy, flag_unselected: bool, slash_fraction: float = 0.0
    ) -> dict[str, Any]:
        """The audit log entry: everything an auditor needs to recompute the round's changes."""
        return {
            "slash_fraction": slash_fraction,
            "slashed": dict(sorted(self.slashed.items())),
            "stake": dict(sorted(self.stakes.items())),
            "source": source,
            "pool": pool,
            "policy": policy_dict(policy),
            "flag_unselected": flag_unselected,
            "contributions": dict(sorted(self.contributions.items())),
            "flagged": list(self.flagged),
            "reputation_ppm": dict(sorted(self.reputation.items())),
            "reputation_deltas": dict(sorted(self.reputation_deltas.items())),
            "rewards": dict(sorted(self.rewards.items())),
        }


@dataclass
class IncentiveBook:
    policy: ReputationPolicy = field(default_factory=ReputationPolicy)
    reputation: dict[str, int] = field(default_factory=dict)  # ppm, as on chain (absent: never scored)
    balances: dict[str, int] = field(default_factory=dict)
    stakes: dict[str, int] = field(default_factory=dict)

    def current(self, pid: str) -> float:
        ppm = self.reputation.get(pid)
        return ppm / REPUTATION_SCALE if ppm is not None else self.policy.initial

    def apply(
        self,
        rnd: int,
        participants: Sequence[str],
        contributions: Mapping[str, float],
        flagged: set[str],
        pool: int,
        slash_fraction: float = 0.0,
    ) -> RoundIncentives:
        """Score one round: ``participants`` sent updates, ``contributions`` (summing to 1 or 0) says
        how much each moved the model, ``flagged`` were left out by the aggregator. Rewards go to the
        unflagged, in proportion to contribution x new reputation; the whole pool or nothing."""
        ids = sorted(participants)
        if set(contributions) != set(ids) or not flagged <= set(ids):
            raise IncentiveError(f"round {rnd}: contributions / flags name other participants than the round's")
        if any(not 0.0 <= c <= 1.0 + 1e-9 for c in contributions.values()):
            raise IncentiveError(f"round {rnd}: contributions must lie in [0, 1]")
        prev = {pid: self.current(pid) for pid in ids}
        scores = torch.tensor([float(contributions[p]) for p in ids], dtype=torch.float64)
        new = update_reputation(prev, ids, scores, flagged, self.policy)
        after = {pid: max(1, round(new[pid] * REPUTATION_SCALE)) for pid in ids}
        deltas = {pid: after[pid] - self.reputation.get(pid, 0) for pid in ids}
        weights = {pid: contributions[pid] * after[pid] for pid in ids if pid not in flagged}
        rewards = allocate_rewards(pool, weights) if weights else {}
        rewards = {pid: rewards.get(pid, 0) for pid in ids}
        cut = {pid: slash(self.stakes.get(pid, 0), slash_fraction) for pid in sorted(flagged)}
        slashed = {pid: a for pid, a in cut.items() if a > 0}
        self.reputation.update(after)
        for pid, amount in rewards.items():
            self.balances[pid] = self.balances.get(pid, 0) + amount
        for pid, amount in slashed.items():
            self.stakes[pid] -= amount
        stakes = {pid: self.stakes.get(pid, 0) for pid in ids}
        contrib = {p: float(contributions[p]) for p in ids}
        return RoundIncentives(rnd, contrib, tuple(sorted(flagged)), after, deltas, rewards, slashed, stakes)


class ReputationSelector:
    """Picks a round's participants with probability proportional to their current reputation
    (:func:`~trustfed.incentives.scoring.reputation_weighted_selection`, seeded by ``seed`` and the
    round). The plan carries the available participants and the seed, so that anyone holding the
    audit log recomputes the choice from the reputations the log gives before that round."""

    def __init__(self, reputation: Callable[[str], float], seed: int) -> None:
        self.reputation, self.seed = reputation, seed

    def select(self, rnd: int, pool: Sequence[str], k: int) -> tuple[str, ...]:
        return reputation_weighted_selection(pool, {p: self.reputation(p) for p in pool}, k, self.seed, rnd)

    def plan_config(self, pool: Sequence[str]) -> dict[str, bool | int | float | str]:
        return {"selection": "reputation", "selection_available": ",".join(pool), "selection_seed": self.seed}


def policy_dict(policy: ReputationPolicy) -> dict[str, float]:
    return {"decay": policy.decay, "penalty": policy.penalty, "initial": policy.initial, "floor": policy.floor}


def selection_shares(participants: Sequence[str], selected: Sequence[str]) -> dict[str, float]:
    """Equal contributions among the updates the aggregator used (when per-update scores are not
    available, e.g. from an enclave that releases none)."""
    chosen = set(selected)
    share = 1.0 / len(chosen) if chosen else 0.0
    return {pid: (share if pid in chosen else 0.0) for pid in participants}
