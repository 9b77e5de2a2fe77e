"""The built-in app's parts: dataset, partitions, reference model and trainers from a config.

Everything is derived from the config and its seed, so any process (a multiprocess worker,
a gRPC participant) can rebuild exactly its own share without receiving data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from trustfed.attacks.trainers import IdleTrainer
from trustfed.config import FederationConfig, participant_ids
from trustfed.core.codec import ParamSpec, flatten
from trustfed.data.datasets import Dataset, load_dataset, train_test_split
from trustfed.data.partition import partition
from trustfed.distributed.participant import DDPTrainer
from trustfed.errors import ConfigError, ConfigProblem
from trustfed.models.reference import build_model
from trustfed.models.trainer import LocalTrainer, Trainer
from trustfed.models.training import TrainConfig
from trustfed.privacy.wiring import build_private_trainer


@dataclass
class FederationData:
    train: Dataset
    test: Dataset
    shards: dict[str, Dataset]


def build_data(cfg: FederationConfig) -> FederationData:
    seed = cfg.federation.seed
    ds = load_dataset(cfg.data.dataset, cfg.data.path, seed)
    train, test = train_test_split(ds, cfg.data.test_fraction, seed)
    p = cfg.data.partition
    params: dict[str, float] = {}
    if p.kind == "dirichlet":
        params = {"alpha": p.alpha, "min_size": p.min_size}
    elif p.kind == "shards":
        params = {"shards_per_participant": p.shards_per_participant}
    parts = partition(p.kind, train.y, cfg.federation.participants, seed, **params)
    ids = participant_ids(cfg.federation.participants)
    return FederationData(train, test, {pid: train.subset(idx) for pid, idx in zip(ids, parts, strict=True)})


def model_factory(cfg: FederationConfig, input_shape: tuple[int, ...], num_classes: int) -> Callable[[], nn.Module]:
    m = cfg.model
    return partial(
        build_model,
        m.name,
        input_shape,
        num_classes,
        cfg.federation.seed,
        hidden=tuple(m.hidden),
        channels=tuple(m.channels),
    )


def train_config(cfg: FederationConfig) -> TrainConfig:
    t = cfg.training
    mu = cfg.strategy.proximal_mu if cfg.strategy.name == "fedprox" else 0.0
    return TrainConfig(t.local_epochs, t.batch_size, t.lr, t.momentum, t.weight_decay, mu)


def build_trainer(
    cfg: FederationConfig,
    data: FederationData,
    pid: str,
    *,
    budget_state_dir: Path | None = None,
    spec: ParamSpec | None = None,
) -> Trainer:
    """Participant ``pid``'s trainer. ``budget_state_dir``: with ``[privacy]``, where it keeps its spend
    on disk (a networked participant process); None keeps it in the trainer object only. ``spec``: the
    model's parameter spec when the caller holds it (a runtime building a hundred trainers does);
    otherwise it is read from a freshly built model."""
    if cfg.attack.kind != "none":  # malicious participants (simulation only), see trustfed.attacks
        adversary = adversarial_trainer(cfg, data, pid)
        if adversary is not None:
            return adversary
    if cfg.participant_training.applies_to(pid):  # local training across DDP workers
        return build_ddp_trainer(cfg, data.shards[pid], data.train.input_shape, data.train.num_classes, pid)
    factory = model_factory(cfg, data.train.input_shape, data.train.num_classes)
    if spec is None:
        _, spec = flatten(factory().state_dict())
    if cfg.privacy.mode != "none":
        return build_private_trainer(
            cfg.privacy,
            pid,
            factory,
            spec,
            data.shards[pid],
            train_config(cfg),
            cfg.federation.seed,
            budget_state_dir=budget_state_dir,
        )
    return LocalTrainer(pid, factory, spec, data.shards[pid], train_config(cfg), cfg.federation.seed)


def build_ddp_trainer(
    cfg: FederationConfig, data: Dataset, input_shape: tuple[int, ...], num_classes: int, pid: str
) -> DDPTrainer:
    """The trainer for participant ``pid`` when ``[participant_training]`` selects ``ddp`` for it."""
    pt = cfg.participant_training
    if cfg.privacy.mode == "local":
        # Fail closed: DP-SGD is not implemented across DDP workers, and silently training
        # without it would break the participant's privacy budget.
        raise ConfigError(
            "federation config",
            [ConfigProblem("participant_training.trainer", "ddp cannot be combined with privacy.mode = 'local'")],
        )
    desc: dict[str, Any] = {
        "name": cfg.model.name,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "seed": cfg.federation.seed,
        "hidden": list(cfg.model.hidden),
        "channels": list(cfg.model.channels),
    }
    spec = ParamSpec.from_json(_ddp_spec_json(desc))
    return DDPTrainer(
        pid,
        desc,
        spec,
        data,
        train_config(cfg),
        cfg.federation.seed,
        pt.workers,
        pt.backend,
        pt.workdir,
        persistent=pt.persistent,
    )


def _ddp_spec_json(desc: dict[str, Any]) -> str:
    return flatten(build_model(**desc).state_dict())[1].to_json()


def malicious_participants(cfg: FederationConfig) -> list[str]:
    return cfg.attack.malicious(participant_ids(cfg.federation.participants))


def adversarial_trainer(cfg: FederationConfig, data: FederationData, pid: str) -> Trainer | None:
    """The malicious trainer for ``pid``, or None when ``pid`` is honest. A malicious participant trains
    plainly (no DP: it is the attacker) on the data its attack poisons, or not at all when the attack
    does not train; what it sends is crafted from the collected updates by the simulation's transport
    (:class:`trustfed.simulation.adversary.AttackTransport`)."""
    a = cfg.attack
    bad = tuple(malicious_participants(cfg)) if a.kind != "none" else ()
    if pid not in bad:
        return None
    attack = a.build()
    factory = model_factory(cfg, data.train.input_shape, data.train.num_classes)
    _, spec = flatten(factory().state_dict())
    shard = attack.poison_own_data(data.shards[pid], a.seed * 7919 + cfg.federation.seed, pid, bad)
    honest = LocalTrainer(pid, factory, spec, shard, train_config(cfg), cfg.federation.seed)
    if not attack.trains:
        return IdleTrainer(honest, num_examples=len(data.shards[pid]))
    return honest


__all__ = [
    "FederationData",
    "adversarial_trainer",
    "build_data",
    "build_trainer",
    "malicious_participants",
    "model_factory",
    "train_config",
]
