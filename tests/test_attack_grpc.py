"""An attack on the attack interface runs in a malicious participant's own process on the real gRPC
path (coordinator and participants as processes over mutual TLS): the participant sends what the
attack crafts, exactly as in the simulation (the demo's run shows a robust aggregator and the
incentives catching it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from trustfed.attacks import build_attack
from trustfed.attacks.api import AttackError
from trustfed.config import validate_federation_config
from trustfed.coordinator.local_federation import run_local_federation
from trustfed.core.strategy import RoundPlan, Update
from trustfed.simulation import run_simulation

RAW: dict[str, Any] = {
    "federation": {"name": "attack-grpc", "rounds": 2, "participants": 3, "seed": 5},
    "data": {"dataset": "digits", "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "hidden": [32]},
    "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
    "strategy": {"name": "fedavg", "aggregator": "mean"},  # the crafted update goes into the model
    "ledger": {"enabled": True},
    "attack": {"kind": "sign_flip", "fraction": 0.34, "params": {"scale": 10.0}, "seed": 3},
}


def test_a_malicious_participant_process_sends_the_update_its_attack_crafts(tmp_path: Path) -> None:
    cfg = validate_federation_config(RAW, "test")
    (attacker,) = cfg.attack.malicious(["p000", "p001", "p002"])
    params, metrics = run_local_federation(RAW, tmp_path / "run", round_timeout_s=120)
    sim = run_simulation(cfg, tmp_path / "sim")
    # the attacker sent the update the simulation's attack transport crafts for it: the same model
    assert torch.max(torch.abs(params - sim.params)).item() <= 1e-6
    assert metrics["final_accuracy"] < 0.5  # a mean of ten times the reversed update does not learn
    log = (tmp_path / "run" / "logs" / f"{attacker}.log").read_text()
    assert f"participant {attacker} is malicious in this federation: attack sign_flip" in log


class _Fixed:
    participant_id = "p000"

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        return Update("p000", params + 1.0, 7, {"loss": 0.5})

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return {}


def test_the_crafting_trainer_sends_what_the_attack_crafts_and_refuses_omniscient_attacks() -> None:
    from trustfed.attacks import CraftingTrainer

    attack = build_attack("sign_flip", {"scale": 2.0})
    sent = CraftingTrainer(_Fixed(), attack, "sign_flip", seed=1).fit(torch.zeros(4), RoundPlan(1, ("p000",), {}))
    assert torch.equal(sent.params, torch.full((4,), -2.0)) and sent.num_examples == 7
    with pytest.raises(AttackError, match="'alie' needs every honest update"):
        CraftingTrainer(_Fixed(), build_attack("alie", {}), "alie", seed=1)
