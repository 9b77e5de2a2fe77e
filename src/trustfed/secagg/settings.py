"""The ``[secagg]`` section of a federation file. Imports nothing from trustfed.config."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from trustfed.secagg.protocol import SecAggParams


class SecAggSettings(BaseModel):
    """Secure aggregation: the coordinator receives only the masked sum of the deltas (in the simulation
    and over gRPC)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="aggregate by secure aggregation: no individual update in the clear")
    threshold: int = Field(0, ge=0, description="shares needed to unmask (0: two thirds of the round, at least 2)")
    clip: float = Field(0.5, gt=0, description="each delta coordinate is clipped to [-clip, clip] and quantised")
    bits: int = Field(20, ge=1, le=31, description="quantisation bits per coordinate")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="simulated share of participants lost after masking")
    seed: int = Field(0, ge=0, description="chooses who drops out")
    neighbours: int = Field(
        0, ge=0, multiple_of=2, description="SecAgg+: neighbours per participant (even; 0: everyone, plain SecAgg)"
    )
    weighted: bool = Field(
        False, description="weight each delta by its example count (FedAvg); counts travel in the clear"
    )
    max_weight: int = Field(10_000, ge=1, description="weighted: example counts are capped here (weight <= 1)")
    step_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="over gRPC: how long the coordinator waits for each step after the keys"
    )

    def params(self, n: int, rnd: int) -> SecAggParams:
        """The protocol parameters of a round of ``n`` participants, checked: what every side derives from
        the federation file and the signed plan, never from another party."""
        p = SecAggParams(
            threshold=self.threshold_for(n), clip=self.clip, bits=self.bits, round=rnd, neighbours=self.neighbours
        )
        p.check(n)
        return p

    def threshold_for(self, n: int) -> int:
        """Shares needed to unmask in a round of ``n`` selected participants (each side computes it): two
        thirds of a participant's neighbourhood (everyone, or itself and its neighbours) unless set."""
        size = n if self.neighbours == 0 or self.neighbours >= n - 1 else self.neighbours + 1
        return self.threshold or max(2, math.ceil(2 * size / 3))
