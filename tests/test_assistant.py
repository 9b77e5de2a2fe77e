"""Federated LoRA fine-tuning of a tiny assistant / tool-calling LM (the built-in assistant app).

The base model is built from config, pre-trained briefly on generated text without tool calls, saved
with ``save_pretrained`` (safetensors) and loaded back; three vendors fine-tune LoRA adapters on their
own chats and tool calls. Only adapter tensors travel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.assistant_helpers import make_workspace, raw_config
from typer.testing import CliRunner

from trustfed.apps.runtime import Runtime
from trustfed.cli import app as cli_app
from trustfed.config import FederationConfig, validate_federation_config
from trustfed.coordinator.local_federation import run_local_federation
from trustfed.core.codec import ParamSpec
from trustfed.ledger.audit import parse_entry
from trustfed.ledger.backends import EmbeddedLedger
from trustfed.ledger.checkpoint import checkpoint_hash, checkpoint_paths
from trustfed.simulation.runner import run_simulation

pytest.importorskip("peft", reason="the assistant app needs trustfed[llm] (transformers, peft)")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("assistant"))


def config(root: Path, rounds: int) -> FederationConfig:
    return validate_federation_config(raw_config(root, rounds))


def test_only_adapters_travel(workspace: Path) -> None:
    rt = Runtime(config(workspace, 1))
    model = rt.model_factory()()
    full = sum(v.numel() for k, v in model.state_dict().items() if "lora_" not in k)
    assert all("lora_B" in t.name for t in rt.spec.tensors)  # FFA-LoRA: A frozen and identical everywhere
    assert rt.spec.size <= 0.02 * full, (rt.spec.size, full)


def test_federated_lora_lowers_perplexity_and_learns_tool_calls(workspace: Path) -> None:
    """The base model writes JSON records but never a tool call; federated LoRA teaches the calls."""
    result = run_simulation(config(workspace, 7), workspace / "run")
    fed = [r["federated_evaluation"] for r in result.metrics["rounds"]]
    base, last = fed[0], fed[-1]  # model_round 0 is the base model with zero adapters (B = 0)
    assert base["model_round"] == 0 and last["participants"] == 3
    assert last["perplexity"] < 0.1 * base["perplexity"], (base, last)
    # scored on 8 greedily generated calls per vendor, against the same held-out calls for both models
    assert base["tool_schema_valid"] == 0.0 and base["tool_exact_match"] == 0.0, base
    assert last["tool_schema_valid"] >= base["tool_schema_valid"] + 0.3, (base, last)
    assert last["tool_exact_match"] >= base["tool_exact_match"] + 0.15, (base, last)
    prov = result.metrics["participants_provenance"]
    assert len({p["data_sha256"] for p in prov.values()}) == 3


def test_fedadam_over_adapters(workspace: Path) -> None:
    """A server optimiser steps on the exchanged vector (the adapters) and keeps its moments for it alone."""
    raw = raw_config(workspace, 3)
    raw["app"]["config"]["generate"] = 0
    raw["strategy"].update({"name": "fedadam", "server_lr": 0.02})
    result = run_simulation(validate_federation_config(raw))
    fed = [r["federated_evaluation"] for r in result.metrics["rounds"]]
    assert fed[-1]["perplexity"] < 0.5 * fed[0]["perplexity"], fed
    avg = run_simulation(config(workspace, 3))
    assert result.metrics["model_hash"] != avg.metrics["model_hash"]  # FedAdam's step, not FedAvg's mean


ENCLAVE = {
    "enabled": True,
    "backend": "simulated",
    "allow_simulated_tee": True,
    "policy": {"allow_simulated_tee": True},
}


@pytest.mark.slow  # three participant processes that load transformers and peft: over a minute on 2 cores
def test_assistant_over_grpc_with_enclave_and_ledger(workspace: Path, tmp_path: Path) -> None:
    """Three participant processes, the enclave service and the embedded ledger: only adapter bytes
    cross (the coordinator refuses any upload over 2% of the full model's bytes), the adapters' hash
    is on chain every round, and ``trustfed audit verify`` passes."""
    rt = Runtime(config(workspace, 1))
    model = rt.model_factory()()
    full_bytes = 4 * sum(v.numel() for k, v in model.state_dict().items() if "lora_" not in k)
    limit = int(0.02 * full_bytes)
    raw = raw_config(workspace, 2)
    del raw["simulation"]
    raw["ledger"] = {"enabled": True}
    raw["enclave"] = ENCLAVE
    raw["transport"] = {"limits": {"max_model_bytes": limit}}  # larger uploads are refused by the coordinator
    out = tmp_path / "run"
    data = {f"p{i:03d}": {"path": str(workspace / f"v{i}")} for i in range(3)}
    params, metrics = run_local_federation(raw, out, round_timeout_s=300, participant_data=data)
    assert params.numel() == rt.spec.size and 4 * rt.spec.size <= limit
    assert metrics["enclave"]["label"] == "SIMULATED"
    written = json.loads((out / "metrics.json").read_text())
    assert [len(r["participants"]) for r in written["rounds"]] == [3, 3]  # every upload accepted, none refused
    entries = [parse_entry(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert sum(e.kind == "commitment" for e in entries) == 6
    ledger = EmbeddedLedger(out / "ledger")
    for rnd in (0, 1, 2):
        f32, spec_file = checkpoint_paths(out, rnd)
        spec = ParamSpec.from_json(spec_file.read_text())
        assert all("lora_B" in t.name for t in spec.tensors) and f32.stat().st_size == 4 * rt.spec.size
        on_chain = ledger.read_round(rnd)
        assert on_chain is not None and on_chain.model_hash == checkpoint_hash(out, rnd), rnd
    r = CliRunner().invoke(cli_app, ["audit", "verify", str(out)])
    assert r.exit_code == 0 and "VERIFIED" in r.output, r.output
