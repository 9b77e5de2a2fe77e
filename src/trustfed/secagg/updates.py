"""What a secure-aggregation round hands the coordinator's round loop: one summed update, with the
masked inputs it summed, so that each contributor's commitment to what it sent can go on the ledger
(a masked input reveals nothing about the update behind it; it is what the coordinator saw)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trustfed.core.strategy import Update
from trustfed.secagg.protocol import SecAggError
from trustfed.secagg.settings import SecAggSettings

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


def weight(num_examples: int, max_weight: int) -> float:
    """A participant's weight in a weighted secure sum: its example count, capped, over the cap (<= 1)."""
    return min(max(num_examples, 0), max_weight) / max_weight


def prepare_delta(delta: torch.Tensor, num_examples: int, settings: SecAggSettings, config: object) -> torch.Tensor:
    """What a participant masks: its delta, clipped to the plan's central-DP norm when there is one, and
    scaled by its weight when ``[secagg] weighted`` (so the sum is the example-weighted FedAvg numerator)."""
    c = central_clip(config)
    if c is not None:
        delta = clip_delta(delta, c)
    if settings.weighted:
        delta = delta * weight(num_examples, settings.max_weight)
    return delta


def mean_of_sum(total: np.ndarray, settings: SecAggSettings, examples: Sequence[int]) -> torch.Tensor:
    """The survivors' mean from their secure sum: unweighted, or weighted by the (clear) example counts."""
    denom = sum(weight(n, settings.max_weight) for n in examples) if settings.weighted else len(examples)
    if denom <= 0:
        raise SecAggError("the survivors of a weighted secure sum declared no examples")
    return torch.from_numpy((np.asarray(total, dtype=np.float64) / denom).astype(np.float32))
