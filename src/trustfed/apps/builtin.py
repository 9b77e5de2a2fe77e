"""The built-in datasets (``[data] dataset``) and models (``[model]``) as a federation app.

A federation file without ``[app]`` runs this app. Its data loader hands participant ``i`` its
seeded partition of the dataset (``[data.partition]``), so every process rebuilds exactly its own
share; the coordinator holds the stratified test split and evaluates on it (``server_evaluate``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from torch import nn

import trustfed
from trustfed.app.api import App, AppContext, DataSpec, LocalData
from trustfed.app.loading import AppIdentity, source_hash
from trustfed.apps.builtin_parts import FederationData, build_data, model_factory
from trustfed.config import FederationConfig
from trustfed.errors import DataError
from trustfed.models.training import evaluate

TARGET = "trustfed.apps.builtin:app"


@functools.lru_cache(maxsize=4)
def _federation_data(cfg_json: str) -> FederationData:
    return build_data(FederationConfig.model_validate_json(cfg_json))


def federation_data(cfg: FederationConfig) -> FederationData:
    """The dataset, its test split and every participant's partition (built once per process)."""
    return _federation_data(cfg.model_dump_json(include={"federation", "data"}))


def app_config(cfg: FederationConfig) -> dict[str, Any]:
    return {"data": cfg.data.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json")}


def builtin_app(cfg: FederationConfig) -> App:
    def model(ctx: AppContext) -> nn.Module:
        data = federation_data(cfg)
        return model_factory(cfg, data.train.input_shape, data.train.num_classes)()

    def data(spec: DataSpec, ctx: AppContext) -> LocalData:
        shards = federation_data(cfg).shards
        pid = str(spec.options.get("participant", ctx.participant_id))
        if pid not in shards:
            raise DataError(
                f"{spec.source}: participant {pid!r} is not one of the federation's participants "
                f"({', '.join(sorted(shards)[:5])}…); check [participant].id"
            )
        return LocalData(train=shards[pid])

    def server_evaluate(m: nn.Module, ctx: AppContext) -> dict[str, float]:
        r = evaluate(m, federation_data(cfg).test)
        return {"accuracy": r.accuracy, "loss": r.loss}

    return App(model=model, data=data, server_evaluate=server_evaluate)


def builtin_identity(cfg: FederationConfig) -> AppIdentity:
    """The built-in app's source is trustfed itself: its code hash covers the modules that load the
    datasets, build the models and train them."""
    package = Path(trustfed.__file__).resolve().parent
    names = ["apps/builtin.py", "data/datasets.py", "data/partition.py", "models/reference.py", "models/training.py"]
    digest, files = source_hash(package.parent, [package / n for n in names])
    return AppIdentity(TARGET, digest, files, app_config(cfg))
