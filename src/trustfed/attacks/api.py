"""The interface an attack implements, and the context it is given each round.

An attack is a class with one required method, :meth:`Attack.craft`: given an :class:`AttackContext`
it returns the delta (``update - global``) each attacker of the round sends. Two optional hooks say
what happens before that: :meth:`Attack.poison_data` (what a malicious participant trains on) and
``trains`` (false: it does not train at all, a free rider). ``knowledge`` says what it may see:
``"own"`` attacks see only the attackers' own updates, ``"omniscient"`` ones every honest update of
the round too. The simulation calls ``craft`` on the collected updates, once per round, with a
seeded generator and a state dict it keeps for the attack across rounds.

Register an attack by name with :func:`trustfed.attacks.register_attack`; a federation file selects
it with ``[attack] kind = "name"`` (and ``module = "pkg.mod"`` when it lives in the user's code).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from trustfed.data.datasets import Dataset
from trustfed.errors import TrustFedError

Scalar = float | int | bool | str
Params = Mapping[str, Scalar]
Knowledge = Literal["own", "omniscient"]


class AttackError(TrustFedError):
    """An attack is unknown, was configured with impossible parameters, or crafted something unusable."""

    exit_code = 2


@dataclass(frozen=True)
class AttackContext:
    """What an attack knows in one round. Updates are deltas from ``global_params`` (float32 ``[d]``).

    ``honest_updates`` is empty unless the attack's ``knowledge`` is ``"omniscient"``. ``state`` is the
    same dict every round of a run (the attack's memory); ``aggregator`` is the strategy's description
    of its aggregation rule (``{"name": "median", ...}``), for attacks that adapt to it. ``counts``: the
    example counts the round's participants claim (the attackers' as they will be sent), which rules
    that weigh updates by their counts see; empty when not known. ``guard``: the history guard's
    description (``min_cosine``, ``reference``, ...) when the strategy has one, else empty.
    """

    round: int
    global_params: torch.Tensor
    generator: torch.Generator
    attackers: tuple[str, ...]
    honest: tuple[str, ...]
    own_updates: Mapping[str, torch.Tensor]
    honest_updates: Mapping[str, torch.Tensor]
    state: dict[str, Any]
    aggregator: Mapping[str, Any]
    counts: Mapping[str, int] = field(default_factory=dict)
    guard: Mapping[str, Any] = field(default_factory=dict)

    def stacked(self, ids: tuple[str, ...]) -> torch.Tensor:
        """The deltas of ``ids`` (attackers' or, when known, honest participants') as rows ``[len(ids), d]``."""
        known = {**self.honest_updates, **self.own_updates}
        return torch.stack([known[p] for p in ids])

    def claimed(self, ids: tuple[str, ...]) -> torch.Tensor:
        """The example counts ``ids`` claim, as the aggregation weights ``[len(ids)]`` (1 where unknown)."""
        return torch.tensor([float(self.counts.get(p, 1)) for p in ids])


class Attack(ABC):
    """Base class of every attack: override :meth:`craft`; optionally :meth:`poison_data`, ``trains``
    and ``knowledge``. The constructor takes the ``[attack] params`` as keyword arguments."""

    knowledge: ClassVar[Knowledge] = "own"
    trains: ClassVar[bool] = True

    def poison_data(self, data: Dataset, seed: int) -> Dataset:
        """What a malicious participant trains on (default: its own data, unchanged)."""
        return data

    def poison_own_data(self, data: Dataset, seed: int, participant: str, attackers: tuple[str, ...]) -> Dataset:
        """What malicious participant ``participant`` (one of ``attackers``, sorted) trains on. The
        default is :meth:`poison_data`; an attack whose attackers poison differently (DBA's trigger parts)
        overrides this one."""
        return self.poison_data(data, seed)

    @abstractmethod
    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        """The delta each participant in ``ctx.attackers`` sends this round."""


def craft_checked(attack: Attack, kind: str, ctx: AttackContext) -> dict[str, torch.Tensor]:
    """Run ``attack.craft`` and fail closed on what it returns: exactly one delta of the model's shape per
    attacker of the round (its values are the attack's business: non-finite ones test the aggregator),
    or an error naming the attack, the round and the participant."""
    got = attack.craft(ctx)
    where = f"attack {kind!r}, round {ctx.round}"
    if not isinstance(got, Mapping):
        raise AttackError(f"{where}: craft returned a {type(got).__name__}, not a mapping participant id -> delta")
    missing, extra = sorted(set(ctx.attackers) - set(got)), sorted(set(got) - set(ctx.attackers))
    if missing or extra:
        raise AttackError(
            f"{where}: craft must return one delta per attacker; missing {missing}, not attackers {extra}"
        )
    out = {}
    for pid in ctx.attackers:
        delta = got[pid]
        if not isinstance(delta, torch.Tensor) or delta.shape != ctx.global_params.shape:
            shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
            raise AttackError(
                f"{where}: participant {pid}'s delta is {shape}, expected {tuple(ctx.global_params.shape)}"
            )
        out[pid] = delta.detach().to(torch.float32)
    return out
