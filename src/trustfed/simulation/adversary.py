"""Simulation glue for attacks and for aggregators that need server-side data.

* a malicious participant's own trainer is built with the built-in app's trainers
  (:func:`trustfed.apps.builtin_parts.adversarial_trainer`);
* :class:`OmniscientTransport`: wraps any Transport and rewrites the malicious participants'
  updates from everyone's deltas (ALIE, IPM, min-max, min-sum);
* :func:`attach_root_update`: gives FLTrust its server update, trained on a seeded root sample.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from trustfed.apps.builtin_parts import FederationData, malicious_participants, model_factory, train_config
from trustfed.attacks.model_poisoning import OMNISCIENT_FNS, jitter_copies
from trustfed.attacks.settings import OMNISCIENT
from trustfed.config import FederationConfig
from trustfed.coordinator.engine import Coordinator
from trustfed.core.codec import flatten
from trustfed.core.rounds import Transport
from trustfed.core.strategy import RoundPlan, Update
from trustfed.models.trainer import LocalTrainer

log = logging.getLogger("trustfed.simulation.adversary")


class OmniscientTransport:
    """A Transport whose malicious participants see every update of the round before sending theirs."""

    def __init__(
        self, inner: Transport, kind: str, malicious: Sequence[str], params: dict[str, Any], seed: int = 0
    ) -> None:
        self.inner = inner
        self.attack = OMNISCIENT_FNS[kind]
        self.kind = kind
        self.malicious = frozenset(malicious)
        self.params = dict(params)
        self.jitter = float(self.params.get("jitter", 0.0))
        self.gen = torch.Generator().manual_seed(seed)

    def available(self) -> Sequence[str]:
        return self.inner.available()

    def fit(self, plan: RoundPlan, params: torch.Tensor) -> list[Update]:
        updates = self.inner.fit(plan, params)
        mask = torch.tensor([u.participant_id in self.malicious for u in updates])
        if not bool(mask.any()) or bool(mask.all()):
            return updates
        deltas = torch.stack([u.params for u in updates]) - params
        poisoned = jitter_copies(self.attack(deltas, mask, self.params), deltas, mask, self.jitter, self.gen) + params
        return [
            Update(u.participant_id, poisoned[i].contiguous(), u.num_examples, u.metrics) if bool(mask[i]) else u
            for i, u in enumerate(updates)
        ]

    def close(self) -> None:
        self.inner.close()


def adversarial_transport(cfg: FederationConfig, transport: Transport) -> Transport:
    """Wrap ``transport`` for omniscient attacks; return it unchanged otherwise."""
    if cfg.attack.kind not in OMNISCIENT:
        return transport
    bad = malicious_participants(cfg)
    log.info("omniscient attack %s by %s", cfg.attack.kind, bad)
    return OmniscientTransport(
        transport, cfg.attack.kind, bad, dict(cfg.attack.params), seed=cfg.attack.seed * 7919 + cfg.federation.seed
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
