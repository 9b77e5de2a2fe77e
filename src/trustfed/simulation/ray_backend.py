"""Ray as a simulation backend, for federations larger than one machine's process pool.

``[simulation] backend = "ray"`` runs the participants in ``workers`` Ray actors (one CPU each), on a
local Ray instance that this process starts and stops, or on the cluster at ``ray_address``
(``"auto"``, ``"ray://head:10001"``), whose nodes must have trustfed installed. Each actor rebuilds
the federation's data from the config, as a multiprocess worker does, and hosts a fixed set of
participants (participant *i* on actor *i* mod ``workers``), so a participant's trainer, with its
privacy budget, stays in one place for the whole run. The global model is put in Ray's object store
once per round; updates come back in trustfed's own tensor encoding.

An actor that dies (its node lost, killed, out of memory) is not restarted: the participants it hosted
leave the federation, as if they had dropped out, and the run goes on with the others for as long as
the strategy's minimum allows. A restarted actor would rebuild their trainers from nothing, and with
privacy on it would forget what they had spent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from trustfed.apps.runtime import Runtime
from trustfed.config import FederationConfig
from trustfed.core.codec import to_bytes
from trustfed.core.strategy import RoundPlan, Update
from trustfed.errors import ConfigError, ConfigProblem, ParticipantWithdrew
from trustfed.simulation.transports import EncodedUpdate, decode_update, fit_encoded, note_withdrawal

log = logging.getLogger("trustfed.simulation")


class ParticipantHost:
    """One Ray actor's share of the federation: the trainers of the participants assigned to it."""

    def __init__(self, cfg_json: str) -> None:
        torch.set_num_threads(1)

        self.runtime = Runtime(FederationConfig.model_validate_json(cfg_json))
        self.trainers: dict[str, Any] = {}

    def fit(self, pid: str, rnd: int, config: dict[str, bool | int | float | str], payload: bytes) -> EncodedUpdate:
        if pid not in self.trainers:
            self.trainers[pid] = self.runtime.simulated_trainer(pid)
        return fit_encoded(self.trainers[pid], pid, rnd, config, payload)


def _problem(message: str) -> ConfigError:
    return ConfigError("[simulation]", [ConfigProblem("simulation.backend", message)])


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise _problem("'ray' needs Ray, which is not installed: pip install 'trustfed[ray]'") from exc
    return ray


class RayTransport:
    """Participants train in ``workers`` Ray actors; see the module docstring."""

    def __init__(self, cfg: FederationConfig, workers: int, address: str | None = None) -> None:
        ray = self._ray = _ray()
        self.ids = sorted(f"p{i:03d}" for i in range(cfg.federation.participants))
        self.departures: dict[str, str] = {}  # participant -> why it left
        self._started = False
        if not ray.is_initialized():
            # Ray's usage statistics would be sent to its makers: off unless the user has set otherwise.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            opts: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
            if address is None:
                opts |= {"num_cpus": workers, "include_dashboard": False}
            try:
                ray.init(address=address, **opts)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
                raise _problem(f"'ray' could not start or join {where}: {exc}") from exc
            self._started = True
        host = ray.remote(num_cpus=1, max_restarts=0)(ParticipantHost)
        cfg_json = cfg.model_dump_json()
        self.hosts = [host.remote(cfg_json) for _ in range(workers)]
        self.host_of = {pid: self.hosts[i % workers] for i, pid in enumerate(self.ids)}

    def available(self) -> Sequence[str]:
        return [pid for pid in self.ids if pid not in self.departures]

    def fit(self, plan: RoundPlan, params: torch.Tensor) -> list[Update]:
        ray = self._ray
        payload = ray.put(to_bytes(params))
        calls = [
            (pid, self.host_of[pid].fit.remote(pid, plan.round, dict(plan.config), payload))
            for pid in plan.participants
        ]
        out = []
        for pid, ref in calls:
            try:
                out.append(decode_update(ray.get(ref)))
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause
                if not isinstance(cause, ParticipantWithdrew):
                    raise (cause if isinstance(cause, Exception) else exc) from exc
                note_withdrawal(self.departures, plan.round, cause)
            except ray.exceptions.RayActorError as exc:
                self._lost_host(plan.round, pid, exc)
        return out

    def _lost_host(self, rnd: int, pid: str, exc: BaseException) -> None:
        host = self.host_of[pid]
        gone = sorted(p for p, h in self.host_of.items() if h is host and p not in self.departures)
        log.warning(
            "round %d: the Ray actor hosting %s died (%s); they leave the federation",
            rnd,
            ", ".join(gone),
            type(exc).__name__,
        )
        self.departures.update({p: f"lost: the Ray actor hosting it died ({type(exc).__name__})" for p in gone})

    def close(self) -> None:
        ray = self._ray
        for h in self.hosts:
            ray.kill(h)
        self.hosts = []
        if self._started:
            ray.shutdown()
