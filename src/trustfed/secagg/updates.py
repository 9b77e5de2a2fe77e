"""What a secure-aggregation round hands the coordinator's round loop: one summed update, with the
masked inputs it summed, so that each contributor's commitment to what it sent can go on the ledger
(a masked input reveals nothing about the update behind it; it is what the coordinator saw)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trustfed.core.strategy import Update

SECAGG_ID = "secagg"


@dataclass(frozen=True)
class MaskedInput(Update):
    """One contributor's masked input as it travelled (little-endian uint32 bytes); ``params`` is empty."""

    masked: bytes = b""

    @classmethod
    def of(cls, participant_id: str, y: np.ndarray, num_examples: int) -> MaskedInput:
        return cls(participant_id, torch.zeros(0), num_examples, {}, y.astype("<u4").tobytes())


@dataclass(frozen=True)
class SecureSumUpdate(Update):
    """The global model plus the mean of the survivors' clipped deltas, and the masked inputs summed.
    ``quantisation_step``: one level of the fixed-point encoding (central DP widens its sensitivity
    by the rounding, at most half a step per coordinate)."""

    parts: tuple[MaskedInput, ...] = ()
    quantisation_step: float = 0.0


def clip_delta(delta: torch.Tensor, max_norm: float) -> torch.Tensor:
    """A participant's delta scaled to L2 norm at most ``max_norm`` before masking (central DP over a
    secure sum: the aggregator cannot clip what it cannot see, so each participant clips its own)."""
    norm = float(delta.to(torch.float64).norm())
    return delta if norm <= max_norm else (delta.to(torch.float64) * (max_norm / norm)).to(delta.dtype)


def central_clip(config: object) -> float | None:
    """The plan's central-DP clip norm (``dp_central_clip_norm``), if the round runs central DP."""
    value = config.get("dp_central_clip_norm") if isinstance(config, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def contributions(update: Update) -> tuple[Update, ...]:
    """The updates a round's ledger commits to: the masked inputs of a secure sum, else the update."""
    return update.parts if isinstance(update, SecureSumUpdate) else (update,)
