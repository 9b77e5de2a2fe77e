"""metrics.json against the signed log: the figures a run reports must be the ones it signed.

Each round's ``accuracy``, ``loss``, ``model_hash`` and ``federated_evaluation`` in metrics.json must
equal the coordinator-signed ``aggregation`` entry of that round, and ``final_accuracy`` /
``final_loss`` the last round's. Pure: it takes the parsed file and the log's aggregation bodies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from trustfed.core.evaluation import FED_EVAL_PREFIX

METRICS_FILE = "metrics.json"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        fa, fb = float(a), float(b)
        return (math.isnan(fa) and math.isnan(fb)) or math.isclose(fa, fb, rel_tol=1e-12, abs_tol=1e-15)
    return bool(a == b)


def metrics_problems(
    metrics: Mapping[str, Any], aggregations: Mapping[int, Mapping[str, Any]]
) -> list[tuple[int | None, str, str]]:
    """``(round, field, message)`` for every figure of metrics.json that the signed log does not back."""
    out: list[tuple[int | None, str, str]] = []
    rounds = metrics.get("rounds")
    if not isinstance(rounds, list):
        return [(None, "rounds", "missing or not a list")]
    for i, r in enumerate(rounds):
        if not isinstance(r, dict) or not isinstance(r.get("round"), int):
            out.append((None, f"rounds[{i}]", "not a round record"))
            continue
        rnd = r["round"]
        body = aggregations.get(rnd)
        if body is None:
            out.append((rnd, f"rounds[{i}]", f"round {rnd} has no signed aggregation entry in the log"))
            continue
        signed = body.get("metrics", {}) if isinstance(body.get("metrics"), dict) else {}
        for key in ("accuracy", "loss"):
            if key in r and not _same(r[key], signed.get(key, float("nan"))):
                out.append((rnd, f"rounds[{i}].{key}", f"{r[key]} is not the signed {signed.get(key, 'nan')}"))
        if "model_hash" in r and r["model_hash"] != body.get("model_hash"):
            out.append((rnd, f"rounds[{i}].model_hash", "is not the signed aggregation's model hash"))
        fed = r.get("federated_evaluation", {})
        signed_fed = {k[len(FED_EVAL_PREFIX) :]: v for k, v in signed.items() if k.startswith(FED_EVAL_PREFIX)}
        if (
            not isinstance(fed, dict)
            or set(fed) != set(signed_fed)
            or not all(_same(fed[k], signed_fed[k]) for k in fed)
        ):
            out.append((rnd, f"rounds[{i}].federated_evaluation", "differs from the signed federated evaluation"))
    if rounds and isinstance(rounds[-1], dict):
        last = rounds[-1]
        for final, key in (("final_accuracy", "accuracy"), ("final_loss", "loss")):
            if final in metrics and key in last and not _same(metrics[final], last[key]):
                out.append((None, final, f"{metrics[final]} is not the last round's signed {key} ({last[key]})"))
    last_logged = max(aggregations, default=0)
    if rounds and isinstance(rounds[-1], dict) and rounds[-1].get("round") != last_logged:
        out.append((None, "rounds", f"ends at round {rounds[-1].get('round')}, the log at round {last_logged}"))
    return out
