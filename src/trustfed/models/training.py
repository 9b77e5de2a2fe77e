"""Local training and evaluation loops (plain PyTorch, deterministic given a seed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.optim.sgd import sgd

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
    """SGD over ``data`` for ``cfg.epochs``; with ``proximal_mu`` > 0 adds FedProx's proximal term.

    The update is torch's own SGD in its functional form (see :func:`sgd_step`), exactly what
    ``torch.optim.SGD`` applies: the optimizer object imports ``torch._dynamo`` when the first one is
    built, a second or more and about 70 MB in every process that trains.
    """
    model.train()
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    momentum: dict[torch.Tensor, torch.Tensor | None] = {}
    anchor = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else None
    loss_fn = nn.CrossEntropyLoss()
    total, seen = 0.0, 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            for p in params:
                p.grad = None
            loss = loss_fn(model(x[idx]), y[idx])
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss = loss + 0.5 * cfg.proximal_mu * prox
            loss.backward()
            sgd_step(params, momentum, cfg)
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
    return {"train_loss": total / max(seen, 1)}


@torch.no_grad()
def sgd_step(
    params: Sequence[torch.Tensor], momentum: dict[torch.Tensor, torch.Tensor | None], cfg: TrainConfig
) -> None:
    """One ``torch.optim.SGD.step``: ``torch.optim.sgd.sgd`` over the parameters that have a gradient,
    with their momentum buffers kept in ``momentum`` (the optimizer's state) between steps."""
    live = [p for p in params if p.grad is not None]
    grads = [g for g in (p.grad for p in params) if g is not None]
    buffers = [momentum.get(p) for p in live] if cfg.momentum != 0 else []
    sgd(
        live,
        grads,
        buffers,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        lr=cfg.lr,
        dampening=0.0,
        nesterov=False,
        maximize=False,
    )
    if cfg.momentum != 0:
        momentum.update(zip(live, buffers, strict=True))


FORWARD_CHUNK = 256  # examples per forward pass in evaluate: a CNN's activations for them stay in cache


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 1024) -> EvalResult:
    """Summed cross-entropy and accuracy over ``data``, the loss summed per batch of ``batch_size``.

    Each batch's outputs are computed in near-equal parts of at most :data:`FORWARD_CHUNK` examples
    (at least half that) and joined: about half the time of one forward pass over the whole batch,
    whose activations (a hundred MB for the small CNN) spill out of cache. The reference models give
    every example the same output whichever way a batch is split into parts of that size, so the
    figures are those of whole-batch passes (``tests/test_training.py``).
    """
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        xb = torch.from_numpy(data.x[start : start + batch_size])
        yb = torch.from_numpy(data.y[start : start + batch_size])
        parts = torch.tensor_split(xb, -(-len(xb) // FORWARD_CHUNK))
        out = torch.cat([model(part) for part in parts])
        total_loss += float(loss_fn(out, yb))
        correct += int((out.argmax(dim=1) == yb).sum())
    n = len(data)
    return EvalResult(total_loss / max(n, 1), correct / max(n, 1), n)


def label_histogram(data: Dataset) -> np.ndarray:
    return np.bincount(data.y, minlength=data.num_classes)
