"""Local training and evaluation loops (plain PyTorch, deterministic given a seed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from trustfed.data.datasets import Dataset


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


def train_epochs(model: nn.Module, data: Dataset, cfg: TrainConfig, seed: int) -> dict[str, float]:
    """SGD over ``data`` for ``cfg.epochs``; with ``proximal_mu`` > 0 adds FedProx's proximal term."""
    model.train()
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
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
    return {"train_loss": total / max(seen, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 1024) -> EvalResult:
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        xb = torch.from_numpy(data.x[start : start + batch_size])
        yb = torch.from_numpy(data.y[start : start + batch_size])
        out = model(xb)
        total_loss += float(loss_fn(out, yb))
        correct += int((out.argmax(dim=1) == yb).sum())
    n = len(data)
    return EvalResult(total_loss / max(n, 1), correct / max(n, 1), n)


def label_histogram(data: Dataset) -> np.ndarray:
    return np.bincount(data.y, minlength=data.num_classes)
