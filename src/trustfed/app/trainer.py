"""A participant's trainer for an app: the app's own train/evaluate hooks or the built-in loop.

Before training a round it scores the model it received on its held-out data (federated
evaluation, every ``evaluate_every`` rounds): the ``eval_*`` metrics travel with its update, inside
the commitment it signs, so the coordinator's example-weighted figure can be re-checked from the log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import Any

import torch
from torch import nn

from trustfed.app import loop
from trustfed.app.api import App, AppContext, LocalData, TrainContext, TrainData
from trustfed.core.codec import ParamSpec, flatten, load_vector, unflatten
from trustfed.core.evaluation import EVAL_PREFIX
from trustfed.core.strategy import RoundPlan, Update
from trustfed.errors import AppError, TrustFedError
from trustfed.models.trainer import round_seed, train_config_from_plan
from trustfed.models.training import TrainConfig


def _call_hook(pid: str, hook: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except TrustFedError:
        raise
    except Exception as exc:
        raise AppError(f"participant {pid}: the app's {hook} function raised {type(exc).__name__}: {exc}") from exc


def _floats(pid: str, hook: str, got: Any) -> dict[str, float]:
    if not isinstance(got, Mapping):
        raise AppError(
            f"participant {pid}: the app's {hook} function must return a dict of metrics, got {type(got).__name__}"
        )
    try:
        return {str(k): float(v) for k, v in got.items()}
    except (TypeError, ValueError) as exc:
        raise AppError(f"participant {pid}: the app's {hook} function returned a non-numeric metric: {exc}") from None


def exchanged_state(app: App, model: nn.Module) -> Mapping[str, torch.Tensor]:
    """The state that travels: the app's ``exchange`` selection, or the whole state dict."""
    if app.exchange is None:
        return model.state_dict()
    state = app.exchange(model)
    if not state:
        raise AppError("the app's exchange function selected no tensors")
    return state


def load_exchanged(app: App, model: nn.Module, vector: torch.Tensor, spec: ParamSpec) -> None:
    """Load the travelling part of the state into ``model`` (the rest stays as it is)."""
    if app.exchange is None:
        load_vector(model, vector, spec)
        return
    result = model.load_state_dict(unflatten(vector, spec), strict=False)
    missing = {t.name for t in spec.tensors} & set(result.missing_keys)
    if result.unexpected_keys or missing:
        raise AppError(
            f"the exchanged state does not fit the model: unexpected {result.unexpected_keys[:3]}, missing {sorted(missing)[:3]}"
        )


class AppTrainer:
    """Implements :class:`trustfed.models.trainer.Trainer` for an app's model and local data."""

    def __init__(
        self,
        participant_id: str,
        app: App,
        ctx: AppContext,
        model_factory: Callable[[], nn.Module],
        spec: ParamSpec,
        data: LocalData,
        settings: loop.LoopSettings,
        seed: int,
        evaluate_every: int = 1,
    ) -> None:
        self.participant_id = participant_id
        self.app = app
        self.ctx = ctx
        self.model = model_factory()
        self.spec = spec
        self.data = data
        self.settings = settings
        self.seed = seed
        self.evaluate_every = evaluate_every
        self.num_examples = loop.num_examples(data.train)
        if self.num_examples <= 0:
            raise AppError(f"participant {participant_id}: the app's data loader returned no training examples")

    def round_settings(self, plan: RoundPlan) -> loop.LoopSettings:
        """This round's settings: the coordinator's per-round overrides over the configured ones."""
        c = train_config_from_plan(self.settings, plan)
        return replace(self.settings, **{f.name: getattr(c, f.name) for f in fields(TrainConfig)})

    def _score(self, data: TrainData) -> dict[str, float]:
        if self.app.evaluate is not None:
            got = _floats(
                self.participant_id,
                "evaluate",
                _call_hook(self.participant_id, "evaluate", self.app.evaluate, self.model, data, self.ctx),
            )
            got.setdefault("num_examples", float(loop.num_examples(data)))
            return got
        return loop.evaluate(self.model, data, self.settings.loss, self.settings.metrics)

    def federated_evaluation(self, plan: RoundPlan) -> dict[str, float]:
        """The ``eval_*`` scores of the model just received on the held-out data (every ``evaluate_every`` rounds)."""
        k = self.evaluate_every
        if k > 0 and self.data.eval is not None and (plan.round - 1) % k == 0:
            return {EVAL_PREFIX + name: v for name, v in self._score(self.data.eval).items()}
        return {}

    def update(self, plan: RoundPlan, metrics: dict[str, float]) -> Update:
        """The update to send: the exchanged state after training, refused when it is not finite."""
        vec, _ = flatten(exchanged_state(self.app, self.model))
        if not bool(torch.isfinite(vec).all()):
            raise AppError(
                f"participant {self.participant_id}: round {plan.round}'s training produced non-finite parameters"
            )
        return Update(self.participant_id, vec, self.num_examples, metrics)

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        load_exchanged(self.app, self.model, params, self.spec)
        metrics = self.federated_evaluation(plan)
        s = self.round_settings(plan)
        seed = round_seed(self.seed, plan.round, self.participant_id)
        torch.manual_seed(seed)  # dropout and other randomness inside the app's model
        if self.app.train is not None:
            tctx = TrainContext(plan.round, seed, s.epochs, s.batch_size, s.lr, self.participant_id, self.ctx)
            self.model.train()
            metrics.update(
                _floats(
                    self.participant_id,
                    "train",
                    _call_hook(self.participant_id, "train", self.app.train, self.model, self.data.train, tctx),
                )
            )
        else:
            metrics.update(loop.train(self.model, self.data.train, s, seed))
        return self.update(plan, metrics)

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        load_exchanged(self.app, self.model, params, self.spec)
        return self._score(self.data.eval if self.data.eval is not None else self.data.train)
