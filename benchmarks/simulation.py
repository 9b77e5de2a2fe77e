"""Simulation runtimes: trustfed's three backends vs Flower's simulation runtime, same workload, same run.

    .venv/bin/python benchmarks/simulation.py [--participants 10] [--rounds 5] [--repeats 1] [--quick]
        [--workers 2] [--out benchmarks/results/simulation.json] [--verbose]

The workload, identical on both sides: scikit-learn's digits, trustfed's own IID split into N shards
(``trustfed.apps.builtin_parts.build_data``) and its reference MLP (``model_factory``, the same
initial weights), every participant in every round, 1 local epoch of trustfed's SGD loop
(``trustfed.models.training.train_epochs``: batch 32, lr 0.05, momentum 0.9, the same per-(round,
participant) shuffling seed), FedAvg weighted by example counts, and the global model scored on the
test set after every round (trustfed's coordinator does; Flower gets it as ``evaluate_fn``).

trustfed: ``trustfed.simulation.run_simulation(cfg)`` with ``[simulation] backend`` = inprocess,
multiprocess (``workers`` spawned processes) and ray (``workers`` Ray actors on a local Ray instance it
starts and stops). Flower: ``flwr.simulation.run_simulation`` (Ray backend, ``workers`` CPUs, one CPU
per ClientApp actor) with a legacy ``ServerApp`` running ``flwr.server.strategy.FedAvg`` started
from trustfed's initial parameters; each Ray worker rebuilds the data itself, once per process, as
trustfed's workers do. Both sides train the same shards with the same function, so the runs differ
only in their runtime and transport; their final models are compared (max abs difference).

Total seconds = the whole call (data, starting processes or Ray, every round, shutting down). Round
seconds = the sum over rounds of (local training, transport, aggregation, test evaluation): trustfed's
per-round ``seconds``; for Flower the time from the round-0 evaluation to the last round's evaluation.
One untimed in-process round warms this process up first; every timed run starts its worker processes or
Ray (actors, ClientApps) cold. The runs rotate (a different one first in each repeat). Each figure is the
median over ``--repeats``; "round 1" (start-up of the workers included) and "rounds 2.." are shown
apart. Ratio = Flower seconds / trustfed seconds (> 1: trustfed faster).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

import trustfed
from trustfed.apps.builtin_parts import build_data, model_factory, train_config
from trustfed.config import FederationConfig, validate_federation_config
from trustfed.core.codec import flatten, load_vector
from trustfed.simulation.runner import run_simulation

BACKENDS = ("inprocess", "multiprocess", "ray")
_CACHE_MODULE = "_trustfed_bench_simulation_cache"


def raw_config(participants: int, rounds: int, backend: str, workers: int) -> dict[str, Any]:
    return {
        "federation": {"name": "bench-simulation", "rounds": rounds, "participants": participants, "seed": 1},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp"},
        "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05},
        "strategy": {"name": "fedavg", "min_participants": participants, "fraction_fit": 1.0},
        "simulation": {"backend": backend, "workers": workers},
    }


def ray_down() -> bool:
    """Whether Ray was still up after a run (then it is shut down here, so the next run starts clean)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
        return True
    return False


def run_trustfed(cfg: FederationConfig) -> dict[str, Any]:
    t = time.perf_counter()
    res = run_simulation(cfg)
    total = time.perf_counter() - t
    return {
        "total_s": total,
        "round_s": sum(r["seconds"] for r in res.metrics["rounds"]),
        "per_round_s": [r["seconds"] for r in res.metrics["rounds"]],
        "accuracy": res.metrics["final_accuracy"],
        "params": res.params,
        "ray_left_running": ray_down(),
    }


# --- Flower. Ray pickles the ClientApp (and the functions it closes over) anew for every message, so a
# module-level global of this script would be a fresh copy on each call; the per-process cache lives in
# a module registered in sys.modules instead, which a Ray worker process keeps for its lifetime.
def _process_cache() -> dict[str, Any]:
    mod = sys.modules.get(_CACHE_MODULE)
    if mod is None:
        mod = sys.modules[_CACHE_MODULE] = types.ModuleType(_CACHE_MODULE)
        mod.store = {}  # type: ignore[attr-defined]
    return mod.store  # type: ignore[attr-defined, no-any-return]


def _client_state(cfg_json: str) -> dict[str, Any]:
    """This process's federation (data, config, one model per participant), built once."""
    store = _process_cache()
    if store.get("cfg_json") != cfg_json:
        torch.set_num_threads(1)  # as trustfed's workers and actors do
        cfg = FederationConfig.model_validate_json(cfg_json)
        builds = store.get("builds", 0) + 1
        store.clear()
        store.update(cfg_json=cfg_json, cfg=cfg, data=build_data(cfg), models={}, builds=builds)
    return store


