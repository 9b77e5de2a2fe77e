"""The Strategy seam: configure a round, aggregate its updates, evaluate the result.

Strategies are pure: they take and return tensors and plain values, never sockets or files.
Cross-cutting behaviour (DP, robustness, server optimisers) wraps or parameterises them.
"""

from __future__ import annotations

import logging
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from trustfed.core.aggregator import AggregateResult, Aggregator, get_aggregator, unusable_rows
from trustfed.errors import AggregationError

log = logging.getLogger("trustfed.core.strategy")

Scalar = bool | int | float | str

#: The most examples one participant may declare for one round's update (``[strategy] max_examples``):
#: FedAvg weights updates by their declared counts, so the count a participant claims is bounded; the
#: coordinator (and the enclave, for sealed updates) refuses an update that declares more.
DEFAULT_MAX_EXAMPLES = 1_000_000


@dataclass(frozen=True)
class RoundPlan:
    """What the coordinator asks of the selected participants in one round."""

    round: int
    participants: tuple[str, ...]
    config: Mapping[str, Scalar]
    model_hash: str = ""


@dataclass(frozen=True)
class Update:
    """One participant's result: its locally trained parameters (flat float32)."""

    participant_id: str
    params: torch.Tensor
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundResult:
    params: torch.Tensor
    metrics: dict[str, float]
    aggregate: AggregateResult


EvaluateFn = Callable[[int, torch.Tensor], dict[str, float]]


class Strategy(ABC):
    """Base class: the whole extension story for federated algorithms."""

    name: str = "strategy"

    @abstractmethod
    def configure_round(self, rnd: int, params: torch.Tensor, available: Sequence[str]) -> RoundPlan: ...

    @abstractmethod
    def aggregate(self, plan: RoundPlan, params: torch.Tensor, updates: Sequence[Update]) -> RoundResult: ...

    def evaluate(self, rnd: int, params: torch.Tensor) -> dict[str, float] | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Server-side state to checkpoint (optimizer moments, etc.)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise AggregationError(f"strategy {self.name} keeps no state but got {sorted(state)}")


def usable_updates(updates: Sequence[Update], x: torch.Tensor) -> tuple[list[int], list[str]]:
    """The indices of the updates (stacked in ``x``) an aggregator can use, and the participants left
    out because their update holds NaN or infinite values (or overflows float32; see
    :func:`~trustfed.core.aggregator.unusable_rows`). Every update left out is logged by name; the
    round goes on with the others, and raises only when none is left."""
    bad = unusable_rows(x)
    if not bool(bad.any()):
        return list(range(len(updates))), []
    dropped = [updates[i].participant_id for i in bad.nonzero().flatten().tolist()]
    keep = [i for i in range(len(updates)) if not bool(bad[i])]
    log.warning("left out the non-finite update(s) of %s: never averaged", ", ".join(dropped))
    if not keep:
        raise AggregationError(f"every update holds NaN or infinite values ({', '.join(dropped)})")
    return keep, dropped


def stack_updates(updates: Sequence[Update], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not updates:
        raise AggregationError("no updates to aggregate")
    for u in updates:
        if u.params.shape != (dim,) or u.params.dtype != torch.float32:
            raise AggregationError(
                f"update from {u.participant_id} has shape {tuple(u.params.shape)} / {u.params.dtype}; "
                f"expected ({dim},) float32"
            )
        if u.num_examples <= 0:
            raise AggregationError(f"update from {u.participant_id} reports {u.num_examples} examples")
    x = torch.stack([u.params for u in updates])
    w = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float32)
    return x, w


_AGGREGATOR_PREFIX = "aggregator."  # the aggregator's state inside a strategy's state_dict


class Selector(Protocol):
    """Chooses ``k`` of the available participants for a round (when not all of them take part)."""

    def select(self, rnd: int, pool: Sequence[str], k: int) -> tuple[str, ...]: ...

    def plan_config(self, pool: Sequence[str]) -> dict[str, Scalar]:
        """Scalars for the round plan that let anyone recompute the choice."""
        ...


