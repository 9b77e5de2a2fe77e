"""A whole federation of processes on one machine, over mutual TLS on 127.0.0.1.

Used by ``trustfed demo`` and the end-to-end tests: it creates a fresh PKI in ``OUT/pki``,
writes ``OUT/federation.toml`` and one ``OUT/participants/<id>.toml`` per participant, runs the
coordinator in this process on a free port, starts every participant as its own
``trustfed client`` process (one torch thread each) and waits for them to finish.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trustfed.config import load_federation_config, participant_ids, validate_federation_config
from trustfed.coordinator.network import GrpcTransport
from trustfed.coordinator.run import run_coordinator, spec_for
from trustfed.core.rounds import RoundObserver
from trustfed.enclave.service import ENCLAVE_TLS_NAME
from trustfed.pki.ca import CA_CERT, CRL_FILE, init_ca, issue
from trustfed.simulation.enclave import enclave_aggregation
from trustfed.simulation.runner import write_results
from trustfed.transport.errors import TransportError

log = logging.getLogger("trustfed.coordinator.local_federation")


def to_toml(data: Mapping[str, Any]) -> str:
    """A small TOML writer for config dicts (tables of scalars and lists of scalars)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str | Path):
            s = str(v).replace("\\", "\\\\").replace('"', '\\"')
            return f'"{s}"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines: list[str] = []

    def table(prefix: str, d: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, Mapping) and v is not None}
        if prefix and (scalars or not any(isinstance(v, Mapping) for v in d.values())):
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {value(v)}")
        if scalars:
            lines.append("")
        for k, v in d.items():
            if isinstance(v, Mapping):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines) + "\n"


@dataclass
class LocalFederation:
    out: Path
    federation_file: Path
    participant_files: dict[str, Path] = field(default_factory=dict)


def prepare(
    out: Path,
    raw: Mapping[str, Any],
    participants: Sequence[str],
    *,
    round_timeout_s: float = 120.0,
    enclave_address: str | None = None,
) -> LocalFederation:
    """Fresh PKI in OUT/pki and OUT/federation.toml with a ``[transport]`` section (port 0)."""
    out = Path(out)
    pki = out / "pki"
    if pki.exists():
        shutil.rmtree(pki)
    init_ca(pki, common_name="trustfed demo CA")
    issue(pki, "coordinator", "coordinator", hosts=("127.0.0.1", "localhost"))
    for pid in participants:
        issue(pki, "participant", pid)
    return write_federation_file(out, raw, round_timeout_s=round_timeout_s, enclave_address=enclave_address)


def _in(folder: str, name: str) -> str:
    return name if folder in ("", ".") else f"{folder}/{name}"


def transport_section(
    raw: Mapping[str, Any],
    *,
    listen: str,
    tls_dir: str,
    round_timeout_s: float | None = None,
    join_timeout_s: float | None = None,
) -> dict[str, Any]:
    """The coordinator's ``[transport]``: ``raw``'s own settings, its address and its TLS files in
    ``tls_dir`` (relative to the federation file); the timeouts given replace ``raw``'s."""
    timeouts = {"round_timeout_s": round_timeout_s, "join_timeout_s": join_timeout_s}
    return {
        **dict(raw.get("transport", {})),
        "listen": listen,
        "ca": _in(tls_dir, CA_CERT),
        "cert": _in(tls_dir, "coordinator.pem"),
        "key": _in(tls_dir, "coordinator.key"),
        "crl": _in(tls_dir, CRL_FILE),
        **{k: v for k, v in timeouts.items() if v is not None},
    }