def make_client_app(cfg_json: str) -> Any:
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context

    from trustfed.models.trainer import round_seed
    from trustfed.models.training import train_epochs

    class ShardClient(NumPyClient):  # type: ignore[misc]
        def __init__(self, pid: str) -> None:
            self.pid = pid

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
            st = _client_state(cfg_json)
            cfg, data = st["cfg"], st["data"]
            if self.pid not in st["models"]:
                st["models"][self.pid] = model_factory(cfg, data.train.input_shape, data.train.num_classes)()
            model = st["models"][self.pid]
            names = list(model.state_dict())
            model.load_state_dict({n: torch.from_numpy(np.asarray(a)) for n, a in zip(names, parameters, strict=True)})
            rnd = int(config["server_round"])
            shard = data.shards[self.pid]
            metrics = train_epochs(model, shard, train_config(cfg), round_seed(cfg.federation.seed, rnd, self.pid))
            out = [v.detach().numpy().copy() for v in model.state_dict().values()]
            # which process trained, and how many times it has built the data (1: the cache works)
            return out, len(shard), {"train_loss": metrics["train_loss"], "pid": os.getpid(), "builds": st["builds"]}

    def client_fn(context: Context) -> Any:
        return ShardClient(f"p{int(context.node_config['partition-id']):03d}").to_client()

    return ClientApp(client_fn=client_fn)


