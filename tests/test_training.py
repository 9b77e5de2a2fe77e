"""The built-in local training loop against its oracle: the same loop driven by ``torch.optim.SGD``."""

from __future__ import annotations

import copy

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trustfed.data.datasets import Dataset
from trustfed.models.reference import build_model
from trustfed.models.training import TrainConfig, train_epochs


def train_with_torch_optim(model: nn.Module, data: Dataset, cfg: TrainConfig, seed: int) -> float:
    """The loop as written with the optimizer object (the slow, obviously-correct version)."""
    model.train()
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
    loss_fn = nn.CrossEntropyLoss()
    total, seen = 0.0, 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                loss = loss + 0.5 * cfg.proximal_mu * prox
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
    return total / max(seen, 1)


@settings(max_examples=20, deadline=None)
@given(
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    weight_decay=st.sampled_from([0.0, 1e-3]),
    proximal_mu=st.sampled_from([0.0, 0.1]),
    batch_size=st.integers(1, 40),
    epochs=st.integers(1, 3),
    model=st.sampled_from(["mlp", "cnn"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_train_epochs_is_torch_optim_sgd_bit_for_bit(
    momentum: float, weight_decay: float, proximal_mu: float, batch_size: int, epochs: int, model: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    data = Dataset("t", rng.normal(size=(37, 16)).astype(np.float32), rng.integers(0, 3, size=37), 3)
    cfg = TrainConfig(epochs, batch_size, 0.05, momentum, weight_decay, proximal_mu)
    fast = build_model(model, (16,), 3, seed=seed % 1000)
    oracle = copy.deepcopy(fast)
    loss = train_epochs(fast, data, cfg, seed)["train_loss"]
    assert loss == train_with_torch_optim(oracle, data, cfg, seed)
    for (name, a), b in zip(fast.state_dict().items(), oracle.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
