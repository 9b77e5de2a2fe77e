"""A participant training on 2 DDP workers: seconds per round with persistent workers vs a torchrun
launch per round, against plain single-process training (LocalTrainer) of the same rounds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ddp_participant.py [--rounds 5] [--epochs 3] [--out FILE]

One participant's shard of digits (the demo's split and MLP), the same start and seeds in every
mode; each mode trains ``--rounds`` rounds from the model the previous round returned. The first
round of the persistent mode includes starting its workers; "rounds 2.." is the steady state. The
final parameters of the DDP modes are compared with the single-process ones (max abs difference).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trustfed.apps.builtin_parts import build_data, build_trainer, model_factory, train_config
from trustfed.config import validate_federation_config
from trustfed.core.codec import flatten
from trustfed.core.strategy import RoundPlan
from trustfed.distributed.participant import DDPTrainer
from trustfed.models.trainer import LocalTrainer


def run(trainer: Any, params: torch.Tensor, rounds: int) -> tuple[list[float], torch.Tensor]:
    times = []
    for rnd in range(1, rounds + 1):
        t = time.perf_counter()
        params = trainer.fit(params, RoundPlan(rnd, ("p000",), {})).params
        times.append(time.perf_counter() - t)
    return times, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ddp_participant.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = {
            "federation": {"rounds": args.rounds, "participants": 5, "seed": 0},
            "data": {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}},
            "model": {"name": "mlp", "hidden": [128]},
            "training": {"local_epochs": args.epochs, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
            "participant_training": {"trainer": "ddp", "workers": args.workers, "workdir": tmp},
        }
        cfg = validate_federation_config(raw)
        data = build_data(cfg)
        factory = model_factory(cfg, data.train.input_shape, data.train.num_classes)
        start, spec = flatten(factory().state_dict())
        local = LocalTrainer("p000", factory, spec, data.shards["p000"], train_config(cfg), cfg.federation.seed)
        t_local, p_local = run(local, start.clone(), args.rounds)
        rows.append({"mode": "single process (LocalTrainer)", "per_round_s": t_local, "max_abs_diff": 0.0})
        for persistent in (False, True):
            trainer = build_trainer(cfg, data, "p000")
            assert isinstance(trainer, DDPTrainer)
            trainer.persistent = persistent
            try:
                t, p = run(trainer, start.clone(), args.rounds)
            finally:
                trainer.close()
            mode = f"DDP x{args.workers}, " + ("persistent workers" if persistent else "torchrun per round")
            rows.append({"mode": mode, "per_round_s": t, "max_abs_diff": float((p - p_local).abs().max())})
    per_launch = statistics.median(rows[1]["per_round_s"][1:])
    print(f"{'mode':42s} {'round 1 s':>10s} {'rounds 2.. s (median)':>22s} {'vs per-round launch':>20s} max|diff|")
    for r in rows:
        steady = statistics.median(r["per_round_s"][1:])
        r["round1_s"], r["steady_s"], r["launch_over_this"] = r["per_round_s"][0], steady, per_launch / steady
        print(
            f"{r['mode']:42s} {r['round1_s']:10.3f} {steady:22.3f} {r['launch_over_this']:19.1f}x "
            f"{r['max_abs_diff']:.1e}"
        )
    out = {
        "rounds": args.rounds,
        "epochs": args.epochs,
        "workers": args.workers,
        "shard_examples": len(data.shards["p000"]),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
