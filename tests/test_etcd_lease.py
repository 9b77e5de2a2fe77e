"""The etcd leadership lease against a real etcd server started on 127.0.0.1 (skipped, saying why, when
the etcd binary or the ``ha`` extra is missing): one holder at a time, a growing fencing epoch, takeover
once the holder stops renewing, and the old holder learning it lost."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustfed.coordinator.ha import EtcdLease, LeaseHeartbeat, open_lease
from trustfed.errors import TrustFedError

ETCD = shutil.which("etcd")
pytestmark = pytest.mark.skipif(ETCD is None, reason="no etcd binary (apt-get install etcd-server; `make etcd`)")
pytest.importorskip("etcd3gw", reason="the 'ha' extra (etcd3gw) is not installed")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert ETCD is not None
    data = tmp_path_factory.mktemp("etcd")
    client, peer = _port(), _port()
    log = open(Path(data) / "etcd.log", "wb")  # noqa: SIM115 (closed after etcd stops)
    proc = subprocess.Popen(
        [ETCD, "--name", "tf", "--data-dir", str(data), "--logger=zap", "--log-level=warn",
         "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"tf=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    try:
        end = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{client}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError("etcd did not become healthy")
            time.sleep(0.05)
        yield f"127.0.0.1:{client}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_one_holder_then_takeover_with_a_higher_epoch(etcd: str) -> None:
    url = f"etcd://{etcd}/trustfed/test/leader"
    a, b = EtcdLease(url, "A", ttl=2), EtcdLease(url, "B", ttl=2)
    assert a.try_acquire() and not b.try_acquire()
    assert a.renew() and a.read() is not None and a.read().holder == "A"  # type: ignore[union-attr]
    first = a.epoch
    b.wait(poll=0.2, timeout=15)  # A stops renewing: etcd expires its key
    assert b.epoch > first and b.read().holder == "B"  # type: ignore[union-attr]
    assert not a.renew()  # the old leader learns it lost
    b.release()
    assert a.try_acquire() and a.epoch > b.epoch


def test_heartbeat_keeps_the_lease_and_open_lease_picks_the_backend(etcd: str, tmp_path: Path) -> None:
    url = f"etcd://{etcd}/trustfed/test/beat"
    a = open_lease(url, "A", 2)
    assert isinstance(a, EtcdLease) and a.try_acquire()
    beat = LeaseHeartbeat(a, 0.5)
    beat.start()
    try:
        time.sleep(3.0)  # longer than the ttl: only the heartbeat keeps A in place
        assert not EtcdLease(url, "B", 2).try_acquire() and not beat.lost.is_set()
    finally:
        beat.stop.set()
        beat.join(timeout=5)
    a.release()
    assert type(open_lease(str(tmp_path / "lease.json"), "A", 2)).__name__ == "FileLease"


def test_bad_urls_and_unreachable_etcd_are_clear_errors() -> None:
    with pytest.raises(TrustFedError, match="must look like etcd://HOST:PORT/KEY"):
        EtcdLease("etcd://nohost", "A", 2)
    lease = EtcdLease(f"etcd://127.0.0.1:{_port()}/k", "A", 2)
    with pytest.raises(TrustFedError, match=r"etcd at etcd://127\.0\.0\.1:.*failed"):
        lease.try_acquire()
