"""Multi-host: the coordinator and the participants in separate network namespaces joined by
a veth pair (RECIPES.md section 6), each a `trustfed server` / `trustfed client` process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from trustfed.coordinator.local_federation import start_participant, to_toml
from trustfed.pki import init_ca, issue

RAW = {
    "federation": {"name": "netns", "rounds": 2, "participants": 2, "seed": 3},
    "data": {"dataset": "digits", "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "hidden": [16]},
    "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
    "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 2},
}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextmanager
def star(spokes: int) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """A hub namespace (the coordinator's) and ``spokes`` namespaces, each joined to the hub by its own
    veth pair on a /24 of its own. Yields (hub, [(spoke, hub's address on that link, hub's device)])."""
    if shutil.which("ip") is None:
        pytest.skip("`ip` (iproute2) is not installed, so no network namespaces can be made")
    tag = f"{os.getpid() % 100000}"
    hub = f"tfh{tag}"
    probe = subprocess.run(["ip", "netns", "add", hub], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces here (`ip netns add` said: {probe.stderr.strip()})")
    made, links = [hub], []
    try:
        _ip("-n", hub, "link", "set", "lo", "up")
        for k in range(spokes):
            ns, a, b = f"tf{k}s{tag}", f"h{k}v{tag}", f"s{k}v{tag}"
            _ip("netns", "add", ns)
            made.append(ns)
            # a /24 of our own, from the pid, so parallel runs do not collide
            net = f"10.{200 + os.getpid() % 50}.{(os.getpid() // 50 * 4 + k) % 250}"
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", hub)
            _ip("link", "set", b, "netns", ns)
            _ip("-n", hub, "addr", "add", f"{net}.1/24", "dev", a)
            _ip("-n", ns, "addr", "add", f"{net}.2/24", "dev", b)
            for n, dev in ((hub, a), (ns, b), (ns, "lo")):
                _ip("-n", n, "link", "set", dev, "up")
            links.append((ns, f"{net}.1", a))
        yield hub, links
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture()
def namespaces() -> Iterator[tuple[str, str, str]]:
    with star(1) as (hub, [(spoke, hub_ip, _)]):
        yield hub, spoke, hub_ip


def _federation(tmp_path: Path, fed: dict[str, Any], listen: str, hosts: tuple[str, ...], ids: list[str]) -> Path:
    """A fresh PKI (the coordinator's certificate names ``hosts``) and the federation file."""
    pki = tmp_path / "pki"
    init_ca(pki)
    issue(pki, "coordinator", "coordinator", hosts=hosts)
    for pid in ids:
        issue(pki, "participant", pid)
    fed = dict(fed)
    fed["transport"] = {
        "listen": listen,
        "ca": "pki/ca.pem",
        "cert": "pki/coordinator.pem",
        "key": "pki/coordinator.key",
        "crl": "pki/crl.pem",
        "join_timeout_s": 120.0,
        "round_timeout_s": fed.pop("round_timeout_s", 120.0),
    }
    path = tmp_path / "federation.toml"
    path.write_text(to_toml(fed))
    return path


def _server(tmp_path: Path, ns: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(tmp_path / "server.log", "wb") as fh:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "trustfed.cli", "server",
             "--config", str(tmp_path / "federation.toml"), "--out", str(tmp_path / "out")],
            stdout=fh, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip


def _participant(tmp_path: Path, pid: str, address: str, ns: str, **retry: float) -> subprocess.Popen[bytes]:
    cfg = {
        "participant": {"id": pid, "coordinator": address, "federation_config": "federation.toml"},
        "tls": {"ca": "pki/ca.pem", "cert": f"pki/{pid}.pem", "key": f"pki/{pid}.key"},
        "retry": {"attempts": 10, "initial_backoff_s": 0.5, "max_backoff_s": 3.0, **retry},
    }
    path = tmp_path / f"{pid}.toml"
    path.write_text(to_toml(cfg))
    return start_participant(path, tmp_path / f"{pid}.log", netns=ns)


def _finish(tmp_path: Path, server: subprocess.Popen[bytes], clients: dict[str, subprocess.Popen[bytes]]) -> None:
    try:
        assert server.wait(timeout=400) == 0, (tmp_path / "server.log").read_text()
        for pid, c in clients.items():
            assert c.wait(timeout=60) == 0, (tmp_path / f"{pid}.log").read_text()
    finally:
        for p in (server, *clients.values()):
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float = 240.0) -> None:
    end = time.monotonic() + timeout_s
    while text not in (path.read_text() if path.exists() else ""):
        if proc.poll() is not None or time.monotonic() > end:
            raise AssertionError(f"{text!r} never appeared in {path.name}:\n{path.read_text()}")
        time.sleep(0.02)


def test_coordinator_and_participants_in_separate_namespaces(tmp_path: Path, namespaces: tuple[str, str, str]) -> None:
    ns_coord, ns_part, coord_ip = namespaces
    address = f"{coord_ip}:50555"
    _federation(tmp_path, RAW, address, (coord_ip,), ["p000", "p001"])
    server = _server(tmp_path, ns_coord)
    clients = {pid: _participant(tmp_path, pid, address, ns_part) for pid in ("p000", "p001")}
    _finish(tmp_path, server, clients)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["transport"]["address"] == address
    assert "2 round(s), included in 2" in (tmp_path / "p001.log").read_text()


def test_a_participant_whose_link_goes_down_misses_a_round_and_rejoins(tmp_path: Path) -> None:
    """p002 sits on its own link to the coordinator. Once its round-1 update is in, that link goes down:
    a round ends at its timeout with p000 and p001's updates only; then the link comes back, and p002
    (its calls retried) takes part in the later rounds. No process exits with an error."""
    fed = dict(RAW, round_timeout_s=8.0)
    fed["federation"] = dict(RAW["federation"], participants=3, rounds=5)
    with star(2) as (hub, [(ns_a, ip_a, _), (ns_b, ip_b, dev_b)]):
        port = 50556
        _federation(tmp_path, fed, f"0.0.0.0:{port}", (ip_a, ip_b), ["p000", "p001", "p002"])
        server = _server(tmp_path, hub)
        retry = {"attempts": 60, "max_backoff_s": 1.0, "poll_wait_ms": 2000}
        clients = {pid: _participant(tmp_path, pid, f"{ip_a}:{port}", ns_a, **retry) for pid in ("p000", "p001")}
        clients["p002"] = _participant(tmp_path, "p002", f"{ip_b}:{port}", ns_b, **retry)
        log = tmp_path / "server.log"
        try:
            _wait_for(log, "round 1: accepted update from p002", server)
            _ip("-n", hub, "link", "set", dev_b, "down")
            _wait_for(log, "'num_updates': 2.0", server)  # a round closed at its timeout without p002
            _ip("-n", hub, "link", "set", dev_b, "up")
        finally:
            _finish(tmp_path, server, clients)
    rounds = json.loads((tmp_path / "out" / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    assert rounds[0]["updated_by"] == ["p000", "p001", "p002"]
    missed = [r["round"] for r in rounds if "p002" not in r["updated_by"]]
    assert missed and all(rounds[m - 1]["updated_by"] == ["p000", "p001"] for m in missed), rounds
    assert all("p002" in r["participants"] for r in rounds)  # never withdrawn: selected every round
    back = [r["round"] for r in rounds if "p002" in r["updated_by"] and r["round"] > missed[0]]
    assert back, rounds
    assert rounds[-1]["accuracy"] > 0.5, rounds
    n = 5 - len(missed)  # the rounds p002 completed, each with its update included
    assert f"participant p002: {n} round(s), included in {n}" in (tmp_path / "p002.log").read_text()
