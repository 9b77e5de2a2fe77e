"""PKI: CA init, issuing with role + id, 0600 keys, revocation, and every refusal reason."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from trustfed.pki import (
    COORDINATOR_TLS_NAME,
    PkiError,
    RevocationList,
    identity_of,
    init_ca,
    issue,
    load_certificate,
    load_private_key,
    revoke,
    verify_certificate,
)


@pytest.fixture()
def ca(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    init_ca(d)
    return d


def _crl(ca: Path) -> RevocationList:
    return RevocationList.load(ca / "crl.pem", load_certificate(ca / "ca.pem"))


def test_keys_are_0600_and_p256(ca: Path) -> None:
    cert, key = issue(ca, "participant", "p000")
    for k in (ca / "ca.key", key):
        assert stat.S_IMODE(k.stat().st_mode) == 0o600
    assert isinstance(load_private_key(key).curve, ec.SECP256R1)
    assert stat.S_IMODE(cert.stat().st_mode) & 0o077 != 0o077  # the certificate itself is public


def test_certificate_carries_role_and_id(ca: Path) -> None:
    cert, _ = issue(ca, "participant", "p007")
    ident = identity_of(load_certificate(cert))
    assert (ident.name, ident.role) == ("p007", "participant")
    c, _ = issue(ca, "coordinator", "coord", hosts=("10.1.2.3", "example.org"))
    text = str(load_certificate(c).extensions)
    assert COORDINATOR_TLS_NAME in text and "10.1.2.3" in text and "example.org" in text


def test_only_coordinators_carry_the_coordinator_name(ca: Path) -> None:
    with pytest.raises(PkiError, match="only a coordinator"):
        issue(ca, "participant", "p000", hosts=(COORDINATOR_TLS_NAME,))
    cert, _ = issue(ca, "participant", "p001")
    assert COORDINATOR_TLS_NAME not in str(load_certificate(cert).extensions)


def test_bad_role_and_name_and_existing_ca(ca: Path) -> None:
    with pytest.raises(PkiError, match="role 'root'"):
        issue(ca, "root", "x")
    with pytest.raises(PkiError, match="name"):
        issue(ca, "participant", "../evil")
    with pytest.raises(PkiError, match="already exists"):
        init_ca(ca)


def test_verify_accepts_then_refuses_after_revocation(ca: Path) -> None:
    cert, _ = issue(ca, "participant", "p000")
    c, ca_cert = load_certificate(cert), load_certificate(ca / "ca.pem")
    assert verify_certificate(c, ca_cert, _crl(ca), role="participant").name == "p000"
    assert revoke(ca, name="p000") == [c.serial_number]
    with pytest.raises(PkiError, match="revoked"):
        verify_certificate(c, ca_cert, _crl(ca), role="participant")
    assert revoke(ca, name="p000") == []  # idempotent


def test_verify_refuses_other_ca_wrong_role_and_expired(tmp_path: Path, ca: Path) -> None:
    other = tmp_path / "other"
    init_ca(other)
    foreign, _ = issue(other, "participant", "p000")
    ca_cert = load_certificate(ca / "ca.pem")
    with pytest.raises(PkiError, match="not issued by the federation CA"):
        verify_certificate(load_certificate(foreign), ca_cert, _crl(ca))
    part, _ = issue(ca, "participant", "p001")
    with pytest.raises(PkiError, match="role 'participant', expected 'coordinator'"):
        verify_certificate(load_certificate(part), ca_cert, _crl(ca), role="coordinator")
    old, _ = issue(ca, "participant", "p002", days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    with pytest.raises(PkiError, match="expired"):
        verify_certificate(load_certificate(old), ca_cert, _crl(ca))


def test_crl_from_another_ca_is_refused(tmp_path: Path, ca: Path) -> None:
    other = tmp_path / "other"
    init_ca(other)
    with pytest.raises(PkiError, match="not signed by the federation CA"):
        RevocationList.load(other / "crl.pem", load_certificate(ca / "ca.pem"))


def test_cli_init_issue_revoke(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from trustfed.cli import app

    d = tmp_path / "pki"
    r = CliRunner()
    assert r.invoke(app, ["pki", "init", "--out", str(d)]).exit_code == 0
    res = r.invoke(app, ["pki", "issue", "--ca", str(d), "--role", "participant", "--name", "p003"])
    assert res.exit_code == 0, res.output
    assert identity_of(load_certificate(d / "p003.pem")).role == "participant"
    assert r.invoke(app, ["pki", "revoke", "--ca", str(d), "--name", "p003"]).exit_code == 0
    assert _crl(d).is_revoked(load_certificate(d / "p003.pem").serial_number)
