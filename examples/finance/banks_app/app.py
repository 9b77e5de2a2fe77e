"""The banks' app: a credit-risk network trained on each bank's own loan book, weighted for rare defaults.

Every bank reads its own ``train.csv`` / ``eval.csv`` from its ``[data] path``. The federation
agreed on the features and their transforms (logarithms of money and durations, fixed centres and
scales from market-wide figures), so every bank scales its table alike without sharing it.

Defaults are rare (about 5%), so each bank trains with class weighting: binary cross-entropy whose
positive class weighs ``[app.config] pos_weight`` times a negative (``"balanced"``: the bank's own
ratio of repaid to defaulted loans). Evaluation: AUC (area under the ROC curve) and average
precision of the default score, the figures credit risk is judged by; accuracy says little at 5%.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from trustfed.app import App, AppContext, DataSpec, LocalData, TrainContext, TrainData
from trustfed.data.datasets import Dataset
from trustfed.data.loaders import load_table
from trustfed.errors import AppError

TARGET = "default"
# The agreed transform of every feature: centred and scaled by market-wide figures, not a bank's data.
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "age": lambda v: (v - 45.0) / 12.0,
    "income": lambda v: np.log(np.maximum(v, 1.0) / 40.0) / 0.5,
    "months_employed": lambda v: (np.log1p(v) - 4.0) / 1.2,
    "credit_utilisation": lambda v: (v - 0.4) / 0.25,
    "loan_amount": lambda v: np.log(np.maximum(v, 0.1) / 20.0) / 0.6,
    "debt_to_income": lambda v: (v - 0.45) / 0.3,
    "late_payments_12m": lambda v: np.log1p(v) / 0.6,
    "inquiries_6m": lambda v: (v - 0.8) / 0.9,
    "open_accounts": lambda v: (v - 4.5) / 2.5,
    "home_owner": lambda v: (v - 0.5) * 2.0,
}
FEATURES = list(TRANSFORMS)


def model(ctx: AppContext) -> nn.Module:
    hidden = int(ctx.config.get("hidden", 32))
    return nn.Sequential(
        nn.Linear(len(FEATURES), hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )


def _transformed(table: Dataset) -> Dataset:
    x = np.stack([TRANSFORMS[name](table.x[:, j]) for j, name in enumerate(FEATURES)], axis=1)
    return Dataset(table.name, x.astype(np.float32), table.y, table.num_classes)


def data(spec: DataSpec, ctx: AppContext) -> LocalData:
    """This bank's own tables: ``train.csv`` and the held-out ``eval.csv`` in its ``[data] path``."""
    folder = spec.require_path()
    files = [folder / "train.csv", folder / "eval.csv"]
    train, held_out = (load_table(f, features=FEATURES, target=TARGET, classes=[0, 1]) for f in files)
    return LocalData(train=_transformed(train), eval=_transformed(held_out), files=files)


def _table(d: TrainData) -> Dataset:
    if not isinstance(d, Dataset):
        raise AppError("the banks' app trains and evaluates on its own tables (trustfed arrays)")
    return d


def positive_weight(y: np.ndarray, setting: object) -> float:
    """The weight of a default in the loss: ``"balanced"`` (repaid / defaulted) or a number."""
    if setting == "balanced":
        positives = int(y.sum())
        return (len(y) - positives) / max(positives, 1)
    return float(str(setting))


def train(m: nn.Module, d: TrainData, ctx: TrainContext) -> dict[str, float]:
    """``local_epochs`` of Adam on the class-weighted binary cross-entropy over this bank's loans."""
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
def default_score(m: nn.Module, d: Dataset) -> np.ndarray:
    """The model's probability of default for every loan of ``d``."""
    m.eval()
    return torch.sigmoid(m(torch.from_numpy(d.x)).squeeze(-1)).numpy()


def scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """AUC and average precision of default scores ``p`` (when both classes are present)."""
    if not 0 < y.sum() < len(y):
        return {}
    return {"auc": float(roc_auc_score(y, p)), "average_precision": float(average_precision_score(y, p))}


def evaluate(m: nn.Module, d: TrainData, ctx: AppContext) -> dict[str, float]:
    table = _table(d)
    p = default_score(m, table)
    loss = nn.functional.binary_cross_entropy(torch.from_numpy(p).double(), torch.from_numpy(table.y).double())
    return {"loss": float(loss), **scores(table.y, p), "num_examples": float(len(table))}


app = App(model=model, data=data, train=train, evaluate=evaluate)
