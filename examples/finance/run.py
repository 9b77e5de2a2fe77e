"""The finance example end to end: ``python examples/finance/run.py [--small] [--out DIR]``.

Writes each bank's loan book (``banks_app.sites``; ``--small``: a tenth of it), runs the federation
through ``trustfed simulate``, then scores the final model on every bank's held-out loans pooled
(AUC, average precision) and on each bank's own, beside the same model trained by that bank alone
for as many epochs (what a bank gains by joining), and the ceiling: the true default probabilities
the loan books were drawn from.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import numpy as np  # noqa: E402
import scenario  # noqa: E402
from banks_app.app import default_score, scores, train  # noqa: E402
from banks_app.sites import write_sites  # noqa: E402

from trustfed.app import TrainContext  # noqa: E402


def alone(rt: Any, pid: str) -> Any:
    """The app's model trained on bank ``pid``'s own loans only, for the federation's total epochs."""
    cfg = rt.cfg
    m = rt.model_factory()()
    epochs = cfg.federation.rounds * cfg.training.local_epochs
    t = cfg.training
    train(
        m,
        rt.simulated_local_data(pid).train,
        TrainContext(1, cfg.federation.seed, epochs, t.batch_size, t.lr, pid, rt.context(pid)),
    )
    return m


def main(argv: list[str] | None = None) -> None:
    plan = scenario.plan("finance", HERE, argv)
    counts, truth = write_sites(plan.sites, plan.seed, scale=0.1 if plan.small else 1.0)
    seconds = scenario.simulate(plan)
    rt, model = scenario.final_model(plan)
    held = scenario.held_out(rt)
    y = np.concatenate([d.y for d in held.values()])
    p = np.concatenate([default_score(model, d) for d in held.values()])
    best = np.concatenate([truth[pid] for pid in held])
    per_site = {
        pid: {"federated": scores(d.y, default_score(model, d)), "alone": scores(d.y, default_score(alone(rt, pid), d))}
        for pid, d in held.items()
    }
    figures = {
        "pooled": {**scores(y, p), "loans": len(y), "defaults": int(y.sum())},
        "true_probability": scores(y, best),  # the ceiling: the law the data was drawn from
        "per_site": per_site,
        "sites": counts,
    }
    scenario.report(plan, figures, seconds)


if __name__ == "__main__":
    main()
