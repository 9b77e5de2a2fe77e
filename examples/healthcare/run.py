"""The healthcare example end to end: ``python examples/healthcare/run.py [--small] [--out DIR]``.

Writes each hospital's tables (``hospitals_app.sites``), runs the federation through
``trustfed simulate``, then scores the final model on every hospital's held-out patients pooled
(accuracy, AUC) and on each hospital's own, and states each hospital's privacy spend: epsilon at
the federation's delta, recomputed from the mechanisms recorded in ``privacy.jsonl``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import numpy as np  # noqa: E402
import scenario  # noqa: E402
from hospitals_app.app import malignancy, scores  # noqa: E402
from hospitals_app.sites import write_sites  # noqa: E402

from trustfed.privacy.report import load_records, summarize  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    plan = scenario.plan("healthcare", HERE, argv)
    counts = write_sites(plan.sites, plan.seed)
    seconds = scenario.simulate(plan)
    rt, model = scenario.final_model(plan)
    held = scenario.held_out(rt)
    y = np.concatenate([d.y for d in held.values()])
    p = np.concatenate([malignancy(model, d) for d in held.values()])
    privacy = {
        s.party: {"epsilon": round(s.epsilon, 3), "delta": s.delta, "rounds": len(s.rounds), "verified": s.verified}
        for s in summarize(load_records(plan.out))
    }
    figures = {
        "pooled": {**scores(y, p), "patients": len(y), "malignant": int(y.sum())},
        "per_site": {pid: scores(d.y, malignancy(model, d)) for pid, d in held.items()},
        "sites": counts,
        "privacy": privacy,
    }
    scenario.report(plan, figures, seconds)


if __name__ == "__main__":
    main()
