"""The smart city example end to end: ``python examples/smart_city/run.py [--small] [--out DIR]``.

Writes each district's meter export (``districts_app.sites``; ``--small``: 8 weeks of history),
runs the federation through ``trustfed simulate``, then scores the final model's day-ahead forecast
on every district's held-out weeks pooled and on each district's own: MAE and RMSE in MWh beside
the seasonal naive forecast (the same hour a week before), and the skill over it.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import numpy as np  # noqa: E402
import scenario  # noqa: E402
from districts_app.app import errors, forecast  # noqa: E402
from districts_app.sites import write_sites  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    plan = scenario.plan("smart_city", HERE, argv)
    counts = write_sites(plan.sites, plan.seed, scale=8 / 52 if plan.small else 1.0)
    seconds = scenario.simulate(plan)
    rt, model = scenario.final_model(plan)
    held = scenario.held_out(rt)
    predicted = {pid: forecast(model, h) for pid, h in held.items()}
    pooled = errors(
        np.concatenate([h.demand for h in held.values()]),
        np.concatenate(list(predicted.values())),
        np.concatenate([h.naive for h in held.values()]),
    )
    figures = {
        "pooled": {**pooled, "hours": sum(len(h) for h in held.values())},
        "per_site": {pid: errors(h.demand, predicted[pid], h.naive) for pid, h in held.items()},
        "sites": counts,
    }
    scenario.report(plan, figures, seconds)


if __name__ == "__main__":
    main()
