"""A user's own federation app, written into a project folder by the tests: a house-price regression
(one CSV per site, a model with BatchNorm, MSE and Adam), as an organisation would write it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

APP_SOURCE = textwrap.dedent(
    '''
    """House prices: each site trains on its own CSV."""
    from __future__ import annotations

    import csv

    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from trustfed.app import App, AppContext, DataSpec, LocalData

    FEATURES = ["rooms", "area", "age", "distance"]


    def model(ctx: AppContext) -> nn.Module:
        hidden = int(ctx.config.get("hidden", 16))
        return nn.Sequential(nn.Linear(len(FEATURES), hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 1))


    def _read(path):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"{path} has no rows")
        missing = [c for c in [*FEATURES, "price"] if c not in rows[0]]
        if missing:
            raise KeyError(f"{path}: missing column {missing[0]!r}")
        x = torch.tensor([[float(r[c]) for c in FEATURES] for r in rows], dtype=torch.float32)
        y = torch.tensor([float(r["price"]) for r in rows], dtype=torch.float32)
        return TensorDataset(x, y)


    def data(spec: DataSpec, ctx: AppContext) -> LocalData:
        folder = spec.require_path()
        files = [folder / "train.csv", folder / "eval.csv"]
        return LocalData(train=_read(files[0]), eval=_read(files[1]), files=files)


    app = App(model=model, data=data)
    '''
)

FEDERATION = textwrap.dedent(
    """
    [federation]
    name = "houses"
    rounds = {rounds}
    participants = 3
    seed = 1

    [app]
    target = "{package}.app:app"

    [app.config]
    hidden = 16

    [training]
    local_epochs = 2
    batch_size = 16
    lr = 0.01
    loss = "mse"
    optimizer = "adam"
    metrics = ["mae", "rmse"]

    [strategy]
    min_participants = 3

    [simulation.data.p000]
    path = "sites/p000"
    [simulation.data.p001]
    path = "sites/p001"
    [simulation.data.p002]
    path = "sites/p002"
    """
)


def write_site_csv(path: Path, rng: np.random.Generator, n: int, shift: float) -> None:
    x = rng.normal(shift, 1.0, size=(n, 4))
    price = 2.0 * x[:, 0] + 1.5 * x[:, 1] - 0.5 * x[:, 2] - x[:, 3] + rng.normal(0, 0.1, size=n)
    lines = ["rooms,area,age,distance,price"] + [
        ",".join(f"{v:.5f}" for v in (*row, p)) for row, p in zip(x, price, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_project(root: Path, package: str, rounds: int = 4) -> Path:
    """A project folder: the app package, the federation file, and each site's own CSVs."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("", encoding="utf-8")
    (root / package / "app.py").write_text(APP_SOURCE, encoding="utf-8")
    rng = np.random.default_rng(0)
    for i in range(3):
        site = root / "sites" / f"p{i:03d}"
        site.mkdir(parents=True)
        write_site_csv(site / "train.csv", rng, 120, shift=0.3 * i)
        write_site_csv(site / "eval.csv", rng, 40, shift=0.3 * i)
    fed = root / "federation.toml"
    fed.write_text(FEDERATION.format(rounds=rounds, package=package), encoding="utf-8")
    return fed
