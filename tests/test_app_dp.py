"""DP-SGD for any app that declares ``example_loss``: its own data (a torch Dataset), its own model,
trustfed's clipping, noise and budget; a travelling tensor that training changes outside DP-SGD is refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from trustfed.app import App, AppContext, DataSpec, LocalData
from trustfed.app.loop import LoopSettings
from trustfed.apps.private import AppDPSGDTrainer
from trustfed.core.codec import flatten, unflatten
from trustfed.core.strategy import RoundPlan
from trustfed.errors import AppError
from trustfed.privacy.accounting import GaussianSteps, epsilon
from trustfed.privacy.settings import PrivacySettings


def _data(n: int = 64) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=gen)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _per_example_ce(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    out: torch.Tensor = nn.functional.cross_entropy(model(x), y, reduction="none")
    return out


def _trainer(make: Any, **privacy: Any) -> tuple[AppDPSGDTrainer, torch.Tensor]:
    def model(ctx: AppContext) -> nn.Module:
        torch.manual_seed(0)
        m: nn.Module = make()
        return m

    def data(spec: DataSpec, ctx: AppContext) -> LocalData:
        return LocalData(train=_data(), eval=_data(16))

    app = App(model=model, data=data, example_loss=_per_example_ce)
    ctx = AppContext({}, 0, "p000")
    params, spec = flatten(model(ctx).state_dict())
    s = PrivacySettings(mode="local", noise_multiplier=1.0, max_grad_norm=0.5, **privacy)
    settings = LoopSettings(1, 16, 0.1, 0.0)
    local = data(DataSpec(None), ctx)
    return AppDPSGDTrainer("p000", app, ctx, lambda: model(ctx), spec, local, settings, 0, s), params


def test_any_app_with_a_per_example_loss_trains_with_dp_sgd_within_its_budget() -> None:
    def mlp() -> nn.Module:
        m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
        m[0].requires_grad_(False)  # a frozen first layer: it must not move
        return m

    trainer, params = _trainer(mlp, budget_epsilon=100.0)
    upd = trainer.fit(params, RoundPlan(1, ("p000",), {}))
    event = GaussianSteps(1.0, 16 / 64, 4)  # q = batch / examples, 1/q steps
    assert upd.metrics["dp_epsilon"] == pytest.approx(epsilon([event], 1e-5))
    assert upd.metrics["dp_sample_rate"] == 0.25 and upd.metrics["dp_steps"] == 4
    assert upd.metrics["dp_budget_epsilon"] == 100.0 and "eval_loss" in upd.metrics
    before, after = unflatten(params, trainer.spec), unflatten(upd.params, trainer.spec)
    assert torch.equal(before["0.weight"], after["0.weight"]) and torch.equal(before["0.bias"], after["0.bias"])
    assert not torch.equal(before["2.weight"], after["2.weight"])


class _Counting(nn.Module):
    """A linear layer that counts its calls in a buffer: state that training changes outside DP-SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out: torch.Tensor = self.linear(x)
        return out


def test_a_travelling_buffer_that_training_changes_is_refused() -> None:
    trainer, params = _trainer(_Counting)
    with pytest.raises(AppError, match=r"training changed 'calls'.*DP-SGD cannot protect it"):
        trainer.fit(params, RoundPlan(1, ("p000",), {}))


def test_batchnorm_is_refused() -> None:
    with pytest.raises(AppError, match=r"'1' is a BatchNorm, which mixes the examples"):
        _trainer(lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)))
