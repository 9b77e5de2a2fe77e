"""DP-SGD for any app that declares a per-example loss (``App.example_loss``), such as LoRA adapters.

The app keeps its own model, data and evaluation; trustfed's loop replaces its ``train`` under
``[privacy] mode = "local"``: Poisson-sampled batches of its training data (each example in a batch
with probability q), each example's gradient of the *trainable* parameters clipped to
``max_grad_norm`` (a frozen base model and LoRA's frozen A take no part), Gaussian noise of std
``noise_multiplier * max_grad_norm``, the optimiser of ``[training]``. The participant's budget is
checked before any data is touched and its spend recorded as the built-in DP-SGD trainer records
it (the ``dp_*`` metrics that ``privacy.jsonl``, the audit log and ``trustfed audit verify`` read).

What the guarantee covers: the training data. The federated evaluation (``eval_*`` scores of the
received model on the held-out data) travels as it does without privacy; it is not noised.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate
from torch.utils.data import Dataset as TorchDataset

from trustfed.app import loop
from trustfed.app.api import App, AppContext, LocalData
from trustfed.app.trainer import AppTrainer, exchanged_state, load_exchanged
from trustfed.core.codec import ParamSpec
from trustfed.core.strategy import RoundPlan, Update
from trustfed.data.datasets import Dataset as ArrayDataset
from trustfed.errors import AppError, TrustFedError
from trustfed.models.trainer import round_seed
from trustfed.privacy.accounting import GaussianSteps, PrivacyError
from trustfed.privacy.budget import BudgetGuard
from trustfed.privacy.budget_state import BudgetStateFile
from trustfed.privacy.dpsgd import dp_sgd_example_step, local_event, poisson_sample
from trustfed.privacy.per_sample import trainable_parameters
from trustfed.privacy.settings import PrivacySettings

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class AppDPSGDTrainer(AppTrainer):
    """A participant that trains an app's model with DP-SGD over its ``example_loss`` and enforces
    its own (epsilon, delta) budget."""

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
        privacy: PrivacySettings,
        *,
        evaluate_every: int = 1,
        budget_state: BudgetStateFile | None = None,
    ) -> None:
        if app.example_loss is None:
            raise AppError(f"participant {participant_id}: DP-SGD over an app needs its example_loss function")
        if isinstance(data.train, DataLoader):
            raise AppError(
                f"participant {participant_id}: privacy.mode = 'local' samples the training examples itself; "
                "the app's data loader must return a map-style Dataset, not a DataLoader"
            )
        super().__init__(participant_id, app, ctx, model_factory, spec, data, settings, seed, evaluate_every)
        if not privacy.noise_multiplier > 0:
            raise PrivacyError(f"participant {participant_id}: DP-SGD needs noise_multiplier > 0")
        self.example_loss = app.example_loss
        self.privacy = privacy
        budget, delta = privacy.budget_for(participant_id)
        self.guard = BudgetGuard(participant_id, budget, delta, privacy.accountant, state=budget_state)
        if not trainable_parameters(self.model):
            raise AppError(f"participant {participant_id}: the app's model has no trainable parameters")
        mixing = [n for n, m in self.model.named_modules() if isinstance(m, _BATCH_NORMS)]
        if mixing:
            raise AppError(
                f"participant {participant_id}: {mixing[0]!r} is a BatchNorm, which mixes the examples of a batch, "
                "so no example's gradient is its own; use GroupNorm or LayerNorm for DP-SGD"
            )

    def plan_event(self, s: loop.LoopSettings) -> GaussianSteps:
        return local_event(
            self.privacy.noise_multiplier, self.privacy.sample_rate, s.batch_size, self.num_examples, s.epochs
        )

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        s = self.round_settings(plan)
        event = self.plan_event(s)
        eps_after = self.guard.admit(plan.round, event)  # raises BudgetExhausted before any data is touched
        load_exchanged(self.app, self.model, params, self.spec)
        metrics = self.federated_evaluation(plan)
        seed = round_seed(self.seed, plan.round, self.participant_id)
        torch.manual_seed(seed)  # dropout and other randomness inside the app's model
        before = {k: v.detach().clone() for k, v in exchanged_state(self.app, self.model).items()}
        metrics.update(self._train(s, event, seed))
        self._check_untouched(before)
        self.guard.record(event, plan.round)
        metrics.update(self.guard.metrics(event, eps_after))
        return self.update(plan, metrics)

    def _batch(self, idx: torch.Tensor) -> Any:
        train = self.data.train
        if isinstance(train, ArrayDataset):
            i = idx.numpy()
            return torch.from_numpy(train.x[i]), torch.from_numpy(train.y[i])
        assert isinstance(train, TorchDataset)  # a DataLoader is refused when the trainer is built
        return default_collate([train[int(i)] for i in idx])

    def _losses(self, batch: Any) -> torch.Tensor:
        assert self.example_loss is not None
        try:
            got = self.example_loss(self.model, batch)
        except TrustFedError:
            raise
        except Exception as exc:
            raise AppError(
                f"participant {self.participant_id}: the app's example_loss raised {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(got, torch.Tensor) or got.dim() != 1:
            raise AppError(
                f"participant {self.participant_id}: the app's example_loss must return one loss per example "
                f"(a 1-D tensor), got {type(got).__name__} {tuple(getattr(got, 'shape', ()))}"
            )
        return got

    def _train(self, s: loop.LoopSettings, event: GaussianSteps, seed: int) -> dict[str, float]:
        self.model.train()
        sampler = torch.Generator().manual_seed(seed)
        secure = self.privacy.secure_noise
        noise = torch.Generator().manual_seed(secrets.randbits(63) if secure else seed ^ 0x5EED)
        opt = loop.make_optimizer(self.model, s)  # over the trainable parameters
        n, clip = self.num_examples, self.privacy.max_grad_norm
        total, seen, clipped = 0.0, 0, 0
        for _ in range(event.steps):
            idx = poisson_sample(n, event.sample_rate, sampler)
            batch = self._batch(idx) if len(idx) else None
            cg = dp_sgd_example_step(
                self.model,
                opt,
                self._losses,
                batch,
                len(idx),
                max_grad_norm=clip,
                noise_multiplier=self.privacy.noise_multiplier,
                expected_batch_size=event.sample_rate * n,
                generator=noise,
            )
            total += cg.loss
            seen += len(idx)
            clipped += int((cg.norms > clip).sum())
        if not torch.isfinite(torch.tensor(total)):
            raise AppError(f"participant {self.participant_id}: the DP-SGD training loss became {total}")
        return {
            "train_loss": total / max(seen, 1),
            "dp_clipped_fraction": clipped / max(seen, 1),
            "dp_max_grad_norm": clip,
        }

    def _check_untouched(self, before: dict[str, torch.Tensor]) -> None:
        """Fail closed: an exchanged tensor that is no trainable parameter (a BatchNorm running statistic,
        say) must not have changed in training, or it would carry the data out without noise."""
        trained = {id(p) for p in trainable_parameters(self.model)}
        params = dict(self.model.named_parameters())
        for name, now in exchanged_state(self.app, self.model).items():
            p = params.get(name)
            if (p is None or id(p) not in trained) and not torch.equal(before[name], now):
                raise AppError(
                    f"participant {self.participant_id}: training changed {name!r}, which travels but is not a "
                    "trainable parameter (a running statistic?); DP-SGD cannot protect it: exchange parameters only"
                )
