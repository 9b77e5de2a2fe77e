"""``trustfed provision``: startup kits per site and for the coordinator, written from a project file,
and a provisioned federation that runs from its kits alone (each kit's start.sh, its own process) and
passes ``trustfed audit verify``: on one host, and across network namespaces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509

import trustfed
from process_helpers import free_port
from trustfed.config import load_federation_config
from trustfed.coordinator.provision import provision
from trustfed.errors import ConfigError
from trustfed.ledger.audit import parsed_entries
from trustfed.participant.settings import load_participant_config
from trustfed.pki.ca import identity_of

FEDERATION = """
[federation]
name = "kits"
rounds = 2
seed = 4
[data]
dataset = "digits"
[data.partition]
kind = "iid"
[model]
name = "mlp"
hidden = [16]
[training]
local_epochs = 1
batch_size = 32
[strategy]
min_participants = 3
[ledger]
enabled = true
[tracking]
tensorboard = true
mlflow = true
[transport]
round_timeout_s = 240.0
join_timeout_s = 240.0
"""

SITES = '[[sites]]\nname = "alpha"\n[[sites]]\nname = "beta"\n[[sites]]\nname = "gamma"\n'


def _project(tmp_path: Path, host: str = "127.0.0.1", port: int = 50051, sites: str = SITES) -> Path:
    (tmp_path / "federation.toml").write_text(FEDERATION)
    path = tmp_path / "project.toml"
    path.write_text(f'federation = "federation.toml"\n[coordinator]\nhost = "{host}"\nport = {port}\n{sites}')
    return path


SRC = str(Path(trustfed.__file__).resolve().parents[1])  # this trustfed, from any working folder


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run(
        [sys.executable, "-m", "trustfed.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_the_kits_hold_what_each_host_needs(tmp_path: Path) -> None:
    kits = provision(_project(tmp_path), tmp_path / "kits")
    assert [k.identity for k in kits] == ["coordinator", "p000", "p001", "p002"]
    out = tmp_path / "kits"
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "beta", "ca", "coordinator", "gamma"]
    coord = out / "coordinator"
    cfg = load_federation_config(coord / "federation.toml")
    assert cfg.federation.participants == 3
    t = cfg.transport.resolved(coord)
    assert t.listen == "0.0.0.0:50051" and t.round_timeout_s == 240.0  # the federation's own timeouts kept
    assert {t.ca, t.cert, t.key, t.crl} == {
        coord / "ca.pem",
        coord / "coordinator.pem",
        coord / "coordinator.key",
        coord / "crl.pem",
    }
    for pid, site in (("p000", "alpha"), ("p001", "beta"), ("p002", "gamma")):
        kit = out / site
        pc = load_participant_config(kit / "participant.toml")  # every file it names is in the kit
        assert pc.participant.id == pid and pc.participant.coordinator == "127.0.0.1:50051"
        assert pc.tls.cert == kit / f"{pid}.pem" and pc.tls.crl == kit / "crl.pem"
        assert identity_of(x509.load_pem_x509_certificate((kit / f"{pid}.pem").read_bytes())).name == pid
        assert (kit / f"{pid}.key").stat().st_mode & 0o777 == 0o600
        assert "[transport]" not in (kit / "federation.toml").read_text()
        assert os.access(kit / "start.sh", os.X_OK) and (kit / "README.md").is_file()
        assert not (kit / "ca.key").exists() and not list(kit.glob("coordinator.*"))
        for text in (kit / "participant.toml").read_text(), (kit / "federation.toml").read_text():
            assert str(tmp_path) not in text  # relative paths only: the kit can move
    assert (coord / "coordinator.key").stat().st_mode & 0o777 == 0o600
    assert (out / "ca" / "ca.key").is_file() and not (coord / "ca.key").exists()
    assert not list(out.glob(".provision-*"))


@pytest.mark.parametrize(
    "sites,needle",
    [
        ('[[sites]]\nid = "p000"\n[[sites]]\nname = "b"\n', "sites.0.name: required key is missing"),
        ('[[sites]]\nname = "a"\nid = "p001"\n[[sites]]\nname = "b"\n', "two sites have this participant id"),
        ('[[sites]]\nname = "a"\n[[sites]]\nname = "a"\n', "two sites have this name"),
        ('[[sites]]\nname = "a"\ncolour = "red"\n', "sites.0.colour: unknown key"),
        ('[[sites]]\nname = "coordinator"\n', "reserved"),
        ('[[sites]]\nname = "a"\nid = "p007"\n', "has the ids p000"),
        ("", "sites: required key is missing"),
    ],
)
def test_a_bad_project_is_exit_2_and_writes_nothing(tmp_path: Path, sites: str, needle: str) -> None:
    project = _project(tmp_path, sites=sites)
    r = _cli("provision", str(project), "--out", str(tmp_path / "kits"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "kits").exists()


def test_a_federation_that_does_not_validate_is_named(tmp_path: Path) -> None:
    project = _project(tmp_path)
    (tmp_path / "federation.toml").write_text(FEDERATION.replace("[model]", "[model]\nlayers = 3"))
    with pytest.raises(ConfigError, match=r"federation: model.layers: unknown key"):
        provision(project, tmp_path / "kits")
    project.write_text(
        project.read_text().replace('federation = "federation.toml"', "[config.federation]\nparticipants = 5")
    )
    with pytest.raises(ConfigError, match=r"federation.participants: the project has 3 sites"):
        provision(project, tmp_path / "kits")
    assert not (tmp_path / "kits").exists()


def test_an_existing_kit_is_replaced_only_with_force(tmp_path: Path) -> None:
    project = _project(tmp_path)
    out = tmp_path / "kits"
    provision(project, out)
    key = (out / "alpha" / "p000.key").read_bytes()
    r = _cli("provision", str(project), "--out", str(out))
    assert r.returncode == 2 and "already there; pass --force" in r.stderr
    assert (out / "alpha" / "p000.key").read_bytes() == key  # untouched
    r = _cli("provision", str(project), "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert (out / "alpha" / "p000.key").read_bytes() != key
    assert not list(out.glob(".provision-*"))


# ------------------------------------------------------------------------------------------------ running kits
def _start(kit: Path, log: Path, netns: str | None = None) -> subprocess.Popen[bytes]:
    """The kit's own start.sh, as its host would run it (``TRUSTFED``: this interpreter's trustfed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=SRC)  # start.sh cds to its kit
    env["TRUSTFED"] = f"{sys.executable} -m trustfed.cli"
    cmd = ["sh", str(kit / "start.sh")]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)


