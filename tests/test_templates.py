"""``trustfed new``: every template makes a project that runs as written, in simulation and (tabular)
over gRPC with one process per site reading its own CSV, with the enclave and the ledger on."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from process_helpers import free_port
from trustfed.config import load_federation_config
from trustfed.coordinator.local_federation import run_local_federation
from trustfed.ledger.audit import parse_entry
from trustfed.ledger.verify import verify_run
from trustfed.simulation.runner import run_simulation
from trustfed.templates import TEMPLATES, new_project, package_name


def _small(fed: Path, rounds: int) -> object:
    cfg = load_federation_config(fed)
    return cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": rounds})})


@pytest.mark.parametrize("template", sorted(set(TEMPLATES) - {"assistant"}))  # assistant: test_templates_assistant.py
def test_each_template_runs_in_simulation(tmp_path: Path, template: str) -> None:
    folder = tmp_path / f"{template}-site"
    fed = new_project(folder, template)
    assert {p.name for p in folder.iterdir()} >= {
        "federation.toml",
        "README.md",
        "sites",
        "tests",
        package_name(folder),
    }
    for i in range(3):
        assert (folder / "sites" / f"p{i:03d}" / "participant.toml").is_file()
    result = run_simulation(_small(fed, 3), tmp_path / "run")  # type: ignore[arg-type]
    m = result.metrics
    assert m["app"]["target"] == f"{package_name(folder)}.app:app"
    fed_eval = [r["federated_evaluation"] for r in m["rounds"]]
    assert all(f["participants"] == 3 for f in fed_eval)
    assert fed_eval[-1]["loss"] < fed_eval[0]["loss"]  # the sites' own held-out data says it learns
    assert len({p["data_sha256"] for p in m["participants_provenance"].values()}) == 3


def test_new_refuses_a_folder_in_use_and_an_unknown_template(tmp_path: Path) -> None:
    from trustfed.errors import ConfigError

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep me")
    with pytest.raises(ConfigError) as exc:
        new_project(tmp_path / "used", "audio")
    assert "--template" in str(exc.value) and "DIR" in str(exc.value)
    assert (tmp_path / "used" / "x").read_text() == "keep me"


def test_tabular_project_over_grpc_with_enclave_and_ledger(tmp_path: Path) -> None:
    folder = tmp_path / "clinic"
    fed = new_project(folder, "tabular")
    cfg = _small(fed, 2)
    raw = cfg.model_dump(mode="json", exclude={"transport", "participant_training"})  # type: ignore[attr-defined]
    raw["ledger"] = {"enabled": True}
    raw["enclave"] = {
        "enabled": True,
        "backend": "simulated",
        "allow_simulated_tee": True,
        "policy": {"allow_simulated_tee": True},
    }
    # each site's own [data], from its participant file as the template wrote it
    data = {}
    for site in sorted((folder / "sites").iterdir()):
        section = tomllib.loads((site / "participant.toml").read_text())["data"]
        data[site.name] = {**section, "path": str(site / section["path"])}
    out = tmp_path / "run"
    _, metrics = run_local_federation(raw, out, round_timeout_s=120, participant_data=data)
    written = json.loads((out / "metrics.json").read_text())
    assert written["app"]["target"] == "clinic_app.app:app" and metrics["enclave"]["label"] == "SIMULATED"
    code = written["app"]["code_sha256"]
    commitments = [
        e for e in (parse_entry(x) for x in (out / "audit.jsonl").read_text().splitlines()) if e.kind == "commitment"
    ]
    assert len(commitments) == 6 and {e.body["app_sha256"] for e in commitments} == {code}
    assert {e.author: e.body["data_sha256"] for e in commitments} == {
        pid: v["data_sha256"] for pid, v in written["participants_provenance"].items()
    }
    for pid in data:  # each process read its own site's CSV
        assert "round(s), included in 2" in (out / "logs" / f"{pid}.log").read_text()
    assert math.isfinite(written["rounds"][-1]["federated_evaluation"]["accuracy"])
    verdict = verify_run(out)
    assert verdict.ok, verdict.failures


@pytest.mark.slow
def test_tabular_project_as_its_readme_says_server_and_clients_then_audit(tmp_path: Path) -> None:
    """The generated README's commands, as written (two rounds, a free port): the PKI, `trustfed server`,
    one `trustfed client` per site checking every model against the run's chain, `trustfed audit verify`."""
    folder = tmp_path / "clinic"
    new_project(folder, "tabular")
    port = str(free_port())
    fed = folder / "federation.toml"
    fed.write_text(fed.read_text().replace("rounds = 10", "rounds = 2").replace("50051", port))
    sites = sorted(p.name for p in (folder / "sites").iterdir())
    for pid in sites:
        part = folder / "sites" / pid / "participant.toml"
        part.write_text(part.read_text().replace("50051", port))

    def cli(*args: str) -> list[str]:
        return [sys.executable, "-m", "trustfed.cli", *args]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cli(*args), cwd=folder, capture_output=True, text=True, timeout=120)

    assert run("pki", "init", "--out", "pki").returncode == 0
    assert (
        run(
            "pki", "issue", "--ca", "pki", "--role", "coordinator", "--name", "coordinator", "--host", "127.0.0.1"
        ).returncode
        == 0
    )
    for pid in sites:
        assert run("pki", "issue", "--ca", "pki", "--role", "participant", "--name", pid).returncode == 0
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ["server", *sites]}
    procs = {
        "server": subprocess.Popen(
            cli("server", "--config", "federation.toml", "--out", "runs/live"),
            cwd=folder,
            stdout=logs["server"],
            stderr=subprocess.STDOUT,
        )
    }
    for pid in sites:
        procs[pid] = subprocess.Popen(
            cli("client", "--config", f"sites/{pid}/participant.toml"),
            cwd=folder,
            stdout=logs[pid],
            stderr=subprocess.STDOUT,
        )
    try:
        codes = {name: p.wait(timeout=300) for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
        for f in logs.values():
            f.close()
    text = {name: (tmp_path / f"{name}.log").read_text() for name in logs}
    assert codes == dict.fromkeys(logs, 0), text
    for pid in sites:  # each site checked the models it trained on against the chain
        assert "round 2 model" in text[pid] and "matches the chain" in text[pid], text[pid]
    audit = run("audit", "verify", "runs/live")
    assert audit.returncode == 0 and audit.stdout.startswith("VERIFIED"), audit.stdout + audit.stderr


def test_the_wheel_ships_the_templates_and_examples(tmp_path: Path) -> None:
    """``pip install trustfed`` has what ``trustfed new`` writes and the example files."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    cmd = [sys.executable, "-m", "pip", "wheel", str(tmp_path), "--no-deps", "--no-build-isolation", "-q", "-w"]
    subprocess.run([*cmd, str(tmp_path / "dist")], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("trustfed-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in TEMPLATES:
        assert f"trustfed/templates/{template}_app.py" in names
    assert {"trustfed/examples/federation.toml", "trustfed/examples/enclave.toml"} <= names
