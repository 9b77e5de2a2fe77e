"""Central DP-FedAvg (McMahan et al. 2018) as a Strategy wrapper, with fixed or adaptive clipping
(Andrew et al. 2021). Pure: tensors in, tensors out; it runs wherever the aggregation runs (the
coordinator, or the attested enclave when there is one).

Each round: every update's model delta is clipped to norm C; the clipped deltas are summed,
Gaussian noise of std ``z_delta * C`` is added to the sum, and the sum is divided by the number
of participants the round *selected* (a fixed denominator, so the sensitivity of the mean is
C / n). The noised mean is handed to the wrapped strategy as a single pseudo-update, so server
optimisers (FedAdam, FedYogi, ...) act on it as post-processing.

Over a secure sum (``[secagg]``; one :class:`~trustfed.secagg.updates.SecureSumUpdate`), each
participant clips its own delta to C before masking, the aggregator noises the sum it recovers, and
the sensitivity is C plus the fixed-point rounding (half a quantisation step per coordinate).
Adaptive clipping needs every update's norm and is refused there.

Adaptive clipping: the fraction of updates with norm <= C is released with Gaussian noise of std
``sigma_b / n`` and C moves geometrically towards the ``target_quantile``:
``C <- C * exp(-eta_C * (b_noisy - gamma))``. The two releases share the budget:
``1/z^2 = 1/z_delta^2 + 1/(2 sigma_b)^2``, so accounting uses the configured ``z``.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trustfed.core.aggregator import AggregateResult
from trustfed.core.strategy import FedAvg, RoundPlan, RoundResult, Strategy, Update, stack_updates, usable_updates
from trustfed.privacy.accounting import AccountantName, GaussianSteps, PrivacyAccountant, PrivacyError
from trustfed.secagg.updates import SecureSumUpdate


def clip_rows(x: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each row of ``x`` to L2 norm at most ``max_norm``; returns (clipped rows, norms before)."""
    norms = x.norm(dim=1)
    factors = (max_norm / (norms + 1e-12)).clamp(max=1.0)
    return x * factors[:, None], norms


def delta_noise_multiplier(noise_multiplier: float, count_stddev: float | None) -> float:
    """The noise multiplier left for the deltas when the clipped count takes its share (Andrew et al.)."""
    if count_stddev is None:
        return noise_multiplier
    rest = noise_multiplier**-2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise PrivacyError(
            f"adaptive clipping: count noise std {count_stddev} is too small for noise_multiplier {noise_multiplier}; "
            f"set privacy.clip_count_stddev > {noise_multiplier / 2}"
        )
    return float(rest**-0.5)


