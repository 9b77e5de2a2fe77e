"""A small X.509 certificate authority for a federation: ECDSA P-256 only.

``init_ca`` writes a root CA (``ca.pem``, ``ca.key``) and an empty signed revocation list
(``crl.pem``). ``issue`` writes ``NAME.pem`` / ``NAME.key`` for one identity: the certificate
carries its role and participant id as SAN URIs (``urn:trustfed:role:<role>``,
``urn:trustfed:id:<name>``) and in the subject (CN = name, OU = role). ``revoke`` adds a serial
to the CRL. Private keys are written with mode 0600.

Ed25519 is deliberately not offered: grpcio's TLS handshake fails with Ed25519 certificates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustfed.errors import TrustFedError
from trustfed.primitives.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger("trustfed.pki")

Role = Literal["coordinator", "participant", "enclave", "admin"]
ROLES: tuple[Role, ...] = ("coordinator", "participant", "enclave", "admin")
# Every coordinator certificate carries this DNS name; participants verify the server against it
# (gRPC's ssl_target_name_override), so only a coordinator certificate can serve the federation.
COORDINATOR_TLS_NAME = "coordinator.trustfed.internal"
ROLE_URI = "urn:trustfed:role:"
ID_URI = "urn:trustfed:id:"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CRL_FILE = "crl.pem"
INDEX_FILE = "issued.json"


class PkiError(TrustFedError):
    """A certificate, key or revocation list is missing, invalid, expired, revoked or of the wrong role."""


@dataclass(frozen=True)
class Identity:
    """Who a certificate names: its participant id (or name), role and serial."""

    name: str
    role: str
    serial: int
    not_after: dt.datetime

    def __str__(self) -> str:
        return f"{self.role} {self.name!r} (serial {self.serial:x})"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600), created that way (no window)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, mode=0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise PkiError(f"certificate file {path} does not exist; issue one with `trustfed pki issue`") from None
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate: {exc}") from None


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise PkiError(f"private key file {path} does not exist") from None
    except ValueError as exc:
        raise PkiError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError(f"{path}: only ECDSA P-256 keys are supported (gRPC's TLS rejects others)")
    return key


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise PkiError(f"name {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-'")


def init_ca(out: Path, *, common_name: str = "trustfed root CA", days: int = 3650, force: bool = False) -> Path:
    """Create a root CA in ``out``: ca.pem, ca.key (0600), crl.pem (empty), issued.json."""
    out = Path(out)
    if (out / CA_KEY).exists() and not force:
        raise PkiError(f"{out / CA_KEY} already exists; pick another folder or pass --force to replace the CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trustfed"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    write_private(out / CA_KEY, _key_pem(key))
    (out / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / INDEX_FILE).write_text("{}\n", encoding="utf-8")
    _write_crl(out, cert, key, [])
    log.info("created CA %s in %s", common_name, out)
    return out / CA_CERT


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_dir = Path(ca_dir)
    if not (ca_dir / CA_CERT).is_file():
        raise PkiError(f"{ca_dir} holds no CA ({CA_CERT} missing); create one with `trustfed pki init --out {ca_dir}`")
    return load_certificate(ca_dir / CA_CERT), load_private_key(ca_dir / CA_KEY)


def _read_index(ca_dir: Path) -> dict[str, dict[str, str]]:
    p = Path(ca_dir) / INDEX_FILE
    if not p.is_file():
        return {}
    data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise PkiError(f"{p} is corrupt (expected a JSON object)")
    return data


def _write_index(ca_dir: Path, index: dict[str, dict[str, str]]) -> None:
    atomic_write_text(Path(ca_dir) / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")


def issue(
    ca_dir: Path,
    role: str,
    name: str,
    *,
    out: Path | None = None,
    hosts: tuple[str, ...] = (),
    days: int = 365,
    not_before: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Issue a certificate for ``name`` with ``role``; returns (cert path, key path).

    ``hosts`` (DNS names or IP addresses) are added as SANs; a coordinator always gets
    :data:`COORDINATOR_TLS_NAME`, which no other role may carry.
    """
    if role not in ROLES:
        raise PkiError(f"role {role!r} is not one of {', '.join(ROLES)}")
    _check_name(name)
    if role != "coordinator" and COORDINATOR_TLS_NAME in hosts:
        raise PkiError(f"only a coordinator certificate may carry {COORDINATOR_TLS_NAME}")
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now() - dt.timedelta(minutes=5))
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(ROLE_URI + role),
        x509.UniformResourceIdentifier(ID_URI + name),
    ]
    all_hosts = ((COORDINATOR_TLS_NAME,) if role == "coordinator" else ()) + tuple(hosts)
    for h in dict.fromkeys(all_hosts):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role in ("coordinator", "enclave"):
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trustfed"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    dest = Path(out) if out is not None else Path(ca_dir)
    dest.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = dest / f"{name}.key", dest / f"{name}.pem"
    write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    index = _read_index(ca_dir)
    index[f"{serial:x}"] = {"name": name, "role": role, "not_after": cert.not_valid_after_utc.isoformat()}
    _write_index(ca_dir, index)
    log.info("issued %s certificate for %s (serial %x) in %s", role, name, serial, dest)
    return cert_path, key_path


