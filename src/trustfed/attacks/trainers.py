"""Malicious participants' trainers: one whose update is transformed before it is sent, one that never trains,
and one that has an attack on the :class:`~trustfed.attacks.api.Attack` interface craft what it sends (a
participant process on the network, where no one else's update is known to it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from trustfed.attacks.api import Attack, AttackContext, AttackError, craft_checked
from trustfed.core.strategy import RoundPlan, Update
from trustfed.models.trainer import Trainer, round_seed

DeltaAttack = Callable[[torch.Tensor, Mapping[str, float | int | bool | str], torch.Generator], torch.Tensor]


class MaliciousTrainer:
    """Wraps a :class:`Trainer`: trains honestly (unless ``train`` is false), then sends
    ``global + attack(delta)``. ``num_examples`` is what it claims when it does not train."""

    def __init__(
        self,
        inner: Trainer,
        attack: DeltaAttack,
        params: Mapping[str, float | int | bool | str],
        seed: int,
        *,
        train: bool = True,
        num_examples: int = 1,
    ) -> None:
        self.inner = inner
        self.participant_id = inner.participant_id
        self.attack = attack
        self.params = dict(params)
        self.seed = seed
        self.train = train
        self.num_examples = num_examples

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        gen = torch.Generator().manual_seed(round_seed(self.seed, plan.round, f"attack:{self.participant_id}"))
        if self.train:
            upd = self.inner.fit(params.clone(), plan)
            delta, n, metrics = upd.params - params, upd.num_examples, dict(upd.metrics)
        else:
            delta, n, metrics = torch.zeros_like(params), self.num_examples, {}
        sent = params + self.attack(delta, self.params, gen).to(params.dtype)
        return Update(self.participant_id, sent.contiguous(), n, metrics)

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return self.inner.evaluate(params)


class IdleTrainer:
    """A participant that trains nothing (a free rider): it sends the global model back unchanged and
    claims ``num_examples``; the attack's ``craft`` decides what it really sends."""

    def __init__(self, inner: Trainer, num_examples: int) -> None:
        self.inner = inner
        self.participant_id = inner.participant_id
        self.num_examples = num_examples

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        return Update(self.participant_id, params.clone().contiguous(), self.num_examples, {})

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return self.inner.evaluate(params)


class CraftingTrainer:
    """A malicious participant process: trains with ``inner`` (on the data its attack poisoned), then sends
    ``global + craft(delta)``, crafted by ``attack`` from its own update alone, with the generator the
    simulation would give it (seeded from ``seed``, the round and the attack's ``kind``), so one attacker
    sends the same update here as in the simulation. An attack that needs the honest updates
    (``knowledge = "omniscient"``) cannot run here and is refused by name."""

    def __init__(
        self, inner: Trainer, attack: Attack, kind: str, seed: int, aggregator: Mapping[str, Any] | None = None
    ) -> None:
        if attack.knowledge != "own":
            raise AttackError(
                f"attack {kind!r} needs every honest update of the round (knowledge {attack.knowledge!r}): it runs "
                "in the simulation only, not in a participant process"
            )
        self.inner = inner
        self.participant_id = inner.participant_id
        self.attack, self.kind, self.seed = attack, kind, seed
        self.aggregator = dict(aggregator or {})
        self.state: dict[str, Any] = {}  # the attack's memory across rounds

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        upd = self.inner.fit(params.clone(), plan)
        pid = self.participant_id
        ctx = AttackContext(
            round=plan.round,
            global_params=params.clone(),
            generator=torch.Generator().manual_seed(round_seed(self.seed, plan.round, f"attack:{self.kind}")),
            attackers=(pid,),
            honest=(),
            own_updates={pid: upd.params - params},
            honest_updates={},
            state=self.state,
            aggregator=self.aggregator,
        )
        crafted = craft_checked(self.attack, self.kind, ctx)[pid]
        return Update(pid, (params + crafted).contiguous(), upd.num_examples, dict(upd.metrics))

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return self.inner.evaluate(params)
