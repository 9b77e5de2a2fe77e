"""Standby coordinators: a leadership lease, and a round loop that resumes from checkpoints.

Two coordinator processes share a checkpoint folder and a lease. The one holding the lease runs
rounds and renews it; the standby polls. When the leader crashes, its lease expires, the
standby takes it (with a higher epoch, a fencing token recorded in every checkpoint's round
log), loads the newest verified checkpoint and carries on from the next round.

:class:`FileLease` works on one host (or a shared POSIX file system) with an fcntl lock around
each read-modify-write of the lease file. Across hosts, :class:`EtcdLease` keeps the same interface
on an etcd key created only if absent under an etcd lease (``trustfed server --lease
etcd://HOST:PORT/KEY``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from trustfed.coordinator.engine import Coordinator, History, RoundCallback
from trustfed.coordinator.state import latest_state, resume
from trustfed.errors import TrustFedError
from trustfed.primitives.atomic import atomic_write_text

log = logging.getLogger("trustfed.coordinator.ha")


class LeadershipLost(TrustFedError):
    """This coordinator no longer holds the lease: another one has taken over."""


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    expires: float
    epoch: int


class FileLease:
    """A time-limited leadership lease kept in a small JSON file."""

    def __init__(self, path: Path, holder: str, ttl: float, clock: Callable[[], float] = time.time) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be > 0")
        self.path, self.holder, self.ttl, self.clock = path, holder, ttl, clock
        self.epoch = 0

    @contextmanager
    def _guard(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".guard"), "a+") as g:
            fcntl.flock(g.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(g.fileno(), fcntl.LOCK_UN)

    def read(self) -> LeaseRecord | None:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return LeaseRecord(str(raw["holder"]), float(raw["expires"]), int(raw["epoch"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TrustFedError(f"lease file {self.path} is unreadable ({exc}); remove it to reset") from None

    def _write(self, rec: LeaseRecord) -> None:
        atomic_write_text(self.path, json.dumps({"holder": rec.holder, "expires": rec.expires, "epoch": rec.epoch}))

    def try_acquire(self) -> bool:
        with self._guard():
            now = self.clock()
            cur = self.read()
            if cur is not None and cur.holder != self.holder and cur.expires > now:
                return False
            epoch = cur.epoch if cur is not None and cur.holder == self.holder else (cur.epoch + 1 if cur else 1)
            self._write(LeaseRecord(self.holder, now + self.ttl, epoch))
            self.epoch = epoch
            return True

    def renew(self) -> bool:
        """Extend the lease; False when another holder has it (leadership lost)."""
        with self._guard():
            cur = self.read()
            if cur is None or cur.holder != self.holder or cur.epoch != self.epoch:
                return False
            self._write(LeaseRecord(self.holder, self.clock() + self.ttl, self.epoch))
            return True

    def release(self) -> None:
        with self._guard():
            cur = self.read()
            if cur is not None and cur.holder == self.holder and cur.epoch == self.epoch:
                self._write(LeaseRecord(self.holder, 0.0, self.epoch))

    def wait(
        self, poll: float = 0.5, timeout: float | None = None, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        """Block until this holder becomes the leader."""
        _wait_for_lease(self, self.clock, poll, timeout, sleep)


class Lease(Protocol):
    """What a coordinator needs of a leadership lease (:class:`FileLease`, :class:`EtcdLease`)."""

    holder: str
    ttl: float
    epoch: int

    @property
    def path(self) -> Any: ...

    def read(self) -> LeaseRecord | None: ...

    def try_acquire(self) -> bool: ...

    def renew(self) -> bool: ...

    def release(self) -> None: ...

    def wait(self, poll: float = 0.5, timeout: float | None = None, sleep: Callable[[float], None] = ...) -> None: ...


class LeaseHeartbeat(threading.Thread):
    def __init__(self, lease: Lease, interval: float) -> None:
        super().__init__(daemon=True, name="trustfed-lease")
        self.lease, self.interval = lease, interval
        self.lost = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            if not self.lease.renew():
                self.lost.set()
                return


def run_as_leader(
    coordinator: Coordinator,
    lease: FileLease,
    checkpoints: Path,
    total_rounds: int,
    on_round: RoundCallback | None = None,
    heartbeat: bool = True,
) -> History:
    """Take the lease (waiting as standby), resume from the newest checkpoint, run to ``total_rounds``.

    ``coordinator`` must have a :class:`~trustfed.coordinator.state.CheckpointObserver` writing to
    ``checkpoints``. Raises :class:`LeadershipLost` if the lease is lost mid-run.
    """
    lease.wait()
    log.info("%s leads (epoch %d)", lease.holder, lease.epoch)
    state = latest_state(checkpoints)
    if state is not None:
        resume(coordinator, state)
        log.info("%s resumed after round %d", lease.holder, state.round)
    beat = LeaseHeartbeat(lease, lease.ttl / 3)
    if heartbeat:
        beat.start()
    hist = History()
    try:
        while coordinator.round < total_rounds:
            if beat.lost.is_set() or not lease.renew():
                raise LeadershipLost(f"{lease.holder} lost the lease {lease.path} before round {coordinator.round + 1}")
            rec = coordinator.run_round()
            hist.rounds.append(rec)
            if on_round:
                on_round(rec, coordinator.params)
    finally:
        beat.stop.set()
    lease.release()
    return hist


class EtcdLease:
    """The leadership lease in etcd, for coordinators on different hosts (the ``ha`` extra: etcd3gw).

    The key ``key`` is created only if absent, bound to an etcd lease of ``ttl`` seconds that the
    holder keeps alive; when the holder stops renewing, etcd deletes the key and another coordinator
    creates it. The fencing epoch is the key's create revision, which grows with every new holder.
    ``url`` is ``etcd://HOST:PORT/KEY`` (etcd's HTTP JSON gateway)."""

    def __init__(self, url: str, holder: str, ttl: float) -> None:
        u = urlparse(url)
        if u.scheme != "etcd" or not u.hostname or not u.port or len(u.path) <= 1:
            raise TrustFedError(f"lease URL {url!r} must look like etcd://HOST:PORT/KEY")
        if ttl < 1:
            raise ValueError("an etcd lease needs ttl >= 1 s")
        try:
            from etcd3gw.client import Etcd3Client
        except ModuleNotFoundError as exc:
            raise TrustFedError("an etcd lease needs the 'ha' extra (etcd3gw)") from exc
        self.path = url
        self.key = u.path
        self.holder, self.ttl = holder, ttl
        self.epoch = 0
        self.client = Etcd3Client(host=u.hostname, port=u.port, api_path="/v3/", timeout=max(1.0, ttl / 2))
        self._lease: Any = None

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # etcd3gw raises requests' and its own errors
            raise TrustFedError(f"etcd at {self.path}: {what} failed: {exc}") from None

    def read(self) -> LeaseRecord | None:
        got = self._call("reading the leader key", lambda: self.client.get(self.key, metadata=True))
        if not got:
            return None
        value, meta = got[0]
        return LeaseRecord(value.decode(), float("inf"), int(meta["create_revision"]))

    def try_acquire(self) -> bool:
        if self._lease is not None and self.renew():
            return True
        lease = self._call("granting a lease", lambda: self.client.lease(ttl=int(self.ttl)))
        created = self._call("creating the leader key", lambda: self.client.create(self.key, self.holder, lease=lease))
        if not created:
            self._call("revoking an unused lease", lease.revoke)
            return False
        self._lease = lease
        rec = self.read()
        self.epoch = rec.epoch if rec is not None else 0
        return True

    def renew(self) -> bool:
        if self._lease is None:
            return False
        left = self._call("renewing the lease", self._lease.refresh)
        rec = self.read()
        if (
            not isinstance(left, int)
            or left <= 0
            or rec is None
            or rec.holder != self.holder
            or rec.epoch != self.epoch
        ):
            self._lease = None
            return False
        return True

    def release(self) -> None:
        if self._lease is not None:
            self._call("revoking the lease", self._lease.revoke)
            self._lease = None

    def wait(
        self, poll: float = 0.5, timeout: float | None = None, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        """Block until this holder becomes the leader."""
        _wait_for_lease(self, time.monotonic, poll, timeout, sleep)


def _wait_for_lease(
    lease: Lease, clock: Callable[[], float], poll: float, timeout: float | None, sleep: Callable[[float], None]
) -> None:
    start = clock()
    while not lease.try_acquire():
        if timeout is not None and clock() - start > timeout:
            cur = lease.read()
            raise TrustFedError(
                f"could not take the lease {lease.path} within {timeout} s; held by {cur.holder if cur else '?'}"
            )
        sleep(poll)


def open_lease(where: str, holder: str, ttl: float) -> FileLease | EtcdLease:
    """``etcd://HOST:PORT/KEY`` for an etcd lease, anything else a lease file path."""
    if where.startswith("etcd://"):
        return EtcdLease(where, holder, ttl)
    return FileLease(Path(where), holder, ttl)
