"""A standby coordinator process takes over a recorded federation: the leader is killed (SIGKILL) mid-run,
the standby takes the lease, binds the same address, resumes after the last round on chain, and the
participant processes drop the round in flight and follow. The run ends with the same model as an
uninterrupted one and passes the independent audit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from process_helpers import free_port
from trustfed.config import participant_ids, validate_federation_config
from trustfed.coordinator.local_federation import (
    prepare,
    start_enclave,
    start_participant,
    write_federation_file,
    write_participant_configs,
)
from trustfed.core.codec import from_bytes
from trustfed.ledger.verify import verify_run
from trustfed.simulation import run_simulation

RAW: dict[str, Any] = {
    "federation": {"name": "failover", "rounds": 4, "participants": 3, "seed": 5},
    "data": {"dataset": "digits", "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "hidden": [16]},
    "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
    "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 3},
    "ledger": {"enabled": True},
    "incentives": {"enabled": True},
}


def _server(fed_file: Path, out: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "trustfed.cli", "server", "--config", str(fed_file), "--out", str(out)]
    cmd += ["--listen", f"127.0.0.1:{port}", "--lease", str(out / "lease.json"), "--lease-ttl", "2"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)


def _wait_for(what: str, cond: Any, timeout: float, procs: list[subprocess.Popen[bytes]], poll: float = 0.1) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        if any(p.poll() not in (None, 0) for p in procs):
            raise AssertionError(f"a process failed while waiting for {what}")
        time.sleep(poll)


def _aggregated(out: Path) -> int:
    path = out / "audit.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"kind":"aggregation"' in line.replace(" ", ""))


CENTRAL_DP = {"mode": "central", "noise_multiplier": 0.5, "max_grad_norm": 1.0, "budget_epsilon": 1e6}


SECAGG = {"enabled": True, "clip": 0.5, "bits": 24}
ENCLAVE = {
    "enabled": True,
    "backend": "simulated",
    "allow_simulated_tee": True,
    "policy": {"allow_simulated_tee": True},
}


@pytest.mark.parametrize(
    ("privacy", "secagg", "enclave"),
    [
        (None, None, None),
        # central DP alone and secure aggregation: 30 s each on 2 cores; `make test-all` runs them
        pytest.param(CENTRAL_DP, None, None, marks=pytest.mark.slow),
        pytest.param(None, SECAGG, None, marks=pytest.mark.slow),
        (CENTRAL_DP, None, ENCLAVE),
    ],
    ids=["plain", "central-dp", "secagg", "enclave-central-dp"],
)
def test_standby_takes_over_a_recorded_run_and_participants_follow(
    tmp_path: Path, privacy: dict[str, Any] | None, secagg: dict[str, Any] | None, enclave: dict[str, Any] | None
) -> None:
    """With central DP the resumed coordinator also carries on the accountant (from its state) and the
    seeded noise, so the run still ends where an uninterrupted one does. With secure aggregation the
    participants caught mid-protocol drop that round (its keys died with the leader) and join the
    standby's, and the sums, which do not depend on the masks, end where an uninterrupted run does.
    With central DP in an enclave process (SIMULATED), the standby checks the enclave's signed state
    against the log: the same attested key, at the last round on chain or one past it; in that case the
    round is aggregated again and its first release is counted in the privacy record too."""
    raw = {**RAW, **({"privacy": privacy} if privacy else {}), **({"secagg": secagg} if secagg else {})}
    if enclave:
        raw["enclave"] = enclave
    out = tmp_path / "run"
    ids = participant_ids(3)
    fed = prepare(out, raw, ids, round_timeout_s=60)
    procs: list[subprocess.Popen[bytes]] = []
    if enclave:  # its own process, outliving the leader
        enclave_proc, address = start_enclave(out, raw, ids)
        procs.append(enclave_proc)
        fed = write_federation_file(out, raw, round_timeout_s=60, enclave_address=address)
    port = free_port()
    write_participant_configs(fed, f"127.0.0.1:{port}", ids, ledger_view=True)
    for f in fed.participant_files.values():  # outlast the lease ttl and the standby's start
        f.write_text(
            f.read_text().replace("attempts = 6", "attempts = 60").replace("max_backoff_s = 2.0", "max_backoff_s = 1.0")
        )
    logs = out / "logs"
    leader = _server(fed.federation_file, out, port, logs / "leader.log")
    procs.append(leader)
    try:
        _wait_for("the leader", lambda: "leads" in (logs / "leader.log").read_text(), 60, procs)
        standby = _server(fed.federation_file, out, port, logs / "standby.log")
        procs.append(standby)
        _wait_for("the standby", lambda: "waiting for the lease" in (logs / "standby.log").read_text(), 60, procs)
        parts = [start_participant(fed.participant_files[pid], logs / f"{pid}.log") for pid in ids]
        procs += parts
        if enclave:  # the moment the leader has the enclave's round-2 output, before it can record it
            leader_log = logs / "leader.log"
            _wait_for("round 2 released", lambda: "round 2: receipt" in leader_log.read_text(), 180, procs, 0.002)
        else:
            _wait_for("round 2 on record", lambda: _aggregated(out) >= 2, 180, procs)
        leader.send_signal(signal.SIGKILL)
        leader.wait(timeout=10)
        assert standby.wait(timeout=240) == 0, (logs / "standby.log").read_text()[-3000:]
        for pid, p in zip(ids, parts, strict=True):
            assert p.wait(timeout=60) == 0, (logs / f"{pid}.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    standby_log = (logs / "standby.log").read_text()
    assert "resumed after round" in standby_log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_after_round"] >= 1
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3, 4]  # the leader's rounds too, from the signed log
    params = from_bytes((out / "model.f32").read_bytes())
    plain = run_simulation(validate_federation_config(raw), tmp_path / "plain")
    assert torch.max(torch.abs(params - plain.params)).item() <= 1e-6
    verdict = verify_run(out)
    assert verdict.ok, [str(f) for f in verdict.failures]
    assert verdict.checked["chain_rounds"] == 5 and verdict.checked["incentive_rounds"] == 4
    if privacy:
        eps = [r["epsilon"] for r in map(json.loads, (out / "privacy.jsonl").read_text().splitlines())
               if r["kind"] == "aggregator"]  # fmt: skip
        want = [r["epsilon"] for r in map(json.loads, (tmp_path / "plain" / "privacy.jsonl").read_text().splitlines())
                if r["kind"] == "aggregator"]  # fmt: skip
        if not enclave:
            assert eps == pytest.approx(want, rel=1e-12) and len(eps) == 4
    if enclave:
        assert "resuming through the same enclave" in standby_log
        lines = [
            r for r in map(json.loads, (out / "privacy.jsonl").read_text().splitlines()) if r["kind"] == "aggregator"
        ]
        lost = [r for r in lines if r.get("lost")]
        redone = "aggregated again (redo)" in standby_log or "which the run does not record" in standby_log
        assert len(lost) == int(redone) and len(lines) == 4 + len(lost), lines
        # every release the enclave made is counted: with a lost one, the final epsilon is that of 5 releases
        assert (lines[-1]["epsilon"] > want[-1]) == redone and lines[-1]["epsilon"] >= want[-1]


def test_a_participant_revoked_mid_run_is_marked_revoked_on_chain(tmp_path: Path) -> None:
    """The CA revokes p002 once round 1 is on record: the coordinator refuses its calls (the CRL file is
    re-read when it changes), drops it from the federation, records a signed participant_status entry
    and sets its registry status to revoked; the others finish and the run verifies."""
    from trustfed.ledger.backends import EmbeddedLedger
    from trustfed.ledger.records import Status
    from trustfed.pki import revoke

    raw = {**RAW, "strategy": {**RAW["strategy"], "min_participants": 2}}
    out = tmp_path / "run"
    ids = participant_ids(3)
    fed = prepare(out, raw, ids, round_timeout_s=20)
    port = free_port()
    write_participant_configs(fed, f"127.0.0.1:{port}", ids)
    logs = out / "logs"
    server = _server(fed.federation_file, out, port, logs / "server.log")
    procs = [server]
    try:
        _wait_for("the coordinator", lambda: "leads" in (logs / "server.log").read_text(), 60, procs)
        parts = {pid: start_participant(fed.participant_files[pid], logs / f"{pid}.log") for pid in ids}
        procs += parts.values()
        _wait_for("round 1 on record", lambda: _aggregated(out) >= 1, 180, [server])
        assert revoke(out / "pki", name="p002")
        assert server.wait(timeout=240) == 0, (logs / "server.log").read_text()[-3000:]
        for pid in ("p000", "p001"):
            assert parts[pid].wait(timeout=60) == 0, (logs / f"{pid}.log").read_text()[-3000:]
        assert parts["p002"].wait(timeout=120) != 0  # refused from then on, it gives up
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    statuses = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    (entry,) = [e for e in statuses if e["kind"] == "participant_status"]
    assert entry["body"] == {"participant": "p002", "status": "revoked", "reason": "revoked"}
    status = {i.id: i.status for i in EmbeddedLedger(out / "ledger", read_only=True).participants()}
    assert status["p002"] == Status.REVOKED and status["p000"] == Status.ACTIVE
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert all("p002" not in r["participants"] for r in rounds if r["round"] > entry["round"])
    verdict = verify_run(out)
    assert verdict.ok, [str(f) for f in verdict.failures]
    assert verdict.checked["departures"] == 1