class DPFedAvg(Strategy):
    """Wraps a FedAvg-like strategy (weighted-mean aggregator) with central differential privacy."""

    name = "dp_fedavg"

    def __init__(
        self,
        inner: FedAvg,
        *,
        noise_multiplier: float,
        clip_norm: float,
        delta: float = 1e-5,
        clipping: str = "fixed",
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clip_count_stddev: float | None = None,
        sampling_amplification: bool = True,
        accountant: AccountantName = "rdp",
        seed: int = 0,
        secure_noise: bool = False,
    ) -> None:
        if getattr(inner.aggregator, "name", "") != "mean":
            raise PrivacyError(
                f"central DP calibrates noise to a mean of clipped updates; the wrapped strategy uses aggregator "
                f"{getattr(inner.aggregator, 'name', '?')!r}: set strategy.aggregator = 'mean'"
            )
        if not noise_multiplier > 0 or not clip_norm > 0:
            raise PrivacyError("central DP needs noise_multiplier > 0 and clip_norm > 0")
        if clipping not in ("fixed", "adaptive"):
            raise PrivacyError(f"clipping must be 'fixed' or 'adaptive', got {clipping!r}")
        self.inner = inner
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.clipping = clipping
        self.target_quantile = target_quantile
        self.clip_learning_rate = clip_learning_rate
        self.clip_count_stddev = clip_count_stddev
        self.sampling_amplification = sampling_amplification
        self.seed = seed
        self.secure_noise = secure_noise
        self.accountant = PrivacyAccountant(delta, accountant)
        self._sample_rate: dict[int, float] = {}

    # -- Strategy -------------------------------------------------------------------------------
    def configure_round(self, rnd: int, params: torch.Tensor, available: Sequence[str]) -> RoundPlan:
        plan = self.inner.configure_round(rnd, params, available)
        q = len(plan.participants) / max(len(available), 1) if self.sampling_amplification else 1.0
        self._sample_rate[rnd] = q
        config = {
            **plan.config,
            "dp_central_noise_multiplier": self.noise_multiplier,
            "dp_central_sample_rate": q,
            "dp_central_clip_norm": self.clip_norm,
        }
        return RoundPlan(plan.round, plan.participants, config, plan.model_hash)

    def count_stddev(self, n: int) -> float | None:
        if self.clipping != "adaptive":
            return None
        if self.clip_count_stddev is not None:
            return self.clip_count_stddev
        return max(n / 20.0, self.noise_multiplier)

    def aggregate(self, plan: RoundPlan, params: torch.Tensor, updates: Sequence[Update]) -> RoundResult:
        n = max(len(plan.participants), len(updates))
        gen = torch.Generator().manual_seed(secrets.randbits(63) if self.secure_noise else self._round_seed(plan.round))
        clip = self.clip_norm
        sensitivity = clip
        norms: torch.Tensor | None = None
        keep = list(range(len(updates)))
        secure = updates[0] if len(updates) == 1 and isinstance(updates[0], SecureSumUpdate) else None
        if secure is not None:
            # a secure sum: each participant clipped its own delta to the plan's clip norm before masking; the
            # fixed-point rounding moves each coordinate by at most half a step, which widens the sensitivity
            if self.clipping != "fixed":
                raise PrivacyError("adaptive clipping needs every update's norm; a secure sum has none (use 'fixed')")
            count = len(secure.parts)
            summed = (secure.params.to(torch.float64) - params.to(torch.float64)) * count
            sensitivity = clip + math.sqrt(params.numel()) * secure.quantisation_step / 2
        else:
            x, _ = stack_updates(updates, params.numel())
            keep, _dropped = usable_updates(updates, x)  # a non-finite update is left out, never clipped in
            clipped, norms = clip_rows(x[keep].to(torch.float64) - params.to(torch.float64), clip)
            summed, count = clipped.sum(0), len(keep)
        sigma_b = self.count_stddev(n)
        z_delta = delta_noise_multiplier(self.noise_multiplier, sigma_b)
        noise_std = z_delta * sensitivity
        noise = torch.randn(params.numel(), generator=gen, dtype=torch.float64) * noise_std
        mean = (summed + noise) / n
        metrics: dict[str, float] = {"num_updates": float(count), "dp_clip_norm": clip, "dp_noise_std": noise_std / n}
        if norms is not None:
            unclipped = float((norms <= clip).sum())
            metrics["dp_unclipped_fraction"] = unclipped / count
            metrics["dp_update_norm_median"] = float(norms.median())
        if sigma_b is not None and norms is not None:
            b_noisy = (unclipped + float(torch.randn((), generator=gen, dtype=torch.float64)) * sigma_b) / n
            self.clip_norm = clip * math.exp(-self.clip_learning_rate * (b_noisy - self.target_quantile))
            metrics["dp_next_clip_norm"] = self.clip_norm
        total = sum(updates[i].num_examples for i in keep)
        pseudo = Update("dp-aggregate", (params.to(torch.float64) + mean).to(torch.float32), total)
        inner = self.inner.aggregate(plan, params, [pseudo])
        q = self._sample_rate.pop(plan.round, None)
        if q is None:  # configured elsewhere (the coordinator, when this runs in the enclave): the plan says
            q = float(plan.config.get("dp_central_sample_rate", 1.0))
        self.accountant.step(GaussianSteps(self.noise_multiplier, q, 1))
        metrics.update(
            {
                **{k: v for k, v in inner.metrics.items() if k != "num_updates"},
                "dp_epsilon": self.accountant.epsilon(),
                "dp_delta": self.accountant.delta,
                "dp_noise_multiplier": self.noise_multiplier,
                "dp_sample_rate": q,
            }
        )
        scores: dict[str, torch.Tensor] = {}
        if norms is not None:
            scores["update_norm"] = torch.full((len(updates),), float("nan"))
            scores["update_norm"][keep] = norms.to(torch.float32)
        if len(keep) < len(updates):
            scores["non_finite"] = torch.tensor([i not in keep for i in range(len(updates))])
            metrics["num_non_finite"] = float(len(updates) - len(keep))
        return RoundResult(inner.params, metrics, AggregateResult(inner.params, tuple(keep), scores))

    def evaluate(self, rnd: int, params: torch.Tensor) -> dict[str, float] | None:
        return self.inner.evaluate(rnd, params)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inner": self.inner.describe(),
            "noise_multiplier": self.noise_multiplier,
            "clipping": self.clipping,
            "clip_norm": self.clip_norm,
            "target_quantile": self.target_quantile,
            "clip_learning_rate": self.clip_learning_rate,
            "delta": self.accountant.delta,
            "accountant": self.accountant.accountant,
            "sampling_amplification": self.sampling_amplification,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        hist = [[e.noise_multiplier, e.sample_rate, float(e.steps)] for e in self.accountant.history]
        state = {f"inner.{k}": v for k, v in self.inner.state_dict().items()}
        state["dp.clip_norm"] = torch.tensor(self.clip_norm, dtype=torch.float64)
        state["dp.history"] = torch.tensor(hist, dtype=torch.float64).reshape(-1, 3)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("inner.")})
        if "dp.clip_norm" in state:
            self.clip_norm = float(state["dp.clip_norm"])
        if "dp.history" in state:
            self.accountant.history = [
                GaussianSteps(float(z), float(q), int(s)) for z, q, s in state["dp.history"].tolist()
            ]

    def _round_seed(self, rnd: int) -> int:
        d = hashlib.sha256(f"{self.seed}:central-dp:{rnd}".encode()).digest()
        return int.from_bytes(d[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
