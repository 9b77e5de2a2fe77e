"""Per-participant privacy budgets: refuse a round that would overspend, and leave cleanly."""

from __future__ import annotations

import logging
import math

from trustfed.coordinator.engine import ParticipantWithdrew
from trustfed.privacy.accounting import AccountantName, GaussianSteps, PrivacyAccountant, PrivacyError

log = logging.getLogger("trustfed.privacy")


class BudgetExhausted(ParticipantWithdrew):
    """The round would take the participant past its declared (epsilon, delta) budget.

    Raised by a trainer *before* it touches its data; transports treat it as a withdrawal."""


class BudgetGuard:
    """One participant's declared budget and the spend recorded against it."""

    def __init__(
        self,
        participant_id: str,
        budget_epsilon: float | None,
        delta: float,
        accountant: AccountantName = "rdp",
    ) -> None:
        if budget_epsilon is not None and not budget_epsilon > 0:
            raise PrivacyError(f"participant {participant_id}: budget epsilon must be > 0, got {budget_epsilon}")
        self.participant_id = participant_id
        self.budget_epsilon = budget_epsilon
        self.accountant = PrivacyAccountant(delta, accountant)

    @property
    def delta(self) -> float:
        return self.accountant.delta

    def spent(self) -> float:
        return self.accountant.epsilon()

    def admit(self, rnd: int, event: GaussianSteps) -> float:
        """Check that ``event`` fits the budget; return the epsilon after it. Raises BudgetExhausted."""
        after = self.accountant.projected(event)
        if self.budget_epsilon is not None and after > self.budget_epsilon:
            spent = self.spent()
            raise BudgetExhausted(
                self.participant_id,
                f"round {rnd} would raise its privacy spend from epsilon {spent:.4g} to {after:.4g}, past its "
                f"budget of {self.budget_epsilon:.4g} at delta {self.delta:.3g}; raise the budget in its "
                "[privacy.budgets] entry or train fewer rounds",
            )
        return after

    def record(self, event: GaussianSteps) -> None:
        self.accountant.step(event)

    def metrics(self, event: GaussianSteps, epsilon_after: float) -> dict[str, float]:
        """What the participant reports with its update (and auditors recompute)."""
        out = {
            "dp_epsilon": epsilon_after,
            "dp_delta": self.delta,
            "dp_epsilon_round": self.accountant_round(event),
            "dp_noise_multiplier": event.noise_multiplier,
            "dp_sample_rate": event.sample_rate,
            "dp_steps": float(event.steps),
        }
        if self.budget_epsilon is not None and math.isfinite(self.budget_epsilon):
            out["dp_budget_epsilon"] = self.budget_epsilon
        return out

    def accountant_round(self, event: GaussianSteps) -> float:
        from trustfed.privacy.accounting import epsilon

        return epsilon([event], self.delta, self.accountant.accountant)
