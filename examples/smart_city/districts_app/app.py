"""The districts' app: a day-ahead forecast of each hour's electricity demand from the meter history.

Every district reads its own ``demand.csv`` (one row an hour) from its ``[data] path`` and holds out
its last ``[app.config] eval_weeks`` weeks. At each hour t the forecast uses only what is known a day
before: the demand of t-24, t-48, t-168 and t-336 hours, the calendar (hour, weekday, holiday) and
the temperature forecast for t. The model is the seasonal naive forecast plus a learned correction. Demand is divided by the district's own level (its mean over the
week before t-24), so one model serves a 30 MWh suburb and a 200 MWh port alike; the forecast is
multiplied back into MWh.

Evaluation (each district, on its held-out weeks): MAE and RMSE in MWh, beside the seasonal naive
forecast (the same hour a week before), and the skill ``1 - MAE / naive MAE``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from trustfed.app import App, AppContext, DataSpec, LocalData, TrainData
from trustfed.data.datasets import Dataset
from trustfed.data.loaders import load_table
from trustfed.errors import AppError, DataError

COLUMNS = ["day", "hour", "temperature_c", "holiday"]
TARGET = "demand_mwh"
LAGS = (24, 48, 168, 336)
WEEK = 168
FIRST = max(LAGS) + 24  # the first hour with every lag and a level
LAND_USE = ("offices", "residential", "industry", "campus")
# hour, weekday, holiday and temperature (at t and a week before), lags, level, land use
WIDTH = 4 + 7 + 4 + len(LAGS) + 1 + len(LAND_USE)
WEEK_AGO = 4 + 7 + 4 + LAGS.index(168)  # the column of the demand a week before


@dataclass(frozen=True)
class Horizon(Dataset):
    """Held-out hours: features and targets as trained on, each hour's level (to get back to MWh),
    its demand and the seasonal naive forecast, in MWh."""

    level: np.ndarray = field(kw_only=True)
    demand: np.ndarray = field(kw_only=True)
    naive: np.ndarray = field(kw_only=True)


def features(
    day: np.ndarray, hour: np.ndarray, temperature: np.ndarray, holiday: np.ndarray, load: np.ndarray, land_use: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, level) for every hour from ``FIRST`` on: what is known a day ahead, relative to the level."""
    t = np.arange(FIRST, len(load))
    csum = np.concatenate([[0.0], np.cumsum(load)])
    level = (csum[t - 24 + 1] - csum[t - 24 + 1 - WEEK]) / WEEK  # the week up to t-24
    angle = 2 * np.pi * hour[t] / 24
    weekday = np.eye(7)[day[t] % 7]
    x = np.column_stack(
        [
            np.sin(angle),
            np.cos(angle),
            np.sin(2 * angle),
            np.cos(2 * angle),
            weekday,
            holiday[t],
            holiday[t - WEEK],
            (temperature[t] - 12.0) / 8.0,
            (temperature[t - WEEK] - 12.0) / 8.0,
            *(load[t - lag] / level - 1.0 for lag in LAGS),
            (np.log(level) - 4.0) / 1.0,
            np.tile(np.eye(len(LAND_USE))[LAND_USE.index(land_use)], (len(t), 1)),
        ]
    )
    return x.astype(np.float32), (load[t] / level - 1.0).astype(np.float32), level


def data(spec: DataSpec, ctx: AppContext) -> LocalData:
    """This district's ``demand.csv``: every hour but the last ``eval_weeks`` weeks to train on."""
    path = spec.require_path() / "demand.csv"
    table = load_table(path, features=COLUMNS, target=TARGET, task="regression")
    day, hour = table.x[:, 0].astype(np.int64), table.x[:, 1].astype(np.int64)
    clock = day * 24 + hour
    if np.any(np.diff(clock) != 1):
        raise DataError(f"{path}: rows must be consecutive hours (row {int(np.argmax(np.diff(clock) != 1)) + 3})")
    load = table.y.astype(np.float64)
    land_use = str(spec.options.get("land_use", ""))
    if land_use not in LAND_USE:
        raise DataError(f"{spec.source}: land_use must be one of {', '.join(LAND_USE)}, got {land_use!r}")
    x, y, level = features(day, hour, table.x[:, 2].astype(np.float64), table.x[:, 3], load, land_use)
    held = int(ctx.config.get("eval_weeks", 2)) * WEEK
    if len(y) <= held:
        raise DataError(f"{path}: {len(load)} hours; needs more than {FIRST + held} (lags, level, held-out weeks)")
    naive = load[FIRST - WEEK : len(load) - WEEK]  # the same hour a week before
    train = Dataset("demand", x[:-held], y[:-held], 0)
    held_out = Horizon("demand", x[-held:], y[-held:], 0, level=level[-held:], demand=load[-held:], naive=naive[-held:])
    return LocalData(train=train, eval=held_out, files=[path])


class SeasonalResidual(nn.Module):
    """The seasonal naive forecast (the same hour a week before) plus a learned correction: the
    correction's last layer starts at zero, so training starts from the naive forecast."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(width, hidden), nn.ReLU()] if hidden else []
        head = nn.Linear(hidden or width, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.correction = nn.Sequential(*layers, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x[:, WEEK_AGO] + self.correction(x).squeeze(-1)
        return out


def model(ctx: AppContext) -> nn.Module:
    return SeasonalResidual(WIDTH, int(ctx.config.get("hidden", 0)))


@torch.no_grad()
def forecast(m: nn.Module, h: Horizon) -> np.ndarray:
    """The model's forecast of every held-out hour, in MWh."""
    m.eval()
    relative: np.ndarray = m(torch.from_numpy(h.x)).double().numpy()
    mwh: np.ndarray = (relative + 1.0) * h.level
    return mwh


def errors(actual: np.ndarray, predicted: np.ndarray, naive: np.ndarray) -> dict[str, float]:
    """MAE and RMSE of ``predicted``, the seasonal naive MAE and the forecast's skill over it."""
    mae = float(np.abs(predicted - actual).mean())
    naive_mae = float(np.abs(naive - actual).mean())
    return {
        "mae": mae,
        "rmse": float(np.sqrt(((predicted - actual) ** 2).mean())),
        "naive_mae": naive_mae,
        "skill": 1.0 - mae / naive_mae,
    }


def evaluate(m: nn.Module, d: TrainData, ctx: AppContext) -> dict[str, float]:
    if not isinstance(d, Horizon):
        raise AppError("the districts' app evaluates its own held-out hours")
    predicted = forecast(m, d)
    relative = float(np.mean(((predicted - d.demand) / d.level) ** 2))  # the training loss, on held-out hours
    return {"loss": relative, **errors(d.demand, predicted, d.naive), "num_examples": float(len(d))}


app = App(model=model, data=data, evaluate=evaluate)
