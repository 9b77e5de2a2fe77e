"""End to end: a coordinator and 3 participant *processes* over mutual TLS give the same final
parameters as the in-process simulation with the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trustfed.config import validate_federation_config
from trustfed.coordinator.local_federation import run_local_federation
from trustfed.core.codec import from_bytes
from trustfed.simulation import run_simulation

RAW = {
    "federation": {"name": "e2e-grpc", "rounds": 2, "participants": 3, "seed": 7},
    "data": {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}},
    "model": {"name": "mlp", "hidden": [32]},
    "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
    "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 3},
}


def test_three_processes_match_the_simulation(tmp_path: Path) -> None:
    out = tmp_path / "run"
    params, metrics = run_local_federation(RAW, out, round_timeout_s=120)
    sim = run_simulation(validate_federation_config(RAW))
    assert torch.max(torch.abs(params - sim.params)).item() <= 1e-6
    assert metrics["model_hash"] == sim.metrics["model_hash"]
    # the demo's output contract, and the files of the run
    written = json.loads((out / "metrics.json").read_text())
    assert {"final_accuracy", "rounds", "config", "versions"} <= set(written)
    assert [r["round"] for r in written["rounds"]] == [1, 2]
    assert torch.equal(from_bytes((out / "model.f32").read_bytes()), params)
    assert (out / "metrics.png").stat().st_size > 0
    for pid in ("p000", "p001", "p002"):
        assert "2 round(s), included in 2" in (out / "logs" / f"{pid}.log").read_text()
    assert (out / "pki" / "p000.key").stat().st_mode & 0o077 == 0
