"""Secure aggregation as a simulation run mode: a Transport wrapper around the participants.

Each round the participants train as usual, then run the SecAgg protocol
(:mod:`trustfed.secagg.protocol`) among themselves through a :class:`SecAggServer` that sees only
public keys, encrypted key shares, masked vectors and unmasking shares. What reaches the coordinator
is one update, ``"secagg"``: the global model plus the mean of the survivors' clipped deltas
(unweighted, or with ``weighted`` each delta scaled by its capped example count first and the
sum divided by the weights: FedAvg's mean), with the number of examples summed. Participants
listed by ``dropout`` (seeded per round) compute their masked input but never deliver it; the
protocol removes their masks from the sum using the others' shares.

The update carries the masked inputs it summed (what a server sees): with the ledger on, each
survivor's commitment to its masked input is recorded. The coordinator learns the sum only, so
rules that look at individual updates (robust aggregators), the enclave and incentive scores do
not apply; the config refuses those combinations.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import torch

from trustfed.core.strategy import RoundPlan, Update
from trustfed.errors import AggregationError
from trustfed.secagg.protocol import secure_sum, share_points
from trustfed.secagg.settings import SecAggSettings
from trustfed.secagg.updates import SECAGG_ID, MaskedInput, SecureSumUpdate, mean_of_sum, prepare_delta

log = logging.getLogger("trustfed.secagg")

__all__ = ["SECAGG_ID", "SecAggTransport"]


class SecAggTransport:
    """Wraps the participants' transport; ``fit`` returns the securely aggregated update only."""

    def __init__(self, inner: object, settings: SecAggSettings, min_updates: int = 1) -> None:
        self.inner = inner
        self.settings = settings
        self.min_updates = min_updates  # survivors needed (the coordinator sees one update per round)
        self.last: dict[str, object] = {}  # round statistics (survivors, dropped), for metrics

    def available(self) -> Sequence[str]:
        return self.inner.available()  # type: ignore[attr-defined, no-any-return]

    def close(self) -> None:
        self.inner.close()  # type: ignore[attr-defined]

    def fit(self, plan: RoundPlan, params: torch.Tensor) -> list[Update]:
        # On each participant's side: train, then take part in the protocol with its own delta.
        updates: list[Update] = self.inner.fit(plan, params)  # type: ignore[attr-defined]
        s = self.settings
        n = len(updates)
        p = s.params(n, plan.round)
        ids = share_points(u.participant_id for u in updates)
        config = dict(plan.config)  # central DP: each participant clips its own delta first; weighted: scales it
        deltas = {
            ids[u.participant_id]: prepare_delta(u.params - params, u.num_examples, s, config).numpy() for u in updates
        }
        rng = random.Random(f"{s.seed}:secagg-dropout:{plan.round}")
        lost = set(rng.sample(sorted(deltas), int(s.dropout * n)))
        # the server side sees keys, encrypted shares, masked vectors and unmasking shares: never an input
        result = secure_sum(p, deltas, drop_after_masking=lost)
        total, who = result.total, result.survivors
        if len(who) < self.min_updates:
            raise AggregationError(
                f"round {plan.round}: {len(who)} update(s) in the secure sum, {self.min_updates} needed"
            )
        names = {i: pid for pid, i in ids.items()}
        kept = [names[i] for i in who]
        examples = sum(u.num_examples for u in updates if u.participant_id in kept)
        by_id = {u.participant_id: u for u in updates}
        mean = mean_of_sum(total, s, [by_id[p].num_examples for p in kept])
        self.last = {"round": plan.round, "survivors": kept, "dropped": sorted(names[i] for i in lost)}
        log.info(
            "round %d: secure aggregation of %d update(s), %d dropped after masking", plan.round, len(who), len(lost)
        )
        metrics = {"secagg_survivors": float(len(who)), "secagg_dropped": float(len(lost))}
        parts = tuple(MaskedInput.of(names[i], result.masked[i], by_id[names[i]].num_examples) for i in who)
        return [SecureSumUpdate(SECAGG_ID, params + mean, max(examples, 1), metrics, parts, p.step)]
