"""DP-SGD in a participant (Abadi et al. 2016): Poisson-sampled batches, per-example clipping,
Gaussian noise, and a spend that is accounted and checked against the participant's budget.

:class:`DPSGDTrainer` implements the participant's ``Trainer`` seam (``fit`` / ``evaluate``).
The per-example clipping uses :mod:`trustfed.privacy.per_sample` (book-keeping fast path), not
Opacus' per-sample hooks, which cost 1.9x (CNN) to 104x (MLP) a plain step in
``benchmarks/privacy.py``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trustfed.core.codec import ParamSpec, flatten, load_vector
from trustfed.core.strategy import RoundPlan, Update
from trustfed.data.datasets import Dataset
from trustfed.models.trainer import Trainer, round_seed, train_config_from_plan
from trustfed.models.training import TrainConfig, evaluate
from trustfed.privacy.accounting import AccountantName, GaussianSteps, PrivacyError
from trustfed.privacy.budget import BudgetGuard
from trustfed.privacy.budget_state import BudgetStateFile
from trustfed.privacy.per_sample import (
    ClippedGrads,
    ExampleLossFn,
    LossFn,
    clipped_example_grad_sum,
    clipped_grad_sum,
    sum_cross_entropy,
    trainable_parameters,
)


def dp_sgd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator,
    loss_fn: LossFn = sum_cross_entropy,
    anchor: list[torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
) -> ClippedGrads:
    """One DP-SGD step: grad = (sum_i clip(g_i, C) + N(0, (sigma C)^2 I)) / expected_batch_size.

    ``ClippedGrads.grads`` of the result are the noisy gradients (the trainable parameters' ``.grad``).

    Dividing by the *expected* batch size (not the sampled one) keeps the sensitivity C / (qN)
    under Poisson sampling. A FedProx term, which does not depend on the data, is added after
    the noise."""
    scale = 1.0 / expected_batch_size
    return noisy_step(
        model,
        optimizer,
        lambda into: clipped_grad_sum(model, x, y, max_grad_norm, loss_fn, scale=scale, into=into),
        std=noise_multiplier * max_grad_norm * scale,
        generator=generator,
        anchor=anchor,
        proximal_mu=proximal_mu,
    )


def dp_sgd_example_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    example_loss: ExampleLossFn,
    batch: Any,
    size: int,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator,
) -> ClippedGrads:
    """:func:`dp_sgd_step` for any batch of ``size`` examples: ``example_loss(batch)`` gives one loss
    per example (``size == 0``, an empty Poisson sample, is a step on the noise alone)."""
    scale = 1.0 / expected_batch_size
    return noisy_step(
        model,
        optimizer,
        lambda into: clipped_example_grad_sum(model, example_loss, batch, size, max_grad_norm, scale=scale, into=into),
        std=noise_multiplier * max_grad_norm * scale,
        generator=generator,
    )


def noisy_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    clipped_into: Callable[[list[torch.Tensor]], ClippedGrads],
    *,
    std: float,
    generator: torch.Generator,
    anchor: list[torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
) -> ClippedGrads:
    """Draw N(0, std^2) into every trainable parameter's gradient, add the clipped sum
    (``clipped_into(noise)`` accumulates it in place), then step. Frozen parameters get nothing."""
    params = trainable_parameters(model)
    with torch.no_grad():
        # The noise is drawn first, into each parameter's .grad (reused between steps); the clipped
        # sum, already divided by the expected batch size, is then accumulated onto it.
        noise = []
        for p in params:
            g = p.grad
            if g is None or g.shape != p.shape or g.dtype != p.dtype or not g.is_contiguous():
                g = torch.empty_like(p, memory_format=torch.contiguous_format)
            noise.append(g.normal_(0.0, std, generator=generator))
    cg = clipped_into(noise)
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, noise, strict=True)):
            if anchor is not None and proximal_mu > 0:
                g += proximal_mu * (p - anchor[i])
            p.grad = g
    optimizer.step()
    return cg


def steps_per_epoch(sample_rate: float) -> int:
    """Opacus' convention: an epoch is 1/q Poisson-sampled steps."""
    return max(1, round(1.0 / sample_rate))


def local_event(
    noise_multiplier: float, sample_rate: float | None, batch_size: int, examples: int, epochs: int
) -> GaussianSteps:
    """One round of DP-SGD over ``examples``: rate ``sample_rate`` (default batch_size / examples),
    ``epochs`` epochs of 1/q steps."""
    q = sample_rate if sample_rate is not None else min(1.0, batch_size / examples)
    return GaussianSteps(noise_multiplier, q, epochs * steps_per_epoch(q))


def poisson_sample(examples: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """The indices of one Poisson-sampled batch: each example is in it with probability ``sample_rate``."""
    return (torch.rand(examples, generator=generator) < sample_rate).nonzero().flatten()


class DPSGDTrainer:
    """A participant that trains with DP-SGD and enforces its own (epsilon, delta) budget."""

    def __init__(
        self,
        participant_id: str,
        model_factory: Callable[[], nn.Module],
        spec: ParamSpec,
        data: Dataset,
        config: TrainConfig,
        seed: int,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        delta: float,
        budget_epsilon: float | None = None,
        sample_rate: float | None = None,
        accountant: AccountantName = "rdp",
        secure_noise: bool = False,
        budget_state: BudgetStateFile | None = None,
    ) -> None:
        if len(data) == 0:
            raise PrivacyError(f"participant {participant_id} has no training data")
        if not noise_multiplier > 0 or not max_grad_norm > 0:
            raise PrivacyError(f"participant {participant_id}: DP-SGD needs noise_multiplier > 0 and max_grad_norm > 0")
        self.participant_id = participant_id
        self.model = model_factory()
        self.spec = spec
        self.data = data
        self.config = config
        self.seed = seed
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.sample_rate = sample_rate
        self.secure_noise = secure_noise
        self.guard = BudgetGuard(participant_id, budget_epsilon, delta, accountant, state=budget_state)

    def plan_event(self, cfg: TrainConfig) -> GaussianSteps:
        return local_event(self.noise_multiplier, self.sample_rate, cfg.batch_size, len(self.data), cfg.epochs)

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        cfg = train_config_from_plan(self.config, plan)
        event = self.plan_event(cfg)
        eps_after = self.guard.admit(plan.round, event)  # raises BudgetExhausted before any data is touched
        load_vector(self.model, params, self.spec)
        self.model.train()
        seed = round_seed(self.seed, plan.round, self.participant_id)
        sampler = torch.Generator().manual_seed(seed)
        noise = torch.Generator().manual_seed(secrets.randbits(63) if self.secure_noise else seed ^ 0x5EED)
        trained = trainable_parameters(self.model)
        opt = torch.optim.SGD(trained, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        anchor = [p.detach().clone() for p in trained] if cfg.proximal_mu > 0 else None
        x = torch.from_numpy(self.data.x)
        y = torch.from_numpy(self.data.y)
        n = len(y)
        total, seen, clipped, examples = 0.0, 0, 0, 0
        for _ in range(event.steps):
            idx = poisson_sample(n, event.sample_rate, sampler)
            cg = dp_sgd_step(
                self.model,
                opt,
                x[idx],
                y[idx],
                max_grad_norm=self.max_grad_norm,
                noise_multiplier=self.noise_multiplier,
                expected_batch_size=event.sample_rate * n,
                generator=noise,
                anchor=anchor,
                proximal_mu=cfg.proximal_mu,
            )
            total += cg.loss
            seen += len(idx)
            clipped += int((cg.norms > self.max_grad_norm).sum())
            examples += len(idx)
        self.guard.record(event, plan.round)
        vec, _ = flatten(self.model.state_dict())
        metrics = {
            "train_loss": total / max(seen, 1),
            "dp_clipped_fraction": clipped / max(examples, 1),
            "dp_max_grad_norm": self.max_grad_norm,
            **self.guard.metrics(event, eps_after),
        }
        return Update(self.participant_id, vec, n, metrics)

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        load_vector(self.model, params, self.spec)
        r = evaluate(self.model, self.data)
        return {"loss": r.loss, "accuracy": r.accuracy, "num_examples": float(r.num_examples)}


class CentralBudgetTrainer:
    """Wraps any trainer of a federation that runs central DP (DP-FedAvg): before each round it
    checks the participant's budget against the aggregator's announced noise and sampling rate
    (``dp_central_*`` keys of the plan) and withdraws instead of overspending."""

    def __init__(
        self,
        inner: Trainer,
        budget_epsilon: float | None,
        delta: float,
        accountant: AccountantName = "rdp",
        *,
        budget_state: BudgetStateFile | None = None,
    ):
        self.inner = inner
        self.participant_id = inner.participant_id
        self.guard = BudgetGuard(inner.participant_id, budget_epsilon, delta, accountant, state=budget_state)

    @property
    def accounted_round(self) -> int:
        return self.guard.last_round

    def plan_event(self, plan: RoundPlan) -> GaussianSteps:
        c = plan.config
        if "dp_central_noise_multiplier" not in c:
            raise PrivacyError(
                f"participant {self.participant_id}: round {plan.round} plan announces no central DP noise "
                "(dp_central_noise_multiplier); refusing to train under a central-DP budget"
            )
        z = float(c["dp_central_noise_multiplier"])
        q = float(c.get("dp_central_sample_rate", 1.0))
        # With participant sampling, every round since the last one accounted counts (amplified by q);
        # without it, only the rounds this participant takes part in. A round at or before the last one
        # accounted (a new run resuming a state file) counts every round of this run so far.
        last = self.guard.last_round
        steps = (plan.round - last if plan.round > last else plan.round) if q < 1 else 1
        return GaussianSteps(z, q, steps)

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        event = self.plan_event(plan)
        eps_after = self.guard.admit(plan.round, event)
        upd = self.inner.fit(params, plan)
        self.guard.record(event, plan.round)
        return Update(
            upd.participant_id, upd.params, upd.num_examples, {**upd.metrics, **self.guard.metrics(event, eps_after)}
        )

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return self.inner.evaluate(params)
