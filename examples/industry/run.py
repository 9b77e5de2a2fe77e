"""The industry example end to end: ``python examples/industry/run.py [--small] [--out DIR]``.

Writes each factory's sensor windows (``factories_app.sites``; ``--small``: a quarter of the
machines), runs the federation through ``trustfed simulate``, then scores the final model on every
factory's held-out machines pooled and on each factory's own: AUC of the fault score, and
precision, recall and F1 of the alarm at ``[app.config] threshold``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import numpy as np  # noqa: E402
import scenario  # noqa: E402
from factories_app.app import fault_score, scores  # noqa: E402
from factories_app.sites import write_sites  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    plan = scenario.plan("industry", HERE, argv)
    counts = write_sites(plan.sites, plan.seed, scale=0.25 if plan.small else 1.0)
    seconds = scenario.simulate(plan)
    rt, model = scenario.final_model(plan)
    held = scenario.held_out(rt)
    threshold = float(plan.app_config.get("threshold", 0.5))
    y = np.concatenate([d.y for d in held.values()])
    p = np.concatenate([fault_score(model, d) for d in held.values()])
    figures = {
        "pooled": {**scores(y, p, threshold), "windows": len(y), "faults": int(y.sum()), "threshold": threshold},
        "per_site": {pid: scores(d.y, fault_score(model, d), threshold) for pid, d in held.items()},
        "sites": counts,
    }
    scenario.report(plan, figures, seconds)


if __name__ == "__main__":
    main()
