"""Secure aggregation benchmark: what the secrecy costs, against plain summation and Flower's masks.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/secagg.py [--quick] [--out benchmarks/results/secagg.json]

Part 1, the protocol (``trustfed.secagg.protocol``, all messages handed over in process): n
participants with d float32 values each, every other participant a neighbour (SecAgg) or 8
neighbours each (SecAgg+). Client seconds = one participant's four steps (key
agreement, Shamir shares, quantising and masking with n ChaCha20 key streams, unmasking shares);
server seconds = recovering the sum (removing self-masks, and the pairwise masks of the ones that
dropped after masking). Peer: the plain float32 sum of the same vectors (numpy), ratio server/plain.
Part 2, one mask of d values: trustfed's ``prg`` (ChaCha20, 256-bit seed) vs Flower's SecAgg+
``pseudo_rand_gen`` (numpy MT19937, its seed folded to 32 bits), same d, interleaved, medians.
Part 3, a whole networked run: the local multi-process federation (3 participant processes, mutual
TLS, digits MLP 64-1024-512-10, 0.6 M parameters; --quick: 64-32-10) with ``[secagg]`` vs the same
federation with plain FedAvg.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from trustfed.core.codec import ParamSpec
from trustfed.secagg.protocol import SecAggClient, SecAggParams, SecAggServer, prg


def protocol_run(n: int, d: int, dropped: int, seed: int, neighbours: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    inputs = {i: rng.uniform(-0.4, 0.4, d).astype(np.float32) for i in range(1, n + 1)}
    size = n if neighbours == 0 else neighbours + 1  # a neighbourhood: itself and its neighbours
    bits = 24 if n < 256 else 20
    p = SecAggParams(threshold=max(2, -(-2 * size // 3)), clip=0.5, bits=bits, round=1, neighbours=neighbours)
    client_s: dict[int, float] = {}

    def timed(cid: int, fn: Any, *args: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args)
        client_s[cid] = client_s.get(cid, 0.0) + time.perf_counter() - t
        return out

    clients = {cid: timed(cid, SecAggClient, cid, p) for cid in inputs}
    server = SecAggServer(p, d)
    for cid, c in clients.items():
        server.receive_keys(cid, c.advertise_keys())
    roster = server.roster_for_clients()
    for cid, c in clients.items():
        server.receive_shares(cid, timed(cid, c.share_keys, roster))
    lost = set(rng.choice(np.arange(1, n + 1), size=dropped, replace=False).tolist())
    for cid, c in clients.items():
        y = timed(cid, c.masked_input, inputs[cid], server.inbox_for(cid))
        if cid not in lost:
            server.receive_masked(cid, y)
    survivors = server.survivors()
    for cid in survivors:
        server.receive_unmask(cid, timed(cid, clients[cid].unmask, survivors))
    t = time.perf_counter()
    total, who = server.aggregate()
    server_s = time.perf_counter() - t
    kept = np.stack([inputs[c] for c in who])
    t = time.perf_counter()
    plain = kept.sum(axis=0, dtype=np.float32)
    plain_s = time.perf_counter() - t
    err = float(np.max(np.abs(total - plain)))
    return {
        "n": n,
        "d": d,
        "neighbours": neighbours or n - 1,
        "dropped_after_masking": dropped,
        "client_s_median": statistics.median(client_s.values()),
        "server_s": server_s,
        "plain_sum_s": plain_s,
        "server_over_plain": server_s / plain_s,
        "max_abs_error": err,
        "quantisation_step": 2 * p.clip / (2**p.bits - 1),
    }


def mask_generation(d: int, reps: int) -> dict[str, Any]:
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    ours, flower = [], []
    for _ in range(reps):
        seed = os.urandom(32)
        t = time.perf_counter()
        prg(seed, d)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        pseudo_rand_gen(seed, 1 << 32, [(d,)])
        flower.append(time.perf_counter() - t)
    ratios = [f / o for o, f in zip(ours, flower, strict=True)]
    return {
        "d": d,
        "reps": reps,
        "trustfed_chacha20_s": statistics.median(ours),
        "flower_mt19937_s": statistics.median(flower),
        "flower_over_trustfed": statistics.median(ratios),
        "seed_bits": {"trustfed": 256, "flower": 32},
    }


def networked(rounds: int, hidden: list[int]) -> dict[str, Any]:
    from trustfed.coordinator.local_federation import run_local_federation

    base: dict[str, Any] = {
        "federation": {"name": "bench-secagg", "rounds": rounds, "participants": 3, "seed": 6},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": hidden},
        "training": {"local_epochs": 1, "batch_size": 64, "lr": 0.05},
        "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 2},
    }
    out: dict[str, Any] = {"participants": 3, "rounds": rounds, "hidden": hidden}
    for name, extra in (("plain", {}), ("secagg", {"secagg": {"enabled": True, "clip": 0.5, "bits": 24}})):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            _, metrics = run_local_federation({**base, **extra}, Path(tmp) / "run", round_timeout_s=120)
            out[f"{name}_s"] = time.perf_counter() - t
            out[f"{name}_accuracy"] = metrics["final_accuracy"]
            out[f"{name}_round_s"] = statistics.median(r["seconds"] for r in metrics["rounds"])
            out["parameters"] = ParamSpec.from_json((Path(tmp) / "run" / "model.spec.json").read_text()).size
    out["secagg_over_plain_round"] = out["secagg_round_s"] / out["plain_round_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "secagg.json")
    ap.add_argument("--no-network", action="store_true", help="skip part 3 (the multi-process federation)")
    args = ap.parse_args()
    sizes = [(5, 10_000, 0)] if args.quick else [(10, 100_000, 0), (10, 1_000_000, 0), (50, 100_000, 0)]
    sizes += [] if args.quick else [(100, 100_000, 0), (100, 100_000, 8)]  # SecAgg vs SecAgg+ at n = 100
    proto = []
    for n, d, k in sizes:
        for dropped in (0, max(1, n // 20) if k else max(1, n // 10)):
            proto.append(protocol_run(n, d, dropped, seed=n + d, neighbours=k))
    masks = [mask_generation(d, 3 if args.quick else 7) for d in ([10_000] if args.quick else [100_000, 1_000_000])]
    net = None if args.no_network else networked(1 if args.quick else 3, [32] if args.quick else [1024, 512])

    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    t = Table(title="secure aggregation protocol, in process (1 thread)")
    for c in ("n", "d", "neighbours", "dropped", "client s", "server s", "plain sum s", "server/plain", "max error"):
        t.add_column(c, justify="right", no_wrap=True)
    for r in proto:
        t.add_row(
            str(r["n"]),
            f"{r['d']:,}",
            str(r["neighbours"]),
            str(r["dropped_after_masking"]),
            f"{r['client_s_median']:.3f}",
            f"{r['server_s']:.3f}",
            f"{r['plain_sum_s']:.4f}",
            f"{r['server_over_plain']:.0f}",
            f"{r['max_abs_error']:.1e}",
        )
    console.print(t)
    t = Table(title="one mask of d values: trustfed ChaCha20 (256-bit seed) vs Flower SecAgg+ MT19937 (32-bit seed)")
    for c in ("d", "trustfed s", "Flower s", "Flower / trustfed"):
        t.add_column(c, justify="right", no_wrap=True)
    for m in masks:
        t.add_row(
            f"{m['d']:,}",
            f"{m['trustfed_chacha20_s']:.4f}",
            f"{m['flower_mt19937_s']:.4f}",
            f"{m['flower_over_trustfed']:.2f}",
        )
    console.print(t)
    if net is not None:
        t = Table(
            title=f"networked run: 3 participant processes, mutual TLS, {net['rounds']} round(s), digits MLP "
            f"{net['hidden']} ({net['parameters']:,} parameters)"
        )
        for c in ("mode", "median round s", "whole run s", "final accuracy"):
            t.add_column(c, justify="right", no_wrap=True)
        for name in ("plain", "secagg"):
            t.add_row(
                name, f"{net[name + '_round_s']:.2f}", f"{net[name + '_s']:.1f}", f"{net[name + '_accuracy']:.4f}"
            )
        console.print(t)
        console.print(f"secagg / plain round time: {net['secagg_over_plain_round']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"quick": args.quick, "protocol": proto, "masks": masks, "networked": net}, indent=2)
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
