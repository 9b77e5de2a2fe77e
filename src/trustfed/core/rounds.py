"""The seams of a round that every side shares: :class:`Transport` (how the coordinator reaches its
participants), :class:`RoundRecord` (what a closed round produced) and :class:`RoundObserver` (who
sees every round: recorders, the ledger, checkpoints, receipts)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from trustfed.core.strategy import RoundPlan, RoundResult, Update


class Transport(Protocol):
    def available(self) -> Sequence[str]:
        """Participants that can take part in the next round."""
        ...

    def fit(self, plan: RoundPlan, params: torch.Tensor) -> list[Update]:
        """Send the plan and parameters to the plan's participants; return their updates.

        A participant that raises :class:`ParticipantWithdrew` sends no update and is left out
        of ``available()`` from then on."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RoundRecord:
    round: int
    participants: tuple[str, ...]
    model_hash: str
    metrics: dict[str, float]
    seconds: float
    # whose updates the round aggregated (for a secure sum, the survivors); the rest of ``participants``
    # dropped out, withdrew or were too late
    updated_by: tuple[str, ...] = ()
    # who left the federation since the last round (withdrew, revoked, host lost): participant -> why
    left: dict[str, str] = field(default_factory=dict)


class RoundObserver(Protocol):
    """Sees every round: the ledger, the audit log, checkpoints and dashboards hook in here."""

    def on_round_start(self, plan: RoundPlan, params: torch.Tensor) -> None: ...

    def on_round_end(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> None: ...
