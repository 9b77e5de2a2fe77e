"""The federation's certificate revocation list as the coordinator sees it: re-read whenever its file changes."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from trustfed.pki.ca import PkiError, RevocationList

if TYPE_CHECKING:
    pass

log = logging.getLogger("trustfed.coordinator.service")


class CrlSource:
    """The federation's revocation list, re-read whenever its file changes."""

    def __init__(self, path: Path | None, ca_cert: x509.Certificate) -> None:
        self.path = path
        self.ca_cert = ca_cert
        self._mtime: float | None = None
        self._crl = RevocationList.empty()
        self._lock = threading.Lock()
        self.current()

    def current(self) -> RevocationList:
        if self.path is None:
            return self._crl
        with self._lock:
            mtime = self.path.stat().st_mtime_ns if self.path.exists() else None
            if mtime is None:
                raise PkiError(
                    f"revocation list {self.path} has disappeared; refusing every certificate until it is back"
                )
            if mtime != self._mtime:
                self._crl = RevocationList.load(self.path, self.ca_cert)
                self._mtime = mtime
                log.info("loaded revocation list %s: %d revoked serial(s)", self.path, len(self._crl.serials))
            return self._crl
