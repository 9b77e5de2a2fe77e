"""The coordinator's round loop, independent of how participants are reached.

The :class:`~trustfed.core.rounds.Transport` seam is the coordinator's view of its participants: it hands out a plan
and the global parameters and returns updates. The in-process simulation, the multiprocess
simulation and gRPC all implement it, so a round runs the same everywhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from trustfed.core.codec import ParamSpec, model_hash
from trustfed.core.evaluation import combine
from trustfed.core.rounds import RoundObserver, RoundRecord, Transport
from trustfed.core.strategy import RoundPlan, Strategy
from trustfed.errors import AggregationError
from trustfed.secagg.updates import contributions

log = logging.getLogger("trustfed.coordinator")

__all__ = ["Coordinator", "History", "RoundCallback", "departure"]


def departure(transport: object, participant_id: str) -> str:
    """Why ``participant_id`` left: from the transport's own ``departure(pid)``, or its ``departures``
    map (participant -> reason), when it (or a transport it wraps, ``.inner``) has one; else
    ``"withdrew"``."""
    while transport is not None:
        why = getattr(transport, "departure", None)
        if callable(why):
            return str(why(participant_id))
        known = getattr(transport, "departures", None)
        if isinstance(known, Mapping):
            return str(known.get(participant_id, "withdrew"))
        transport = getattr(transport, "inner", None)
    return "withdrew"


@dataclass
class History:
    rounds: list[RoundRecord] = field(default_factory=list)


RoundCallback = Callable[[RoundRecord, torch.Tensor], None]


class Coordinator:
    """Runs rounds: configure, distribute, collect, aggregate, evaluate."""

    def __init__(
        self,
        strategy: Strategy,
        transport: Transport,
        params: torch.Tensor,
        spec: ParamSpec,
        *,
        min_updates: int = 1,
        observers: Sequence[RoundObserver] = (),
    ) -> None:
        if params.numel() != spec.size:
            raise AggregationError(f"initial parameters have {params.numel()} values, spec needs {spec.size}")
        self.strategy = strategy
        self.transport = transport
        self.params = params
        self.spec = spec
        self.min_updates = min_updates
        self.observers = list(observers)
        self.round = 0
        self._present: set[str] | None = None  # who was available after the last round

    def run_round(self) -> RoundRecord:
        rnd = self.round + 1
        t0 = time.perf_counter()
        available = list(self.transport.available())
        plan = self.strategy.configure_round(rnd, self.params, available)
        plan = RoundPlan(plan.round, plan.participants, plan.config, model_hash(self.params, self.spec))
        for obs in self.observers:
            obs.on_round_start(plan, self.params)
        updates = self.transport.fit(plan, self.params)
        if len(updates) < self.min_updates:
            raise AggregationError(f"round {rnd}: {len(updates)} update(s) arrived, {self.min_updates} needed")
        result = self.strategy.aggregate(plan, self.params, updates)
        self.params = result.params
        self.round = rnd
        metrics = dict(result.metrics)
        # the participants' scores of the model they received (the previous round's), example-weighted
        metrics.update(combine((p.metrics for u in updates for p in contributions(u)), rnd - 1))
        evaluated = self.strategy.evaluate(rnd, self.params)
        if evaluated:
            metrics.update(evaluated)
        came = tuple(sorted(p.participant_id for u in updates for p in contributions(u)))
        after = set(self.transport.available())
        gone = sorted(((self._present or set()) | set(available)) - after)
        left = {p: departure(self.transport, p) for p in gone}
        self._present = after
        rec = RoundRecord(
            rnd, plan.participants, model_hash(self.params, self.spec), metrics, time.perf_counter() - t0, came, left
        )
        for obs in self.observers:
            obs.on_round_end(plan, updates, result, rec)
        log.info("round %d: %s", rnd, {k: round(v, 4) for k, v in metrics.items()})
        return rec

    def run(self, rounds: int, on_round: RoundCallback | None = None) -> History:
        hist = History()
        for _ in range(rounds):
            rec = self.run_round()
            hist.rounds.append(rec)
            if on_round:
                on_round(rec, self.params)
        return hist
