"""Per-update anomaly scores, recorded per participant for reputation mechanisms.

Scores compare each participant's delta (``update - global``) with the round's aggregate delta:

* ``norm``: ``|delta_i|``;
* ``distance``: ``|delta_i - delta_agg|``;
* ``cosine``: ``cos(delta_i, delta_agg)`` (0 when either is zero);
* ``*_z``: robust z-scores of norm and distance over the round (``(s - median) / (1.4826 * MAD)``);
* ``consistency`` (:class:`AnomalyMonitor` only): ``cos(delta_i, delta_i before)``, the participant's own
  previous delta (NaN for its first), what the history guard's ``min_consistency`` is compared with.

:class:`AnomalyMonitor` is a coordinator RoundObserver that keeps these per participant and round.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trustfed.errors import AggregationError


def robust_z(s: torch.Tensor) -> torch.Tensor:
    """``(s - median) / (1.4826 * MAD)``; zeros where the MAD is zero and the value is the median."""
    s = s.to(torch.float64)
    med = s.quantile(0.5)
    mad = (s - med).abs().quantile(0.5) * 1.4826
    if float(mad) == 0.0:
        return torch.where(s == med, torch.zeros_like(s), torch.sign(s - med) * torch.inf)
    return (s - med) / mad


def cosines(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``cos(x_i, r)`` for each row of ``x`` ``[n, d]`` against ``r`` ``[d]`` (float64; 0 when either is
    zero)."""
    x64, r64 = x.to(torch.float64), r.to(torch.float64)
    denom = torch.linalg.vector_norm(x64, dim=1) * torch.linalg.vector_norm(r64)
    cos: torch.Tensor = torch.where(denom > 0, (x64 @ r64) / denom.clamp_min(1e-300), torch.zeros_like(denom))
    return cos


def anomaly_scores(deltas: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores of each row of ``deltas`` ``[n, d]`` against the ``reference`` delta ``[d]`` (float64)."""
    if deltas.dim() != 2 or reference.shape != (deltas.shape[1],):
        raise AggregationError(
            f"anomaly scores need deltas [n, d] and a reference [d]; got {tuple(deltas.shape)} and {tuple(reference.shape)}"
        )
    x = deltas.to(torch.float64)
    r = reference.to(torch.float64)
    norm = torch.linalg.vector_norm(x, dim=1)
    dist = torch.linalg.vector_norm(x - r, dim=1)
    return {
        "norm": norm,
        "distance": dist,
        "cosine": cosines(x, r),
        "norm_z": robust_z(norm),
        "distance_z": robust_z(dist),
    }


@dataclass
class AnomalyMonitor:
    """RoundObserver: ``history[participant][i]`` = {"round", "norm", "distance", "cosine", ...}."""

    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    _global: torch.Tensor | None = None
    _previous: dict[str, torch.Tensor] = field(default_factory=dict)

    def on_round_start(self, plan: Any, params: torch.Tensor) -> None:
        self._global = params.detach().clone()

    def on_round_end(self, plan: Any, updates: Sequence[Any], result: Any, record: Any) -> None:
        if self._global is None or not updates:
            return
        g = self._global
        deltas = torch.stack([u.params for u in updates]) - g
        scores = anomaly_scores(deltas, result.params - g)
        selected = set(result.aggregate.selected) if hasattr(result, "aggregate") else set(range(len(updates)))
        for i, u in enumerate(updates):
            row = {"round": float(plan.round), "selected": float(i in selected)}
            row.update({k: float(v[i]) for k, v in scores.items()})
            before = self._previous.get(u.participant_id)
            row["consistency"] = float("nan")  # no update before this one
            if before is not None and before.shape == deltas[i].shape:
                row["consistency"] = float(cosines(deltas[i : i + 1], before)[0])
            self._previous[u.participant_id] = deltas[i].clone()
            self.history.setdefault(u.participant_id, []).append(row)

    def mean(self, participant_id: str, key: str) -> float:
        rows = self.history.get(participant_id, [])
        return sum(r[key] for r in rows) / len(rows) if rows else float("nan")
