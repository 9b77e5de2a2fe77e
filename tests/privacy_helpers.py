"""Shared helper for the privacy tests: a small DP-SGD participant on 200 digits."""

from __future__ import annotations

import torch
from torch import nn

from trustfed.core.codec import flatten
from trustfed.data.datasets import load_dataset
from trustfed.models.training import TrainConfig
from trustfed.privacy.budget_state import BudgetStateFile
from trustfed.privacy.dpsgd import DPSGDTrainer


def digits_dpsgd_trainer(
    budget: float | None, *, hidden: int = 32, budget_state: BudgetStateFile | None = None
) -> tuple[DPSGDTrainer, torch.Tensor]:
    """Participant p007: MLP 64-hidden-10, sigma 1.0, clip 1.0, delta 1e-5; returns it and the start params."""
    data = load_dataset("digits", None, 0).subset(torch.arange(200).numpy())

    def factory() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    params, spec = flatten(factory().state_dict())
    trainer = DPSGDTrainer(
        "p007",
        factory,
        spec,
        data,
        TrainConfig(1, 50, 0.1, 0.0),
        0,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
        budget_epsilon=budget,
        budget_state=budget_state,
    )
    return trainer, params
