"""Enclave-mode round time vs plain aggregation on the demo workload, in the same run.

Workload = ``trustfed demo``: digits, 5 participants, Dirichlet(0.5), MLP(128), 2 local epochs, FedAvg.
Modes, interleaved round-robin per repeat so machine load hits them alike:

* ``plain``: Coordinator + InProcessTransport, aggregation in the coordinator.
* ``enclave``: the same, through an in-process SIMULATED enclave: participants attest it, seal
  their updates (X25519 + HKDF + AES-256-GCM), sign commitments; the enclave opens, checks,
  aggregates and signs a receipt; the coordinator verifies the receipt.
* ``enclave-grpc``: the enclave behind its gRPC service with mutual TLS on loopback (needs
  ``trustfed.pki``); every attestation and aggregation crosses the network stack.
* ``net-plain`` / ``net-enclave`` (unless ``--quick``): the demo as users run it, ``trustfed demo``'s
  federation: a fresh PKI, the coordinator and 5 participant processes over mutual TLS, the ledger on;
  ``net-enclave`` adds the SIMULATED enclave service as its own process. Round 1 (process start-up,
  attestation) is left out of these two modes' round times.

The goal from the issue: enclave round time <= 1.15x plain. Software only: a hardware enclave adds
its own costs (EPC paging, transitions; 8-19% reported for Gramine-SGX), which this cannot measure.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/enclave.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trustfed.config import FederationConfig, validate_federation_config
from trustfed.simulation.enclave import run_federation


def demo_config(rounds: int, participants: int = 5, seed: int = 0) -> FederationConfig:
    return validate_federation_config(
        {
            "federation": {"name": "digits-demo", "rounds": rounds, "participants": participants, "seed": seed},
            "data": {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}},
            "model": {"name": "mlp", "hidden": [128]},
            "training": {"local_epochs": 2, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
            "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 2},
            "enclave": {
                "enabled": True,
                "backend": "simulated",
                "allow_simulated_tee": True,
                "policy": {"allow_simulated_tee": True},
            },
        }
    )


def grpc_factory(workdir: Path) -> tuple[Callable[..., Any], Callable[[], None]] | None:
    """An enclave_factory serving the enclave over mutual TLS on loopback; None without trustfed.pki."""
    try:
        from trustfed.pki import ca as pki
    except ImportError:
        return None
    from trustfed.enclave.core import Enclave
    from trustfed.enclave.service import ENCLAVE_TLS_NAME, GrpcEnclaveClient, TlsMaterial, serve
    from trustfed.enclave.settings import AggregationSettings, EnclaveServiceConfig

    pki.init_ca(workdir)
    pki.issue(workdir, "enclave", "enclave", hosts=(ENCLAVE_TLS_NAME,))
    pki.issue(workdir, "coordinator", "coord")
    servers: list[Any] = []
    clients: list[Any] = []

    def tls(name: str) -> TlsMaterial:
        return TlsMaterial.from_files(workdir / "ca.pem", workdir / f"{name}.pem", workdir / f"{name}.key")

    def factory(keyring: Any) -> Any:
        enclave = Enclave(AggregationSettings(min_updates=2), keyring, allow_simulated_tee=True)
        cfg = EnclaveServiceConfig.model_validate({"enclave": {"allow_simulated_tee": True}})
        server, port, _ = serve(cfg, enclave=enclave, tls=tls("enclave"), listen="127.0.0.1:0")
        servers.append(server)
        client = GrpcEnclaveClient(f"127.0.0.1:{port}", tls("coord"))
        clients.append(client)
        return client

    def cleanup() -> None:
        for c in clients:
            c.close()
        for s in servers:
            s.stop(grace=None)
        clients.clear()
        servers.clear()

    return factory, cleanup


def isolated_overhead(cfg: FederationConfig, reps: int) -> dict[str, float]:
    """Median seconds per round of the enclave-only work, timed apart from training (less load noise).

    One round's worth: every participant attests-less seals + signs its update (attestation is reused
    across rounds), the enclave checks, opens, aggregates and signs, the coordinator verifies the
    receipt, minus the plain FedAvg aggregation that enclave mode replaces.
    """
    from trustfed.apps.builtin_parts import build_data, model_factory
    from trustfed.core.codec import flatten
    from trustfed.core.strategy import FedAvg, RoundPlan, Update
    from trustfed.enclave.core import AggregationRequest, Enclave
    from trustfed.enclave.keys import EnclavePublicKey
    from trustfed.enclave.receipts import verify_receipt
    from trustfed.enclave.sealing import KeySigner, StaticKeyring, seal_update
    from trustfed.enclave.settings import AggregationSettings

    data = build_data(cfg)
    params, spec = flatten(model_factory(cfg, data.train.input_shape, data.train.num_classes)().state_dict())
    n = cfg.federation.participants
    gen = torch.Generator().manual_seed(0)
    clear = [Update(f"p{i:03d}", params + 0.01 * torch.randn(params.shape, generator=gen), 100) for i in range(n)]
    signers = {u.participant_id: KeySigner.generate(u.participant_id) for u in clear}
    keyring = StaticKeyring({p: s.public_key() for p, s in signers.items()})
    seal_s, enclave_s, plain_s = [], [], []
    for rnd in range(1, reps + 1):
        enclave = Enclave(AggregationSettings(), keyring, allow_simulated_tee=True, measurement="00" * 32)
        pk = EnclavePublicKey.from_bytes(enclave.public_key())
        t0 = time.perf_counter()
        sealed = [seal_update(u, rnd, pk, signers[u.participant_id]) for u in clear]
        t1 = time.perf_counter()
        resp = enclave.aggregate(AggregationRequest(rnd, params, spec, sealed))
        assert verify_receipt(resp.receipt, enclave_public_key=enclave.public_key(), allow_simulated=True).ok
        t2 = time.perf_counter()
        FedAvg().aggregate(RoundPlan(rnd, (), {}), params, clear)
        t3 = time.perf_counter()
        seal_s.append(t1 - t0)
        enclave_s.append(t2 - t1)
        plain_s.append(t3 - t2)
    return {
        "params": float(params.numel()),
        "participants_seal_sign_s": statistics.median(seal_s),
        "enclave_open_check_aggregate_sign_verify_s": statistics.median(enclave_s),
        "plain_aggregate_s": statistics.median(plain_s),
        "overhead_per_round_s": statistics.median(seal_s) + statistics.median(enclave_s) - statistics.median(plain_s),
    }


def demo_raw(rounds: int, enclave: bool) -> dict[str, Any]:
    """``trustfed demo``'s federation (2 local epochs as in the in-process modes), with or without the enclave."""
    raw: dict[str, Any] = {
        "federation": {"name": "digits-demo", "rounds": rounds, "participants": 5, "seed": 0},
        "data": {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "model": {"name": "mlp", "hidden": [128]},
        "training": {"local_epochs": 2, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 2},
        "ledger": {"enabled": True},
    }
    if enclave:
        raw["enclave"] = {
            "enabled": True,
            "backend": "simulated",
            "allow_simulated_tee": True,
            "policy": {"allow_simulated_tee": True},
        }
    return raw


def networked(rounds: int, repeats: int, workdir: Path) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Round seconds (rounds 2..N) of the multi-process demo without and with the enclave, interleaved."""
    from trustfed.coordinator.local_federation import run_local_federation

    times: dict[str, list[float]] = {"net-plain": [], "net-enclave": []}
    hashes: dict[str, str] = {}
    for rep in range(repeats):
        order = list(times) if rep % 2 == 0 else list(reversed(times))
        for mode in order:
            _, metrics = run_local_federation(demo_raw(rounds, mode == "net-enclave"), workdir / f"{mode}-{rep}")
            times[mode] += [float(r["seconds"]) for r in metrics["rounds"][1:]]
            hashes[mode] = str(metrics["model_hash"])
    return times, hashes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds x 1 repeat (CI smoke)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "enclave.json")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 10)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(1)
    cfg = demo_config(rounds)

    with tempfile.TemporaryDirectory() as tmp:
        grpc = grpc_factory(Path(tmp))
        modes: dict[str, dict[str, Any]] = {"plain": {}, "enclave": {}}
        if grpc is not None:
            modes["enclave-grpc"] = {}
        round_times: dict[str, list[float]] = {m: [] for m in modes}
        totals: dict[str, list[float]] = {m: [] for m in modes}
        hashes: dict[str, str] = {}
        for warm in (False, True):  # warm-up: imports, data loading, first crypto calls
            run_federation(demo_config(1), enclave_mode=warm)
        for rep in range(repeats):
            order = list(modes) if rep % 2 == 0 else list(reversed(modes))
            for mode in order:
                factory = grpc[0] if (mode == "enclave-grpc" and grpc is not None) else None
                try:
                    run = run_federation(cfg, enclave_mode=mode != "plain", enclave_factory=factory)
                finally:
                    if mode == "enclave-grpc" and grpc is not None:
                        grpc[1]()
                round_times[mode] += [r.seconds for r in run.records]
                totals[mode].append(run.seconds)
                hashes[mode] = run.records[-1].model_hash
        net_base = ""
        if not args.quick:
            net_times, net_hashes = networked(rounds, repeats, Path(tmp))
            round_times.update(net_times)
            totals.update({m: [sum(v)] for m, v in net_times.items()})
            modes.update({m: {} for m in net_times})
            identical_net = len(set(net_hashes.values())) == 1
            net_base = "net-plain"
    identical = len(set(hashes.values())) == 1
    iso = isolated_overhead(cfg, 20 if args.quick else 50)
    base = statistics.median(round_times["plain"])
    rows = []
    for mode in modes:
        med = statistics.median(round_times[mode])
        ref = statistics.median(round_times[net_base]) if mode.startswith("net-") and net_base else base
        rows.append(
            {
                "mode": mode,
                "rounds": len(round_times[mode]),
                "median_round_s": med,
                "mean_round_s": statistics.fmean(round_times[mode]),
                "median_total_s": statistics.median(totals[mode]),
                "ratio_vs_plain": med / ref,
                "compared_with": "net-plain" if mode.startswith("net-") else "plain",
            }
        )
    result = {
        "benchmark": "enclave",
        "workload": "demo: digits, 5 participants, Dirichlet(0.5), MLP(128), 2 local epochs, FedAvg mean",
        "rounds_per_run": rounds,
        "repeats": repeats,
        "goal_ratio": 1.15,
        "same_final_model": identical,
        "same_final_model_networked": identical_net if net_base else None,
        "isolated": {**iso, "overhead_vs_plain_median_round": iso["overhead_per_round_s"] / base},
        "rows": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "simulated": True,
    }
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"enclave vs plain aggregation ({rounds} rounds x {repeats}; SIMULATED enclave)")
        for col in ("mode", "rounds", "median round s", "mean round s", "ratio vs plain"):
            t.add_column(col, justify="right")
        for r in rows:
            t.add_row(
                r["mode"],
                str(r["rounds"]),
                f"{r['median_round_s']:.4f}",
                f"{r['mean_round_s']:.4f}",
                f"{r['ratio_vs_plain']:.3f}x",
            )
        Console().print(t)
    except ImportError:
        for r in rows:
            print(r)
    print(f"same final model in every in-process mode: {identical}; goal <= 1.15x")
    if net_base:
        print(f"networked modes (net-* vs net-plain, rounds 2..N): same final model: {identical_net}")
    print(
        f"isolated enclave work per round ({int(iso['params'])} params, {cfg.federation.participants} participants): "
        f"seal+sign {iso['participants_seal_sign_s'] * 1e3:.2f} ms, enclave {iso['enclave_open_check_aggregate_sign_verify_s'] * 1e3:.2f} ms, "
        f"minus plain aggregate {iso['plain_aggregate_s'] * 1e3:.2f} ms = {iso['overhead_per_round_s'] * 1e3:.2f} ms "
        f"= {iso['overhead_per_round_s'] / base:.3f} of the plain median round"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
