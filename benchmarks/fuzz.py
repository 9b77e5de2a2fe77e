"""Long wire fuzz: 10^5 hostile messages at every RPC of the coordinator and of the enclave.

The same harness as ``tests/test_wire_fuzz.py`` (real servers on 127.0.0.1, mutual TLS 1.3), driven
by a seeded ``random.Random`` instead of hypothesis so that it can run long: each message draws an
RPC, an identity (valid participant, coordinator, revoked participant) and a family (garbage,
truncated, oversized, mis-signed, mutated). Reported: messages per second, the answers by status
(any status outside the documented set is a failure), resident memory at checkpoints (its growth
after the first checkpoint is what a flood costs), and that both servers still answer honest calls.

    .venv/bin/python benchmarks/fuzz.py                  # 100,000 messages
    .venv/bin/python benchmarks/fuzz.py --quick          # 5,000 messages
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.wire_helpers import (  # noqa: E402
    ENC,
    FAMILIES,
    FED,
    IDENTITIES,
    LIMITS,
    RPCS,
    Messages,
    Wire,
    make_pki,
    rss_bytes,
)

from trustfed.transport.guard import DOCUMENTED_STATUSES  # noqa: E402


def run(n: int, seed: int, checkpoints: int) -> dict[str, Any]:
    logging.disable(logging.WARNING)  # refusals are logged within a budget; the benchmark measures the servers
    with tempfile.TemporaryDirectory() as d:
        pki = make_pki(Path(d))
        wire = Wire.start(pki, limits=LIMITS.model_copy(update={"calls_per_s": 1e6, "call_burst": 1_000_000}))
        msgs = Messages(pki)
        rng = random.Random(seed)
        methods = sorted(RPCS)
        by_status: Counter[str] = Counter()
        undocumented: Counter[str] = Counter()
        revoked_ok = 0
        rss: list[tuple[int, float]] = []
        every = max(1, n // checkpoints)
        t0 = time.perf_counter()
        try:
            for i in range(1, n + 1):
                method, who, family = rng.choice(methods), rng.choice(IDENTITIES), rng.choice(FAMILIES)
                code = wire.send(method, who, msgs.hostile(family, method, who, rng))
                by_status[code.name] += 1
                if code != grpc.StatusCode.OK and code not in DOCUMENTED_STATUSES:
                    undocumented[f"{method.rpartition('/')[2]} {who} {family} {code.name}"] += 1
                revoked_ok += who == "p002" and code == grpc.StatusCode.OK
                if i % every == 0:
                    gc.collect()
                    rss.append((i, rss_bytes() / 2**20))
            elapsed = time.perf_counter() - t0
            honest = [
                wire.send(FED + "GetRoundPlan", "p001", msgs.valid(FED + "GetRoundPlan", "p001", rng)).name,
                wire.send(
                    ENC + "GetPublicKey", "coordinator", msgs.valid(ENC + "GetPublicKey", "coordinator", rng)
                ).name,
            ]
        finally:
            wire.close()
    first = rss[0][1]
    return {
        "messages": n,
        "seed": seed,
        "seconds": round(elapsed, 1),
        "messages_per_s": round(n / elapsed, 1),
        "by_status": dict(sorted(by_status.items())),
        "undocumented": dict(undocumented),
        "revoked_answered_ok": revoked_ok,
        "honest_calls_after": honest,
        "rss_mib": [[i, round(m, 1)] for i, m in rss],
        "rss_growth_after_first_checkpoint_mib": round(rss[-1][1] - first, 1),
        "rss_growth_per_1000_messages_kib": round(
            (rss[-1][1] - first) * 1024 / max(1, (rss[-1][0] - rss[0][0]) / 1000), 1
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoints", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="5,000 messages")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fuzz.json")
    args = ap.parse_args()
    if args.quick:
        args.messages = 5_000
    result = run(args.messages, args.seed, args.checkpoints)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"wire fuzz: {result['messages']} hostile messages, seed {result['seed']}")
    t.add_column("status")
    t.add_column("answers", justify="right")
    for status, count in result["by_status"].items():
        t.add_row(status, str(count))
    Console().print(t)
    m = Table(title="resident memory (MiB) after n messages")
    m.add_column("n", justify="right")
    m.add_column("RSS MiB", justify="right")
    for i, mib in result["rss_mib"]:
        m.add_row(str(i), f"{mib:.1f}")
    Console().print(m)
    Console().print(
        f"{result['messages_per_s']} messages/s; undocumented statuses: {sum(result['undocumented'].values())}; "
        f"revoked answered OK: {result['revoked_answered_ok']}; honest calls after: {result['honest_calls_after']}; "
        f"RSS growth after the first checkpoint: {result['rss_growth_after_first_checkpoint_mib']} MiB"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
