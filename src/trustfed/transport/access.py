"""Who may call, how often and how many at once: the checks :class:`~trustfed.transport.guard.ServerGuard`
runs from the TLS session alone, before any byte of a request body is read.

:class:`CertificateCheck` authenticates the caller from the certificate gRPC verified in the
handshake (TLS 1.3, the federation CA, validity, the revocation list, a role allowed for the
method). :class:`PeerLimiter` bounds each certificate's calls in flight (long polls included, so
one participant cannot hold the worker pool) and its call rate (a token bucket).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

import grpc
from cryptography import x509

from trustfed.pki.ca import PkiError, RevocationList, verify_certificate
from trustfed.transport.guard import Caller, Refusal


class CertificateCheck:
    """Authenticates a call from its TLS auth context; ``roles`` maps a method to the roles allowed
    to call it (``default_roles`` for the others)."""

    def __init__(
        self,
        ca_cert: x509.Certificate,
        revocations: Callable[[], RevocationList],
        *,
        default_roles: tuple[str, ...],
        roles: Mapping[str, tuple[str, ...]] | None = None,
        tls13_only: bool = True,
    ) -> None:
        self.ca_cert = ca_cert
        self.revocations = revocations
        self.default_roles = default_roles
        self.roles = dict(roles or {})
        self.tls13_only = tls13_only
        self._certs: dict[bytes, x509.Certificate] = {}
        self._lock = threading.Lock()

    def _certificate(self, pem: bytes) -> x509.Certificate:
        with self._lock:
            cert = self._certs.get(pem)
        if cert is None:
            try:
                cert = x509.load_pem_x509_certificate(pem)
            except ValueError:
                raise Refusal("certificate_refused", "the client certificate does not parse") from None
            with self._lock:
                if len(self._certs) >= 4096:
                    self._certs.clear()
                self._certs[pem] = cert
        return cert

    def __call__(self, context: grpc.ServicerContext, method: str) -> Caller:
        auth = context.auth_context()
        if self.tls13_only:
            version = (auth.get("ssl_tls_version") or [b"?"])[0].decode("latin-1")
            if version != "TLSv1.3":
                raise Refusal("tls_version", f"TLS version {version} refused; TLS 1.3 only")
        pems = auth.get("x509_pem_cert")
        if not pems:
            raise Refusal("no_client_certificate", "no client certificate")
        cert = self._certificate(pems[0])
        return self.check_certificate(cert, method)

    def certificate_of(self, context: grpc.ServicerContext) -> x509.Certificate:
        """The caller's certificate (already authenticated by :meth:`__call__` in this call)."""
        return self._certificate(context.auth_context()["x509_pem_cert"][0])

    def check_certificate(self, cert: x509.Certificate, method: str) -> Caller:
        try:
            ident = verify_certificate(cert, self.ca_cert, self.revocations(), role=None)
        except PkiError as exc:
            raise Refusal("certificate_refused", str(exc)) from None
        allowed = self.roles.get(method, self.default_roles)
        if ident.role not in allowed:
            others = f" (or {', '.join(allowed[1:])})" if len(allowed) > 1 else ""
            raise Refusal(
                "wrong_role",
                f"{method} needs a {allowed[0]} certificate{others}; the client presented role {ident.role}",
            )
        return Caller(ident.name, ident.role, ident.serial)


class PeerLimiter:
    """At most ``max_calls`` calls in flight and ``rate`` calls per second (bursts of ``burst``) per key."""

    def __init__(self, max_calls: int, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_calls = max_calls
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._tokens: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    @property
    def in_flight(self) -> int:
        """Calls in flight, all callers together."""
        with self._lock:
            return sum(self._in_flight.values())

    def enter(self, key: str) -> str | None:
        now = self._clock()
        with self._lock:
            if self._in_flight.get(key, 0) >= self.max_calls:
                return "too_many_calls"
            tokens, last = self._tokens.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._tokens[key] = (tokens, now)
                return "rate_limited"
            if len(self._tokens) >= 65536:  # one entry per certificate seen: forget the full buckets
                self._tokens = {k: v for k, v in self._tokens.items() if v[0] < self.burst}
            self._tokens[key] = (tokens - 1.0, now)
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
            return None

    def leave(self, key: str) -> None:
        with self._lock:
            n = self._in_flight.get(key, 0) - 1
            if n > 0:
                self._in_flight[key] = n
            else:
                self._in_flight.pop(key, None)