def run_flower(cfg: FederationConfig, workers: int) -> dict[str, Any]:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation as flwr_run_simulation

    from trustfed.models.training import evaluate

    n, rounds = cfg.federation.participants, cfg.federation.rounds
    data = build_data(cfg)  # the server side: initial model and test set, as trustfed's coordinator builds them
    factory = model_factory(cfg, data.train.input_shape, data.train.num_classes)
    eval_model = factory()
    init = [v.detach().numpy().copy() for v in eval_model.state_dict().values()]
    names = list(eval_model.state_dict())
    marks: dict[int, float] = {}
    builds: dict[int, int] = {}  # Flower client process id -> times it built the data

    def note_builds(fit_metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        for _, m in fit_metrics:
            builds[int(m["pid"])] = max(builds.get(int(m["pid"]), 0), int(m["builds"]))
        return {}

    scores: dict[int, dict[str, float]] = {}

    def evaluate_fn(rnd: int, ndarrays: list[np.ndarray], _config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        eval_model.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in zip(names, ndarrays, strict=True)})
        r = evaluate(eval_model, data.test)
        scores[rnd] = {"accuracy": r.accuracy, "loss": r.loss}
        marks[rnd] = time.perf_counter()
        return r.loss, {"accuracy": r.accuracy}

    class KeepLast(FedAvg):  # type: ignore[misc]
        final: list[np.ndarray] | None = None

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            params, metrics = super().aggregate_fit(server_round, results, failures)
            if params is not None:
                self.final = parameters_to_ndarrays(params)
            return params, metrics

    strategy = KeepLast(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_evaluate_clients=0,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(init),
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda rnd: {"server_round": rnd},
        fit_metrics_aggregation_fn=note_builds,
    )

    def server_fn(_context: Any) -> ServerAppComponents:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": workers, "log_to_driver": False, "logging_level": logging.WARNING},
    }
    t = time.perf_counter()
    flwr_run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=make_client_app(cfg.model_dump_json()),
        num_supernodes=n,
        backend_config=backend_config,  # type: ignore[arg-type]
    )
    total = time.perf_counter() - t
    if strategy.final is None or rounds not in scores:
        raise RuntimeError(f"Flower's run did not finish its {rounds} rounds (evaluated rounds: {sorted(scores)})")
    _, spec = flatten(factory().state_dict())
    final = torch.from_numpy(np.concatenate([a.ravel() for a in strategy.final]).astype(np.float32))
    check = factory()
    load_vector(check, final, spec)  # the kept parameters load into the model: same layout as trustfed's
    return {
        "total_s": total,
        "round_s": marks[rounds] - marks[0],
        "per_round_s": [marks[i] - marks[i - 1] for i in range(1, rounds + 1)],
        "accuracy": scores[rounds]["accuracy"],
        "params": final,
        "ray_left_running": ray_down(),
        "client_processes": len(builds),
        "data_builds_per_process": max(builds.values(), default=0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--participants", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2, help="processes / Ray actors / Ray CPUs on both sides")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each; the median is reported")
    ap.add_argument("--quick", action="store_true", help="N = 4, R = 2 (smoke run)")
    ap.add_argument("--verbose", action="store_true", help="keep Flower's and Ray's logs")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "simulation.json")
    args = ap.parse_args()
    if args.quick:
        args.participants, args.rounds = 4, 2
    # Before Ray or Flower are imported: no usage statistics or telemetry leave the machine.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if not args.verbose:
        import warnings

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
    import flwr
    import ray

    if not args.verbose:  # after the import: Flower sets its logger's level when it is imported
        logging.getLogger("flwr").setLevel(logging.ERROR)

    n, r, w = args.participants, args.rounds, args.workers
    load_before = os.getloadavg()
    samples: dict[str, list[dict[str, Any]]] = {b: [] for b in (*BACKENDS, "flower")}  # in this order
    # One untimed in-process round first, so no timed run pays this process's one-off costs (torch's first
    # kernels, reading the dataset); worker processes and Ray actors still start cold in every timed run.
    run_simulation(validate_federation_config(raw_config(n, 1, "inprocess", w)))
    names = (*BACKENDS, "flower")
    for rep in range(args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # a different one goes first each time
            if name == "flower":
                sample = run_flower(validate_federation_config(raw_config(n, r, "inprocess", w)), w)
            else:
                sample = run_trustfed(validate_federation_config(raw_config(n, r, name, w)))
            sample["load_average_after"] = os.getloadavg()
            samples[name].append(sample)
            side = "flower  " if name == "flower" else "trustfed"
            backend = "ray" if name == "flower" else name
            print(f"[{rep + 1}/{args.repeats}] {side} {backend:12s} {sample['total_s']:7.2f}s", flush=True)
    load_after = os.getloadavg()

    reference = samples["inprocess"][0]["params"]
    for runs in samples.values():
        for x in runs:  # round 1 includes the workers' start-up (spawning, Ray actors, data); later ones do not
            x["first_round_s"] = x["per_round_s"][0]
            x["later_rounds_s"] = sum(x["per_round_s"][1:])
    keys = ("total_s", "round_s", "first_round_s", "later_rounds_s")
    med = {b: {k: statistics.median(x[k] for x in runs) for k in keys} for b, runs in samples.items()}
    fl = med["flower"]
    rows = []
    for name, runs in samples.items():
        m = med[name]
        row: dict[str, Any] = {
            "runtime": "flower" if name == "flower" else "trustfed",
            "backend": "ray" if name == "flower" else name,
            **{k: round(m[k], 3) for k in keys},
            **{f"{k}_all": [round(x[k], 3) for x in runs] for k in keys},
            "per_round_s_all": [[round(v, 3) for v in x["per_round_s"]] for x in runs],
            "accuracy": runs[-1]["accuracy"],
            "accuracies": sorted({x["accuracy"] for x in runs}),
            "max_abs_diff_vs_trustfed_inprocess": max(float((x["params"] - reference).abs().max()) for x in runs),
            "ray_left_running_after": any(x["ray_left_running"] for x in runs),
            "load_average_after_each": [[round(v, 2) for v in x["load_average_after"]] for x in runs],
        }
        if name == "flower":
            row["client_processes"] = [x["client_processes"] for x in runs]
            row["data_builds_per_process"] = max(x["data_builds_per_process"] for x in runs)
        else:
            for k in keys:
                short = k.removesuffix("_s")
                row[f"flower_over_trustfed_{short}"] = round(fl[k] / m[k], 3) if m[k] > 0 else None
        rows.append(row)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    t = Table(
        title=f"digits MLP, {n} participants, {r} rounds, {w} workers/actors, median of {args.repeats} "
        f"(ratio = Flower s / trustfed s; > 1: trustfed faster)"
    )
    cols = ("runtime", "backend", "total s", "rounds s", "round 1 s", "rounds 2.. s", "accuracy", "max|Δ| vs inproc")
    for c in (*cols, "ratio total", "ratio rounds", "ratio rounds 2.."):
        t.add_column(c, justify="right", no_wrap=True)

    def ratio(row: dict[str, Any], k: str) -> str:
        v = row.get(f"flower_over_trustfed_{k}")
        return "-" if v is None else f"{v:.2f}"

    for row in rows:
        t.add_row(
            row["runtime"],
            row["backend"],
            f"{row['total_s']:.2f}",
            f"{row['round_s']:.2f}",
            f"{row['first_round_s']:.2f}",
            f"{row['later_rounds_s']:.2f}",
            f"{row['accuracy']:.4f}",
            f"{row['max_abs_diff_vs_trustfed_inprocess']:.1e}",
            ratio(row, "total"),
            ratio(row, "round"),
            ratio(row, "later_rounds"),
        )
    console.print(t)
    out = {
        "participants": n,
        "rounds": r,
        "workers": w,
        "repeats": args.repeats,
        "quick": args.quick,
        "workload": {
            "dataset": "digits",
            "partition": "iid",
            "model": "mlp [128]",
            "parameters": int(reference.numel()),
            "local_epochs": 1,
            "batch_size": 32,
            "lr": 0.05,
            "momentum": 0.9,
            "strategy": "fedavg (example-weighted), all participants every round",
            "seed": 1,
        },
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "versions": {
            "trustfed": trustfed.__version__,
            "torch": torch.__version__,
            "flwr": flwr.__version__,
            "ray": ray.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
