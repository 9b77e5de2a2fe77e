"""Pydantic models of trustfed's TOML files, and a loader that reports every problem at once.

A federation file looks like ``src/trustfed/examples/federation.toml``. Unknown keys, wrong types, missing
data folders and impossible values are all collected into one :class:`ConfigError` that names
the file, the field and what was expected.
"""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trustfed.app.loading import load_app
from trustfed.attacks.settings import AttackSettings
from trustfed.core.aggregator import available_aggregators, get_aggregator
from trustfed.core.strategy import DEFAULT_MAX_EXAMPLES, STRATEGIES
from trustfed.data.datasets import NEEDS_PATH
from trustfed.distributed.settings import ParticipantTrainingSettings
from trustfed.enclave.settings import EnclaveSection
from trustfed.errors import AggregationError, AppError, ConfigError, ConfigProblem
from trustfed.incentives.settings import IncentiveSettings
from trustfed.ledger.settings import LedgerSettings
from trustfed.privacy.settings import PrivacySettings
from trustfed.secagg.settings import SecAggSettings
from trustfed.transport.settings import TransportSettings


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FederationSection(_Section):
    name: str = "federation"
    rounds: int = Field(10, ge=1, le=100_000, description="number of federated rounds")
    participants: int = Field(5, ge=1, le=100_000, description="number of participants")
    seed: int = Field(0, ge=0)


class PartitionSection(_Section):
    kind: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (dirichlet only)")
    shards_per_participant: int = Field(2, ge=1, description="shards per participant (shards only)")
    min_size: int = Field(2, ge=1, description="smallest allowed partition (dirichlet only)")


class DataSection(_Section):
    dataset: Literal["digits", "breast_cancer", "mnist5k", "synthetic", "mnist", "cifar10"] = "digits"
    path: Path | None = Field(None, description="folder with the files (mnist, cifar10 only)")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    partition: PartitionSection = PartitionSection()


class ModelSection(_Section):
    name: Literal["mlp", "cnn"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [128], description="MLP hidden widths")
    channels: list[int] = Field(default_factory=lambda: [16, 32], description="CNN channels (two)")

    @model_validator(mode="after")
    def _sizes(self) -> ModelSection:
        if any(h < 1 for h in self.hidden):
            raise ValueError("hidden widths must be >= 1")
        if len(self.channels) != 2 or any(c < 1 for c in self.channels):
            raise ValueError("channels must be two integers >= 1")
        return self


LOSSES = ("cross_entropy", "mse", "l1", "bce")
METRICS = ("accuracy", "mse", "mae", "rmse")


class TrainingSection(_Section):
    local_epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(0.0, ge=0)
    loss: Literal["cross_entropy", "mse", "l1", "bce"] = Field(
        "cross_entropy", description="the built-in loop's loss (an app's own train function ignores it)"
    )
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    metrics: list[Literal["accuracy", "mse", "mae", "rmse"]] | None = Field(
        None, description="evaluation metrics; default: accuracy for classification losses, mae and rmse otherwise"
    )
    evaluate_every: int = Field(
        1, ge=0, le=100_000, description="federated evaluation on participants' held-out data every k rounds; 0: off"
    )

    def metric_names(self) -> list[str]:
        if self.metrics is not None:
            return list(self.metrics)
        return ["accuracy"] if self.loss in ("cross_entropy", "bce") else ["mae", "rmse"]


class AppSection(_Section):
    """The federation app: the user's own model, data loader and (optionally) training code."""

    target: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
        description="'package.module:attribute' of a trustfed.app.App",
    )
    path: Path | None = Field(None, description="folder to import the app from (default: the federation file's folder)")
    config: dict[str, Any] = Field(default_factory=dict, description="free-form values handed to the app")


class SuspensionSection(_Section):
    """``[strategy.suspension]``: suspend participants whose updates oppose the aggregate round after round
    (:class:`trustfed.core.history_guard.HistoryGuard`)."""

    enabled: bool = False
    min_cosine: float = Field(
        -0.2, ge=-1, le=1, description="suspend when the mean cosine to the aggregate over `rounds` is below this"
    )
    rounds: int = Field(3, ge=1, le=1000, description="how many of a participant's last rounds the mean is over")
    min_consistency: float = Field(
        -1.0,
        ge=-1,
        le=1,
        description="suspend when the mean cosine of its last `rounds` updates to its update before is below this"
        " (-1: off)",
    )
    reference: Literal["aggregate", "trimmed_mean"] = Field(
        "aggregate",
        description="what the opposition rule compares each update with: the round's aggregate, or the"
        " coordinate-wise trimmed mean of the updates the rule kept (which a minority cannot capture)",
    )
    trim: float = Field(0.2, ge=0, lt=0.5, description="with reference = trimmed_mean: share cut at each end")


