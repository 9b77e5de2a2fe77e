"""Run a whole federation in one machine and write its results.

``DIR/metrics.json`` = {"final_accuracy", "rounds": [{"round", "accuracy", "loss", "seconds"}],
"config", "versions", "attack", ...}; ``DIR/metrics.png`` plots accuracy and loss over rounds (unless
``plot=False``: matplotlib's import and drawing cost about a second).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

import trustfed
from trustfed.apps.builtin import federation_data
from trustfed.apps.runtime import Runtime
from trustfed.config import FederationConfig, participant_ids
from trustfed.coordinator.engine import Coordinator
from trustfed.coordinator.incentives_record import use_reputation_selection
from trustfed.coordinator.recorders import ledger_metrics, recorders_for
from trustfed.core.codec import ParamSpec, model_hash, to_bytes
from trustfed.core.evaluation import FED_EVAL_PREFIX
from trustfed.core.history_guard import HistoryGuard
from trustfed.core.rounds import RoundObserver, RoundRecord, Transport
from trustfed.core.strategy import Strategy
from trustfed.primitives.atomic import atomic_write_bytes
from trustfed.simulation.adversary import adversarial_transport, attach_root_update
from trustfed.simulation.ray_backend import RayTransport
from trustfed.simulation.secagg import SecAggTransport
from trustfed.simulation.transports import CompressingTransport, InProcessTransport, MultiprocessTransport


def versions() -> dict[str, str]:
    """The versions a run records. scikit-learn's comes from its installed metadata: importing it
    only to read ``__version__`` would cost a simulation a second or more."""
    return {
        "trustfed": trustfed.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": metadata.version("scikit-learn"),
    }


@dataclass
class SimulationResult:
    params: torch.Tensor
    metrics: dict[str, Any]


def run_simulation(
    cfg: FederationConfig,
    out_dir: Path | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    observers: Sequence[RoundObserver] = (),
    *,
    plot: bool = True,
) -> SimulationResult:
    rt = Runtime(cfg)
    params, spec = rt.initial
    strategy = rt.strategy(rt.evaluate_fn())
    ids = participant_ids(cfg.federation.participants)
    transport: Transport
    if cfg.simulation.backend == "multiprocess":
        transport = MultiprocessTransport(cfg, cfg.simulation.workers)
    elif cfg.simulation.backend == "ray":
        transport = RayTransport(cfg, cfg.simulation.workers, cfg.simulation.ray_address)
    else:
        transport = InProcessTransport({pid: rt.simulated_trainer(pid) for pid in ids})
    if cfg.attack.kind != "none":  # the attack crafts the malicious updates from the collected ones
        transport = adversarial_transport(cfg, transport, strategy)
    if cfg.transport.compression != "none":  # updates cross the same codec as gRPC uploads (not with secagg)
        transport = CompressingTransport(transport, cfg.transport.compression_policy)
    if cfg.secagg.enabled:  # the coordinator gets the masked sum only
        transport = SecAggTransport(transport, cfg.secagg, cfg.strategy.min_participants)
    provenance = {pid: simulated_provenance(rt, pid) for pid in ids} if out_dir is not None else {}
    # privacy spend + ledger (audit log, checkpoints, chain): the same recorders as the networked coordinator
    guard = strategy if isinstance(strategy, HistoryGuard) else None  # its suspensions are recorded
    recorded = recorders_for(cfg, out_dir, spec, ids, provenance=provenance, app=rt.identity, guard=guard)
    watchers = [*observers, *recorded]
    use_reputation_selection(cfg, strategy, watchers)
    min_updates = 1 if cfg.secagg.enabled else cfg.strategy.min_participants  # secagg: one summed update
    coord = Coordinator(strategy, transport, params, spec, min_updates=min_updates, observers=watchers)
    if rt.builtin:
        attach_root_update(cfg, federation_data(cfg), strategy, coord)  # FLTrust's server update from a root sample
    metrics = run_rounds(coord, cfg, transport, strategy, spec, on_round)
    metrics["app"] = rt.identity.describe()
    metrics["attack"] = cfg.attack.record(ids)  # the attack that ran (its implementation), or "no attack"
    metrics.update(ledger_metrics(watchers))
    if provenance:
        metrics["participants_provenance"] = provenance
    if out_dir is not None:
        write_results(out_dir, metrics, coord.params, spec.to_json(), plot=plot)
    return SimulationResult(coord.params, metrics)


def simulated_provenance(rt: Runtime, pid: str) -> dict[str, str]:
    """What a virtual participant would sign: the app's code hash and its data manifest's hash."""
    return rt.provenance(rt.simulated_data_spec(pid), rt.simulated_local_data(pid))


def run_rounds(
    coord: Coordinator,
    cfg: FederationConfig,
    transport: Transport,
    strategy: Strategy,
    spec: ParamSpec,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> dict[str, Any]:
    """Run every round of ``cfg`` (closing ``transport`` after) and return the metrics.json contract:
    the simulation and the networked coordinator share it."""
    rounds: list[dict[str, Any]] = []

    def record(rec: RoundRecord, _params: torch.Tensor) -> None:
        rounds.append(
            {
                "round": rec.round,
                "accuracy": rec.metrics.get("accuracy", float("nan")),
                "loss": rec.metrics.get("loss", float("nan")),
                "seconds": rec.seconds,
                "participants": list(rec.participants),
                "updated_by": list(rec.updated_by),
                "model_hash": rec.model_hash,
                **federated_entry(rec.metrics),
            }
        )
        if on_round:
            on_round(rec)

    t0 = time.perf_counter()
    try:
        coord.run(cfg.federation.rounds - coord.round, record)  # a resumed coordinator starts after round 0
    finally:
        transport.close()
    if not rounds:  # resumed after the last round: nothing ran here, evaluate the model as it stands
        final = strategy.evaluate(coord.round, coord.params) or {}
        last = {"accuracy": final.get("accuracy", float("nan")), "loss": final.get("loss", float("nan"))}
    else:
        last = rounds[-1]
    out = {
        "final_accuracy": last["accuracy"],
        "final_loss": last["loss"],
        "rounds": rounds,
        "total_seconds": time.perf_counter() - t0,
        "model_hash": model_hash(coord.params, spec),
        "strategy": strategy.describe(),
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
    }
    if isinstance(strategy, HistoryGuard):  # who it suspended: round, why, and the mean score
        out["suspensions"] = {
            pid: {"round": s.round, "reason": s.reason, "score": s.score, "rounds": s.rounds}
            for pid, s in sorted(strategy.suspended.items())
        }
    return out


def federated_entry(metrics: dict[str, float]) -> dict[str, Any]:
    """The round's federated evaluation for metrics.json: the participants' example-weighted scores of
    the model they received (the previous round's), or nothing when none evaluated."""
    found = {k[len(FED_EVAL_PREFIX) :]: v for k, v in metrics.items() if k.startswith(FED_EVAL_PREFIX)}
    if not found:
        return {}
    model_round = int(found.pop("model_round", -1))
    return {"federated_evaluation": {"model_round": model_round, **found}}


def write_results(
    out_dir: Path, metrics: dict[str, Any], params: torch.Tensor, spec_json: str, *, plot: bool = True
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
    atomic_write_bytes(out_dir / "model.f32", to_bytes(params))
    atomic_write_bytes(out_dir / "model.spec.json", spec_json.encode())
    if plot:
        plot_metrics(metrics, out_dir / "metrics.png")


def plot_metrics(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in metrics["rounds"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(rounds, [r["accuracy"] for r in metrics["rounds"]], marker="o", label="coordinator")
    ax2.plot(rounds, [r["loss"] for r in metrics["rounds"]], marker="o", color="tab:red", label="coordinator")
    fed = [r["federated_evaluation"] for r in metrics["rounds"] if "federated_evaluation" in r]
    for ax, key, colour in ((ax1, "accuracy", "tab:green"), (ax2, "loss", "tab:orange")):
        shown = [(f["model_round"], f[key]) for f in fed if key in f]  # participants' scores of round k's model
        if shown:
            ax.plot([k for k, _ in shown], [v for _, v in shown], marker="s", color=colour, label="federated")
            ax.legend()
    ax1.set(xlabel="round", ylabel="accuracy", title="Accuracy")
    ax1.grid(alpha=0.3)
    ax2.set(xlabel="round", ylabel="loss", title="Loss")
    ax2.grid(alpha=0.3)
    name = metrics.get("config", {}).get("federation", {}).get("name", "federation")
    fig.suptitle(f"trustfed: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
