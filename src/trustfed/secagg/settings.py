"""The ``[secagg]`` section of a federation file. Imports nothing from trustfed.config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SecAggSettings(BaseModel):
    """Secure aggregation (simulation): the coordinator receives only the masked sum of the deltas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="aggregate by secure aggregation: no individual update in the clear")
    threshold: int = Field(0, ge=0, description="shares needed to unmask (0: two thirds of the round, at least 2)")
    clip: float = Field(0.5, gt=0, description="each delta coordinate is clipped to [-clip, clip] and quantised")
    bits: int = Field(20, ge=1, le=31, description="quantisation bits per coordinate")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="simulated share of participants lost after masking")
    seed: int = Field(0, ge=0, description="chooses who drops out")
