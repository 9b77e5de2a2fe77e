"""DP benchmark: DP-SGD step cost vs a plain step (and vs Opacus as the peer), and accuracy vs
epsilon on MNIST-5k.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/privacy.py [--quick] [--out benchmarks/results/privacy.json]

Part 1 times one optimiser step on the same model and batch, interleaving the modes so that load
from other processes hits them alike, and reports medians and the median of the per-round ratios to the plain step:
plain SGD; trustfed DP-SGD (book-keeping per-example clipping + noise); trustfed's torch.func
fallback; Opacus 1.6 ``hooks`` (its default) and ``ghost``.
Part 2 trains an MLP with DP-SGD on 4,000 MNIST-5k images (the rest is the test set) at
epsilon in {1, 3, 8} (delta 1e-5, noise calibrated by trustfed's accountant) and without DP.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trustfed.core.codec import flatten, load_vector
from trustfed.core.strategy import RoundPlan
from trustfed.data.datasets import load_dataset, train_test_split
from trustfed.models.reference import build_model
from trustfed.models.training import TrainConfig, evaluate, train_epochs
from trustfed.privacy import per_sample
from trustfed.privacy.accounting import GaussianSteps, epsilon, noise_multiplier_for
from trustfed.privacy.dpsgd import DPSGDTrainer, dp_sgd_step, steps_per_epoch

Step = Callable[[], None]


def _opacus_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> Step:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    dl = DataLoader(TensorDataset(x, y), batch_size=len(x))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        pe = PrivacyEngine(accountant="rdp")
        if mode == "ghost":
            model, opt, crit, _ = pe.make_private(
                module=model, optimizer=opt, data_loader=dl, criterion=crit,
                noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
            )  # fmt: skip
        else:
            model, opt, _ = pe.make_private(
                module=model, optimizer=opt, data_loader=dl, noise_multiplier=1.0, max_grad_norm=1.0
            )

    def step() -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()

    return step


def time_steps(model_name: str, batch: int, rounds: int, reps: int, with_vmap: bool) -> dict[str, Any]:
    ds = load_dataset("mnist5k", None, 0)
    x = torch.from_numpy(ds.x[:batch])
    y = torch.from_numpy(ds.y[:batch])
    shape, kw = ds.input_shape, {"hidden": (256,)} if model_name == "mlp" else {}

    def fresh() -> nn.Module:
        return build_model(model_name, shape, 10, 0, **kw)

    plain_m, dp_m, vm_m = fresh(), fresh(), fresh()
    plain_opt = torch.optim.SGD(plain_m.parameters(), lr=0.05)
    dp_opt = torch.optim.SGD(dp_m.parameters(), lr=0.05)
    vm_opt = torch.optim.SGD(vm_m.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    crit = nn.CrossEntropyLoss()

    def plain() -> None:
        plain_opt.zero_grad()
        crit(plain_m(x), y).backward()
        plain_opt.step()

    def ours() -> None:
        dp_sgd_step(
            dp_m, dp_opt, x, y, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=batch, generator=gen
        )

    def ours_vmap() -> None:
        cg = per_sample._vmap(vm_m, x, y, 1.0, per_sample.sum_cross_entropy)
        for p, g in zip(vm_m.parameters(), cg.grads, strict=True):
            p.grad = (g + torch.randn(p.shape, generator=gen)) / batch
        vm_opt.step()

    modes: dict[str, Step] = {"plain": plain, "trustfed_dpsgd": ours}
    if with_vmap:
        modes["trustfed_torch_func"] = ours_vmap
    modes["opacus_hooks"] = _opacus_step(fresh(), x, y, "hooks")
    modes["opacus_ghost"] = _opacus_step(fresh(), x, y, "ghost")
    times: dict[str, list[float]] = {k: [] for k in modes}
    for f in modes.values():
        for _ in range(3):
            f()
    for _ in range(rounds):
        for name, f in modes.items():
            n = 1 if name in ("opacus_hooks", "trustfed_torch_func") else reps
            f()  # one untimed step first: every mode is timed warm, whatever ran before it
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            times[name].append((time.perf_counter() - t0) / n * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    # Ratios pair by pair: each round's time over the plain step's time in the same round, so that
    # a drift in the machine's speed between rounds cancels; the median of those is reported.
    paired = {k: statistics.median(a / b for a, b in zip(v, times["plain"], strict=True)) for k, v in times.items()}
    return {
        "model": model_name,
        "params": sum(p.numel() for p in fresh().parameters()),
        "batch": batch,
        "median_ms": med,
        "ratio_to_plain": paired,
        "ratio_of_medians": {k: v / med["plain"] for k, v in med.items()},
    }


def accuracy_vs_epsilon(epsilons: list[float], epochs: int, seed: int) -> list[dict[str, Any]]:
    ds = load_dataset("mnist5k", None, seed)
    train, test = train_test_split(ds, 0.2, seed)
    batch, delta, clip = 256, 1e-5, 1.0
    q = batch / len(train)
    steps = epochs * steps_per_epoch(q)

    def factory() -> nn.Module:
        return build_model("mlp", train.input_shape, 10, seed, hidden=(128,))

    params, spec = flatten(factory().state_dict())
    out = []
    for eps in epsilons:
        t0 = time.perf_counter()
        if math.isinf(eps):
            model = factory()
            train_epochs(model, train, TrainConfig(epochs, batch, 0.1, 0.9), seed)
            r = evaluate(model, test)
            out.append(
                {"epsilon": eps, "noise_multiplier": 0.0, "accuracy": r.accuracy, "seconds": time.perf_counter() - t0}
            )
            continue
        z = noise_multiplier_for(eps, delta, q, steps)
        tr = DPSGDTrainer("bench", factory, spec, train, TrainConfig(epochs, batch, 0.5, 0.9), seed,
                          noise_multiplier=z, max_grad_norm=clip, delta=delta)  # fmt: skip
        upd = tr.fit(params, RoundPlan(1, ("bench",), {}))
        model = factory()
        load_vector(model, upd.params, spec)
        r = evaluate(model, test)
        spent = epsilon([GaussianSteps(z, q, steps)], delta)
        out.append({
            "epsilon": eps, "epsilon_spent": spent, "noise_multiplier": z, "sample_rate": q, "steps": steps,
            "accuracy": r.accuracy, "seconds": time.perf_counter() - t0,
        })  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and epochs (CI smoke run)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "privacy.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    np.random.seed(args.seed)
    rounds, reps = (5, 5) if args.quick else (15, 10)
    timing = [time_steps("mlp", 256, rounds, reps, with_vmap=not args.quick)]
    if not args.quick:
        timing.append(time_steps("cnn", 64, rounds, reps, with_vmap=False))
    acc = accuracy_vs_epsilon([1.0, 3.0, 8.0, math.inf], 3 if args.quick else 15, args.seed)

    from rich.console import Console
    from rich.table import Table

    console = Console()
    for t in timing:
        table = Table(title=f"one step, {t['model']} ({t['params']:,} params), batch {t['batch']}, 1 thread")
        for c in ("mode", "median ms", "x plain"):
            table.add_column(c, justify="left" if c == "mode" else "right")
        for k, v in t["median_ms"].items():
            table.add_row(k, f"{v:.2f}", f"{t['ratio_to_plain'][k]:.2f}")
        console.print(table)
    table = Table(title="MNIST-5k, MLP 784-128-10, DP-SGD (delta 1e-5, clip 1.0, batch 256)")
    for c in ("epsilon", "noise multiplier", "steps", "test accuracy", "seconds"):
        table.add_column(c, justify="right")
    for a in acc:
        table.add_row(
            "inf (no DP)" if math.isinf(a["epsilon"]) else f"{a['epsilon']:g}",
            f"{a['noise_multiplier']:.3f}",
            str(a.get("steps", "-")),
            f"{a['accuracy']:.4f}",
            f"{a['seconds']:.1f}",
        )
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for a in acc:  # JSON has no infinity
        a["epsilon"] = "inf" if math.isinf(a["epsilon"]) else a["epsilon"]
    args.out.write_text(json.dumps({"quick": args.quick, "timing": timing, "accuracy": acc}, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
