"""The ``[attack]`` section of a federation file: which attack, how many malicious participants.

Simulation only: the chosen share of participants turns malicious (chosen from ``seed``, the same in
every process). Default: no attack.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

AttackKind = Literal[
    "none",
    "label_flip",
    "sign_flip",
    "gaussian_noise",
    "alie",
    "ipm",
    "min_max",
    "min_sum",
    "scaling_backdoor",
    "free_rider",
]

#: Attacks that need the other participants' updates: applied to the collected updates (omniscient).
OMNISCIENT: frozenset[str] = frozenset({"alie", "ipm", "min_max", "min_sum"})


class AttackSettings(BaseModel):
    """``kind`` of attack, ``fraction`` of participants that are malicious, attack ``params``, ``seed``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: AttackKind = "none"
    fraction: float = Field(0.2, ge=0.0, le=1.0, description="share of participants that are malicious")
    params: dict[str, float | int | bool | str] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, description="chooses the malicious participants and the attack's randomness")

    def malicious(self, participant_ids: list[str]) -> list[str]:
        """The malicious participants: ``round(fraction * n)`` of them, a seeded sample."""
        if self.kind == "none":
            return []
        k = round(self.fraction * len(participant_ids))
        return sorted(random.Random(f"{self.seed}:malicious").sample(sorted(participant_ids), k))
