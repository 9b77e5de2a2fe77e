"""Shared helpers for the assistant-app tests: a workspace with a tiny pre-trained base model and
three vendors' chats, and the federation config that runs the built-in assistant app on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def make_workspace(
    root: Path, *, steps: int = 400, hidden: int = 64, layers: int = 2, train: int = 96, held_out: int = 32
) -> Path:
    """``root/base``: the base model (``pretrain_base``, safetensors); ``root/v<i>``: vendor i's chats."""
    from trustfed.apps.assistant.corpus import VENDORS, write_vendor_data
    from trustfed.apps.assistant.model import pretrain_base

    pretrain_base(root / "base", steps=steps, hidden=hidden, layers=layers)  # small: the suite runs on 2 cores
    rng = np.random.default_rng(0)
    for i, vendor in enumerate(VENDORS):
        write_vendor_data(root / f"v{i}", vendor, rng, train=train, held_out=held_out)
    return root


def raw_config(root: Path, rounds: int) -> dict[str, Any]:
    return {
        "federation": {"name": "assistant", "rounds": rounds, "participants": 3, "seed": 0},
        "app": {
            "target": "trustfed.apps.assistant.app:app",
            "config": {"base": str(root / "base"), "generate": 8, "targets": ["q_proj", "v_proj"], "length": 48},
        },
        "training": {"local_epochs": 3, "batch_size": 8, "lr": 0.05},
        "strategy": {"min_participants": 3},
        "simulation": {"data": {f"p{i:03d}": {"path": str(root / f"v{i}")} for i in range(3)}},
    }