class StrategySection(_Section):
    name: str = Field("fedavg", description="fedavg | fedprox | fedadagrad | fedadam | fedyogi, or the app's own")
    aggregator: str = "mean"
    aggregator_params: dict[str, float | int | bool | str] = Field(default_factory=dict)
    fraction_fit: float = Field(1.0, gt=0, le=1)
    min_participants: int = Field(1, ge=1)
    max_examples: int = Field(
        DEFAULT_MAX_EXAMPLES,
        ge=1,
        le=2**40,
        description="most examples one participant may declare for an update (FedAvg's weight); more is refused",
    )
    proximal_mu: float = Field(0.01, ge=0, description="FedProx only")
    server_lr: float = Field(0.1, gt=0, description="FedAdagrad/FedAdam/FedYogi only")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    fedopt_convention: Literal["reddi", "flower"] = Field(
        "reddi",
        description="FedAdagrad/FedAdam/FedYogi: 'reddi' (second moment starts at tau^2, no bias correction) or "
        "'flower' (Flower's numbers: starts at 0, FedAdam bias-corrected)",
    )
    suspension: SuspensionSection = SuspensionSection()


class SimulationSection(_Section):
    backend: Literal["inprocess", "multiprocess", "ray"] = "inprocess"
    workers: int = Field(2, ge=1, le=256, description="processes (multiprocess) or Ray actors (ray)")
    ray_address: str | None = Field(
        None,
        min_length=1,
        description="ray only: the Ray cluster to join ('auto', 'ray://head:10001'); none starts a local one",
    )
    data: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="with [app]: each virtual participant's [data] section by id (path and free keys); a participant "
        "not listed gets {partition = i, partitions = n}",
    )


TRACKING_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # switch -> module of the 'tracking' extra


class TrackingSection(_Section):
    """Experiment tracking of a run: each round's metrics, the privacy spent and the audit-log head, as
    TensorBoard event files and an MLflow run (the 'tracking' extra)."""

    tensorboard: bool = Field(False, description="write TensorBoard event files in FOLDER/tensorboard")
    mlflow: bool = Field(False, description="log an MLflow run")
    folder: Path = Field(Path("tracking"), description="relative to the run folder: event files, the MLflow store")
    tracking_uri: str | None = Field(
        None, min_length=1, description="MLflow tracking URI (default: sqlite:///FOLDER/mlflow.db in the run folder)"
    )
    experiment: str | None = Field(None, min_length=1, description="MLflow experiment (default: the federation's name)")

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.mlflow

    def problems(self) -> list[ConfigProblem]:
        """A switch that is on needs its package: said when the file is checked, not mid-run."""
        return [
            ConfigProblem(f"tracking.{switch}", f"needs the 'tracking' extra ({module} is not installed)")
            for switch, module in TRACKING_PACKAGES.items()
            if getattr(self, switch) and importlib.util.find_spec(module) is None
        ]


