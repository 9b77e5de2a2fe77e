"""In-process and multiprocess implementations of the coordinator's Transport seam."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from trustfed.apps.runtime import Runtime
from trustfed.config import FederationConfig
from trustfed.core.codec import from_bytes, to_bytes
from trustfed.core.compression import CompressionPolicy, compress_update, restore
from trustfed.core.rounds import Transport
from trustfed.core.strategy import RoundPlan, Update
from trustfed.errors import ParticipantWithdrew
from trustfed.models.trainer import Trainer, close_trainer

log = logging.getLogger("trustfed.simulation")


class InProcessTransport:
    """Participants are objects in this process; they train one after another."""

    def __init__(self, trainers: Mapping[str, Trainer]) -> None:
        self.trainers = dict(trainers)
        self.departures: dict[str, str] = {}  # participant -> why it left

    def available(self) -> Sequence[str]:
        return sorted(self.trainers)

    def fit(self, plan: RoundPlan, params: torch.Tensor) -> list[Update]:
        out = []
        for pid in plan.participants:
            try:
                out.append(self.trainers[pid].fit(params.clone(), plan))
            except ParticipantWithdrew as exc:
                note_withdrawal(self.departures, plan.round, exc)
                close_trainer(self.trainers.pop(pid))
        return out

    def close(self) -> None:
        for trainer in self.trainers.values():  # e.g. a DDP trainer's persistent worker processes
            close_trainer(trainer)


# --- multiprocess: each worker rebuilds the federation from the config, then trains on request.
_WORKER: dict[str, object] = {}


def _init_worker(cfg_json: str, budget_dir: str | None = None) -> None:
    torch.set_num_threads(1)

    _WORKER["runtime"] = Runtime(FederationConfig.model_validate_json(cfg_json))
    _WORKER["trainers"] = {}
    _WORKER["budget_dir"] = budget_dir


EncodedUpdate = tuple[str, bytes, int, dict[str, float]]  # what crosses a process boundary: no pickled tensors


def fit_encoded(
    trainer: Trainer, pid: str, rnd: int, config: dict[str, bool | int | float | str], payload: bytes
) -> EncodedUpdate:
    """A worker's side of one fit: decode the global model, train, encode the update."""
    upd = trainer.fit(from_bytes(payload), RoundPlan(rnd, (pid,), config))
    return upd.participant_id, to_bytes(upd.params), upd.num_examples, dict(upd.metrics)


def note_withdrawal(departures: dict[str, str], rnd: int, exc: ParticipantWithdrew) -> None:
    """A participant withdrew (its budget is spent, say): it leaves the federation, with its reason."""
    log.info("round %d: %s; it leaves the federation", rnd, exc)
    departures[exc.participant_id] = f"withdrew: {exc.reason}"


def decode_update(encoded: EncodedUpdate) -> Update:
    pid, data, n, metrics = encoded
    return Update(pid, from_bytes(data), n, metrics)


def _fit_in_worker(pid: str, rnd: int, config: dict[str, bool | int | float | str], payload: bytes) -> EncodedUpdate:
    rt = _WORKER["runtime"]
    trainers = _WORKER["trainers"]
    assert isinstance(rt, Runtime) and isinstance(trainers, dict)
    budget_dir = _WORKER.get("budget_dir")
    if isinstance(budget_dir, str):
        # With privacy, a participant's spend lives in its budget state file, shared by all workers:
        # the trainer is rebuilt for every round so that it starts from the spend on disk, whichever
        # worker trained it last.
        trainer: Trainer = rt.simulated_trainer(pid, budget_state_dir=Path(budget_dir))
    else:
        if pid not in trainers:
            trainers[pid] = rt.simulated_trainer(pid)
        trainer = trainers[pid]
    return fit_encoded(trainer, pid, rnd, config, payload)


class MultiprocessTransport:
    """Participants train in a pool of worker processes (spawned, one torch thread each)."""

    def __init__(self, cfg: FederationConfig, workers: int) -> None:
        self.ids = sorted(f"p{i:03d}" for i in range(cfg.federation.participants))
        self.departures: dict[str, str] = {}  # participant -> why it left
        # Privacy budgets: one state file per participant in a folder of this run's own (a participant
        # trains at most once per round, so its file is never written by two workers at once).
        self._budgets = tempfile.TemporaryDirectory(prefix="trustfed-budgets-") if cfg.privacy.mode != "none" else None
        ctx = mp.get_context("spawn")
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            self.pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(cfg.model_dump_json(), self._budgets.name if self._budgets else None),
            )
        finally:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads

    def available(self) -> Sequence[str]:
        return [pid for pid in self.ids if pid not in self.departures]

    def fit(self, plan: RoundPlan, params: torch.Tensor) -> list[Update]:
        payload = to_bytes(params)
        futs = [
            self.pool.submit(_fit_in_worker, pid, plan.round, dict(plan.config), payload) for pid in plan.participants
        ]
        out = []
        for f in futs:
            try:
                out.append(decode_update(f.result()))
            except ParticipantWithdrew as exc:
                note_withdrawal(self.departures, plan.round, exc)
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self._budgets is not None:
            self._budgets.cleanup()


class CompressingTransport:
    """The simulation's wire under ``[transport] compression``: each participant's update leaves as the
    payload of its delta to the round's model (:func:`~trustfed.core.compression.compress_update`, which
    measures the error), and the coordinator's side restores it from those bytes alone, as the gRPC
    coordinator restores an upload. The commitments then sign the payload's hash and the measured error."""

    def __init__(self, inner: Transport, policy: CompressionPolicy) -> None:
        self.inner = inner
        self.policy = policy
        self.sent_bytes: dict[int, int] = {}  # round -> payload bytes of all its updates

    def available(self) -> Sequence[str]:
        return self.inner.available()

    def close(self) -> None:
        self.inner.close()

    def fit(self, plan: RoundPlan, params: torch.Tensor) -> list[Update]:
        base = params.detach().clone()
        sent = [compress_update(u, base, self.policy) for u in self.inner.fit(plan, params)]
        p = self.policy
        out: list[Update] = [dataclasses.replace(u, params=restore(base, u.payload, p.codec, p.block)) for u in sent]
        self.sent_bytes[plan.round] = sum(len(u.payload) for u in sent)
        return out
