"""``trustfed server --resume`` over gRPC on a recorded run that stopped after round 2 of 3: the resumed
run's metrics.json and plot hold every round; a finished run is refused and left as it was; a run whose
ledger checkpoint, coordinator state or audit log does not verify is refused before any participant is
waited for, naming the file and the reason, with every file of the run folder unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from process_helpers import free_port
from trustfed.config import participant_ids, validate_federation_config
from trustfed.coordinator.local_federation import (
    LocalFederation,
    run_local_federation,
    start_participant,
    write_participant_configs,
)
from trustfed.core.codec import from_bytes
from trustfed.ledger.verify import verify_run
from trustfed.simulation import run_simulation
from trustfed.simulation.runner import plot_metrics

RAW: dict[str, Any] = {
    "federation": {"name": "resume", "rounds": 3, "participants": 3, "seed": 11},
    "data": {"dataset": "digits", "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "hidden": [16]},
    "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
    "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 3},
    "ledger": {"enabled": True},
    "incentives": {"enabled": True},
}
JOIN_TIMEOUT_S = 30.0  # how long a resumed coordinator waits for participants; the checks come before it


class _Stop(Exception):
    """Stops the coordinator after a round is on record, as a crash would."""


def _stop_after_round_2(rec: Any) -> None:
    if rec.round == 2:
        raise _Stop


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recorded run over gRPC whose coordinator stopped once round 2 of 3 was on chain."""
    out = tmp_path_factory.mktemp("resume") / "stopped"
    with pytest.raises(_Stop):
        run_local_federation(RAW, out, on_round=_stop_after_round_2, round_timeout_s=60)
    assert not (out / "metrics.json").exists()
    fed = (out / "federation.toml").read_text()
    (out / "federation.toml").write_text(fed.replace("join_timeout_s = 120.0", f"join_timeout_s = {JOIN_TIMEOUT_S}"))
    return out


def _copy(src: Path, dest: Path) -> Path:
    return Path(shutil.copytree(src, dest))