class FederationConfig(_Section):
    """The whole federation file."""

    federation: FederationSection = FederationSection()
    app: AppSection | None = None
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    training: TrainingSection = TrainingSection()
    strategy: StrategySection = StrategySection()
    simulation: SimulationSection = SimulationSection()
    attack: AttackSettings = AttackSettings()
    ledger: LedgerSettings = LedgerSettings()
    incentives: IncentiveSettings = IncentiveSettings()
    secagg: SecAggSettings = SecAggSettings()
    enclave: EnclaveSection = EnclaveSection()
    privacy: PrivacySettings = PrivacySettings()
    transport: TransportSettings = TransportSettings()
    participant_training: ParticipantTrainingSettings = ParticipantTrainingSettings()
    tracking: TrackingSection = TrackingSection()

    def semantic_problems(self) -> list[ConfigProblem]:
        """Checks that span fields or touch the file system."""
        out: list[ConfigProblem] = []

        d = self.data
        if self.app is None:
            if d.dataset in NEEDS_PATH and d.path is None:
                out.append(ConfigProblem("data.path", f"dataset {d.dataset!r} needs a folder with its files"))
            if d.path is not None and not d.path.is_dir():
                out.append(ConfigProblem("data.path", "folder does not exist", str(d.path)))
        n = self.federation.participants
        out += self._app_problems()
        if self.strategy.min_participants > n:
            out.append(
                ConfigProblem(
                    "strategy.min_participants",
                    f"must be <= federation.participants ({n})",
                    str(self.strategy.min_participants),
                )
            )
        app_aggregators, app_strategies = self._app_names()
        builtin = available_aggregators()
        aggregators = [*builtin, *app_aggregators]
        if self.strategy.aggregator not in aggregators:
            out.append(
                ConfigProblem(
                    "strategy.aggregator",
                    f"unknown aggregator; expected one of {', '.join(aggregators)}",
                    repr(self.strategy.aggregator),
                )
            )
        elif self.strategy.aggregator in builtin:  # built in: its parameters are checked now
            try:
                get_aggregator(self.strategy.aggregator, **self.strategy.aggregator_params)
            except (AggregationError, ValueError) as exc:
                out.append(ConfigProblem("strategy.aggregator_params", str(exc), repr(self.strategy.aggregator_params)))
        strategies = [*STRATEGIES, *app_strategies]
        if self.strategy.name not in strategies:
            out.append(
                ConfigProblem(
                    "strategy.name",
                    f"unknown strategy; expected one of {', '.join(strategies)}",
                    repr(self.strategy.name),
                )
            )
        if self.simulation.backend != "inprocess" and self.simulation.workers > n:
            out.append(ConfigProblem("simulation.workers", f"must be <= federation.participants ({n})"))
        if self.simulation.ray_address is not None and self.simulation.backend != "ray":
            out.append(ConfigProblem("simulation.ray_address", "is used by backend = 'ray' only"))
        if self.secagg.enabled:
            clash = {
                "strategy.aggregator": self.strategy.aggregator != "mean",
                "enclave.enabled": self.enclave.enabled,
                "privacy.clipping": self.privacy.mode == "central" and self.privacy.clipping == "adaptive",
                "secagg.weighted": self.privacy.mode == "central" and self.secagg.weighted,
            }
            for where, bad in clash.items():
                if bad:
                    out.append(
                        ConfigProblem(
                            where,
                            "secure aggregation gives the coordinator the sum only; this needs individual updates "
                            "(secagg runs with the mean aggregator, without the enclave; "
                            "central DP with fixed clipping and unweighted sums only, each participant clipping its own delta)",
                        )
                    )
        if self.strategy.suspension.enabled:
            clash = {
                "secagg.enabled": self.secagg.enabled,
                "enclave.enabled": self.enclave.enabled,
                "privacy.mode": self.privacy.mode == "central",
            }
            out += [
                ConfigProblem(
                    where,
                    "strategy.suspension scores each participant's update in the clear; it runs without secure "
                    "aggregation, the enclave and central DP",
                )
                for where, bad in clash.items()
                if bad
            ]
        if self.strategy.fedopt_convention != "reddi" and self.enclave.enabled:
            out.append(
                ConfigProblem(
                    "strategy.fedopt_convention",
                    "the enclave's server optimisers follow the 'reddi' convention only",
                    repr(self.strategy.fedopt_convention),
                )
            )
        if self.incentives.enabled and not self.ledger.enabled:
            out.append(ConfigProblem("incentives.enabled", "needs [ledger] enabled = true: rewards are paid on chain"))
        if self.incentives.selection == "reputation" and not self.incentives.enabled:
            out.append(ConfigProblem("incentives.selection", "'reputation' needs incentives.enabled = true"))
        if (
            self.incentives.selection == "reputation"
            and self.privacy.mode == "central"
            and self.privacy.sampling_amplification
        ):
            out.append(
                ConfigProblem(
                    "incentives.selection",
                    "central DP's sampling amplification assumes uniform sampling of participants; use "
                    "selection = 'uniform' or privacy.sampling_amplification = false",
                )
            )
        if self.incentives.enabled and self.incentives.flag_unselected and self.strategy.aggregator == "krum":
            out.append(
                ConfigProblem(
                    "incentives.flag_unselected",
                    "krum keeps a single update, so every other participant would be flagged each round; "
                    "set flag_unselected = false or use multi_krum",
                )
            )
        out += self.attack.problems()
        out += self.transport.compression_problems(secagg=self.secagg.enabled, enclave=self.enclave.enabled)
        ids = [f"p{i:03d}" for i in range(n)]
        out += self.privacy.problems(ids, self.strategy.aggregator)
        out += self.tracking.problems()
        return out

    def _app_names(self) -> tuple[list[str], list[str]]:
        """The aggregators and strategies the app registers (none without an app, or one that fails to load)."""
        if self.app is None:
            return [], []

        try:
            app = load_app(self.app.target, self.app.path)
        except AppError:
            return [], []
        return sorted(app.aggregators), sorted(app.strategies)

    def _app_problems(self) -> list[ConfigProblem]:
        if self.app is None:
            if self.simulation.data:
                return [ConfigProblem("simulation.data", "per-participant data sections need an [app]")]
            return []

        out: list[ConfigProblem] = []
        try:
            load_app(self.app.target, self.app.path)
        except AppError as exc:
            out.append(ConfigProblem("app.target", str(exc), repr(self.app.target)))
        ids = {f"p{i:03d}" for i in range(self.federation.participants)}
        for pid in sorted(set(self.simulation.data) - ids):
            out.append(ConfigProblem(f"simulation.data.{pid}", "not a participant of this federation"))
        if self.attack.kind != "none":
            out.append(ConfigProblem("attack.kind", "simulated attacks run on the built-in apps (no [app]) only"))
        if self.participant_training.trainer != "local":
            out.append(
                ConfigProblem("participant_training.trainer", "DDP participants run the built-in apps (no [app]) only")
            )
        return out