def _run_kits(out: Path, kits: dict[str, tuple[Path, str | None]]) -> str:
    """Start every kit (folder, namespace) by name, site kits first (they wait for the coordinator);
    wait for all; return the server's output."""
    logs = out / "logs"
    logs.mkdir()
    procs = {name: _start(folder, logs / f"{name}.log", ns) for name, (folder, ns) in kits.items()}
    try:
        for name in ["coordinator", *(n for n in procs if n != "coordinator")]:
            rc = procs[name].wait(timeout=500)
            assert rc == 0, f"{name} exited {rc}:\n" + (logs / f"{name}.log").read_text()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return (logs / "coordinator.log").read_text()


def _check_run(out: Path, server_log: str) -> None:
    run = out / "coordinator" / "run"
    r = _cli("audit", "verify", str(run))
    assert r.returncode == 0 and "VERIFIED" in r.stdout, r.stdout + r.stderr
    for pid in ("p000", "p001", "p002"):
        assert f"{pid} joined" in server_log
    assert "round 1 started" in server_log
    _check_tracking(run)


def _check_tracking(run: Path) -> None:
    """The networked coordinator tracked both rounds, ending at the audit log's head."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    head = list(parsed_entries(run / "audit.jsonl"))[-1].hash
    acc = EventAccumulator(str(run / "tracking" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("accuracy")] == [1, 2]
    assert acc.Tensors("audit/head/text_summary")[-1].tensor_proto.string_val[0].decode() == head
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'tracking' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kits")
    assert exp is not None
    (found,) = client.search_runs([exp.experiment_id])
    assert [m.step for m in client.get_metric_history(found.info.run_id, "loss")] == [1, 2]
    assert found.data.tags["audit_head"] == head


def test_a_provisioned_federation_runs_from_its_kits(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    provision(_project(tmp_path, port=free_port()), out)
    moved = tmp_path / "elsewhere" / "beta"
    shutil.move(out / "beta", moved)  # a kit works wherever it is copied to
    kits = {name: (out / name, None) for name in ("alpha", "gamma", "coordinator")}
    log = _run_kits(out, {**kits, "beta": (moved, None)})
    _check_run(out, log)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextmanager
def lan(hosts: int) -> Iterator[tuple[str, list[str], str]]:
    """A coordinator's namespace with a bridge, and ``hosts`` site namespaces, each on the bridge by its own
    veth pair: one /24, the coordinator at .1. Yields (coordinator's namespace, site namespaces, its address)."""
    if shutil.which("ip") is None:
        pytest.skip("`ip` (iproute2) is not installed, so no network namespaces can be made")
    tag = f"{os.getpid() % 100000}"
    hub = f"tfkh{tag}"
    probe = subprocess.run(["ip", "netns", "add", hub], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces here (`ip netns add` said: {probe.stderr.strip()})")
    made, sites = [hub], []
    net = f"10.{150 + os.getpid() % 50}.{os.getpid() // 50 % 250}"
    try:
        _ip("-n", hub, "link", "set", "lo", "up")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{net}.1/24", "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        for k in range(hosts):
            ns, a, b = f"tfk{k}s{tag}", f"kh{k}v{tag}", f"ks{k}v{tag}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", hub)
            _ip("link", "set", b, "netns", ns)
            _ip("-n", hub, "link", "set", a, "master", "br0")
            _ip("-n", ns, "addr", "add", f"{net}.{k + 2}/24", "dev", b)
            for n, dev in ((hub, a), (ns, b), (ns, "lo")):
                _ip("-n", n, "link", "set", dev, "up")
            sites.append(ns)
        yield hub, sites, f"{net}.1"
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_a_provisioned_federation_runs_across_network_namespaces(tmp_path: Path) -> None:
    """Three sites, each in its own namespace, reach the coordinator's only over the bridge; the
    coordinator's loopback is not theirs, so only the address in the kits can work."""
    with lan(3) as (hub, sites, address):
        out = tmp_path / "kits"
        provision(_project(tmp_path, host=address, port=50557), out)
        t0 = time.monotonic()
        where = {"alpha": sites[0], "beta": sites[1], "gamma": sites[2], "coordinator": hub}
        log = _run_kits(out, {name: (out / name, ns) for name, ns in where.items()})
        _check_run(out, log)
        assert time.monotonic() - t0 < 500
