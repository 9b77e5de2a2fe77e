"""What every example's ``run.py`` does around its own data and figures.

1. Work from the example's folder (relative paths in ``[app.config]`` name files there), and read
   the federation file (``federation.toml``, or ``small.toml`` with ``--small``): its seed and
   each site's ``[simulation.data.<id>] path``, where the site's data is written.
2. Run the federation through the trustfed CLI (``trustfed simulate``) in a subprocess, as a user would.
3. Load the final model from the run folder (raw float32 tensors, checked against the model hash in
   metrics.json before use) into the app's own model, so the example can score it on every site's
   held-out data pooled: the last federated evaluation scores the model of the round before.
4. Write ``figures.json`` beside metrics.json and print the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Plan:
    """One run of an example: its federation file, seed, sites' data folders and output folder."""

    name: str
    config: Path
    small: bool
    seed: int
    sites: dict[str, Path]  # participant id -> the folder its [data] path names
    out: Path
    app_config: Mapping[str, Any]


def plan(name: str, here: Path, argv: list[str] | None = None) -> Plan:
    """Parse ``--small`` / ``--out``, move into the example's folder and read the federation file."""
    parser = argparse.ArgumentParser(prog=f"{name}/run.py", description=f"the {name} example, end to end")
    parser.add_argument("--small", action="store_true", help="small size (small.toml): seconds, for tests")
    parser.add_argument("--out", type=Path, default=Path("runs") / name, help="run folder (default runs/NAME)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    os.environ["PYTHONPATH"] = os.pathsep.join(  # the CLI's process starts in the example's folder too
        str(Path(entry).resolve()) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry
    )
    sys.path[:] = [os.path.abspath(entry) if entry else entry for entry in sys.path]
    os.chdir(here)
    config = here / ("small.toml" if args.small else "federation.toml")
    raw = tomllib.loads(config.read_text(encoding="utf-8"))
    sites = {pid: here / str(section["path"]) for pid, section in sorted(raw["simulation"]["data"].items())}
    return Plan(
        name=name,
        config=config,
        small=bool(args.small),
        seed=int(raw["federation"]["seed"]),
        sites=sites,
        out=out,
        app_config=raw.get("app", {}).get("config", {}),
    )


def simulate(p: Plan) -> float:
    """``trustfed simulate`` on the plan's federation file, from the example's folder; its seconds."""
    command = [sys.executable, "-m", "trustfed.cli", "simulate", "--config", str(p.config), "--out", str(p.out)]
    if p.small:
        command.append("--no-plot")
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=p.config.parent)
    return time.perf_counter() - started


def final_model(p: Plan) -> tuple[Any, Any]:
    """(the federation's Runtime, the app's model holding the run's final parameters)."""
    from trustfed.app.trainer import load_exchanged
    from trustfed.apps.runtime import Runtime
    from trustfed.config import load_federation_config
    from trustfed.core.codec import ParamSpec, from_bytes, model_hash

    metrics = json.loads((p.out / "metrics.json").read_text(encoding="utf-8"))
    spec = ParamSpec.from_json((p.out / "model.spec.json").read_text(encoding="utf-8"))
    params = from_bytes((p.out / "model.f32").read_bytes(), spec)
    if model_hash(params, spec) != metrics["model_hash"]:
        raise SystemExit(f"{p.out / 'model.f32'} is not the model metrics.json names (model_hash differs)")
    rt = Runtime(load_federation_config(p.config))
    model = rt.model_factory()()
    load_exchanged(rt.app, model, params, spec)
    model.eval()
    return rt, model


def held_out(rt: Any) -> dict[str, Any]:
    """Every site's held-out data, loaded by the app's own data loader, by participant id."""
    return {pid: rt.simulated_local_data(pid).eval for pid in sorted(rt.cfg.simulation.data)}


def report(p: Plan, figures: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """Write ``figures.json`` in the run folder and print it."""
    metrics = json.loads((p.out / "metrics.json").read_text(encoding="utf-8"))
    record = {
        "example": p.name,
        "size": "small" if p.small else "full",
        "config": p.config.name,
        "rounds": len(metrics["rounds"]),
        "simulate_seconds": round(seconds, 1),
        "model_hash": metrics["model_hash"],
        **figures,
    }
    (p.out / "figures.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))
    print(f"figures in {p.out / 'figures.json'}")
    return record
