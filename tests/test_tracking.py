"""``[tracking]``: each round's metrics, the privacy spent and the audit-log head, read back by
TensorBoard's own reader (EventAccumulator) and MLflow's own client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trustfed.config import validate_federation_config
from trustfed.errors import ConfigError
from trustfed.ledger.audit import parsed_entries
from trustfed.simulation.runner import run_simulation

RAW: dict[str, Any] = {
    "federation": {"name": "tracked", "rounds": 3, "participants": 3, "seed": 1},
    "data": {"dataset": "digits", "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "hidden": [16]},
    "training": {"local_epochs": 1, "batch_size": 64, "lr": 0.1, "momentum": 0.0},
    "strategy": {"name": "fedavg", "min_participants": 1},
    "privacy": {"mode": "central", "noise_multiplier": 0.8, "max_grad_norm": 2.0, "budget_epsilon": 1e6},
    "ledger": {"enabled": True},
}


def _heads(run: Path) -> dict[int, str]:
    """The audit-log head after each round: the hash of the round's last entry."""
    heads: dict[int, str] = {}
    for e in parsed_entries(run / "audit.jsonl"):
        heads[e.round] = e.hash
    return heads


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run = tmp_path_factory.mktemp("tracked") / "run"
    cfg = validate_federation_config({**RAW, "tracking": {"tensorboard": True, "mlflow": True}}, "test")
    return run, run_simulation(cfg, run, plot=False).metrics


def test_tensorboard_holds_each_round(tracked_run: tuple[Path, dict[str, Any]]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, metrics = tracked_run
    acc = EventAccumulator(str(run / "tracking" / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"accuracy", "loss", "privacy/epsilon_aggregator", "privacy/epsilon_participant_max"} <= set(scalars)
    accuracy = acc.Scalars("accuracy")
    assert [e.step for e in accuracy] == [1, 2, 3]
    assert [e.value for e in accuracy] == pytest.approx([r["accuracy"] for r in metrics["rounds"]], abs=1e-6)
    eps = [e.value for e in acc.Scalars("privacy/epsilon_aggregator")]
    recorded = [
        r for r in map(json.loads, (run / "privacy.jsonl").read_text().splitlines()) if r["kind"] == "aggregator"
    ]
    assert eps == pytest.approx([r["epsilon"] for r in recorded], rel=1e-6) and eps[0] < eps[-1]
    heads = [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors("audit/head/text_summary")]
    assert heads == [(r, _heads(run)[r]) for r in (1, 2, 3)]


def test_mlflow_holds_the_run(tracked_run: tuple[Path, dict[str, Any]]) -> None:
    from mlflow.tracking import MlflowClient

    run, metrics = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'tracking' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tracked")
    assert exp is not None
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.status == "FINISHED"
    history = client.get_metric_history(found.info.run_id, "accuracy")
    assert [m.step for m in history] == [r["round"] for r in metrics["rounds"]]
    assert [m.value for m in history] == pytest.approx([r["accuracy"] for r in metrics["rounds"]])
    eps = client.get_metric_history(found.info.run_id, "privacy/epsilon_participant_max")
    assert [m.step for m in eps] == [1, 2, 3] and eps[0].value < eps[-1].value
    assert found.data.tags["audit_head"] == _heads(run)[3] and found.data.tags["audit_head_round"] == "3"
    assert found.data.params["federation.rounds"] == "3" and found.data.params["privacy.mode"] == "central"


def test_tracking_off_imports_neither(tmp_path: Path) -> None:
    """The default path stays as fast as it was: neither TensorBoard nor MLflow is imported."""
    code = (
        "import sys; from pathlib import Path; from trustfed.config import validate_federation_config as v;"
        "from trustfed.simulation.runner import run_simulation as r;"
        f"r(v({ ({**RAW, 'privacy': {}})!r}, 't'), Path({str(tmp_path / 'run')!r}), plot=False);"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'tensorboard')"
        " or m.startswith('torch.utils.tensorboard')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_tracking_needs_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tracking.mlflow: needs the 'tracking' extra"):
        validate_federation_config({**RAW, "tracking": {"mlflow": True}}, "test")
