"""A user's app over gRPC: three participant processes, each reading its own CSV from its own folder,
with the (simulated) enclave and the ledger on. The records name the app, its code hash and each
participant's data manifest; ``audit verify`` passes."""

from __future__ import annotations

import json
import math
from pathlib import Path

from app_helpers import write_project
from trustfed.config import load_federation_config
from trustfed.coordinator.local_federation import run_local_federation
from trustfed.data.manifest import data_manifest, manifest_hash
from trustfed.ledger.audit import parse_entry
from trustfed.ledger.verify import verify_run
from trustfed.simulation.runner import run_simulation

ENCLAVE = {
    "enabled": True,
    "backend": "simulated",
    "allow_simulated_tee": True,
    "policy": {"allow_simulated_tee": True},
}


def test_user_app_over_grpc_with_enclave_and_ledger(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    fed_file = write_project(project, "houses_grpc", rounds=3)
    cfg = load_federation_config(fed_file)
    raw = cfg.model_dump(mode="json", exclude={"transport", "participant_training"})
    raw["ledger"] = {"enabled": True}
    raw["enclave"] = ENCLAVE
    sites = {f"p{i:03d}": project / "sites" / f"p{i:03d}" for i in range(3)}
    out = tmp_path / "run"
    params, metrics = run_local_federation(
        raw, out, round_timeout_s=120, participant_data={pid: {"path": str(p)} for pid, p in sites.items()}
    )
    assert params.isfinite().all()
    written = json.loads((out / "metrics.json").read_text())
    assert written["app"]["target"] == "houses_grpc.app:app"
    code = written["app"]["code_sha256"]
    # each participant signed the hash of the code it ran and of its own files
    expected = {
        pid: manifest_hash(data_manifest([p / "train.csv", p / "eval.csv"], root=p)) for pid, p in sites.items()
    }
    prov = written["participants_provenance"]
    assert {pid: v["data_sha256"] for pid, v in prov.items()} == expected
    assert {v["app_sha256"] for v in prov.values()} == {code}
    entries = [parse_entry(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    app_entries = [e for e in entries if e.kind == "app"]
    assert len(app_entries) == 1 and app_entries[0].body["code_sha256"] == code
    commitments = [e for e in entries if e.kind == "commitment"]
    assert len(commitments) == 9
    assert all(e.body["app_sha256"] == code and e.body["data_sha256"] == expected[e.author] for e in commitments)
    # federated evaluation: in the signed commitments, combined by the coordinator
    assert all(e.body["evaluation"]["num_examples"] == 40 for e in commitments)
    fed_eval = [r["federated_evaluation"] for r in written["rounds"]]
    assert [f["model_round"] for f in fed_eval] == [0, 1, 2] and fed_eval[-1]["loss"] < fed_eval[0]["loss"]
    assert metrics["enclave"]["label"] == "SIMULATED"
    verdict = verify_run(out)
    assert verdict.ok, verdict.failures
    # the same federation in simulation reaches the same model
    sim_raw = {k: v for k, v in raw.items() if k not in ("enclave", "ledger")}
    from trustfed.config import validate_federation_config

    sim = run_simulation(validate_federation_config(sim_raw))
    assert math.isclose(sim.metrics["rounds"][-1]["federated_evaluation"]["loss"], fed_eval[-1]["loss"], rel_tol=1e-4)
