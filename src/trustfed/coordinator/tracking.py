"""Experiment tracking: ``[tracking]`` writes each round to TensorBoard and MLflow.

Two RoundObservers, attached after the ledger recorder (see
:func:`trustfed.coordinator.recorders.recorders_for`) so that a round's audit-log head is already
written when they read it. Each logs, with the round as its step:

- the round's metrics (accuracy, loss, the federated evaluation, ...), its seconds and how many
  participants were selected and aggregated;
- the privacy spent: ``privacy/epsilon_participant_max`` (the largest epsilon a participant reported
  spending in total, local DP or its budget view) and ``privacy/epsilon_aggregator`` (central DP's);
- the audit-log head after the round (TensorBoard: text ``audit/head``; MLflow: tags ``audit_head``
  and ``audit_head_round``), the value ``trustfed audit verify`` and the chain's RoundLog hold.

Tracking is a view, not a record: the signed audit log, ``metrics.json`` and ``privacy.jsonl`` stay the
run's evidence. TensorBoard and MLflow are the 'tracking' extra and are imported only here, when a
switch is on. MLflow's default store is ``sqlite:///RUN/tracking/mlflow.db``: MLflow 3 refuses its
file store (``./mlruns``) unless ``MLFLOW_ALLOW_FILE_STORE`` is set, and a database keeps one file.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import trustfed
from trustfed.config import FederationConfig
from trustfed.core.rounds import RoundObserver, RoundRecord
from trustfed.core.strategy import RoundPlan, RoundResult, Update
from trustfed.ledger.audit import AuditLog
from trustfed.ledger.recorder import AUDIT_FILE
from trustfed.secagg.updates import contributions


def round_scalars(updates: Sequence[Update], result: RoundResult, record: RoundRecord) -> dict[str, float]:
    """What a tracker logs for one round: finite numbers only, by name."""
    out = {k: float(v) for k, v in record.metrics.items()}
    out["seconds"] = record.seconds
    out["participants/selected"] = float(len(record.participants))
    out["participants/aggregated"] = float(len(record.updated_by or record.participants))
    spent = [float(p.metrics["dp_epsilon"]) for u in updates for p in contributions(u) if "dp_epsilon" in p.metrics]
    if spent:
        out["privacy/epsilon_participant_max"] = max(spent)
    if "dp_epsilon" in result.metrics:
        out["privacy/epsilon_aggregator"] = float(result.metrics["dp_epsilon"])
    return {k: v for k, v in out.items() if math.isfinite(v)}


def audit_head(run_dir: Path) -> str | None:
    """The hash of the audit log's last entry (None without a log: the ledger is off)."""
    path = run_dir / AUDIT_FILE
    return AuditLog(path).head if path.is_file() else None


def flat_params(cfg: FederationConfig) -> dict[str, str]:
    """The config as MLflow params: dotted names, scalars as text, lists and tables as JSON."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif value is not None:
            out[prefix] = value if isinstance(value, str) else json.dumps(value)

    walk("", cfg.model_dump(mode="json", exclude={"tracking"}))
    return out


class TensorBoardTracker:
    """Scalars per round and the audit head as text, in ``folder`` (TensorBoard's event files)."""

    def __init__(self, folder: Path, run_dir: Path, last_round: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # the 'tracking' extra; only when switched on

        self.writer = SummaryWriter(log_dir=str(folder))
        self.run_dir, self.last_round = run_dir, last_round

    def on_round_start(self, plan: RoundPlan, params: torch.Tensor) -> None:
        pass

    def on_round_end(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> None:
        for name, value in round_scalars(updates, result, record).items():
            self.writer.add_scalar(name, value, record.round)
        head = audit_head(self.run_dir)
        if head is not None:
            self.writer.add_text("audit/head", head, record.round)
        self.writer.flush()
        if record.round >= self.last_round:
            self.writer.close()


class MlflowTracker:
    """One MLflow run per coordinator process: the config as params, metrics per round, the audit head as tags."""

    def __init__(self, uri: str, experiment: str, cfg: FederationConfig, run_dir: Path) -> None:
        from mlflow.entities import Param, RunTag  # the 'tracking' extra; only when switched on
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        tags = {"trustfed.version": trustfed.__version__, "trustfed.run_dir": run_dir.name}
        self.run_id: str = self.client.create_run(exp_id, tags=tags, run_name=cfg.federation.name).info.run_id
        params = [Param(k, v) for k, v in sorted(flat_params(cfg).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.run_dir, self.last_round = run_dir, cfg.federation.rounds
        self._tag = RunTag

    def on_round_start(self, plan: RoundPlan, params: torch.Tensor) -> None:
        pass

    def on_round_end(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        scalars = round_scalars(updates, result, record)
        metrics = [Metric(_mlflow_name(k), v, now, record.round) for k, v in scalars.items()]
        head = audit_head(self.run_dir)
        tags = [] if head is None else [self._tag("audit_head", head), self._tag("audit_head_round", str(record.round))]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        if record.round >= self.last_round:
            self.client.set_terminated(self.run_id)


def _mlflow_name(name: str) -> str:
    """MLflow allows letters, digits and ``_-. /``; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)


def trackers_for(cfg: FederationConfig, run_dir: Path) -> list[RoundObserver]:
    """The trackers ``cfg.tracking`` switches on, for a run in ``run_dir`` (none when all are off)."""
    t = cfg.tracking
    folder = t.folder if t.folder.is_absolute() else run_dir / t.folder
    out: list[RoundObserver] = []
    if t.tensorboard:
        out.append(TensorBoardTracker(folder / "tensorboard", run_dir, cfg.federation.rounds))
    if t.mlflow:
        folder.mkdir(parents=True, exist_ok=True)
        uri = t.tracking_uri or f"sqlite:///{(folder / 'mlflow.db').resolve()}"
        out.append(MlflowTracker(uri, t.experiment or cfg.federation.name, cfg, run_dir))
    return out
