"""Multi-host: the coordinator and the participants in separate network namespaces joined by
a veth pair (RECIPES.md section 6), each a `trustfed server` / `trustfed client` process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustfed.pki import init_ca, issue
from trustfed.transport.local import start_participant, to_toml

RAW = {
    "federation": {"name": "netns", "rounds": 2, "participants": 2, "seed": 3},
    "data": {"dataset": "digits", "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "hidden": [16]},
    "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
    "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 2},
}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture()
def namespaces() -> Iterator[tuple[str, str, str]]:
    tag = f"{os.getpid() % 100000}"
    a, b = f"tfa{tag}", f"tfb{tag}"
    if shutil.which("ip") is None:
        pytest.skip("`ip` (iproute2) is not installed, so no network namespaces can be made")
    probe = subprocess.run(["ip", "netns", "add", a], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces here (`ip netns add` said: {probe.stderr.strip()})")
    # a /24 of our own, from the pid, so parallel runs do not collide
    net = f"10.{200 + os.getpid() % 50}.{(os.getpid() // 50) % 250}"
    try:
        _ip("netns", "add", b)
        _ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        _ip("link", "set", f"va{tag}", "netns", a)
        _ip("link", "set", f"vb{tag}", "netns", b)
        _ip("-n", a, "addr", "add", f"{net}.1/24", "dev", f"va{tag}")
        _ip("-n", b, "addr", "add", f"{net}.2/24", "dev", f"vb{tag}")
        for ns, dev in ((a, f"va{tag}"), (b, f"vb{tag}")):
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield a, b, f"{net}.1"
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_coordinator_and_participants_in_separate_namespaces(tmp_path: Path, namespaces: tuple[str, str, str]) -> None:
    ns_coord, ns_part, coord_ip = namespaces
    pki = tmp_path / "pki"
    init_ca(pki)
    issue(pki, "coordinator", "coordinator", hosts=(coord_ip,))
    for pid in ("p000", "p001"):
        issue(pki, "participant", pid)
    address = f"{coord_ip}:50555"
    fed = dict(RAW)
    fed["transport"] = {
        "listen": address,
        "ca": "pki/ca.pem",
        "cert": "pki/coordinator.pem",
        "key": "pki/coordinator.key",
        "crl": "pki/crl.pem",
        "join_timeout_s": 120.0,
        "round_timeout_s": 120.0,
    }
    (tmp_path / "federation.toml").write_text(to_toml(fed))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    server_log = tmp_path / "server.log"
    with open(server_log, "wb") as fh:
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns_coord, sys.executable, "-m", "trustfed.cli", "server",
             "--config", str(tmp_path / "federation.toml"), "--out", str(tmp_path / "out")],
            stdout=fh, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    clients = []
    try:
        for pid in ("p000", "p001"):
            cfg = {
                "participant": {"id": pid, "coordinator": address, "federation_config": "federation.toml"},
                "tls": {"ca": "pki/ca.pem", "cert": f"pki/{pid}.pem", "key": f"pki/{pid}.key"},
                "retry": {"attempts": 10, "initial_backoff_s": 0.5, "max_backoff_s": 3.0},
            }
            path = tmp_path / f"{pid}.toml"
            path.write_text(to_toml(cfg))
            clients.append(start_participant(path, tmp_path / f"{pid}.log", netns=ns_part))
        assert server.wait(timeout=400) == 0, server_log.read_text()
        for c, pid in zip(clients, ("p000", "p001"), strict=True):
            assert c.wait(timeout=60) == 0, (tmp_path / f"{pid}.log").read_text()
    finally:
        for p in (server, *clients):
            if p.poll() is None:
                p.kill()
                p.wait()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["transport"]["address"] == address
    assert "2 round(s), included in 2" in (tmp_path / "p001.log").read_text()
