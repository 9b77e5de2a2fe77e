"""The same FedAvg workload on Flower's simulation runtime, run by ``benchmarks/simulation.py`` as a process.

    FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=benchmarks:src
        python benchmarks/fedavg_flower.py --workload '{"dataset": "mnist5k", ...}' --workers 2 --out DIR

``flwr.simulation.run_simulation`` (Ray backend: ``workers`` CPUs, one CPU per ClientApp actor) with
``workload["participants"]`` supernodes and a legacy ``ServerApp`` around ``flwr.server.strategy.FedAvg``
(Flower's own example-weighted aggregation), started from the same initial parameters as trustfed.
Each round the strategy asks ``per_round`` of Flower's sampled nodes to train the participants that
trustfed's selection rule picks (the participant id travels in the fit config, so Flower's random node
sampling does not change whose shard is trained), with trustfed's ``train_epochs`` and per-(round,
participant) seed; the global model is scored on the test set by ``evaluate_fn`` (Flower also scores
the initial model, round 0). Each Ray worker builds the shards once per process (``fedavg_plain.build_shards``)
and keeps one model. Writes ``DIR/model.f32`` and ``DIR/metrics.json`` like ``fedavg_plain.py``.
``benchmarks/`` must be on ``PYTHONPATH`` (the Ray workers import ``fedavg_plain``), and Flower's telemetry
off in the environment (Flower reads it when it is imported; the run refuses to start otherwise).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedavg_plain import (
    MNIST5K_CNN_100,
    build_shards,
    new_model,
    participant_ids,
    round_seed,
    selected,
    train_config,
)
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn

from trustfed.models.training import evaluate, train_epochs

_CACHE_MODULE = "_trustfed_bench_fedavg_flower_cache"


# Ray pickles the ClientApp (and what it closes over) anew for every message, so a global of this
# script would be a fresh copy on each call; the per-process cache lives in a module registered in
# sys.modules instead, which a Ray worker process keeps for its lifetime.
def _worker_state(workload_json: str) -> dict[str, Any]:
    mod = sys.modules.get(_CACHE_MODULE)
    if mod is None:
        mod = sys.modules[_CACHE_MODULE] = types.ModuleType(_CACHE_MODULE)
        mod.store = {}  # type: ignore[attr-defined]
    store: dict[str, Any] = mod.store  # type: ignore[attr-defined]
    if store.get("workload_json") != workload_json:
        w = json.loads(workload_json)
        train, _, shards = build_shards(w)
        store.clear()
        store.update(workload_json=workload_json, w=w, shards=shards, model=new_model(w, train))
    return store


def set_params(model: nn.Module, arrays: list[np.ndarray]) -> None:
    names = list(model.state_dict())
    model.load_state_dict({n: torch.from_numpy(np.asarray(a)) for n, a in zip(names, arrays, strict=True)})


def make_client_app(workload_json: str) -> ClientApp:
    class ShardClient(NumPyClient):  # type: ignore[misc]
        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
            st = _worker_state(workload_json)
            w, model = st["w"], st["model"]
            pid, rnd = str(config["pid"]), int(config["server_round"])
            set_params(model, parameters)
            shard = st["shards"][pid]
            train_epochs(model, shard, train_config(w), round_seed(w["seed"], rnd, pid))
            return [v.detach().numpy().copy() for v in model.state_dict().values()], len(shard), {}

    def client_fn(_context: Context) -> Any:
        return ShardClient().to_client()

    return ClientApp(client_fn=client_fn)


class TrustfedSelection(FedAvg):  # type: ignore[misc]
    """Flower's FedAvg; each round's participants are trustfed's choice, one per sampled node."""

    def __init__(self, w: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.w = w
        self.final: list[np.ndarray] | None = None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, FitIns]]:
        w = self.w
        pids = selected(w["seed"], server_round, participant_ids(w["participants"]), w["per_round"])
        nodes = client_manager.sample(num_clients=len(pids), min_num_clients=len(pids))
        return [
            (node, FitIns(parameters, {"server_round": server_round, "pid": pid}))
            for node, pid in zip(nodes, pids, strict=True)
        ]

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        if failures:
            raise RuntimeError(f"round {server_round}: {len(failures)} fit(s) failed: {failures[:1]}")
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is not None:
            self.final = parameters_to_ndarrays(params)
        return params, metrics


def run(w: dict[str, Any], workers: int) -> tuple[list[np.ndarray], list[dict[str, float]]]:
    train, test, _ = build_shards(w)  # the server side: the initial model and the test set
    eval_model = new_model(w, train)
    init = [v.detach().numpy().copy() for v in eval_model.state_dict().values()]
    scores: list[dict[str, float]] = []

    def evaluate_fn(rnd: int, arrays: list[np.ndarray], _config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        set_params(eval_model, arrays)
        r = evaluate(eval_model, test)
        scores.append({"round": rnd, "accuracy": r.accuracy, "loss": r.loss})
        return r.loss, {"accuracy": r.accuracy}

    n = w["participants"]
    strategy = TrustfedSelection(
        w,
        fraction_fit=w["per_round"] / n,
        fraction_evaluate=0.0,
        min_fit_clients=w["per_round"],
        min_evaluate_clients=0,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(init),
        evaluate_fn=evaluate_fn,
    )

    def server_fn(_context: Context) -> ServerAppComponents:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=w["rounds"]))

    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": workers, "log_to_driver": False, "logging_level": logging.WARNING},
    }
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=make_client_app(json.dumps(w)),
        num_supernodes=n,
        backend_config=backend_config,  # type: ignore[arg-type]
    )
    if strategy.final is None or not scores or scores[-1]["round"] != w["rounds"]:
        raise RuntimeError(f"Flower's run did not finish its {w['rounds']} rounds (evaluated: {scores})")
    return strategy.final, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default=json.dumps(MNIST5K_CNN_100), help="the workload as JSON")
    ap.add_argument("--workers", type=int, default=2, help="Ray CPUs (ClientApp actors)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--verbose", action="store_true", help="keep Flower's and Ray's logs")
    args = ap.parse_args()
    for var in ("FLWR_TELEMETRY_ENABLED", "RAY_USAGE_STATS_ENABLED"):
        if os.environ.get(var) != "0":
            sys.exit(f"set {var}=0 in the environment: no usage statistics leave the machine")
    if not args.verbose:  # after the import: Flower sets its logger's level when it is imported
        logging.getLogger("flwr").setLevel(logging.ERROR)
    final, scores = run(json.loads(args.workload), args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    flat = np.concatenate([a.ravel() for a in final]).astype("<f4")
    (args.out / "model.f32").write_bytes(flat.tobytes())
    (args.out / "metrics.json").write_text(json.dumps({"final_accuracy": scores[-1]["accuracy"], "rounds": scores}))


if __name__ == "__main__":
    main()