def participant_ids(n: int) -> list[str]:
    """The ids of a federation's ``n`` participants: p000, p001, ..."""
    return [f"p{i:03d}" for i in range(n)]


def problems_from_validation(exc: ValidationError) -> list[ConfigProblem]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"]
        got = None if kind == "missing" else repr(err.get("input"))
        if got is not None and len(got) > 60:
            got = got[:57] + "..."
        out.append(ConfigProblem(loc, msg, got))
    return out


def parse_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), [ConfigProblem("(file)", "no such file")])
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [ConfigProblem("(file)", f"not UTF-8 text: {exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [ConfigProblem("(syntax)", f"invalid TOML: {exc}")]) from None


def resolve_path(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str):
        data["path"] = resolve_path(data["path"], base)
    app = raw.get("app")
    if isinstance(app, dict):
        app["path"] = resolve_path(app["path"], base) if isinstance(app.get("path"), str) else str(base.resolve())
    attack = raw.get("attack")
    if isinstance(attack, dict) and isinstance(attack.get("module"), str):  # imported like an app
        path = attack.get("path")
        attack["path"] = resolve_path(path, base) if isinstance(path, str) else str(base.resolve())
    sim = raw.get("simulation")
    if isinstance(sim, dict) and isinstance(sim.get("data"), dict):
        for section in sim["data"].values():
            if isinstance(section, dict) and isinstance(section.get("path"), str):
                section["path"] = resolve_path(section["path"], base)


def _raw_problems(raw: dict[str, Any]) -> list[ConfigProblem]:
    """Problems found in the raw file when its types are wrong too, so that one run lists everything."""
    out = []
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str) and not Path(data["path"]).is_dir():
        out.append(ConfigProblem("data.path", "folder does not exist", data["path"]))
    strategy = raw.get("strategy")
    name = strategy.get("name") if isinstance(strategy, dict) else None
    if "app" not in raw and name is not None and name not in STRATEGIES:
        out.append(
            ConfigProblem("strategy.name", f"unknown strategy; expected one of {', '.join(STRATEGIES)}", repr(name))
        )
    return out


def load_federation_config(path: str | Path) -> FederationConfig:
    """Load and validate a federation TOML file; relative paths resolve against its folder."""
    p = Path(path)
    raw = parse_toml(p)
    _resolve_paths(raw, p.parent)
    return validate_federation_config(raw, str(p))


def _section(where: str) -> str:
    return where.split(".")[0]


def _rules_beside_type_errors(raw: dict[str, Any], found: list[ConfigProblem]) -> list[ConfigProblem]:
    """The cross-field rules, checked on the sections that are well typed (the others at their
    defaults), so a file with a type error still gets every rule problem reported. Rules are left
    out when [federation] itself is wrong: its counts decide most of them."""
    bad = {_section(p.field) for p in found}
    if "federation" in bad or "(top level)" in bad:
        return []
    fields = FederationConfig.model_fields
    partial = {k: v for k, v in raw.items() if k in fields and k not in bad}
    try:
        cfg = FederationConfig.model_validate(partial)
    except ValidationError:
        return []
    return [p for p in cfg.semantic_problems() if _section(p.field) not in bad]


def _unique(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    seen: set[tuple[str, str]] = set()
    out = []
    for p in problems:
        if (p.field, p.message) not in seen:
            seen.add((p.field, p.message))
            out.append(p)
    return out


def validate_federation_config(raw: dict[str, Any], source: str = "<config>") -> FederationConfig:
    try:
        cfg = FederationConfig.model_validate(raw)
    except ValidationError as exc:
        # Report file-system and rule problems too, so one run lists everything wrong.
        problems = problems_from_validation(exc) + _raw_problems(raw)
        problems += _rules_beside_type_errors(raw, problems)
        raise ConfigError(source, _unique(problems)) from None
    problems = cfg.semantic_problems()
    if problems:
        raise ConfigError(source, problems)
    return cfg