class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017): the example-weighted aggregate of the participants' models.

    ``aggregator`` selects how models are combined (default: the weighted mean). Aggregators
    whose ``operates_on`` is ``"deltas"`` receive ``model_i - global`` and the result is added
    back to the global model.
    """

    name = "fedavg"

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        min_participants: int = 1,
        local_config: Mapping[str, Scalar] | None = None,
        aggregator: Aggregator | str = "mean",
        aggregator_params: Mapping[str, Any] | None = None,
        evaluate_fn: EvaluateFn | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 < fraction_fit <= 1.0:
            raise ValueError("fraction_fit must be in (0, 1]")
        self.fraction_fit = fraction_fit
        self.min_participants = min_participants
        self.local_config = dict(local_config or {})
        self.aggregator = (
            get_aggregator(aggregator, **dict(aggregator_params or {})) if isinstance(aggregator, str) else aggregator
        )
        self.evaluate_fn = evaluate_fn
        self.seed = seed
        self.selector: Selector | None = None  # e.g. reputation-weighted; default: uniform without replacement
        self.excluded: Callable[[], Collection[str]] | None = None  # never selected (e.g. suspended participants)

    def select(self, rnd: int, available: Sequence[str]) -> tuple[str, ...]:
        pool = sorted(available)
        k = max(self.min_participants, round(self.fraction_fit * len(pool)))
        if k > len(pool):
            raise AggregationError(f"round {rnd} needs {k} participants but only {len(pool)} are available")
        if k == len(pool):
            return tuple(pool)
        if self.selector is not None:
            return self.selector.select(rnd, pool, k)
        rng = random.Random(f"{self.seed}:select:{rnd}")
        return tuple(sorted(rng.sample(pool, k)))

    def configure_round(self, rnd: int, params: torch.Tensor, available: Sequence[str]) -> RoundPlan:
        if self.excluded is not None:
            out = self.excluded()
            available = [p for p in available if p not in out]
        chosen = self.select(rnd, available)
        config = dict(self.local_config)
        if self.selector is not None and len(chosen) < len(available):
            config.update(self.selector.plan_config(sorted(available)))  # what an auditor recomputes it from
        return RoundPlan(rnd, chosen, config)

    def combine(self, params: torch.Tensor, updates: Sequence[Update]) -> AggregateResult:
        """The aggregate of the usable updates: a non-finite one is left out (never selected, its scores
        NaN, ``scores["non_finite"]`` marks it) instead of failing the round."""
        x, w = stack_updates(updates, params.numel())
        keep, dropped = usable_updates(updates, x)
        if dropped:
            x, w = x[keep], w[keep]
        if getattr(self.aggregator, "operates_on", "models") == "deltas":
            res = self.aggregator(x - params, w)
            res = AggregateResult(params + res.params, res.selected, res.scores)
        else:
            res = self.aggregator(x, w)
        if not dropped:
            return res
        n = len(updates)
        scores = {"non_finite": torch.tensor([i not in keep for i in range(n)])}
        for name, s in res.scores.items():
            if s.shape == (len(keep),):
                full = torch.full((n,), float("nan"), dtype=s.dtype if s.is_floating_point() else torch.float64)
                full[keep] = s.to(full.dtype)
                scores[name] = full
        return AggregateResult(res.params, tuple(keep[i] for i in res.selected), scores)

    def aggregate(self, plan: RoundPlan, params: torch.Tensor, updates: Sequence[Update]) -> RoundResult:
        res = self.combine(params, updates)
        n = sum(updates[i].num_examples for i in res.selected)
        metrics = {"num_updates": float(len(updates)), "num_examples": float(n)}
        return RoundResult(res.params, metrics | _non_finite_metric(res), res)

    def evaluate(self, rnd: int, params: torch.Tensor) -> dict[str, float] | None:
        return self.evaluate_fn(rnd, params) if self.evaluate_fn else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The aggregator's state (centered clipping's centre, server momentum, ...) under ``aggregator.``."""
        get = getattr(self.aggregator, "state_dict", None)
        inner: Mapping[str, torch.Tensor] = get() if callable(get) else {}
        return {_AGGREGATOR_PREFIX + k: v for k, v in inner.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(k for k in state if not k.startswith(_AGGREGATOR_PREFIX))
        if unknown:
            raise AggregationError(f"strategy {self.name} got unknown state keys {unknown}")
        inner = {k[len(_AGGREGATOR_PREFIX) :]: v for k, v in state.items()}
        load = getattr(self.aggregator, "load_state_dict", None)
        if callable(load):
            load(inner)
        elif inner:
            raise AggregationError(f"aggregator {self.aggregator.describe()} keeps no state but got {sorted(inner)}")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fraction_fit": self.fraction_fit,
            "min_participants": self.min_participants,
            "aggregator": self.aggregator.describe(),
            "local_config": dict(self.local_config),
        }


