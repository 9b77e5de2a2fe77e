"""PKI: a federation CA (ECDSA P-256), identities with role and participant id, revocation."""

from trustfed.pki.ca import (
    COORDINATOR_TLS_NAME,
    ROLES,
    Identity,
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

__all__ = [
    "COORDINATOR_TLS_NAME",
    "ROLES",
    "Identity",
    "PkiError",
    "RevocationList",
    "identity_of",
    "init_ca",
    "issue",
    "load_certificate",
    "load_private_key",
    "revoke",
    "verify_certificate",
]
