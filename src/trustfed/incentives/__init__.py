"""Incentives: contribution scores, reputation, rewards and slashing (pure; the ledger records them)."""

from trustfed.incentives.scoring import (
    IncentiveError,
    ReputationPolicy,
    allocate_rewards,
    contribution_scores,
    reputation_weighted_selection,
    slash,
    update_reputation,
)

__all__ = [
    "IncentiveError",
    "ReputationPolicy",
    "allocate_rewards",
    "contribution_scores",
    "reputation_weighted_selection",
    "slash",
    "update_reputation",
]