def _non_finite_metric(res: AggregateResult) -> dict[str, float]:
    """``num_non_finite``: how many updates were left out as non-finite (absent when none was)."""
    mask = res.scores.get("non_finite")
    return {} if mask is None else {"num_non_finite": float(mask.sum())}


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg whose participants add (mu/2)||w - w_global||^2 to their loss."""

    name = "fedprox"

    def __init__(self, *, proximal_mu: float, **kwargs: Any) -> None:
        if proximal_mu < 0:
            raise ValueError("proximal_mu must be >= 0")
        super().__init__(**kwargs)
        self.proximal_mu = proximal_mu
        self.local_config["proximal_mu"] = proximal_mu

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "proximal_mu": self.proximal_mu}


#: How the server optimisers start and step: "reddi" follows Reddi et al. 2021 (Algorithm 2: the second
#: moment starts at tau^2, no bias correction); "flower" gives Flower's FedAdagrad/FedAdam/FedYogi numbers
#: (the second moment starts at 0; FedAdam scales the step by sqrt(1 - beta2^(r+1)) / (1 - beta1^(r+1)),
#: r the round number, as Flower does).
FEDOPT_CONVENTIONS = ("reddi", "flower")


class FedOpt(FedAvg):
    """Adaptive server optimisers (Reddi et al. 2021): the aggregate's difference from the
    global model is a pseudo-gradient fed to Adagrad, Adam or Yogi on the server. ``convention``:
    see :data:`FEDOPT_CONVENTIONS`."""

    name = "fedopt"
    variant = "adam"

    def __init__(
        self,
        *,
        server_lr: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        convention: str = "reddi",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if server_lr <= 0 or tau <= 0 or not (0 <= beta1 < 1) or not (0 <= beta2 < 1):
            raise ValueError("need server_lr > 0, tau > 0, 0 <= beta1 < 1, 0 <= beta2 < 1")
        if convention not in FEDOPT_CONVENTIONS:
            raise ValueError(f"convention must be one of {', '.join(FEDOPT_CONVENTIONS)}, got {convention!r}")
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.convention = convention
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.t = 0

    def aggregate(self, plan: RoundPlan, params: torch.Tensor, updates: Sequence[Update]) -> RoundResult:
        res = self.combine(params, updates)
        delta = res.params.to(torch.float64) - params.to(torch.float64)
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(delta)
            self.v = torch.full_like(delta, self.tau**2 if self.convention == "reddi" else 0.0)
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        d2 = delta * delta
        if self.variant == "adagrad":
            self.v = self.v + d2
        elif self.variant == "adam":
            self.v = self.beta2 * self.v + (1 - self.beta2) * d2
        else:  # yogi
            self.v = self.v - (1 - self.beta2) * d2 * torch.sign(self.v - d2)
        new = params.to(torch.float64) + self._step_size(plan.round) * self.m / (self.v.sqrt() + self.tau)
        n = sum(updates[i].num_examples for i in res.selected)
        metrics = {"num_updates": float(len(updates)), "num_examples": float(n)} | _non_finite_metric(res)
        return RoundResult(new.to(torch.float32), metrics, res)

    def _step_size(self, rnd: int) -> float:
        if self.convention == "flower" and self.variant == "adam":  # Flower's FedAdam, exponent round + 1
            return float(self.server_lr * math.sqrt(1 - self.beta2 ** (rnd + 1)) / (1 - self.beta1 ** (rnd + 1)))
        return self.server_lr

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "server_lr": self.server_lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
            "convention": self.convention,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = super().state_dict()
        if self.m is not None and self.v is not None:
            out.update({"m": self.m, "v": self.v, "t": torch.tensor(self.t)})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        inner = {k: v for k, v in state.items() if k.startswith(_AGGREGATOR_PREFIX)}
        own = {k: v for k, v in state.items() if k not in inner}
        unknown = sorted(set(own) - {"m", "v", "t"})
        if unknown:
            raise AggregationError(f"strategy {self.name} got unknown state keys {unknown}")
        super().load_state_dict(inner)
        if not own:
            self.m = self.v = None
            self.t = 0
            return
        missing = sorted({"m", "v", "t"} - set(own))
        if missing:
            raise AggregationError(f"strategy {self.name} state lacks {missing}")
        self.m, self.v, self.t = own["m"].to(torch.float64), own["v"].to(torch.float64), int(own["t"])


class FedAdagrad(FedOpt):
    name = "fedadagrad"
    variant = "adagrad"


class FedAdam(FedOpt):
    name = "fedadam"
    variant = "adam"


class FedYogi(FedOpt):
    name = "fedyogi"
    variant = "yogi"


STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}
