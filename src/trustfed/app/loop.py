"""The built-in training and evaluation loop for any task an app's data describes.

It takes trustfed's in-memory arrays, a map-style torch Dataset of ``(input, target)`` pairs or a
ready DataLoader; the loss (cross-entropy, MSE, L1, BCE with logits), optimiser (SGD, Adam, AdamW)
and metrics come from ``[training]``. Classification targets may be one label per example or one per
position (token sequences: logits ``[batch, length, vocab]``). Every shuffle takes a seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from trustfed.app.api import TrainData
from trustfed.data.datasets import Dataset as ArrayDataset
from trustfed.errors import AppError
from trustfed.models.training import TrainConfig


@dataclass(frozen=True)
class LoopSettings(TrainConfig):
    """The built-in loop's settings: the local-training ones and the loss, optimiser and metrics."""

    loss: str = "cross_entropy"
    optimizer: str = "sgd"
    metrics: tuple[str, ...] = ("accuracy",)


def num_examples(data: TrainData) -> int:
    if isinstance(data, DataLoader):
        return len(data.dataset)  # type: ignore[arg-type]
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        raise AppError(f"the app's data ({type(data).__name__}) has no len(): return a map-style Dataset") from None


def batches(data: TrainData, batch_size: int, gen: torch.Generator | None) -> Iterator[tuple[Any, Any]]:
    """``(inputs, targets)`` batches; shuffled with ``gen`` (None: in order). A DataLoader batches itself."""
    if isinstance(data, ArrayDataset):
        x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
        order = torch.randperm(len(y), generator=gen) if gen is not None else torch.arange(len(y))
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]
        return
    loader: DataLoader[Any]
    if isinstance(data, DataLoader):
        loader = data
    elif isinstance(data, TorchDataset):
        loader = DataLoader(data, batch_size=batch_size, shuffle=gen is not None, generator=gen)
    else:
        raise AppError(f"the app's data is a {type(data).__name__}; expected a torch Dataset or DataLoader")
    for batch in loader:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            yield batch[0], batch[1]
        elif isinstance(batch, dict) and {"input", "target"} <= set(batch):
            yield batch["input"], batch["target"]
        else:
            raise AppError(
                "the built-in loop needs (input, target) pairs (or dicts with 'input' and 'target'); got a "
                f"{type(batch).__name__} batch: give the app its own train/evaluate functions"
            )


def _shape_for(out: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    if loss == "cross_entropy":
        if out.dim() == 3 and y.dim() == 2:  # token sequences: [batch, length, vocab] against [batch, length]
            return out.reshape(-1, out.shape[-1]), y.reshape(-1).long()
        return out, y.long()
    y = y.to(out.dtype)
    if out.dim() == y.dim() + 1 and out.shape[-1] == 1:
        out = out.squeeze(-1)
    if out.shape != y.shape:
        raise AppError(f"the model's output {tuple(out.shape)} does not match the targets {tuple(y.shape)} for {loss}")
    return out, y


_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": nn.functional.cross_entropy,
    "mse": nn.functional.mse_loss,
    "l1": nn.functional.l1_loss,
    "bce": nn.functional.binary_cross_entropy_with_logits,
}


def loss_of(out: torch.Tensor, y: torch.Tensor, loss: str, reduction: str = "mean") -> torch.Tensor:
    o, t = _shape_for(out, y, loss)
    value: torch.Tensor = _LOSSES[loss](o, t, reduction=reduction)
    return value


def make_optimizer(model: nn.Module, s: LoopSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def train(model: nn.Module, data: TrainData, s: LoopSettings, seed: int) -> dict[str, float]:
    """``s.epochs`` epochs over ``data`` (FedProx's proximal term when ``s.proximal_mu`` > 0)."""
    model.train()
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, s)
    anchor = [p.detach().clone() for p in model.parameters()] if s.proximal_mu > 0 else None
    total, seen = 0.0, 0
    for _ in range(s.epochs):
        for xb, yb in batches(data, s.batch_size, gen):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model(xb), yb, s.loss)
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                loss = loss + 0.5 * s.proximal_mu * prox
            if not torch.isfinite(loss):
                raise AppError(f"the training loss became {float(loss)}: lower [training] lr or check the data")
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            n = len(yb)
            total += float(loss.detach()) * n
            seen += n
    return {"train_loss": total / max(seen, 1)}


@torch.no_grad()
def evaluate(
    model: nn.Module, data: TrainData, loss: str, metrics: Sequence[str], batch_size: int = 512
) -> dict[str, float]:
    """Loss and ``metrics`` over ``data`` (sums over examples, then divided: exact for any batching)."""
    model.eval()
    total_loss, correct, sq, ab, count, n = 0.0, 0, 0.0, 0.0, 0, 0
    for xb, yb in batches(data, batch_size, None):
        out = model(xb)
        o, t = _shape_for(out, yb, loss)
        total_loss += float(_LOSSES[loss](o, t, reduction="sum"))
        if loss == "cross_entropy":
            correct += int((o.argmax(dim=-1) == t).sum())
        elif loss == "bce":
            correct += int(((o > 0).to(t.dtype) == t).sum())
        else:
            diff = (o - t).double()
            sq += float((diff**2).sum())
            ab += float(diff.abs().sum())
        count += t.numel()
        n += len(yb)
    result = {"loss": total_loss / max(count, 1), "num_examples": float(n)}
    for m in metrics:
        if m == "accuracy":
            if loss not in ("cross_entropy", "bce"):
                raise AppError(f"metric 'accuracy' needs a classification loss, not {loss!r}")
            result["accuracy"] = correct / max(count, 1)
        elif loss in ("cross_entropy", "bce"):
            raise AppError(f"metric {m!r} needs a regression loss (mse or l1), not {loss!r}")
        elif m == "mse":
            result["mse"] = sq / max(count, 1)
        elif m == "mae":
            result["mae"] = ab / max(count, 1)
        elif m == "rmse":
            result["rmse"] = math.sqrt(sq / max(count, 1))
    return result
