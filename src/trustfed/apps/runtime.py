"""The one place a federation is assembled from its config and its app.

Simulation, ``trustfed server``, ``trustfed client`` and the demo all build their model, trainers,
data and strategy here. Without ``[app]`` the built-in app (:mod:`trustfed.apps.builtin`) runs, so
every path goes through the same seam.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustfed.app import loop
from trustfed.app.api import App, AppContext, DataSpec, LocalData
from trustfed.app.loading import AppIdentity, app_identity, load_app
from trustfed.app.trainer import AppTrainer, exchanged_state, load_exchanged
from trustfed.apps.builtin import builtin_app, builtin_identity, federation_data
from trustfed.apps.builtin_parts import build_trainer, model_factory, train_config
from trustfed.apps.private import AppDPSGDTrainer
from trustfed.config import FederationConfig, participant_ids
from trustfed.core.aggregator import available_aggregators, register_aggregator, registered_factory
from trustfed.core.codec import ParamSpec, flatten
from trustfed.core.history_guard import HistoryGuard, SuspensionRule
from trustfed.core.strategy import STRATEGIES, FedAvg, FedOpt, FedProx, Strategy
from trustfed.data.datasets import Dataset as ArrayDataset
from trustfed.data.manifest import data_manifest, manifest_hash
from trustfed.errors import AppError, DataError, TrustFedError
from trustfed.models.trainer import Trainer
from trustfed.privacy.budget_state import BudgetStateFile
from trustfed.privacy.dpsgd import CentralBudgetTrainer
from trustfed.privacy.wiring import build_central_strategy, build_private_trainer

EvaluateFn = Callable[[int, torch.Tensor], dict[str, float]]


class Runtime:
    """A federation's app, bound to its config: what every process builds its part from."""

    def __init__(self, cfg: FederationConfig) -> None:
        self.cfg = cfg
        self.builtin = cfg.app is None
        self._simulated: dict[str, LocalData] = {}
        if cfg.app is None:
            self.app: App = builtin_app(cfg)
        else:
            self.app = load_app(cfg.app.target, cfg.app.path)
            _register_aggregators(self.app)

    @cached_property
    def identity(self) -> AppIdentity:
        if self.cfg.app is None:
            return builtin_identity(self.cfg)
        return app_identity(self.cfg.app.target, self.cfg.app.path, self.cfg.app.config)

    def context(self, participant_id: str | None = None) -> AppContext:
        config: Mapping[str, Any] = self.cfg.app.config if self.cfg.app is not None else {}
        return AppContext(config, self.cfg.federation.seed, participant_id)

    # ------------------------------------------------------------------ model
    def model_factory(self) -> Callable[[], nn.Module]:
        """A factory of the app's model, seeded: every process builds the same initial parameters."""
        if self.builtin:
            data = federation_data(self.cfg)
            return model_factory(self.cfg, data.train.input_shape, data.train.num_classes)
        app, ctx, seed = self.app, self.context(), self.cfg.federation.seed

        def make() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                try:
                    model = app.model(ctx)
                except TrustFedError:
                    raise
                except Exception as exc:
                    raise AppError(f"the app's model function raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(model, nn.Module):
                raise AppError(f"the app's model function returned a {type(model).__name__}, not a torch.nn.Module")
            return model

        return make

    @cached_property
    def initial(self) -> tuple[torch.Tensor, ParamSpec]:
        """The initial global parameters and their spec."""
        return flatten(exchanged_state(self.app, self.model_factory()()))

    @property
    def spec(self) -> ParamSpec:
        return self.initial[1]

    # ------------------------------------------------------------------ data
    def simulated_data_spec(self, pid: str) -> DataSpec:
        """A virtual participant's ``[data]``: its ``[simulation.data.<id>]`` section, else its partition."""
        ids = participant_ids(self.cfg.federation.participants)
        section = dict(self.cfg.simulation.data.get(pid, {}))
        if not section:
            section = {"partition": ids.index(pid), "partitions": len(ids), "participant": pid}
        path = section.pop("path", None)
        return DataSpec(Path(path) if path is not None else None, section, f"simulation.data.{pid}")

    def local_data(self, spec: DataSpec, pid: str) -> LocalData:
        """Call the app's data loader for ``pid`` (its errors name the participant and its [data])."""
        try:
            got = self.app.data(spec, self.context(pid))
        except TrustFedError:
            raise
        except Exception as exc:
            raise DataError(
                f"participant {pid}: the app's data loader raised {type(exc).__name__} reading {spec.source}: {exc}"
            ) from exc
        if not isinstance(got, LocalData):
            raise AppError(
                f"participant {pid}: the app's data loader must return trustfed.app.LocalData, got {type(got).__name__}"
            )
        return got

    def data_manifest(self, spec: DataSpec, local: LocalData) -> dict[str, Any]:
        """What identifies the participant's data without revealing it: its files' names, sizes and hashes
        (or, for data in memory, a hash of its arrays)."""
        files = list(local.files) if local.files is not None else ([spec.path] if spec.path is not None else [])
        if files:
            return data_manifest(files, root=spec.path if spec.path is not None and spec.path.is_dir() else None)
        train = local.train
        if isinstance(train, ArrayDataset):
            h = hashlib.sha256()
            for arr in (train.x, train.y):
                h.update(str(arr.dtype).encode() + str(arr.shape).encode())
                h.update(memoryview(arr.tobytes()))
            return {"in_memory": {"name": train.name, "examples": len(train), "sha256": h.hexdigest()}}
        return {"in_memory": {"type": type(train).__name__, "examples": loop.num_examples(train)}}

    def provenance(self, spec: DataSpec, local: LocalData) -> dict[str, str]:
        return {"app_sha256": self.identity.code_sha256, "data_sha256": manifest_hash(self.data_manifest(spec, local))}

    # ------------------------------------------------------------------ training
    def loop_settings(self) -> loop.LoopSettings:
        t = self.cfg.training
        base = train_config(self.cfg)  # the built-in app's local-training settings (FedProx's mu included)
        return loop.LoopSettings(**asdict(base), loss=t.loss, optimizer=t.optimizer, metrics=tuple(t.metric_names()))

    def trainer(self, pid: str, local: LocalData, *, budget_state_dir: Path | None = None) -> Trainer:
        """Participant ``pid``'s trainer over its local data (with ``[privacy]``: DP-SGD or a budget guard)."""
        cfg = self.cfg
        if self.builtin:
            return build_trainer(cfg, federation_data(cfg), pid, budget_state_dir=budget_state_dir, spec=self.spec)
        factory = self.model_factory()
        p = cfg.privacy
        state = BudgetStateFile.in_dir(budget_state_dir, pid) if budget_state_dir is not None else None
        if p.mode == "local" and self.app.example_loss is not None:  # DP-SGD over the app's per-example loss
            return AppDPSGDTrainer(
                pid,
                self.app,
                self.context(pid),
                factory,
                self.spec,
                local,
                self.loop_settings(),
                cfg.federation.seed,
                p,
                evaluate_every=cfg.training.evaluate_every,
                budget_state=state,
            )
        if p.mode == "local":
            if (
                not isinstance(local.train, ArrayDataset)
                or self.app.train is not None
                or cfg.training.loss != "cross_entropy"
            ):
                raise AppError(
                    f"participant {pid}: privacy.mode = 'local' (DP-SGD) clips per-example gradients of the built-in "
                    "cross-entropy loop: the app must return its training data as trustfed arrays "
                    "(trustfed.data.datasets.Dataset) and leave train to trustfed, or declare its per-example "
                    "loss (App(example_loss=...))"
                )

            return build_private_trainer(
                p,
                pid,
                factory,
                self.spec,
                local.train,
                train_config(cfg),
                cfg.federation.seed,
                budget_state_dir=budget_state_dir,
            )
        trainer: Trainer = AppTrainer(
            pid,
            self.app,
            self.context(pid),
            factory,
            self.spec,
            local,
            self.loop_settings(),
            cfg.federation.seed,
            cfg.training.evaluate_every,
        )
        if p.mode == "central":
            budget, delta = p.budget_for(pid)
            trainer = CentralBudgetTrainer(trainer, budget, delta, p.accountant, budget_state=state)
        return trainer

    def simulated_local_data(self, pid: str) -> LocalData:
        """A virtual participant's data (loaded once per process)."""
        if pid not in self._simulated:
            self._simulated[pid] = self.local_data(self.simulated_data_spec(pid), pid)
        return self._simulated[pid]

    def simulated_trainer(self, pid: str, *, budget_state_dir: Path | None = None) -> Trainer:
        return self.trainer(pid, self.simulated_local_data(pid), budget_state_dir=budget_state_dir)

    # ------------------------------------------------------------------ coordinator
    def evaluate_fn(self) -> EvaluateFn | None:
        """The app's server-side evaluation, or None when the coordinator holds no data."""
        if self.app.server_evaluate is None:
            return None
        hook, app = self.app.server_evaluate, self.app
        model = self.model_factory()()
        spec, ctx = self.spec, self.context()

        def evaluate_fn(rnd: int, params: torch.Tensor) -> dict[str, float]:
            load_exchanged(app, model, params, spec)
            model.eval()
            try:
                got = hook(model, ctx)
            except TrustFedError:
                raise
            except Exception as exc:
                raise AppError(f"the app's server_evaluate raised {type(exc).__name__}: {exc}") from exc
            return {str(k): float(v) for k, v in got.items()}

        return evaluate_fn

    def base_strategy(self, evaluate_fn: EvaluateFn | None) -> FedAvg:
        """The ``[strategy]`` without central DP (built-in or the app's own by name)."""
        s = self.cfg.strategy
        common: dict[str, Any] = {
            "fraction_fit": s.fraction_fit,
            "min_participants": s.min_participants,
            "aggregator": s.aggregator,
            "aggregator_params": dict(s.aggregator_params),
            "evaluate_fn": evaluate_fn,
            "seed": self.cfg.federation.seed,
        }
        if s.name in self.app.strategies:
            made = self.app.strategies[s.name](**common)
            if not isinstance(made, FedAvg):
                raise AppError(
                    f"the app's strategy {s.name!r} must build a trustfed FedAvg subclass, got {type(made).__name__}"
                )
            return made
        cls = STRATEGIES.get(s.name)
        if cls is None:
            raise AppError(f"unknown strategy {s.name!r}: neither built in nor registered by the app")
        if issubclass(cls, FedOpt):
            return cls(
                server_lr=s.server_lr,
                beta1=s.beta1,
                beta2=s.beta2,
                tau=s.tau,
                convention=s.fedopt_convention,
                **common,
            )
        if cls is FedProx:
            return FedProx(proximal_mu=s.proximal_mu, **common)
        return cls(**common)

    def strategy(self, evaluate_fn: EvaluateFn | None) -> Strategy:
        inner = self.base_strategy(evaluate_fn)
        sus = self.cfg.strategy.suspension
        if sus.enabled:  # the config refuses it with central DP, secure aggregation and the enclave
            rule = SuspensionRule(sus.min_cosine, sus.rounds, sus.min_consistency, sus.reference, sus.trim)
            return HistoryGuard(inner, rule)
        if self.cfg.privacy.mode == "central":
            return build_central_strategy(self.cfg.privacy, inner, self.cfg.federation.seed)
        return inner


def _register_aggregators(app: App) -> None:
    for name, factory in app.aggregators.items():
        if registered_factory(name) is factory:
            continue
        if name in available_aggregators():
            raise AppError(f"the app registers aggregator {name!r}, which is already a built-in aggregator's name")
        register_aggregator(name)(factory)
