"""The factories' app: predict a machine fault in the next 24 hours from its last 24 hours of sensors.

Every factory reads its own ``train.csv`` / ``eval.csv`` (one row per window) from its ``[data] path``.
Factories calibrate their sensors differently, so the app looks at each window relative to its own
first hours (an offset cancels) and scales each sensor by an agreed nominal figure; what signals wear
is the shape of the window: a rising vibration, a warming bearing, an erratic current.

Faults are rare (1 to 2% of windows), so training weighs a fault window ``[app.config] pos_weight``
times a normal one (``"balanced"``: the factory's own ratio). Evaluation: AUC of the fault score, and
precision, recall and F1 of the alarm (score above ``[app.config] threshold``).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score
from torch import nn

from trustfed.app import App, AppContext, DataSpec, LocalData, TrainContext, TrainData
from trustfed.data.datasets import Dataset
from trustfed.data.loaders import load_table
from trustfed.errors import AppError

SENSORS = ("vib", "temp", "current")
NOMINAL = np.array([0.5, 3.0, 2.0], dtype=np.float32)  # agreed scale of each sensor's variation
WINDOW = 24
BASELINE = 8  # the first hours of a window: its reference level
FEATURES = [f"{s}_{h:02d}" for s in SENSORS for h in range(WINDOW)]
TARGET = "fault_24h"


def shapes(x: np.ndarray) -> np.ndarray:
    """Each window relative to its first hours, per sensor, scaled; then each sensor's spread."""
    w = x.reshape(len(x), len(SENSORS), WINDOW)
    centred = (w - w[:, :, :BASELINE].mean(axis=2, keepdims=True)) / NOMINAL[None, :, None]
    spread = np.log(w.std(axis=2) / NOMINAL[None, :] + 1e-3)
    return np.concatenate([centred.reshape(len(x), -1), spread], axis=1).astype(np.float32)


def _windows(table: Dataset) -> Dataset:
    return Dataset(table.name, shapes(table.x), table.y, table.num_classes)


def data(spec: DataSpec, ctx: AppContext) -> LocalData:
    """This factory's own windows: ``train.csv`` and the held-out machines' ``eval.csv``."""
    folder = spec.require_path()
    files = [folder / "train.csv", folder / "eval.csv"]
    train, held_out = (load_table(f, features=FEATURES, target=TARGET, classes=[0, 1]) for f in files)
    return LocalData(train=_windows(train), eval=_windows(held_out), files=files)


def model(ctx: AppContext) -> nn.Module:
    hidden = int(ctx.config.get("hidden", 32))
    width = len(SENSORS) * (WINDOW + 1)
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def _table(d: TrainData) -> Dataset:
    if not isinstance(d, Dataset):
        raise AppError("the factories' app trains and evaluates on its own windows (trustfed arrays)")
    return d


def positive_weight(y: np.ndarray, setting: object) -> float:
    """The weight of a fault window in the loss: ``"balanced"`` (normal / fault) or a number."""
    if setting == "balanced":
        positives = int(y.sum())
        return (len(y) - positives) / max(positives, 1)
    return float(str(setting))


def train(m: nn.Module, d: TrainData, ctx: TrainContext) -> dict[str, float]:
    """``local_epochs`` of Adam on the class-weighted binary cross-entropy over this factory's windows."""
    table = _table(d)
    weight = torch.tensor(positive_weight(table.y, ctx.app.config.get("pos_weight", "balanced")))
    x, y = torch.from_numpy(table.x), torch.from_numpy(table.y).float()
    opt = torch.optim.Adam(m.parameters(), lr=ctx.lr)
    gen = torch.Generator().manual_seed(ctx.seed)
    m.train()
    total = 0.0
    for _ in range(ctx.epochs):
        for idx in torch.split(torch.randperm(len(y), generator=gen), ctx.batch_size):
            loss = nn.functional.binary_cross_entropy_with_logits(m(x[idx]).squeeze(-1), y[idx], pos_weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.detach()) * len(idx)
    return {"train_loss": total / max(len(y) * ctx.epochs, 1)}


@torch.no_grad()
def fault_score(m: nn.Module, d: Dataset) -> np.ndarray:
    """The model's fault score (0 to 1) of every window of ``d``."""
    m.eval()
    return torch.sigmoid(m(torch.from_numpy(d.x)).squeeze(-1)).numpy()


def scores(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC of scores ``p`` (when both classes are present); precision, recall and F1 of the alarm."""
    alarm = (p > threshold).astype(np.int64)
    out = {
        "precision": float(precision_score(y, alarm, zero_division=0)),
        "recall": float(recall_score(y, alarm, zero_division=0)),
        "f1": float(f1_score(y, alarm, zero_division=0)),
    }
    if 0 < y.sum() < len(y):
        out["auc"] = float(roc_auc_score(y, p))
    return out


def evaluate(m: nn.Module, d: TrainData, ctx: AppContext) -> dict[str, float]:
    table = _table(d)
    p = fault_score(m, table)
    loss = nn.functional.binary_cross_entropy(torch.from_numpy(p).double(), torch.from_numpy(table.y).double())
    threshold = float(ctx.config.get("threshold", 0.5))
    return {"loss": float(loss), **scores(table.y, p, threshold), "num_examples": float(len(table))}


app = App(model=model, data=data, train=train, evaluate=evaluate)
