"""The built-in attacks, registered by name on the :class:`~trustfed.attacks.api.Attack` interface.

Data poisoning: ``label_flip``, ``scaling_backdoor`` (trigger + boosted delta). Local model poisoning
(each attacker transforms its own delta): ``sign_flip``, ``gaussian_noise``, ``free_rider``.
Omniscient (every honest delta of the round): ``alie``, ``ipm``, ``min_max``, ``min_sum`` and
``fang_trimmed_mean``. The maths lives in :mod:`trustfed.attacks.model_poisoning` and
:mod:`trustfed.attacks.data_poisoning`; these classes hold the parameters and apply it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from trustfed.attacks.api import Attack, AttackContext, AttackError, Params, Scalar
from trustfed.attacks.data_poisoning import backdoor, flip_labels
from trustfed.attacks.model_poisoning import (
    alie,
    boost,
    fang_trimmed_mean,
    free_ride,
    gaussian_noise,
    ipm,
    jitter_copies,
    min_max,
    min_sum,
    sign_flip,
)
from trustfed.attacks.registry import register_attack
from trustfed.data.datasets import Dataset


def number(kind: str, key: str, value: Scalar) -> float:
    """A numeric attack parameter (a string or a boolean is a configuration mistake)."""
    if isinstance(value, str | bool):
        raise AttackError(f"attack {kind!r}: parameter {key!r} must be a number, got {value!r}")
    return float(value)


def _each(ctx: AttackContext, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    return {pid: fn(ctx.own_updates[pid]) for pid in ctx.attackers}


# --------------------------------------------------------------------------- data poisoning


@register_attack("label_flip", builtin=True)
class LabelFlip(Attack):
    """Train on labels ``C - 1 - c``; send the delta as trained."""

    def poison_data(self, data: Dataset, seed: int) -> Dataset:
        return flip_labels(data)

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        return dict(ctx.own_updates)


@register_attack("scaling_backdoor", builtin=True)
class ScalingBackdoor(Attack):
    """Model replacement (Bagdasaryan et al. 2020): train on triggered copies labelled ``target``, send the
    delta times ``boost``."""

    def __init__(
        self, boost: float = 10.0, poison_fraction: float = 0.5, target: int = 0, trigger_size: int = 4
    ) -> None:
        self.params: Params = {
            "boost": number("scaling_backdoor", "boost", boost),
            "poison_fraction": number("scaling_backdoor", "poison_fraction", poison_fraction),
            "target": int(number("scaling_backdoor", "target", target)),
            "trigger_size": int(number("scaling_backdoor", "trigger_size", trigger_size)),
        }

    def poison_data(self, data: Dataset, seed: int) -> Dataset:
        return backdoor(data, self.params, seed)

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        return _each(ctx, lambda d: boost(d, self.params, ctx.generator))


# --------------------------------------------------------------------------- local model poisoning


@register_attack("sign_flip", builtin=True)
class SignFlip(Attack):
    """Send ``-scale * delta``: the honest direction, reversed and amplified."""

    def __init__(self, scale: float = 4.0) -> None:
        self.params: Params = {"scale": number("sign_flip", "scale", scale)}

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        return _each(ctx, lambda d: sign_flip(d, self.params, ctx.generator))


@register_attack("gaussian_noise", builtin=True)
class GaussianNoise(Attack):
    """Send N(0, sigma^2) noise instead of the delta (one draw per attacker, in id order)."""

    def __init__(self, sigma: float = 1.0) -> None:
        self.params: Params = {"sigma": number("gaussian_noise", "sigma", sigma)}

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        return _each(ctx, lambda d: gaussian_noise(d, self.params, ctx.generator))


@register_attack("free_rider", builtin=True)
class FreeRider(Attack):
    """Train nothing: send the global model (``mode = "global"``) or it plus N(0, sigma^2) noise (``"noise"``)."""

    trains = False

    def __init__(self, mode: str = "global", sigma: float = 1e-3) -> None:
        if mode not in ("global", "noise"):
            raise AttackError(f"attack 'free_rider': mode must be 'global' or 'noise', got {mode!r}")
        self.params: Params = {"mode": mode, "sigma": number("free_rider", "sigma", sigma)}

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        return _each(ctx, lambda d: free_ride(d, self.params, ctx.generator))


# --------------------------------------------------------------------------- omniscient

OmniscientFn = Callable[[torch.Tensor, torch.Tensor, Params], torch.Tensor]


class _Omniscient(Attack):
    """Rewrites the attackers' rows from every delta of the round; ``jitter`` adds independent noise of
    ``jitter`` times the honest spread to each copy. With no honest participant in the round the attackers
    send what they trained (there is nothing to estimate from)."""

    knowledge = "omniscient"

    def __init__(self, fn: OmniscientFn, kind: str, jitter: float, **params: Scalar) -> None:
        self.fn = fn
        self.jitter = number(kind, "jitter", jitter)
        self.params: Params = dict(params)

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        if not ctx.honest:
            return dict(ctx.own_updates)
        deltas = ctx.stacked(ctx.attackers + ctx.honest)
        mask = torch.arange(deltas.shape[0]) < len(ctx.attackers)
        out = jitter_copies(self.fn(deltas, mask, self.params), deltas, mask, self.jitter, ctx.generator)
        return {pid: out[i] for i, pid in enumerate(ctx.attackers)}


@register_attack("alie", builtin=True)
class Alie(_Omniscient):
    """ "A little is enough" (Baruch et al. 2019): ``mean - z * std`` of the honest deltas."""

    def __init__(self, z: float | None = None, jitter: float = 0.0) -> None:
        super().__init__(alie, "alie", jitter, **({} if z is None else {"z": number("alie", "z", z)}))


@register_attack("ipm", builtin=True)
class Ipm(_Omniscient):
    """Inner-product manipulation (Xie et al. 2020): ``-epsilon * mean(honest)``."""

    def __init__(self, epsilon: float = 0.5, jitter: float = 0.0) -> None:
        super().__init__(ipm, "ipm", jitter, epsilon=number("ipm", "epsilon", epsilon))


def _direction(direction: str) -> str:
    if direction not in ("std", "unit", "sign"):
        raise AttackError(f"min-max/min-sum direction must be 'std', 'unit' or 'sign', got {direction!r}")
    return direction


@register_attack("min_max", builtin=True)
class MinMax(_Omniscient):
    """Min-max (Shejwalkar & Houmansadr 2021, aggregator-agnostic): ``mean + gamma * p`` with the largest
    gamma whose distance to every honest delta stays within the largest honest pairwise distance."""

    def __init__(self, direction: str = "std", jitter: float = 0.0) -> None:
        super().__init__(min_max, "min_max", jitter, direction=_direction(direction))


@register_attack("min_sum", builtin=True)
class MinSum(_Omniscient):
    """Min-sum (Shejwalkar & Houmansadr 2021, aggregator-agnostic): as min-max, with the sum of squared
    distances to the honest deltas bounded by the largest such sum of an honest delta."""

    def __init__(self, direction: str = "std", jitter: float = 0.0) -> None:
        super().__init__(min_sum, "min_sum", jitter, direction=_direction(direction))


@register_attack("fang_trimmed_mean", builtin=True)
class FangTrimmedMean(Attack):
    """Fang et al. 2020's full-knowledge attack on trimmed mean / median: each attacker sends values beyond
    the honest extreme opposite to the honest direction, up to a factor ``b`` (see
    :func:`~trustfed.attacks.model_poisoning.fang_trimmed_mean`)."""

    knowledge = "omniscient"

    def __init__(self, b: float = 2.0) -> None:
        self.b = number("fang_trimmed_mean", "b", b)
        if self.b <= 1.0:
            raise AttackError(f"attack 'fang_trimmed_mean': b must be > 1, got {self.b}")

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        if not ctx.honest:
            return dict(ctx.own_updates)
        rows = fang_trimmed_mean(ctx.stacked(ctx.honest), len(ctx.attackers), self.b, ctx.generator)
        return {pid: rows[i] for i, pid in enumerate(ctx.attackers)}
