"""Typed settings: the ``train.toml`` of ``trustfed train`` and a participant's distributed trainer.

This module imports nothing from :mod:`trustfed.config` (which imports it), so there is no cycle.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trustfed.errors import ConfigError, ConfigProblem

Strategy = Literal["ddp", "tp", "pp", "ddp+pp"]
Backend = Literal["auto", "gloo", "nccl"]
LedgerName = Literal["none", "embedded", "jsonrpc"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParticipantTrainingSettings(_Section):
    """``[participant_training]`` in the federation file: how a participant runs its local training.

    ``trainer = "ddp"`` with ``workers = 2`` trains across 2 torchrun worker processes
    (DistributedDataParallel); rank 0 returns the update to the coordinator. ``participants``
    limits it to some participant ids (empty: all of them).
    """

    trainer: Literal["local", "ddp"] = "local"
    workers: int = Field(2, ge=1, le=64, description="DDP worker processes (ddp only)")
    backend: Backend = Field("auto", description="torch.distributed backend: gloo on CPU, nccl on GPU")
    participants: list[str] = Field(default_factory=list, description="ids using this trainer; empty: all")
    workdir: Path | None = Field(None, description="keep each round's job and update files here (default: temp)")
    persistent: bool = Field(True, description="keep the DDP workers across rounds (false: a torchrun per round)")

    def applies_to(self, participant_id: str) -> bool:
        return self.trainer != "local" and (not self.participants or participant_id in self.participants)


class RunSection(_Section):
    name: str = "train"
    out: Path = Field(Path("runs/train"), description="run folder: provenance log, checkpoints, metrics")
    seed: int = Field(0, ge=0)
    audit_key: Path | None = Field(
        None, description="ECDSA P-256 PEM key: also write each provenance entry, signed, to OUT/audit.jsonl"
    )
    ledger: LedgerName = Field(
        "none",
        description="anchor every checkpoint on a chain: 'embedded' (an in-process EVM kept in OUT/ledger) "
        "or 'jsonrpc' (a node at rpc_url); see trustfed.distributed.anchor",
    )
    rpc_url: str | None = Field(None, description="JSON-RPC URL of the node (ledger = 'jsonrpc' only)")
    ledger_key_file: Path | None = Field(
        None, description="hex private key to sign with (ledger = 'jsonrpc'; default: the node's first account)"
    )
    allow_dev_keys: bool = Field(
        False, description="let rank 0 sign with a publicly known development key (anvil/hardhat): test chains only"
    )

    @model_validator(mode="after")
    def _ledger(self) -> RunSection:
        if self.ledger == "jsonrpc" and not self.rpc_url:
            raise ValueError("ledger = 'jsonrpc' needs rpc_url, for example http://127.0.0.1:8545")
        if self.ledger != "jsonrpc" and (self.rpc_url is not None or self.ledger_key_file is not None):
            raise ValueError(f"rpc_url and ledger_key_file are for ledger = 'jsonrpc' (ledger is {self.ledger!r})")
        if self.rpc_url is not None and not self.rpc_url.startswith(("http://", "https://")):
            raise ValueError("rpc_url must start with http:// or https://")
        return self


class LaunchSection(_Section):
    nproc_per_node: int = Field(2, ge=1, le=256)
    nnodes: str = Field("1", pattern=r"^[1-9][0-9]*(:[1-9][0-9]*)?$", description='"N" or elastic "MIN:MAX"')
    max_restarts: int = Field(1, ge=0, le=100)
    backend: Backend = "auto"
    rdzv_endpoint: str | None = Field(None, description="host:port; default 127.0.0.1 and a free port")
    rdzv_id: str | None = None


class ParallelSection(_Section):
    strategy: Strategy = "ddp"
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    microbatches: int = Field(4, ge=1, le=1024)
    pp_stages: int = Field(2, ge=1, le=64, description="pipeline stages (ddp+pp); pp uses the world size")


class ModelSection(_Section):
    d_model: int = Field(64, ge=8, le=8192)
    n_heads: int = Field(4, ge=1, le=256)
    n_layers: int = Field(2, ge=1, le=256)
    d_ff: int = Field(256, ge=8, le=65536)
    seq_len: int = Field(64, ge=4, le=8192)

    @model_validator(mode="after")
    def _heads(self) -> ModelSection:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


class DataSection(_Section):
    task: Literal["assistant"] = "assistant"
    dialogues: int = Field(2000, ge=10, le=10_000_000)


class TrainSection(_Section):
    steps: int = Field(100, ge=1, le=10_000_000)
    batch_size: int = Field(16, ge=1, description="global batch (sequences per step)")
    lr: float = Field(3e-3, gt=0, le=10)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(25, ge=1)
    log_every: int = Field(10, ge=1)


class TrainRunConfig(_Section):
    """The whole ``train.toml``."""

    run: RunSection = RunSection()
    launch: LaunchSection = LaunchSection()
    parallel: ParallelSection = ParallelSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()

    def problems_for_world(self, world: int) -> list[ConfigProblem]:
        """What makes this config impossible on ``world`` processes (checked at launch and in workers)."""
        out: list[ConfigProblem] = []
        p, m, t = self.parallel, self.model, self.train
        if p.strategy == "ddp" and t.batch_size % world:
            out.append(ConfigProblem("train.batch_size", f"must be divisible by the world size {world} for ddp"))
        if p.strategy == "tp":
            for name, val in (("model.n_heads", m.n_heads), ("model.d_ff", m.d_ff)):
                if val % world:
                    out.append(ConfigProblem(name, f"must be divisible by the world size {world} for tp", str(val)))
        if p.strategy in ("pp", "ddp+pp"):
            stages = world if p.strategy == "pp" else p.pp_stages
            if world % stages:
                out.append(ConfigProblem("parallel.pp_stages", f"must divide the world size {world}", str(stages)))
            elif stages < 2 and p.strategy == "pp":
                out.append(ConfigProblem("launch.nproc_per_node", "pp needs at least 2 processes"))
            if p.pp_schedule == "1f1b" and p.microbatches < stages:
                out.append(
                    ConfigProblem("parallel.microbatches", f"1f1b needs >= {stages} (the stages)", str(p.microbatches))
                )
            if m.n_layers < stages:
                out.append(ConfigProblem("model.n_layers", f"must be >= the {stages} pipeline stages", str(m.n_layers)))
            dp = max(world // max(stages, 1), 1)
            if t.batch_size % dp or (t.batch_size // dp) % p.microbatches:
                out.append(
                    ConfigProblem(
                        "train.batch_size",
                        f"must split into {dp} data-parallel shard(s) of {p.microbatches} equal micro-batches",
                        str(t.batch_size),
                    )
                )
        return out

    def min_world(self) -> int:
        return self.launch.nproc_per_node * int(self.launch.nnodes.split(":")[0])


def load_train_config(path: str | Path) -> TrainRunConfig:
    """Load ``train.toml``; every problem (unknown keys, bad values, impossible layouts) at once."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(p), [ConfigProblem("(file)", "no such file")])
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(p), [ConfigProblem("(syntax)", f"invalid TOML: {exc}")]) from None
    run = raw.get("run")
    if isinstance(run, dict):
        for key in ("out", "audit_key", "ledger_key_file"):
            if isinstance(run.get(key), str) and not Path(run[key]).is_absolute():
                run[key] = str(p.parent / run[key])
    return validate_train_config(raw, str(p))


def validate_train_config(raw: dict[str, object], source: str = "<train config>") -> TrainRunConfig:
    try:
        cfg = TrainRunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(ConfigProblem(loc, msg, None if err["type"] == "missing" else repr(err.get("input"))[:60]))
        raise ConfigError(source, problems) from None
    problems = cfg.problems_for_world(cfg.min_world())
    if problems:
        raise ConfigError(source, problems)
    return cfg
