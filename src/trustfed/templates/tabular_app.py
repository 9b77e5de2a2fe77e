"""A tabular federation app: each hospital trains one risk model on its own patients table (CSV).

Every site keeps its table in its own folder; ``[data] path`` in its participant file points there.
The federation agrees on the features, the classes and their scaling (below), so every site reads its
table the same way without sharing it.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from trustfed.app import App, AppContext, DataSpec, LocalData
from trustfed.data.datasets import Dataset
from trustfed.data.loaders import load_table

FEATURES = ["age", "bmi", "systolic_bp", "glucose", "cholesterol", "smoker"]
TARGET = "risk"
CLASSES = ["low", "medium", "high"]
# Agreed scaling (population figures, not any site's data): (value - centre) / scale
CENTRE = np.array([55.0, 27.0, 130.0, 105.0, 200.0, 0.3], dtype=np.float32)
SCALE = np.array([15.0, 5.0, 18.0, 25.0, 35.0, 0.5], dtype=np.float32)


def model(ctx: AppContext) -> nn.Module:
    hidden = int(ctx.config.get("hidden", 32))
    return nn.Sequential(
        nn.Linear(len(FEATURES), hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, len(CLASSES)),
    )


def _scaled(table: Dataset) -> Dataset:
    return Dataset(table.name, (table.x - CENTRE) / SCALE, table.y, table.num_classes)


def data(spec: DataSpec, ctx: AppContext) -> LocalData:
    """This site's own tables: ``train.csv`` and a held-out ``eval.csv`` in its ``[data] path``."""
    folder = spec.require_path()
    train_file = folder / str(spec.options.get("train", "train.csv"))
    eval_file = folder / str(spec.options.get("eval", "eval.csv"))
    train = load_table(train_file, features=FEATURES, target=TARGET, classes=CLASSES)
    held_out = load_table(eval_file, features=FEATURES, target=TARGET, classes=CLASSES)
    return LocalData(train=_scaled(train), eval=_scaled(held_out), files=[train_file, eval_file])


app = App(model=model, data=data)