def _server(run: Path, *args: str, port: int = 0) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "trustfed.cli", "server", "--config", str(run / "federation.toml"), "--out", str(run)]
    cmd += ["--listen", f"127.0.0.1:{port}", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _refused(run: Path, *args: str) -> tuple[int, str]:
    proc = _server(run, *args)
    out, _ = proc.communicate(timeout=JOIN_TIMEOUT_S + 120)
    return proc.returncode, " ".join(out.decode(errors="replace").split())


def _hashes(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def resumed(stopped: Path) -> Path:
    """The stopped run resumed by ``trustfed server --resume`` with three new participant processes."""
    run = _copy(stopped, stopped.parent / "resumed")
    port = free_port()
    ids = participant_ids(3)
    fed = LocalFederation(run, run / "federation.toml")
    write_participant_configs(fed, f"127.0.0.1:{port}", ids)
    server = _server(run, "--resume", port=port)
    parts = [start_participant(fed.participant_files[pid], run / "logs" / f"resumed-{pid}.log") for pid in ids]
    try:
        out, _ = server.communicate(timeout=300)
        assert server.returncode == 0, out.decode(errors="replace")[-3000:]
        for pid, p in zip(ids, parts, strict=True):
            assert p.wait(timeout=60) == 0, (run / "logs" / f"resumed-{pid}.log").read_text()[-3000:]
    finally:
        for p in [server, *parts]:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "resumed after round 2" in out.decode(errors="replace")
    return run


def test_a_resumed_run_reports_every_round_and_plots_them(resumed: Path, tmp_path: Path) -> None:
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["resumed_after_round"] == 2
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert all(r["updated_by"] == ["p000", "p001", "p002"] for r in metrics["rounds"])
    verdict = verify_run(resumed)  # every figure of metrics.json is the signed one, and the last round is there
    assert verdict.ok, [str(f) for f in verdict.failures]
    assert verdict.checked["metrics_file"] == 1
    plain = run_simulation(validate_federation_config(RAW), tmp_path / "plain", plot=False)
    assert torch.max(torch.abs(from_bytes((resumed / "model.f32").read_bytes()) - plain.params)).item() <= 1e-6
    for mine, theirs in zip(metrics["rounds"], plain.metrics["rounds"], strict=True):
        assert mine["model_hash"] == theirs["model_hash"]
    plot_metrics(metrics, tmp_path / "whole.png")  # the plot is drawn from the whole history
    assert (resumed / "metrics.png").read_bytes() == (tmp_path / "whole.png").read_bytes()


def test_a_finished_run_is_refused_and_left_as_it_was(resumed: Path, tmp_path: Path) -> None:
    run = _copy(resumed, tmp_path / "finished")
    before = _hashes(run)
    rc, out = _refused(run, "--resume")
    assert rc == 2, out
    assert "holds a finished run: round 3 of 3 is on chain" in out and "nothing was changed" in out
    assert _hashes(run) == before


def test_a_standby_that_finds_the_run_finished_stands_down(resumed: Path, tmp_path: Path) -> None:
    run = _copy(resumed, tmp_path / "finished")
    before = _hashes(run)
    rc, out = _refused(run, "--lease", str(tmp_path / "lease.json"), "--lease-ttl", "2")
    assert rc == 0, out
    assert "holds a finished run" in out and "this standby stands down" in out
    assert _hashes(run) == before


def _truncate_ledger_checkpoint(run: Path) -> str:
    f32 = run / "checkpoints" / "round_0002.f32"
    f32.write_bytes(f32.read_bytes()[:-8])
    return "checkpoints/round_0002.f32 round 2 [file] checkpoint unreadable"


def _alter_ledger_checkpoint(run: Path) -> str:
    f32 = run / "checkpoints" / "round_0002.f32"
    data = bytearray(f32.read_bytes())
    data[4] ^= 0x01
    f32.write_bytes(bytes(data))
    return "checkpoints/round_0002.f32 round 2 [model_hash] file hashes to"


def _corrupt_coordinator_state(run: Path) -> str:
    model = run / "state" / "round_0002" / "model.f32"
    data = bytearray(model.read_bytes())
    data[0] ^= 0x40
    model.write_bytes(bytes(data))
    return "state/round_0002/model.f32: SHA-256 does not match the manifest"


def _swap_coordinator_state(run: Path) -> str:
    """Round 1's state, whole and self-consistent, put in place of round 2's."""
    shutil.rmtree(run / "state" / "round_0002")
    shutil.copytree(run / "state" / "round_0001", run / "state" / "round_0002")
    return "state/round_0002/manifest.json holds round 1, its folder is round 2's"


def _garbled_state_manifest(run: Path) -> str:
    (run / "state" / "round_0002" / "manifest.json").write_text("{not json")
    return "state/round_0002/manifest.json: cannot read the manifest"


def _edit_audit_entry(run: Path) -> str:
    path = run / "audit.jsonl"
    lines = path.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if '"kind":"aggregation"' in line and '"round":1' in line)
    entry = json.loads(lines[i])
    entry["body"]["metrics"]["accuracy"] = 0.99
    lines[i] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    return f"audit.jsonl:{i + 1} round 1 [hash] stored hash"


@pytest.mark.parametrize(
    "damage",
    [
        _truncate_ledger_checkpoint,
        _alter_ledger_checkpoint,
        _corrupt_coordinator_state,
        _swap_coordinator_state,
        _garbled_state_manifest,
        _edit_audit_entry,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_resume_verifies_before_it_changes_anything(stopped: Path, tmp_path: Path, damage: Any) -> None:
    """No participant runs here: the refusal comes before the coordinator waits for one."""
    run = _copy(stopped, tmp_path / "run")
    expected = damage(run)
    before = _hashes(run)
    rc, out = _refused(run, "--resume")
    assert rc == 2, out
    assert "cannot resume" in out and expected in out and "nothing was changed" in out, out
    assert "checked in" not in out  # it did not wait for participants
    assert _hashes(run) == before
