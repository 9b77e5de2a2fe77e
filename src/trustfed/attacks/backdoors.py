"""Backdoors that respect norm bounds, registered by name on the :class:`~trustfed.attacks.api.Attack`
interface. Every one trains on triggered copies of its data labelled ``target`` (the trigger of
:func:`~trustfed.attacks.data_poisoning.apply_trigger`), so
:func:`~trustfed.attacks.data_poisoning.backdoor_success` measures all of them with the whole trigger.

* ``constrain_scale`` (Bagdasaryan et al. 2020, constrain-and-scale): the backdoored delta scaled by
  ``boost``, then projected back to ``radius`` times the honest updates' median distance from the centre
  (the previous aggregate, or zero), so no distance or norm rule sees it as far;
* ``dba`` (Xie et al. 2020, distributed backdoor attack): attacker ``i`` trains on piece ``i mod parts``
  of the trigger only; the pieces add up to the whole trigger in the aggregate;
* ``neurotoxin`` (Zhang et al. 2022): the backdoored delta without the ``top_fraction`` coordinates the
  previous global update moved most, so the backdoor lives where honest training rarely writes and
  lasts; Neurotoxin projects every local step, this version projects the round's delta once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from trustfed.attacks.adaptive_attacks import previous_step
from trustfed.attacks.api import Attack, AttackContext, AttackError, Params
from trustfed.attacks.builtin import number
from trustfed.attacks.data_poisoning import backdoor
from trustfed.attacks.registry import register_attack
from trustfed.data.datasets import Dataset


def _backdoor_params(kind: str, poison_fraction: float, target: int, trigger_size: int) -> dict[str, float | int]:
    return {
        "poison_fraction": number(kind, "poison_fraction", poison_fraction),
        "target": int(number(kind, "target", target)),
        "trigger_size": int(number(kind, "trigger_size", trigger_size)),
    }


def project_to_ball(x: torch.Tensor, centre: torch.Tensor, radius: float) -> torch.Tensor:
    """``x`` moved onto the ball of ``radius`` around ``centre`` when it lies outside (float64 maths)."""
    r = x.to(torch.float64) - centre.to(torch.float64)
    norm = float(r.norm())
    if norm <= radius:
        return x
    return (centre.to(torch.float64) + r * (radius / norm)).to(x.dtype)


def top_mask(step: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the ``ceil(fraction * d)`` coordinates of largest ``|step|`` (none when the step is zero)."""
    k = int(torch.ceil(torch.tensor(fraction * step.numel())).item())
    mask = torch.zeros(step.shape, dtype=torch.bool)
    if k > 0 and bool((step != 0).any()):
        mask[step.abs().topk(k).indices] = True
    return mask


class _Backdoor(Attack):
    """Trains on the backdoored data given by ``self.params``."""

    params: Params

    def poison_data(self, data: Dataset, seed: int) -> Dataset:
        return backdoor(data, self.params, seed)


@register_attack("constrain_scale", builtin=True)
class ConstrainScale(_Backdoor):
    """Constrain-and-scale (Bagdasaryan et al. 2020): boosted, then back inside the honest radius."""

    knowledge = "omniscient"

    def __init__(
        self,
        boost: float = 10.0,
        radius: float = 1.0,
        center: str = "previous",
        poison_fraction: float = 0.5,
        target: int = 0,
        trigger_size: int = 4,
    ) -> None:
        if center not in ("previous", "zero"):
            raise AttackError(f"attack 'constrain_scale': center must be 'previous' or 'zero', got {center!r}")
        self.params = _backdoor_params("constrain_scale", poison_fraction, target, trigger_size)
        self.boost = number("constrain_scale", "boost", boost)
        self.radius = number("constrain_scale", "radius", radius)
        self.center = center

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        step = previous_step(ctx)
        centre = step if self.center == "previous" else torch.zeros_like(step)
        if not ctx.honest:
            return {p: self.boost * d for p, d in ctx.own_updates.items()}
        honest = ctx.stacked(ctx.honest).to(torch.float64)
        tau = float(torch.linalg.vector_norm(honest - centre.to(torch.float64), dim=1).median())
        return {p: project_to_ball(self.boost * ctx.own_updates[p], centre, self.radius * tau) for p in ctx.attackers}


@register_attack("dba", builtin=True)
class Dba(_Backdoor):
    """Distributed backdoor attack (Xie et al. 2020): each attacker trains on one piece of the trigger."""

    def __init__(
        self, parts: int = 4, boost: float = 1.0, poison_fraction: float = 0.5, target: int = 0, trigger_size: int = 4
    ) -> None:
        self.params = _backdoor_params("dba", poison_fraction, target, trigger_size)
        self.parts = int(number("dba", "parts", parts))
        self.boost = number("dba", "boost", boost)
        if self.parts < 1:
            raise AttackError(f"attack 'dba': parts must be >= 1, got {self.parts}")

    def poison_own_data(self, data: Dataset, seed: int, participant: str, attackers: tuple[str, ...]) -> Dataset:
        piece = attackers.index(participant) % self.parts
        return backdoor(data, self.params, seed, part=(piece, self.parts))

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        return {p: self.boost * d for p, d in ctx.own_updates.items()}


@register_attack("neurotoxin", builtin=True)
class Neurotoxin(_Backdoor):
    """Neurotoxin (Zhang et al. 2022): the backdoored delta, masked off the previous global update's top
    coordinates (the first round, with no previous update seen, sends it whole)."""

    def __init__(
        self,
        top_fraction: float = 0.1,
        boost: float = 1.0,
        poison_fraction: float = 0.5,
        target: int = 0,
        trigger_size: int = 4,
    ) -> None:
        self.params = _backdoor_params("neurotoxin", poison_fraction, target, trigger_size)
        self.top_fraction = number("neurotoxin", "top_fraction", top_fraction)
        self.boost = number("neurotoxin", "boost", boost)
        if not 0 <= self.top_fraction < 1:
            raise AttackError(f"attack 'neurotoxin': top_fraction must be in [0, 1), got {self.top_fraction}")

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        keep = ~top_mask(previous_step(ctx), self.top_fraction)
        return {p: self.boost * d * keep for p, d in ctx.own_updates.items()}
