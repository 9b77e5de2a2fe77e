"""The ``[incentives]`` section of a federation file. Imports nothing from trustfed.config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trustfed.incentives.scoring import ReputationPolicy


class IncentiveSettings(BaseModel):
    """Reputation and rewards driven by every round, recorded in the audit log and on chain.

    Needs ``[ledger] enabled``. Each round an integer pool of ``reward_per_round`` units is split
    among the participants whose updates the aggregator used, in proportion to contribution x
    reputation; updates the aggregator left out are flagged (reputation x ``penalty``) unless
    ``flag_unselected`` is off, and updates an enclave rejected always are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="score every round, update reputation, pay rewards on chain")
    reward_per_round: int = Field(1000, ge=0, description="units split among the round's participants")
    decay: float = Field(0.7, ge=0.0, lt=1.0, description="weight of past reputation in the moving average")
    penalty: float = Field(0.5, ge=0.0, le=1.0, description="reputation multiplier for a flagged update")
    initial: float = Field(0.5, ge=0.0, le=1.0, description="reputation before a participant's first round")
    floor: float = Field(0.0, ge=0.0, le=1.0, description="lowest reputation")
    selection: Literal["uniform", "reputation"] = Field(
        "uniform", description="how a round's participants are drawn when fraction_fit < 1"
    )
    stake: int = Field(0, ge=0, description="units each participant stakes on chain before round 1")
    slash_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="share of its stake a flagged participant loses each time (rounded down)"
    )
    flag_unselected: bool = Field(
        True, description="flag updates the aggregator left out (turn off for rules that keep one update, like krum)"
    )
    suspend_below: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="suspend a participant whose reputation falls below this: never selected again (0: never)",
    )

    @model_validator(mode="after")
    def _order(self) -> IncentiveSettings:
        if self.floor > self.initial:
            raise ValueError(f"floor ({self.floor}) must be <= initial ({self.initial})")
        if self.slash_fraction > 0 and self.stake == 0:
            raise ValueError("slash_fraction > 0 needs a stake to slash (set stake)")
        if self.suspend_below > 0 and not self.enabled:
            raise ValueError("suspend_below needs enabled = true: suspensions follow the reputations it keeps")
        if self.suspend_below > self.initial:
            raise ValueError(
                f"suspend_below ({self.suspend_below}) must be <= initial ({self.initial}): newcomers would be suspended"
            )
        return self

    def policy(self) -> ReputationPolicy:
        return ReputationPolicy(decay=self.decay, penalty=self.penalty, initial=self.initial, floor=self.floor)
