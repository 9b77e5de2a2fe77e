"""The built-in training and evaluation loops against their oracles: the same loop driven by
``torch.optim.SGD``, and evaluation with one forward pass per whole batch."""

from __future__ import annotations

import copy

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trustfed.data.datasets import Dataset
from trustfed.models.reference import build_model
from trustfed.models.training import EvalResult, TrainConfig, evaluate, train_epochs


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


@torch.no_grad()
def evaluate_whole_batches(model: nn.Module, data: Dataset, batch_size: int = 1024) -> EvalResult:
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        xb = torch.from_numpy(data.x[start : start + batch_size])
        yb = torch.from_numpy(data.y[start : start + batch_size])
        out = model(xb)
        total_loss += float(loss_fn(out, yb))
        correct += int((out.argmax(dim=1) == yb).sum())
    return EvalResult(total_loss / len(data), correct / len(data), len(data))


@settings(max_examples=25, deadline=None)
@given(
    case=st.sampled_from([("mlp", (64,)), ("mlp", (30,)), ("cnn", (64,)), ("cnn", (1, 28, 28)), ("cnn", (3, 32, 32))]),
    n=st.one_of(st.integers(1, 2100), st.sampled_from([255, 256, 257, 1000, 1024, 1025, 2048])),
    seed=st.integers(0, 2**31 - 1),
)
def test_evaluate_in_parts_gives_the_whole_batch_figures(case: tuple[str, tuple[int, ...]], n: int, seed: int) -> None:
    name, shape = case
    rng = np.random.default_rng(seed)
    data = Dataset("t", rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, 10, size=n), 10)
    model = build_model(name, shape, 10, seed=seed % 1000)
    assert evaluate(model, data) == evaluate_whole_batches(model, data)
