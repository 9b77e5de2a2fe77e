"""The ``[privacy]`` section of the federation file.

Defaults keep today's behaviour (``mode = "none"``). This module must not import
``trustfed.config`` (config imports it).

```toml
[privacy]
mode = "local"             # none | local (DP-SGD in each participant) | central (DP-FedAvg at the aggregator)
noise_multiplier = 1.1     # sigma: noise std / clip norm
max_grad_norm = 1.0        # local: per-example clip; central: initial per-update clip
delta = 1e-5
budget_epsilon = 8.0       # every participant's default budget (omit: no limit)

[privacy.budgets.p001]     # a participant's own declaration
epsilon = 2.0
delta = 1e-6
```
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trustfed.errors import ConfigProblem


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetSpec(_Section):
    """One participant's declared (epsilon, delta) budget."""

    epsilon: float = Field(gt=0, description="total epsilon the participant will spend over the run")
    delta: float | None = Field(None, gt=0, lt=1, description="delta for this budget (default: privacy.delta)")


class PrivacySettings(_Section):
    mode: Literal["none", "local", "central"] = "none"
    noise_multiplier: float = Field(1.0, ge=0, description="noise std divided by the clip norm")
    max_grad_norm: float = Field(1.0, gt=0, description="local: per-example clip; central: (initial) update clip")
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld", "prv"] = Field(
        "rdp", description="rdp/pld: Google dp-accounting; prv: Opacus' PRV accountant"
    )
    sample_rate: float | None = Field(
        None, gt=0, le=1, description="local: Poisson sampling rate per step (default training.batch_size / shard size)"
    )
    clipping: Literal["fixed", "adaptive"] = Field("fixed", description="central only")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive clipping: fraction of updates left unclipped")
    clip_learning_rate: float = Field(0.2, gt=0, description="adaptive clipping: geometric step (eta_C)")
    clip_count_stddev: float | None = Field(
        None, gt=0, description="adaptive clipping: std of the noise on the unclipped count (default n_sampled / 20)"
    )
    sampling_amplification: bool = Field(
        True,
        description="central: account with participant sampling rate n_sampled/n_available "
        "(valid only when the selection is random and secret)",
    )
    secure_noise: bool = Field(
        False, description="draw noise seeds from the OS (not reproducible) instead of the run seed"
    )
    budget_epsilon: float | None = Field(None, gt=0, description="default epsilon budget of every participant")
    budgets: dict[str, BudgetSpec] = Field(default_factory=dict, description="per-participant budgets, by id")

    @model_validator(mode="after")
    def _check(self) -> PrivacySettings:
        if self.mode != "none" and self.noise_multiplier <= 0:
            raise ValueError(f"privacy.mode = {self.mode!r} needs noise_multiplier > 0")
        if self.clipping == "adaptive" and self.mode != "central":
            raise ValueError("clipping = 'adaptive' applies to mode = 'central' only")
        return self

    def budget_for(self, participant_id: str) -> tuple[float | None, float]:
        """(epsilon budget or None for unlimited, delta) declared for ``participant_id``."""
        b = self.budgets.get(participant_id)
        if b is not None:
            return b.epsilon, b.delta if b.delta is not None else self.delta
        return self.budget_epsilon, self.delta

    def problems(self, participant_ids: list[str], aggregator: str) -> list[ConfigProblem]:
        """Checks that need other sections (called from ``FederationConfig.semantic_problems``)."""
        out: list[ConfigProblem] = []
        unknown = sorted(set(self.budgets) - set(participant_ids))
        if unknown:
            out.append(
                ConfigProblem(
                    "privacy.budgets",
                    f"budgets for unknown participants; ids run {participant_ids[0]}..{participant_ids[-1]}",
                    ", ".join(unknown),
                )
            )
        if self.mode == "central" and aggregator != "mean":
            out.append(ConfigProblem("privacy.mode", "central DP needs strategy.aggregator = 'mean'", repr(aggregator)))
        return out
