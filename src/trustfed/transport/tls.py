"""Mutual-TLS credentials for gRPC and a handshake diagnosis for clear errors.

gRPC reports every failed handshake as ``UNAVAILABLE ... Handshake failed``. When that
happens, :func:`diagnose_tls` repeats the handshake with Python's ``ssl`` module, using the
same files, and says *why*: the server's certificate is not from our CA, is not a coordinator
certificate, or the server refused ours (none, another CA's, expired).
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from trustfed.pki.ca import COORDINATOR_TLS_NAME, PkiError, identity_of

log = logging.getLogger("trustfed.transport")

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def grpc_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def server_credentials(ca: Path, cert: Path, key: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(ca).read_bytes(),
        require_client_auth=True,
    )


def channel(address: str, ca: Path, cert: Path | None, key: Path | None, max_message_bytes: int) -> grpc.Channel:
    """A channel that accepts only a coordinator certificate issued by ``ca``."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )
    opts = [*grpc_options(max_message_bytes), ("grpc.ssl_target_name_override", COORDINATOR_TLS_NAME)]
    return grpc.secure_channel(address, creds, options=opts)


@dataclass(frozen=True)
class Diagnosis:
    reachable: bool
    reason: str


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def diagnose_tls(address: str, ca: Path, cert: Path | None, key: Path | None, timeout: float = 5.0) -> Diagnosis:
    """Handshake with ``address`` like a participant would and explain a refusal (logged)."""
    d = _diagnose(address, ca, cert, key, timeout)
    log.warning("TLS diagnosis for %s: %s", address, d.reason, extra={"reachable": d.reachable})
    return d


def _diagnose(address: str, ca: Path, cert: Path | None, key: Path | None, timeout: float) -> Diagnosis:
    host, port = split_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return Diagnosis(False, f"cannot open a TCP connection to {address}: {exc.strerror or exc}")
    # Step 1: fetch the server certificate without trusting it, to say what it is.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    if cert and key:
        ctx.load_cert_chain(cert, key)
    try:
        with ctx.wrap_socket(sock, server_hostname=COORDINATOR_TLS_NAME) as tls:
            der = tls.getpeercert(binary_form=True)
            reply = _exchange(tls)
    except (ssl.SSLError, OSError) as exc:
        return Diagnosis(True, f"TLS 1.3 handshake with {address} failed: {exc}")
    if not der:
        return Diagnosis(True, f"{address} presented no certificate")
    server_cert = x509.load_der_x509_certificate(der)
    ca_cert = x509.load_pem_x509_certificate(Path(ca).read_bytes())
    try:
        server_cert.verify_directly_issued_by(ca_cert)
    except Exception:
        return Diagnosis(
            True,
            f"the server at {address} presented {server_cert.subject.rfc4514_string()}, which is not issued by "
            f"the federation CA in {ca}; check the address or the CA file",
        )
    try:
        ident = identity_of(server_cert)
    except PkiError as exc:
        return Diagnosis(True, f"the server at {address}: {exc}")
    if ident.role != "coordinator":
        return Diagnosis(
            True,
            f"the server at {address} presented the {ident.role} certificate of {ident.name!r}, not a coordinator "
            "certificate; refusing to talk to it",
        )
    if reply is None:
        who = "no client certificate was presented" if not cert else f"our certificate {cert} was refused"
        return Diagnosis(
            True,
            f"the coordinator at {address} closed the connection after the handshake: {who} "
            "(it must be issued by the federation CA, unexpired and of role participant)",
        )
    return Diagnosis(True, f"a TLS 1.3 handshake with {address} succeeds with these files")


def _exchange(tls: ssl.SSLSocket) -> bytes | None:
    """Send the HTTP/2 preface and read; None if the server closed or alerted (it refused us)."""
    try:
        tls.sendall(_H2_PREFACE)
        data = tls.recv(64)
    except (ssl.SSLError, OSError):
        return None
    return data or None
