"""Build a federation (data, partitions, model, trainers, strategy) from a config.

Everything is derived from the config and its seed, so any process (a multiprocess worker,
a gRPC participant) can rebuild exactly its own share without receiving data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from trustfed.config import FederationConfig
from trustfed.core.codec import ParamSpec, flatten, load_vector
from trustfed.core.strategy import STRATEGIES, FedAvg, FedOpt, FedProx, Strategy
from trustfed.data.datasets import Dataset, load_dataset, train_test_split
from trustfed.data.partition import partition
from trustfed.models.reference import build_model
from trustfed.models.training import TrainConfig, evaluate
from trustfed.participant.trainer import LocalTrainer, Trainer


def participant_ids(n: int) -> list[str]:
    return [f"p{i:03d}" for i in range(n)]


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
    cfg: FederationConfig, data: FederationData, pid: str, *, budget_state_dir: Path | None = None
) -> Trainer:
    """Participant ``pid``'s trainer. ``budget_state_dir``: with ``[privacy]``, where it keeps its spend
    on disk (a networked participant process); None keeps it in the trainer object only."""
    if cfg.attack.kind != "none":  # malicious participants (simulation only), see trustfed.attacks
        from trustfed.simulation.adversary import adversarial_trainer

        adversary = adversarial_trainer(cfg, data, pid)
        if adversary is not None:
            return adversary
    if cfg.participant_training.applies_to(pid):  # local training across DDP workers
        from trustfed.distributed.participant import build_ddp_trainer

        return build_ddp_trainer(cfg, data.shards[pid], data.train.input_shape, data.train.num_classes, pid)
    factory = model_factory(cfg, data.train.input_shape, data.train.num_classes)
    _, spec = flatten(factory().state_dict())
    if cfg.privacy.mode != "none":
        from trustfed.privacy.wiring import build_private_trainer

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


def make_evaluator(
    factory: Callable[[], nn.Module], spec: ParamSpec, test: Dataset
) -> Callable[[int, torch.Tensor], dict[str, float]]:
    model = factory()

    def evaluate_fn(rnd: int, params: torch.Tensor) -> dict[str, float]:
        load_vector(model, params, spec)
        r = evaluate(model, test)
        return {"accuracy": r.accuracy, "loss": r.loss}

    return evaluate_fn


def build_strategy(
    cfg: FederationConfig, evaluate_fn: Callable[[int, torch.Tensor], dict[str, float]] | None
) -> Strategy:
    inner = build_base_strategy(cfg, evaluate_fn)
    if cfg.privacy.mode == "central":
        from trustfed.privacy.wiring import build_central_strategy

        return build_central_strategy(cfg.privacy, inner, cfg.federation.seed)
    return inner


def build_base_strategy(
    cfg: FederationConfig, evaluate_fn: Callable[[int, torch.Tensor], dict[str, float]] | None
) -> FedAvg:
    """The ``[strategy]`` without central DP: what the coordinator runs when the enclave applies DP."""
    s = cfg.strategy
    common = {
        "fraction_fit": s.fraction_fit,
        "min_participants": s.min_participants,
        "aggregator": s.aggregator,
        "aggregator_params": dict(s.aggregator_params),
        "evaluate_fn": evaluate_fn,
        "seed": cfg.federation.seed,
    }
    cls = STRATEGIES[s.name]
    if issubclass(cls, FedOpt):
        return cls(server_lr=s.server_lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau, **common)  # type: ignore[arg-type]
    if cls is FedProx:
        return FedProx(proximal_mu=s.proximal_mu, **common)  # type: ignore[arg-type]
    return cls(**common)  # type: ignore[arg-type]
