"""Ledger benchmarks: audit-log appends, Merkle proofs at 10^6 leaves, the ledger's share of a demo round.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ledger.py [--quick] [--out benchmarks/results/ledger.json]

Peers, measured in the same run: appends against an unsigned, unchained JSON-lines append (what
signing and chaining cost) and against the 10,000/s target; Merkle proof size against the 640-byte
bound; the demo with the ledger against the same demo without it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")


def bench_appends(n: int) -> dict[str, Any]:
    from trustfed.ledger.audit import AuditLog, EcdsaSigner

    signer = EcdsaSigner.generate("coordinator")
    body = {"participant": "p001", "update_sha256": "ab" * 32, "commitment": "cd" * 32, "num_examples": 128}
    with tempfile.TemporaryDirectory() as d:
        t0, c0 = time.perf_counter(), time.process_time()
        with AuditLog(Path(d) / "audit.jsonl") as log:
            for i in range(n):
                log.append("commitment", i // 100, body, signer)
            log.sync()
        signed = n / (time.perf_counter() - t0)
        signed_cpu = n / (time.process_time() - c0)  # per CPU-second: less sensitive to a busy machine
        t0 = time.perf_counter()
        with (Path(d) / "plain.jsonl").open("w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({"seq": i, "round": i // 100, "body": body}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        plain = n / (time.perf_counter() - t0)
    return {
        "appends": n,
        "signed_chained_per_s": signed,
        "signed_chained_per_cpu_s": signed_cpu,
        "plain_jsonl_per_s": plain,
        "target_per_s": 10_000,
    }


def bench_merkle(n: int) -> dict[str, Any]:
    from trustfed.primitives.merkle import MerkleTree, verify_inclusion

    leaves = [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(n)]
    t0 = time.perf_counter()
    tree = MerkleTree(leaves)
    build = time.perf_counter() - t0
    worst = max(
        (tree.proof(i) for i in (0, n // 2, n - 1, (1 << (n.bit_length() - 1)) - 1)), key=lambda p: len(p.siblings)
    )
    t0 = time.perf_counter()
    reps = 1000
    for _ in range(reps):
        assert verify_inclusion(leaves[worst.index], worst, tree.root)
    verify_us = (time.perf_counter() - t0) / reps * 1e6
    return {
        "leaves": n,
        "build_s": build,
        "proof_bytes": len(worst.to_bytes()),
        "proof_levels": len(worst.siblings),
        "bound_bytes": 32 * math.ceil(math.log2(n)),
        "verify_us": verify_us,
    }


def bench_demo(rounds: int, participants: int) -> dict[str, Any]:
    from trustfed.apps.builtin_parts import build_data, model_factory
    from trustfed.config import participant_ids, validate_federation_config
    from trustfed.core.codec import flatten
    from trustfed.core.rounds import RoundRecord
    from trustfed.ledger.recorder import simulated_recorder
    from trustfed.ledger.settings import LedgerSettings
    from trustfed.simulation.runner import run_simulation

    raw = {  # the demo's federation (src/trustfed/cli.py demo), ledger added by hand to time it
        "federation": {"name": "digits-demo", "rounds": rounds, "participants": participants, "seed": 0},
        "data": {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "model": {"name": "mlp", "hidden": [128]},
        "training": {"local_epochs": 2, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 2},
    }
    cfg = validate_federation_config(raw, "bench")

    def timed(observers: list[Any]) -> list[float]:
        marks = [time.perf_counter()]

        def on_round(_rec: RoundRecord) -> None:
            marks.append(time.perf_counter())

        run_simulation(cfg, None, on_round, observers=observers)
        return [b - a for a, b in itertools.pairwise(marks)]

    timed([])  # warm-up: first-use costs (imports, data loading) land in neither measurement
    data = build_data(cfg)
    _, spec = flatten(model_factory(cfg, data.train.input_shape, data.train.num_classes)().state_dict())
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        rec = simulated_recorder(LedgerSettings(enabled=True), Path(d), spec, participant_ids(participants))
        setup = time.perf_counter() - t0
        with_ledger = timed([rec])
        ledger_s = [rec.seconds[r] for r in range(1, rounds + 1)]
    base = timed([])
    steady = range(1, rounds)  # round 1 also writes identities, registers them and commits round 0
    share = sum(ledger_s[i] for i in steady) / sum(with_ledger[i] for i in steady) if rounds > 1 else float("nan")
    return {
        "rounds": rounds,
        "participants": participants,
        "ledger_setup_s": setup,
        "round1_ledger_s": ledger_s[0],
        "round_s_with_ledger": with_ledger,
        "round_s_without_ledger": base,
        "ledger_s_per_round": ledger_s,
        "steady_ledger_share": share,
        "total_ratio_with_vs_without": sum(with_ledger) / sum(base),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (seconds, not minutes)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ledger.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    res = {
        "appends": bench_appends(5_000 if args.quick else 50_000),
        "merkle": bench_merkle(1 << 17 if args.quick else 1_000_000),
        "demo": bench_demo(3 if args.quick else 10, 5),
        "quick": args.quick,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    a, m, d = res["appends"], res["merkle"], res["demo"]
    rows = [
        (
            "audit appends / s (signed, chained)",
            f"{a['signed_chained_per_s']:,.0f}",
            f"{a['signed_chained_per_s'] / a['target_per_s']:.2f}x target 10,000; "
            f"{a['signed_chained_per_s'] / a['plain_jsonl_per_s']:.2f}x plain JSON lines ({a['plain_jsonl_per_s']:,.0f}/s)",
        ),
        (
            "audit appends / CPU-second",
            f"{a['signed_chained_per_cpu_s']:,.0f}",
            f"{a['signed_chained_per_cpu_s'] / a['target_per_s']:.2f}x target 10,000 (wall rate depends on load)",
        ),
        (
            f"Merkle proof at {m['leaves']:,} leaves",
            f"{m['proof_bytes']} B",
            f"bound {m['bound_bytes']} B; build {m['build_s']:.2f} s; verify {m['verify_us']:.0f} us",
        ),
        (
            "ledger setup (keys, EVM, deploy)",
            f"{d['ledger_setup_s']:.2f} s",
            f"round 1 ledger work {d['round1_ledger_s']:.2f} s",
        ),
        (
            "ledger share of a demo round (rounds 2..N)",
            f"{100 * d['steady_ledger_share']:.1f} %",
            f"mean {sum(d['ledger_s_per_round'][1:]) / max(1, d['rounds'] - 1) * 1000:.0f} ms of "
            f"{sum(d['round_s_with_ledger'][1:]) / max(1, d['rounds'] - 1) * 1000:.0f} ms",
        ),
        (
            "demo with ledger / without",
            f"{d['total_ratio_with_vs_without']:.2f}x",
            f"{d['rounds']} rounds, {d['participants']} participants",
        ),
    ]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="trustfed ledger benchmarks" + (" (quick)" if args.quick else ""))
        for c in ("measure", "value", "compared with"):
            t.add_column(c)
        for r in rows:
            t.add_row(*r)
        Console().print(t)
    except ImportError:
        for r in rows:
            print(" | ".join(r))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
