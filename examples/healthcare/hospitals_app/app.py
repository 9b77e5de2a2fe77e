"""The hospitals' app: a small network that tells malignant from benign tumours, trained with DP-SGD.

Every hospital reads its own ``train.csv`` / ``eval.csv`` from its ``[data] path``. The federation
agreed on the features, the classes and their scaling before training: the scaling constants are the
public summary figures of the measurements (mean and standard deviation over the published set), not
any hospital's data. The model has no BatchNorm, so DP-SGD can clip each patient's gradient.

Evaluation (each hospital, on its held-out patients): accuracy and the area under the ROC curve
(AUC) of the malignancy score.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from trustfed.app import App, AppContext, DataSpec, LocalData, TrainData
from trustfed.data.datasets import Dataset
from trustfed.data.loaders import load_table
from trustfed.errors import AppError

_KINDS = ("mean", "error", "worst")
_MEASURES = (
    "radius",
    "texture",
    "perimeter",
    "area",
    "smoothness",
    "compactness",
    "concavity",
    "concave_points",
    "symmetry",
    "fractal_dimension",
)
FEATURES = [f"{kind}_{m}" for kind in _KINDS for m in _MEASURES]
TARGET = "diagnosis"
CLASSES = ["benign", "malignant"]
# fmt: off
CENTRE = np.array([
    14.1, 19.3, 92.0, 655.0, 0.0964, 0.104, 0.0888, 0.0489, 0.181, 0.0628,
    0.405, 1.22, 2.87, 40.3, 0.00704, 0.0255, 0.0319, 0.0118, 0.0205, 0.00379,
    16.3, 25.7, 107.0, 881.0, 0.132, 0.254, 0.272, 0.115, 0.29, 0.0839,
], dtype=np.float32)
SCALE = np.array([
    3.52, 4.3, 24.3, 352.0, 0.0141, 0.0528, 0.0796, 0.0388, 0.0274, 0.00705,
    0.277, 0.551, 2.02, 45.5, 0.003, 0.0179, 0.0302, 0.00616, 0.00826, 0.00264,
    4.83, 6.14, 33.6, 569.0, 0.0228, 0.157, 0.208, 0.0657, 0.0618, 0.018,
], dtype=np.float32)
# fmt: on


def model(ctx: AppContext) -> nn.Module:
    hidden = int(ctx.config.get("hidden", 16))
    return nn.Sequential(nn.Linear(len(FEATURES), hidden), nn.ReLU(), nn.Linear(hidden, len(CLASSES)))


def _scaled(table: Dataset) -> Dataset:
    return Dataset(table.name, (table.x - CENTRE) / SCALE, table.y, table.num_classes)


def data(spec: DataSpec, ctx: AppContext) -> LocalData:
    """This hospital's own tables: ``train.csv`` and the held-out ``eval.csv`` in its ``[data] path``."""
    folder = spec.require_path()
    files = [folder / "train.csv", folder / "eval.csv"]
    train, held_out = (load_table(f, features=FEATURES, target=TARGET, classes=CLASSES) for f in files)
    return LocalData(train=_scaled(train), eval=_scaled(held_out), files=files)


@torch.no_grad()
def malignancy(m: nn.Module, d: Dataset) -> np.ndarray:
    """The model's probability of malignancy for each patient of ``d``."""
    m.eval()
    return torch.softmax(m(torch.from_numpy(d.x)), dim=-1)[:, 1].numpy()


def scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Accuracy at 0.5 and AUC (when both classes are present) of scores ``p`` against labels ``y``."""
    out = {"accuracy": float(((p > 0.5) == (y == 1)).mean())}
    if 0 < y.sum() < len(y):
        out["auc"] = float(roc_auc_score(y, p))
    return out


def evaluate(m: nn.Module, d: TrainData, ctx: AppContext) -> dict[str, float]:
    if not isinstance(d, Dataset):
        raise AppError("the hospitals' app evaluates its own tables (trustfed arrays)")
    p = malignancy(m, d)
    eps = 1e-7
    y = d.y
    loss = float(-np.mean(np.where(y == 1, np.log(p + eps), np.log(1 - p + eps))))
    return {"loss": loss, **scores(y, p), "num_examples": float(len(d))}


app = App(model=model, data=data, evaluate=evaluate)
