"""Federated LoRA fine-tuning of a tiny assistant / tool-calling LM (the built-in assistant app).

The base model is built from config, pre-trained briefly on generated text without tool calls, saved
with ``save_pretrained`` (safetensors) and loaded back; three vendors fine-tune LoRA adapters on their
own chats and tool calls. Only adapter tensors travel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trustfed.apps.runtime import Runtime
from trustfed.config import FederationConfig, validate_federation_config
from trustfed.simulation.runner import run_simulation

pytest.importorskip("peft", reason="the assistant app needs trustfed[llm] (transformers, peft)")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trustfed.apps.assistant.corpus import VENDORS, write_vendor_data
    from trustfed.apps.assistant.model import pretrain_base

    root = tmp_path_factory.mktemp("assistant")
    pretrain_base(root / "base", steps=120, hidden=64, layers=2)  # small: the suite runs on 2 cores
    rng = np.random.default_rng(0)
    for i, vendor in enumerate(VENDORS):
        write_vendor_data(root / f"v{i}", vendor, rng, train=96, held_out=32)
    return root


def config(root: Path, rounds: int) -> FederationConfig:
    raw = {
        "federation": {"name": "assistant", "rounds": rounds, "participants": 3, "seed": 0},
        "app": {
            "target": "trustfed.apps.assistant.app:app",
            "config": {"base": str(root / "base"), "generate": 4, "targets": ["q_proj", "v_proj"], "length": 80},
        },
        "training": {"local_epochs": 1, "batch_size": 16, "lr": 0.03},
        "strategy": {"min_participants": 3},
        "simulation": {"data": {f"p{i:03d}": {"path": str(root / f"v{i}")} for i in range(3)}},
    }
    return validate_federation_config(raw)


def test_only_adapters_travel(workspace: Path) -> None:
    rt = Runtime(config(workspace, 1))
    model = rt.model_factory()()
    full = sum(v.numel() for k, v in model.state_dict().items() if "lora_" not in k)
    assert all("lora_B" in t.name for t in rt.spec.tensors)  # FFA-LoRA: A frozen and identical everywhere
    assert rt.spec.size <= 0.02 * full, (rt.spec.size, full)


def test_federated_lora_lowers_held_out_perplexity(workspace: Path) -> None:
    result = run_simulation(config(workspace, 3), workspace / "run")
    fed = [r["federated_evaluation"] for r in result.metrics["rounds"]]
    base, last = fed[0], fed[-1]  # model_round 0 is the base model with zero adapters (B = 0)
    assert base["model_round"] == 0 and last["participants"] == 3
    assert last["perplexity"] < 0.5 * base["perplexity"], (base, last)
    assert {"tool_exact_match", "tool_schema_valid"} <= set(last)  # scored on generated calls
    prov = result.metrics["participants_provenance"]
    assert len({p["data_sha256"] for p in prov.values()}) == 3
