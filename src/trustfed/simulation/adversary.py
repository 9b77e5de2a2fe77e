"""Simulation glue for attacks and for aggregators that need server-side data.

* a malicious participant's own trainer is built with the built-in app's trainers
  (:func:`trustfed.apps.builtin_parts.adversarial_trainer`);
* :class:`AttackTransport`: wraps any Transport and has the attack craft the malicious participants'
  updates once per round (:mod:`trustfed.attacks`, from the deltas its knowledge allows);
* :func:`attach_root_update`: gives FLTrust its server update, trained on a seeded root sample.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from trustfed.apps.builtin_parts import FederationData, malicious_participants, model_factory, train_config
from trustfed.attacks.api import Attack, AttackContext, craft_checked
from trustfed.config import FederationConfig
from trustfed.coordinator.engine import Coordinator
from trustfed.core.aggregator import unusable_rows
from trustfed.core.codec import flatten
from trustfed.core.rounds import Transport
from trustfed.core.strategy import RoundPlan, Strategy, Update
from trustfed.models.trainer import LocalTrainer, round_seed

log = logging.getLogger("trustfed.simulation.adversary")


class AttackTransport:
    """A Transport whose malicious participants' updates are crafted by the attack once per round, after
    every update of the round is in: the attack gets a typed :class:`AttackContext` (the round, the global
    model, a generator seeded from the run and the round, the attackers and honest participants of the
    round, their deltas as its ``knowledge`` allows, the state it keeps across rounds, the aggregator's
    description, the history guard's when the strategy has one, the example counts claimed) and returns the
    attackers' deltas. With ``claim`` every
    attacker claims that many examples instead of its own count."""

    def __init__(
        self,
        inner: Transport,
        attack: Attack,
        kind: str,
        malicious: Sequence[str],
        seed: int = 0,
        aggregator: Mapping[str, Any] | None = None,
        claim: int | None = None,
        guard: Mapping[str, Any] | None = None,
    ) -> None:
        self.inner = inner
        self.claim = claim  # the example count every attacker claims (None: its own)
        self.attack = attack
        self.kind = kind
        self.malicious = frozenset(malicious)
        self.seed = seed
        self.aggregator = dict(aggregator or {})
        self.guard = dict(guard or {})
        self.state: dict[str, Any] = {}  # the attack's memory across rounds

    def available(self) -> Sequence[str]:
        return self.inner.available()

    def fit(self, plan: RoundPlan, params: torch.Tensor) -> list[Update]:
        updates = self.inner.fit(plan, params)
        attackers = tuple(u.participant_id for u in updates if u.participant_id in self.malicious)
        if not attackers:
            return updates
        deltas = {u.participant_id: u.params - params for u in updates}
        # An honest update the coordinator leaves out (NaN, infinite, overflowing: a diverged local training,
        # by the strategies' own test) is not shown to the attack either: it crafts against those that count.
        sent = [u for u in updates if u.participant_id not in self.malicious]
        unusable = unusable_rows(torch.stack([u.params for u in sent])).tolist() if sent else []
        honest = tuple(u.participant_id for u, bad in zip(sent, unusable, strict=True) if not bad)
        counts = {
            u.participant_id: self.claim
            if self.claim is not None and u.participant_id in self.malicious
            else u.num_examples
            for u in updates
        }
        ctx = AttackContext(
            round=plan.round,
            global_params=params.clone(),
            generator=torch.Generator().manual_seed(round_seed(self.seed, plan.round, f"attack:{self.kind}")),
            attackers=attackers,
            honest=honest,
            own_updates={p: deltas[p] for p in attackers},
            honest_updates={p: deltas[p] for p in honest} if self.attack.knowledge == "omniscient" else {},
            state=self.state,
            aggregator=self.aggregator,
            counts=counts,
            guard=self.guard,
        )
        crafted = craft_checked(self.attack, self.kind, ctx)
        return [
            Update(
                u.participant_id,
                (params + crafted[u.participant_id]).contiguous(),
                counts[u.participant_id],
                u.metrics,
            )
            if u.participant_id in crafted
            else u
            for u in updates
        ]

    def close(self) -> None:
        self.inner.close()


def _wrapped_descriptions(strategy: Strategy) -> list[dict[str, Any]]:
    """``strategy``'s description and those of the strategies it wraps (under ``inner``), outermost first,
    at most 4 deep."""
    out: list[dict[str, Any]] = []
    desc: Any = strategy.describe()
    while isinstance(desc, dict) and len(out) < 4:
        out.append(desc)
        desc = desc.get("inner")
    return out


def aggregator_description(strategy: Strategy) -> dict[str, Any]:
    """The description of the aggregation rule inside ``strategy`` (wrappers such as DP describe theirs
    under ``inner``); empty when it has none."""
    found = [d["aggregator"] for d in _wrapped_descriptions(strategy) if isinstance(d.get("aggregator"), dict)]
    return dict(found[0]) if found else {}


def guard_description(strategy: Strategy) -> dict[str, Any]:
    """The description of the history guard wrapping ``strategy``'s rule (at most a few wrappers deep),
    without its inner strategy's; empty when there is none."""
    found = [d for d in _wrapped_descriptions(strategy) if d.get("name") == "history_guard"]
    return {k: v for k, v in found[0].items() if k != "inner"} if found else {}


def adversarial_transport(cfg: FederationConfig, transport: Transport, strategy: Strategy | None = None) -> Transport:
    """Wrap ``transport`` so that the configured attack crafts the malicious updates; unchanged without one."""
    if cfg.attack.kind == "none":
        return transport
    bad = malicious_participants(cfg)
    log.info("attack %s by %s", cfg.attack.kind, bad)
    return AttackTransport(
        transport,
        cfg.attack.build(),
        cfg.attack.kind,
        bad,
        seed=cfg.attack.seed * 7919 + cfg.federation.seed,
        aggregator=aggregator_description(strategy) if strategy is not None else None,
        claim=cfg.attack.claim,
        guard=guard_description(strategy) if strategy is not None else None,
    )


def _find_root_consumers(obj: object, depth: int = 0) -> list[Any]:
    if depth > 4 or obj is None:
        return []
    found = [obj] if hasattr(obj, "set_root_update") and hasattr(obj, "root_size") else []
    for attr in ("aggregator", "inner", "strategy"):
        child = getattr(obj, attr, None)
        if child is not None and child is not obj:
            found += _find_root_consumers(child, depth + 1)
    return found


def attach_root_update(cfg: FederationConfig, data: FederationData, strategy: object, coord: Coordinator) -> None:
    """If the strategy's aggregator needs a server update (FLTrust), train one each round on
    ``root_size`` examples sampled (seeded) from the training set, starting from the global model."""
    consumers = _find_root_consumers(strategy)
    if not consumers:
        return

    factory = model_factory(cfg, data.train.input_shape, data.train.num_classes)
    _, spec = flatten(factory().state_dict())
    for agg in consumers:
        rng = np.random.default_rng(cfg.federation.seed + 104729)
        idx = np.sort(rng.choice(len(data.train), size=min(agg.root_size, len(data.train)), replace=False))
        root = LocalTrainer(
            "server-root", factory, spec, data.train.subset(idx), train_config(cfg), cfg.federation.seed
        )

        def update(root: LocalTrainer = root) -> torch.Tensor:
            g = coord.params
            return root.fit(g.clone(), RoundPlan(coord.round + 1, ("server-root",), {})).params - g

        agg.root_update_fn = update
