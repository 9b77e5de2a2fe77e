"""A plain sequential PyTorch FedAvg loop: the baseline that ``benchmarks/simulation.py`` runs as a process.

    python benchmarks/fedavg_plain.py --workload '{"dataset": "mnist5k", ...}' --out DIR

It does the simulation's work and nothing else: the dataset, the seeded stratified test split and the
Dirichlet partition come from trustfed's own data functions (``trustfed.data``: the same shards), the
model from ``trustfed.models.reference.build_model`` (the same initial weights) and local training
from ``trustfed.models.training.train_epochs``; what the coordinator adds is written out here in a few
lines: trustfed's participant selection rule (``FedAvg.select``), its per-(round, participant) seed
(``round_seed``) and its example-weighted mean (float64, rounded once to float32). Every round it
trains the selected participants one after another on one model object, averages, and scores the
global model on the test set. Only torch, numpy and those leaf modules are imported (no config
models, strategy objects, transports, ledger, CLI, plot). It writes ``DIR/model.f32`` (the final
parameters in ``state_dict`` order, as trustfed's ``model.f32``) and ``DIR/metrics.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustfed.data.datasets import Dataset, load_dataset, train_test_split
from trustfed.data.partition import partition
from trustfed.models.reference import build_model
from trustfed.models.training import TrainConfig, evaluate, train_epochs

# The workload; ``benchmarks/simulation.py`` writes trustfed's federation file and Flower's run from it.
MNIST5K_CNN_100: dict[str, Any] = {
    "dataset": "mnist5k",
    "test_fraction": 0.2,
    "alpha": 0.5,
    "min_size": 2,
    "participants": 100,
    "per_round": 10,
    "rounds": 20,
    "model": "cnn",
    "channels": [16, 32],
    "local_epochs": 1,
    "batch_size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "seed": 1,
}


def participant_ids(n: int) -> list[str]:
    return [f"p{i:03d}" for i in range(n)]


def build_shards(w: dict[str, Any]) -> tuple[Dataset, Dataset, dict[str, Dataset]]:
    """Train split, test split and every participant's shard, as trustfed builds them."""
    seed = w["seed"]
    train, test = train_test_split(load_dataset(w["dataset"], None, seed), w["test_fraction"], seed)
    parts = partition("dirichlet", train.y, w["participants"], seed, alpha=w["alpha"], min_size=w["min_size"])
    return (
        train,
        test,
        {pid: train.subset(idx) for pid, idx in zip(participant_ids(w["participants"]), parts, strict=True)},
    )


def new_model(w: dict[str, Any], train: Dataset) -> nn.Module:
    return build_model(w["model"], train.input_shape, train.num_classes, w["seed"], channels=tuple(w["channels"]))


def selected(seed: int, rnd: int, ids: list[str], k: int) -> list[str]:
    """trustfed's FedAvg selection: k of the sorted pool, uniformly without replacement, seeded per round."""
    return sorted(random.Random(f"{seed}:select:{rnd}").sample(sorted(ids), k))


def round_seed(seed: int, rnd: int, pid: str) -> int:
    """trustfed's per-(run, round, participant) shuffling seed."""
    digest = hashlib.sha256(f"{seed}:{rnd}:{pid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def train_config(w: dict[str, Any]) -> TrainConfig:
    return TrainConfig(w["local_epochs"], w["batch_size"], w["lr"], w["momentum"])


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in model.state_dict().values()])


def load_flat(model: nn.Module, vec: torch.Tensor) -> None:
    state, at = {}, 0
    for name, t in model.state_dict().items():
        state[name] = vec[at : at + t.numel()].reshape(t.shape).to(t.dtype)
        at += t.numel()
    model.load_state_dict(state)


def weighted_mean(vectors: list[torch.Tensor], weights: list[int]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    return ((w / w.sum()) @ torch.stack(vectors).to(torch.float64)).to(torch.float32)


def run(w: dict[str, Any]) -> tuple[torch.Tensor, list[dict[str, float]]]:
    train, test, shards = build_shards(w)
    model = new_model(w, train)  # the global model; local training runs on ``local``
    local = new_model(w, train)
    params = flat(model)
    ids, cfg, rounds = participant_ids(w["participants"]), train_config(w), []
    for rnd in range(1, w["rounds"] + 1):
        t = time.perf_counter()
        vectors, weights = [], []
        for pid in selected(w["seed"], rnd, ids, w["per_round"]):
            load_flat(local, params)
            train_epochs(local, shards[pid], cfg, round_seed(w["seed"], rnd, pid))
            vectors.append(flat(local))
            weights.append(len(shards[pid]))
        params = weighted_mean(vectors, weights)
        load_flat(model, params)
        r = evaluate(model, test)
        rounds.append({"round": rnd, "accuracy": r.accuracy, "loss": r.loss, "seconds": time.perf_counter() - t})
    return params, rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default=json.dumps(MNIST5K_CNN_100), help="the workload as JSON")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    params, rounds = run(json.loads(args.workload))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model.f32").write_bytes(params.numpy().astype("<f4").tobytes())
    (args.out / "metrics.json").write_text(json.dumps({"final_accuracy": rounds[-1]["accuracy"], "rounds": rounds}))


if __name__ == "__main__":
    main()
