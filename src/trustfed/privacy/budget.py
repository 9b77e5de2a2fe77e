"""Per-participant privacy budgets: refuse a round that would overspend, and leave cleanly.

With a :class:`~trustfed.privacy.budget_state.BudgetStateFile` the guard starts from the spend
recorded there and writes every new mechanism to it before the update leaves, so a restarted
participant process (``trustfed client``) resumes its spend instead of starting afresh.
"""

from __future__ import annotations

import logging
import math

from trustfed.errors import ParticipantWithdrew
from trustfed.privacy.accounting import AccountantName, GaussianSteps, PrivacyAccountant, PrivacyError, epsilon
from trustfed.privacy.budget_state import BudgetStateFile, RecordedStep

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
        *,
        state: BudgetStateFile | None = None,
    ) -> None:
        if budget_epsilon is not None and not budget_epsilon > 0:
            raise PrivacyError(f"participant {participant_id}: budget epsilon must be > 0, got {budget_epsilon}")
        self.participant_id = participant_id
        self.budget_epsilon = budget_epsilon
        self.accountant = PrivacyAccountant(delta, accountant)
        self.state = state
        self.steps: list[RecordedStep] = []
        self.last_round = 0  # the last round whose spend is recorded
        loaded = state.load(participant_id) if state is not None else None
        if state is not None and loaded is not None:
            self.steps = list(loaded.steps)
            self.accountant.history = loaded.events
            self.last_round = loaded.last_round
            log.info(
                "participant %s resumes its privacy spend from %s: epsilon %.4g at delta %.3g over %d mechanism(s), "
                "last round %d",
                participant_id,
                state.path,
                self.spent(),
                self.delta,
                len(self.steps),
                self.last_round,
            )

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

    def record(self, event: GaussianSteps, rnd: int | None = None) -> None:
        """Record ``event`` (spent in round ``rnd``); with a state file, it is on disk before this returns."""
        r = self.last_round if rnd is None else rnd
        steps = [*self.steps, RecordedStep(r, event)]
        last = max(self.last_round, r)
        if self.state is not None:  # first on disk: if that fails, the update is not sent
            self.state.save(self.participant_id, self.accountant.accountant, self.delta, last, steps)
        self.steps = steps
        self.last_round = last
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
        return epsilon([event], self.delta, self.accountant.accountant)