def write_federation_file(
    out: Path, raw: Mapping[str, Any], *, round_timeout_s: float = 120.0, enclave_address: str | None = None
) -> LocalFederation:
    """OUT/federation.toml: ``raw`` plus the ``[transport]`` section (and the enclave's address)."""
    fed = {k: v for k, v in raw.items() if k != "transport"}
    if enclave_address is not None:
        fed["enclave"] = {**dict(raw.get("enclave", {})), "address": enclave_address}
    fed["transport"] = transport_section(
        raw, listen="127.0.0.1:0", tls_dir="pki", round_timeout_s=round_timeout_s, join_timeout_s=120.0
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "federation.toml"
    path.write_text("# written by trustfed (local multi-process federation)\n" + to_toml(fed), encoding="utf-8")
    return LocalFederation(out, path)


def participant_document(
    pid: str,
    address: str,
    *,
    federation_config: str,
    tls_dir: str,
    ledger_dir: str | None = None,
    data: Mapping[str, Any] | None = None,
    retry: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One participant file's content: its id, the coordinator's address, the federation file and its TLS
    files in ``tls_dir`` (paths relative to the participant file)."""
    doc: dict[str, Any] = {
        "participant": {"id": pid, "coordinator": address, "federation_config": federation_config},
        "tls": {
            "ca": _in(tls_dir, CA_CERT),
            "cert": _in(tls_dir, f"{pid}.pem"),
            "key": _in(tls_dir, f"{pid}.key"),
            "crl": _in(tls_dir, CRL_FILE),
        },
        "retry": dict(retry or {"attempts": 6, "initial_backoff_s": 0.25, "max_backoff_s": 2.0}),
    }
    if ledger_dir is not None:
        doc["ledger"] = {"dir": ledger_dir}
    if data is not None:
        doc["data"] = dict(data)
    return doc


def write_participant_configs(
    fed: LocalFederation,
    address: str,
    participants: Sequence[str],
    *,
    ledger_view: bool = False,
    data: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """One participant.toml each; ``ledger_view``: each reads the run's chain itself (``OUT/ledger``);
    ``data``: each participant's own ``[data]`` section (absolute paths), for a federation app."""
    folder = fed.out / "participants"
    folder.mkdir(parents=True, exist_ok=True)
    for pid in participants:
        doc = participant_document(
            pid,
            address,
            federation_config="../federation.toml",
            tls_dir="../pki",
            ledger_dir="../ledger" if ledger_view else None,
            data=None if data is None else data.get(pid),
        )
        p = folder / f"{pid}.toml"
        p.write_text(to_toml(doc), encoding="utf-8")
        fed.participant_files[pid] = p


def start_participant(config: Path, log_path: Path, *, netns: str | None = None) -> subprocess.Popen[bytes]:
    """``trustfed client --config CONFIG`` as a child process (one torch thread), output to LOG_PATH."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "trustfed.cli", "client", "--config", str(config)]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)


def start_enclave(
    out: Path, raw: Mapping[str, Any], participants: Sequence[str], *, timeout_s: float = 60.0
) -> tuple[subprocess.Popen[bytes], str]:
    """``trustfed enclave`` as its own process (simulated backend, labelled SIMULATED): certificate
    ``OUT/pki/enclave.pem``, config ``OUT/enclave/enclave.toml`` (the federation's aggregation settings,
    participants' public keys from their certificates). Returns the process and its ``host:port``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cfg = validate_federation_config(dict(raw), "demo flags")
    pki, folder = out / "pki", out / "enclave"
    folder.mkdir(parents=True, exist_ok=True)
    issue(pki, "enclave", "enclave", hosts=(ENCLAVE_TLS_NAME,))
    keys: dict[str, str] = {}
    for pid in participants:
        cert = x509.load_pem_x509_certificate((pki / f"{pid}.pem").read_bytes())
        pub = cert.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        (folder / f"{pid}.pub.pem").write_bytes(pub)
        keys[pid] = f"{pid}.pub.pem"
    aggregation = enclave_aggregation(cfg)  # with central DP: the enclave applies it, measured
    doc = {
        "enclave": {
            "backend": cfg.enclave.backend,
            "allow_simulated_tee": cfg.enclave.allow_simulated_tee,
            "listen": "127.0.0.1:0",
        },
        "tls": {"cert": "../pki/enclave.pem", "key": "../pki/enclave.key", "ca": "../pki/ca.pem"},
        "aggregation": aggregation.model_dump(mode="json"),
        "participants": keys,
    }
    config = folder / "enclave.toml"
    config.write_text("# written by trustfed (local federation)\n" + to_toml(doc), encoding="utf-8")
    log_path = out / "logs" / "enclave.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trustfed.cli", "enclave", "--config", str(config)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        m = re.search(r"enclave serving on port (\d+)", text)
        if m:
            return proc, f"127.0.0.1:{m.group(1)}"
        if proc.poll() is not None:
            raise TransportError(f"the enclave process exited with code {proc.returncode}: {_tail(log_path)}")
        time.sleep(0.1)
    proc.terminate()
    raise TransportError(f"the enclave process did not start within {timeout_s:.0f} s: {_tail(log_path)}")


def _tail(path: Path, n: int = 6) -> str:
    try:
        return " | ".join(path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-n:])
    except OSError:
        return "(no log)"


def run_local_federation(
    raw: Mapping[str, Any],
    out: Path,
    *,
    on_round: Callable[[Any], None] | None = None,
    round_timeout_s: float = 120.0,
    participant_data: Mapping[str, Mapping[str, Any]] | None = None,
    observers: Sequence[RoundObserver] = (),
    on_progress: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Coordinator here, every participant a process: returns (final params, metrics).
    ``participant_data``: each participant's own ``[data]`` (an app's federation). ``observers`` see each
    round start and end; ``on_progress`` gets a line for each step of the start-up (the PKI, the enclave,
    the coordinator's address, the participant processes), which otherwise passes in silence."""
    say = on_progress or (lambda line: None)
    n = int(raw["federation"]["participants"])
    ids = participant_ids(n)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    enclave_on = bool(raw.get("enclave", {}).get("enabled"))
    fed = prepare(out, raw, ids, round_timeout_s=round_timeout_s)
    say(f"PKI ready in {fed.out / 'pki'}: a fresh CA, the coordinator's and {n} participants' certificates")
    logs = {pid: fed.out / "logs" / f"{pid}.log" for pid in [*ids, "enclave"]}
    stop = threading.Event()
    transport: GrpcTransport | None = None
    try:
        if enclave_on:  # the enclave service is its own process; participants attest it directly
            say("starting the enclave process")
            procs["enclave"], address = start_enclave(fed.out, raw, ids)
            say(f"enclave process serving on {address}")
            fed = write_federation_file(fed.out, raw, round_timeout_s=round_timeout_s, enclave_address=address)
        cfg = load_federation_config(fed.federation_file)
        transport = GrpcTransport(
            cfg.transport.resolved(fed.out),
            spec_for(cfg),
            max_workers=max(16, 3 * n + 4),
            require_commitment=cfg.ledger.enabled,
            sealed=cfg.enclave.enabled,
            secagg=cfg.secagg if cfg.secagg.enabled else None,
            participants=ids,
        )
        grpc_transport = transport
        write_participant_configs(fed, transport.address, ids, ledger_view=cfg.ledger.enabled, data=participant_data)
        say(f"coordinator listening on {transport.address} (mutual TLS)")
        for pid in ids:
            procs[pid] = start_participant(fed.participant_files[pid], logs[pid])
        say(f"{n} participant processes started (logs in {fed.out / 'logs'}); waiting for them to join")

        def watch() -> None:
            while not stop.wait(0.5):
                for pid, p in procs.items():
                    rc = p.poll()
                    if rc not in (None, 0):
                        grpc_transport.abort(f"participant process {pid} exited with code {rc}: {_tail(logs[pid])}")
                        return

        watcher = threading.Thread(target=watch, name="trustfed-watch", daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        params, metrics = run_coordinator(
            cfg, transport, out_dir=fed.out, on_round=on_round, observers=observers, write=False
        )
        stop.set()
        for pid, p in procs.items():
            if pid == "enclave":
                continue
            try:
                rc = p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise TransportError(
                    f"participant {pid} did not exit 60 s after the federation ended: {_tail(logs[pid])}"
                ) from None
            if rc != 0:
                raise TransportError(f"participant {pid} exited with code {rc}: {_tail(logs[pid])}")
        metrics["attack"] = cfg.attack.record(ids)  # the attack its malicious processes ran, or "no attack"
        metrics["processes"] = {
            "participants": n,
            "enclave": enclave_on,
            "logs": str(fed.out / "logs"),
            "seconds": time.perf_counter() - t0,
        }
        write_results(fed.out, metrics, params, transport.spec.to_json())
        return params, metrics
    finally:
        stop.set()
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if transport is not None:
            transport.close()
