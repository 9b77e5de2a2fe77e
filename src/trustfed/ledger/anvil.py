"""Start and stop a local anvil node (npm ``@foundry-rs/anvil``, pinned in package.json) on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from trustfed.ledger.records import LedgerError


def find_anvil(start: Path | None = None) -> Path | None:
    """``node_modules/.bin/anvil`` in ``start`` or a parent folder (the repo root), else anvil on PATH."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents, *Path(__file__).resolve().parents):
        p = d / "node_modules" / ".bin" / "anvil"
        if p.exists():
            return p
    found = shutil.which("anvil")
    return Path(found) if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rpc(url: str, method: str, params: list[object] | None = None) -> object:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=2) as resp:
        return json.loads(resp.read())["result"]


class Anvil:
    """``with Anvil() as node: node.url``; SIGTERM on exit."""

    def __init__(self, binary: Path | None = None, port: int | None = None, timeout: float = 30.0) -> None:
        b = binary or find_anvil()
        if b is None:
            raise LedgerError("anvil not found: run `npm ci` in the repository root (installs @foundry-rs/anvil)")
        self.binary = b
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Anvil:
        self.proc = subprocess.Popen(
            [str(self.binary), "--host", "127.0.0.1", "--port", str(self.port), "--silent"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.stop()
                raise LedgerError(f"anvil exited with {self.proc.returncode} at start: {err.strip()[:300]}")
            try:
                _rpc(self.url, "eth_blockNumber")
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise LedgerError(f"anvil did not answer on {self.url} within {self.timeout:.0f} s")

    def rpc(self, method: str, params: list[object] | None = None) -> object:
        return _rpc(self.url, method, params)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