def _write_crl(ca_dir: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, serials: list[int]) -> Path:
    now = _now()
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=30))
    )
    for s in serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now - dt.timedelta(seconds=1)).build()
        )
    crl = b.sign(ca_key, hashes.SHA256())
    path = Path(ca_dir) / CRL_FILE
    atomic_write_bytes(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


def revoke(ca_dir: Path, *, name: str | None = None, serial: int | None = None) -> list[int]:
    """Revoke every certificate issued to ``name`` (or the one with ``serial``); rewrite crl.pem.

    Returns the serials newly revoked.
    """
    if (name is None) == (serial is None):
        raise PkiError("revoke needs exactly one of a name or a serial")
    ca_cert, ca_key = _load_ca(ca_dir)
    index = _read_index(ca_dir)
    if serial is not None:
        targets = [serial]
    else:
        targets = [int(s, 16) for s, e in index.items() if e.get("name") == name]
        if not targets:
            raise PkiError(f"no certificate issued to {name!r} in {Path(ca_dir) / INDEX_FILE}")
    current = RevocationList.load(Path(ca_dir) / CRL_FILE, ca_cert).serials
    new = [s for s in targets if s not in current]
    _write_crl(ca_dir, ca_cert, ca_key, sorted(current | set(targets)))
    for s in new:
        log.warning("revoked certificate serial %x (%s)", s, index.get(f"{s:x}", {}).get("name", "unknown name"))
    return new


@dataclass(frozen=True)
class RevocationList:
    """The serials a CA has revoked, read from its signed CRL (signature checked on load)."""

    serials: frozenset[int]
    source: str

    @classmethod
    def empty(cls) -> RevocationList:
        return cls(frozenset(), "(none)")

    @classmethod
    def load(cls, path: Path, ca_cert: x509.Certificate) -> RevocationList:
        try:
            crl = x509.load_pem_x509_crl(Path(path).read_bytes())
        except FileNotFoundError:
            raise PkiError(f"revocation list {path} does not exist") from None
        except ValueError as exc:
            raise PkiError(f"{path} is not a PEM revocation list: {exc}") from None
        pub = ca_cert.public_key()
        if (
            crl.issuer != ca_cert.subject
            or not isinstance(pub, ec.EllipticCurvePublicKey)
            or not crl.is_signature_valid(pub)
        ):
            raise PkiError(f"revocation list {path} is not signed by the federation CA; refusing it")
        return cls(frozenset(r.serial_number for r in crl), str(path))

    def is_revoked(self, serial: int) -> bool:
        return serial in self.serials


def identity_of(cert: x509.Certificate) -> Identity:
    """Read the role and name a trustfed certificate carries (fails closed if absent)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError(f"certificate {cert.subject.rfc4514_string()} has no trustfed role/id (no SAN)") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    roles = [u[len(ROLE_URI) :] for u in uris if u.startswith(ROLE_URI)]
    names = [u[len(ID_URI) :] for u in uris if u.startswith(ID_URI)]
    if len(roles) != 1 or len(names) != 1:
        raise PkiError(f"certificate {cert.subject.rfc4514_string()} must carry exactly one trustfed role and id")
    return Identity(names[0], roles[0], cert.serial_number, cert.not_valid_after_utc)


def verify_certificate(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    crl: RevocationList,
    *,
    role: str | None = None,
    now: dt.datetime | None = None,
) -> Identity:
    """Check issuer signature, validity window, revocation and (optionally) role; return the identity.

    Raises :class:`PkiError` naming the first reason the certificate is refused.
    """
    subject = cert.subject.rfc4514_string()
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise PkiError(f"certificate {subject} is not issued by the federation CA ({type(exc).__name__})") from None
    t = now or _now()
    if t < cert.not_valid_before_utc:
        raise PkiError(f"certificate {subject} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if t > cert.not_valid_after_utc:
        raise PkiError(f"certificate {subject} expired at {cert.not_valid_after_utc.isoformat()}; issue a new one")
    ident = identity_of(cert)
    if crl.is_revoked(cert.serial_number):
        raise PkiError(f"certificate of {ident} is revoked (revocation list {crl.source})")
    if role is not None and ident.role != role:
        raise PkiError(f"certificate of {ident} has role {ident.role!r}, expected {role!r}")
    return ident
