"""Federated evaluation: the participants' scores of a model on their own held-out data, combined.

Each participant reports ``eval_<metric>`` and ``eval_num_examples`` with its update (inside the
commitment it signs); the coordinator's figure is the example-weighted mean of each metric over the
participants that reported it. Pure: the verifier recomputes it from the signed commitments.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

EVAL_PREFIX = "eval_"
FED_EVAL_PREFIX = "fed_eval_"


def combine(reports: Iterable[Mapping[str, float]], model_round: int) -> dict[str, float]:
    """``reports``: each participant's metrics (``eval_*`` keys are read, the rest ignored). Returns
    ``fed_eval_<metric>``, ``fed_eval_num_examples``, ``fed_eval_participants`` and
    ``fed_eval_model_round``, or nothing when no participant evaluated. A report with a non-finite
    value or no positive example count is left out."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    total, count = 0.0, 0
    for metrics in reports:
        ev = {k[len(EVAL_PREFIX) :]: float(v) for k, v in metrics.items() if k.startswith(EVAL_PREFIX)}
        n = ev.pop("num_examples", 0.0)
        if not ev or not math.isfinite(n) or n <= 0 or not all(math.isfinite(v) for v in ev.values()):
            continue
        for name, v in ev.items():
            sums[name] = sums.get(name, 0.0) + n * v
            weights[name] = weights.get(name, 0.0) + n
        total += n
        count += 1
    if not count:
        return {}
    out = {FED_EVAL_PREFIX + name: sums[name] / weights[name] for name in sorted(sums)}
    out[FED_EVAL_PREFIX + "num_examples"] = total
    out[FED_EVAL_PREFIX + "participants"] = float(count)
    out[FED_EVAL_PREFIX + "model_round"] = float(model_round)
    return out


_COUNTS = ("num_examples", "participants", "model_round")


def round_headline(metrics: Mapping[str, float]) -> str:
    """A round's figures for a terminal: the coordinator's own evaluation when it has one, then the
    participants' federated evaluation of the model they received."""
    parts = [f"{k} {metrics[k]:.4f}" for k in ("accuracy", "loss") if k in metrics and math.isfinite(metrics[k])]
    fed = {k[len(FED_EVAL_PREFIX) :]: v for k, v in metrics.items() if k.startswith(FED_EVAL_PREFIX)}
    if fed:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in fed.items() if k not in _COUNTS)
        parts.append(f"federated eval of round {int(fed.get('model_round', 0))}: {shown}")
    return "  ".join(parts) or "no evaluation"


def final_headline(result: Mapping[str, object]) -> str:
    """The run's headline figure from metrics.json: the coordinator's final accuracy, or, when it
    holds no data, the participants' last federated evaluation."""
    acc = result.get("final_accuracy")
    rounds = result.get("rounds")
    last = rounds[-1] if isinstance(rounds, list) and rounds else {}
    fed = last.get("federated_evaluation") if isinstance(last, dict) else None
    if (isinstance(acc, float) and math.isfinite(acc)) or not isinstance(fed, dict):
        return f"final accuracy {acc:.4f}" if isinstance(acc, float) else "final accuracy n/a"
    shown = ", ".join(f"{k} {v:.4f}" for k, v in fed.items() if k not in _COUNTS)
    return f"federated evaluation of round {fed.get('model_round')}'s model: {shown}"
