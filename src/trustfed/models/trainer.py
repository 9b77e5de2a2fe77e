"""The Trainer seam: what a participant does with a round plan.

``fit`` trains from the global parameters and returns an :class:`Update`; ``evaluate``
scores parameters on the participant's own data. Local, DP-SGD and distributed trainers
implement the same two methods.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from trustfed.core.codec import ParamSpec, flatten, load_vector
from trustfed.core.compression import CompressionPolicy, compress_update
from trustfed.core.strategy import RoundPlan, Update
from trustfed.data.datasets import Dataset
from trustfed.models.training import TrainConfig, evaluate, train_epochs


@runtime_checkable
class Trainer(Protocol):
    participant_id: str

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update: ...

    def evaluate(self, params: torch.Tensor) -> dict[str, float]: ...


def round_seed(seed: int, rnd: int, participant_id: str) -> int:
    """A per-(run, round, participant) seed that is the same in every process."""
    digest = hashlib.sha256(f"{seed}:{rnd}:{participant_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def train_config_from_plan(base: TrainConfig, plan: RoundPlan) -> TrainConfig:
    """Per-round overrides the coordinator may send (epochs, lr, proximal_mu, ...)."""
    c = plan.config
    return TrainConfig(
        epochs=int(c.get("local_epochs", base.epochs)),
        batch_size=int(c.get("batch_size", base.batch_size)),
        lr=float(c.get("lr", base.lr)),
        momentum=float(c.get("momentum", base.momentum)),
        weight_decay=float(c.get("weight_decay", base.weight_decay)),
        proximal_mu=float(c.get("proximal_mu", base.proximal_mu)),
    )


def close_trainer(trainer: object) -> None:
    """Close a trainer and the trainers it wraps (``.inner``) that hold resources, such as a DDP
    trainer's persistent worker processes."""
    seen: set[int] = set()
    while trainer is not None and id(trainer) not in seen:
        seen.add(id(trainer))
        close = getattr(trainer, "close", None)
        if callable(close):
            close()
        trainer = getattr(trainer, "inner", None)


class LocalTrainer:
    """Plain SGD on the participant's own data, deterministic per (seed, round, participant)."""

    def __init__(
        self,
        participant_id: str,
        model_factory: Callable[[], nn.Module],
        spec: ParamSpec,
        data: Dataset,
        config: TrainConfig,
        seed: int,
    ) -> None:
        self.participant_id = participant_id
        self.model = model_factory()
        self.spec = spec
        self.data = data
        self.config = config
        self.seed = seed

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        load_vector(self.model, params, self.spec)
        cfg = train_config_from_plan(self.config, plan)
        metrics = train_epochs(self.model, self.data, cfg, round_seed(self.seed, plan.round, self.participant_id))
        vec, _ = flatten(self.model.state_dict())
        return Update(self.participant_id, vec, len(self.data), metrics)

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        load_vector(self.model, params, self.spec)
        r = evaluate(self.model, self.data)
        return {"loss": r.loss, "accuracy": r.accuracy, "num_examples": float(r.num_examples)}


class CompressingTrainer:
    """Wraps a Trainer: every update leaves compressed (``[transport] compression``), as its delta to the
    round's global model (:func:`trustfed.core.compression.compress_update`). Outermost, so it compresses
    what the participant would send anyway: after DP noise (post-processing) and any attack's crafting."""

    def __init__(self, inner: Trainer, policy: CompressionPolicy) -> None:
        self.inner = inner
        self.policy = policy
        self.participant_id = inner.participant_id

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        base = params.detach().clone()  # the inner trainer may train in place
        return compress_update(self.inner.fit(params, plan), base, self.policy)

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return self.inner.evaluate(params)
