"""A participant whose local training runs across several DDP worker processes.

:class:`DDPTrainer` implements the participant's ``Trainer`` seam. ``fit`` writes the round's
job (global parameters as raw float32 + spec, their hash, the training settings) to a private
folder, hands it to ``workers`` torchrun processes (``trustfed.distributed.participant_worker``;
started once and kept across rounds, or with ``persistent = false`` launched for every round),
and reads back what rank 0 wrote: the trained parameters and their hash, which it checks
before returning the :class:`~trustfed.core.strategy.Update`. Rank 0 is thus the only one that
speaks to the coordinator.

The workers reproduce :class:`~trustfed.models.trainer.LocalTrainer` exactly: the same
seeded permutation and mini-batches; each rank takes a contiguous slice of every mini-batch and
scales its summed loss by ``workers / batch`` so DDP's gradient average equals the mean over the
whole mini-batch (also when the last batch is uneven).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch

from trustfed.core.codec import ParamSpec, from_bytes, load_vector, model_hash, to_bytes
from trustfed.core.strategy import RoundPlan, Update
from trustfed.data.datasets import Dataset
from trustfed.distributed.launch import run_torchrun, torchrun_argv, worker_env
from trustfed.distributed.parallel import DistributedError
from trustfed.distributed.participant_worker import CONTROL, SERVE
from trustfed.models.reference import build_model
from trustfed.models.trainer import round_seed, train_config_from_plan
from trustfed.models.training import TrainConfig, evaluate
from trustfed.primitives.atomic import atomic_write_bytes

if TYPE_CHECKING:
    pass

log = logging.getLogger("trustfed.distributed.participant")


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


class DDPTrainer:
    """Local training on ``workers`` torchrun processes (gloo on CPU, nccl on GPU)."""

    def __init__(
        self,
        participant_id: str,
        model_desc: dict[str, Any],
        spec: ParamSpec,
        data: Dataset,
        config: TrainConfig,
        seed: int,
        workers: int = 2,
        backend: str = "auto",
        workdir: Path | None = None,
        timeout: float = 900.0,
        persistent: bool = True,
    ) -> None:
        if workers < 1:
            raise DistributedError(f"participant {participant_id}: workers must be >= 1, got {workers}")
        self.participant_id = participant_id
        self.model_desc = dict(model_desc)
        self.spec = spec
        self.data = data
        self.config = config
        self.seed = seed
        self.workers = workers
        self.backend = backend
        self.timeout = timeout
        self._tmp = None if workdir is not None else tempfile.mkdtemp(prefix=f"trustfed-ddp-{participant_id}-")
        self.root = (workdir if workdir is not None else Path(self._tmp or ".")) / participant_id
        self._model = build_model(**self.model_desc)
        self._data_written = False
        self.persistent = persistent
        self._group: subprocess.Popen[bytes] | None = None  # the persistent torchrun, once started
        self._group_log: IO[bytes] | None = None
        self._seq = 0

    def _write_data(self) -> None:
        d = self.root / "data"
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "x.npy", np.ascontiguousarray(self.data.x), allow_pickle=False)
        np.save(d / "y.npy", np.ascontiguousarray(self.data.y), allow_pickle=False)
        self._data_written = True

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        if not self._data_written:
            self._write_data()
        job_dir = self.root / f"round-{plan.round:05d}"
        if job_dir.exists():
            shutil.rmtree(job_dir)
        job_dir.mkdir(parents=True)
        cfg = train_config_from_plan(self.config, plan)
        atomic_write_bytes(job_dir / "params.f32", to_bytes(params))
        atomic_write_bytes(job_dir / "params.spec.json", self.spec.to_json().encode())
        job = {
            "participant_id": self.participant_id,
            "round": plan.round,
            "seed": round_seed(self.seed, plan.round, self.participant_id),
            "params_hash": model_hash(params, self.spec),
            "model": self.model_desc,
            "train": {
                "epochs": cfg.epochs,
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "momentum": cfg.momentum,
                "weight_decay": cfg.weight_decay,
                "proximal_mu": cfg.proximal_mu,
            },
            "backend": self.backend,
            "data_dir": str(self.root / "data"),
        }
        atomic_write_bytes(job_dir / "job.json", json.dumps(job, sort_keys=True).encode())
        if self.persistent:
            self._run_in_group(job_dir)
        else:
            argv = torchrun_argv(
                "trustfed.distributed.participant_worker", ["--job", str(job_dir)], nproc_per_node=self.workers
            )
            run_torchrun(argv, job_dir / "torchrun.log", worker_env(), self.timeout)
        result = json.loads((job_dir / "update.json").read_text(encoding="utf-8"))
        vec = from_bytes((job_dir / "update.f32").read_bytes(), self.spec)
        got = model_hash(vec, self.spec)
        if got != result["update_hash"] or result["params_hash"] != job["params_hash"]:
            raise DistributedError(
                f"participant {self.participant_id} round {plan.round}: the workers' update does not match "
                f"its recorded hash ({got[:16]}… vs {str(result['update_hash'])[:16]}…); see {job_dir}"
            )
        metrics = {**{k: float(v) for k, v in result["metrics"].items()}, "workers": float(self.workers)}
        return Update(self.participant_id, vec, len(self.data), metrics)

    def _start_group(self) -> subprocess.Popen[bytes]:
        """torchrun with ``workers`` processes serving this trainer's jobs (``participant_worker --serve``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / CONTROL).unlink(missing_ok=True)
        self._seq = 0
        serve = {"owner_pid": os.getpid(), "backend": self.backend}
        atomic_write_bytes(self.root / SERVE, json.dumps(serve, sort_keys=True).encode())
        argv = torchrun_argv(
            "trustfed.distributed.participant_worker", ["--serve", str(self.root)], nproc_per_node=self.workers
        )
        log.info("participant %s: starting %d persistent DDP workers", self.participant_id, self.workers)
        if self._group_log is not None:  # a group that died before
            self._group_log.close()
        self._group_log = (self.root / "torchrun.log").open("ab")
        return subprocess.Popen(argv, env=worker_env(), stdout=self._group_log, stderr=subprocess.STDOUT)

    def _control(self, **command: object) -> None:
        """The next command for the persistent workers (``control.json``, replaced atomically)."""
        self._seq += 1
        atomic_write_bytes(self.root / CONTROL, json.dumps({"seq": self._seq, **command}).encode())

    def _run_in_group(self, job_dir: Path) -> None:
        """Hand ``job_dir`` to the persistent workers and wait for rank 0's update (or their exit)."""
        if self._group is None or self._group.poll() is not None:
            self._group = self._start_group()
        self._control(job=job_dir.name)
        end = time.monotonic() + self.timeout
        while not (job_dir / "update.json").exists():
            code = self._group.poll()
            if code is not None:
                self._group = None
                raise DistributedError(
                    f"participant {self.participant_id}: the DDP workers exited with {code} during round job "
                    f"{job_dir.name}; last lines of {self.root / 'torchrun.log'}:\n{_tail(self.root / 'torchrun.log')}"
                )
            if time.monotonic() > end:
                self.close_group()
                raise DistributedError(
                    f"participant {self.participant_id}: no update from the DDP workers within {self.timeout} s; "
                    f"see {self.root / 'torchrun.log'}"
                )
            time.sleep(0.005)

    def close_group(self, timeout: float = 30.0) -> None:
        """Stop the persistent workers (a ``stop`` control, then a kill if they do not leave in time)."""
        group, self._group = self._group, None
        if group is not None and group.poll() is None:
            self._control(stop=True)
            try:
                group.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                group.kill()
                group.wait()
        if self._group_log is not None:
            self._group_log.close()
            self._group_log = None

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        load_vector(self._model, params, self.spec)
        r = evaluate(self._model, self.data)
        return {"loss": r.loss, "accuracy": r.accuracy, "num_examples": float(r.num_examples)}

    def close(self) -> None:
        self.close_group()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __del__(self) -> None:
        group = getattr(self, "_group", None)
        if group is not None and group.poll() is None:  # ask the workers to leave (they also do once we are gone)
            with contextlib.suppress(OSError):
                self._control(stop=True)
        group_log = getattr(self, "_group_log", None)
        if group_log is not None:
            group_log.close()
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
