"""A participant's signed refusal of a round: evidence an auditor can collect.

When a participant refuses the model it was served (its hash is not the one on chain, or the enclave
failed attestation) it signs a refusal record with its certificate key: the round, a reason code, the
model hash the coordinator's signed plan named, the hash of the bytes it was served, the hash it
expected (the chain's) and the time. It keeps the record in ``<state dir>/<id>.refusals.jsonl`` and
sends it with its withdrawal; the coordinator must place it in the audit log as an entry of kind
``refusal`` authored and signed by the participant (the same digest, :func:`entry_digest`).

``trustfed audit verify --participant-records`` reads these files: a refusal missing from the log, or
one showing a served model other than the round's logged plan (two models in one round), fails the run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustfed.ledger.audit import Signer, entry_digest, verify_signature
from trustfed.ledger.kinds import REFUSAL_KIND
from trustfed.primitives.canonical import canonical_text

REFUSALS_SUFFIX = ".refusals.jsonl"
MAX_REFUSAL_BYTES = 8 * 1024  # a record is a few hashes and a line of text
_FIELDS = ("participant", "round", "reason", "detail", "plan_model_hash", "served_model_hash", "expected_model_hash")


class RefusalError(ValueError):
    """A refusal record that cannot be read or whose fields are malformed."""


@dataclass(frozen=True)
class SignedRefusal:
    participant_id: str
    round: int
    body: dict[str, Any]
    sig: bytes

    def digest(self) -> bytes:
        return entry_digest(REFUSAL_KIND, self.round, self.participant_id, self.body)

    def verifies(self, public_key_pem: bytes) -> bool:
        return verify_signature(public_key_pem, self.digest(), self.sig)

    def body_bytes(self) -> bytes:
        return canonical_text(self.body).encode()

    def to_line(self) -> str:
        return json.dumps({"body": self.body, "sig": self.sig.hex()}, sort_keys=True, separators=(",", ":"))


def refusal_body(
    participant_id: str,
    rnd: int,
    reason: str,
    detail: str,
    *,
    plan_model_hash: str,
    served_model_hash: str,
    expected_model_hash: str,
    at: float | None = None,
) -> dict[str, Any]:
    return {
        "participant": participant_id,
        "round": int(rnd),
        "reason": reason,
        "detail": detail[:1000],
        "plan_model_hash": plan_model_hash,
        "served_model_hash": served_model_hash,
        "expected_model_hash": expected_model_hash,
        "time": round(time.time() if at is None else at, 3),
    }


def sign_refusal(signer: Signer, body: dict[str, Any]) -> SignedRefusal:
    rnd = int(body["round"])
    sig = signer.sign(entry_digest(REFUSAL_KIND, rnd, signer.key_id, body))
    return SignedRefusal(signer.key_id, rnd, body, sig)


def parse_refusal(body_bytes: bytes, sig: bytes) -> SignedRefusal:
    """A refusal as it travels (canonical JSON body + signature); its fields are checked, not its signature."""
    if len(body_bytes) > MAX_REFUSAL_BYTES:
        raise RefusalError(f"refusal record of {len(body_bytes)} bytes (at most {MAX_REFUSAL_BYTES})")
    try:
        body = json.loads(body_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RefusalError(f"refusal record is not JSON: {exc}") from None
    if not isinstance(body, dict) or any(k not in body for k in _FIELDS):
        raise RefusalError(f"refusal record needs the fields {', '.join(_FIELDS)}")
    if not isinstance(body["round"], int) or not all(isinstance(body[k], str) for k in _FIELDS if k != "round"):
        raise RefusalError("refusal record: round must be an integer and the other fields strings")
    return SignedRefusal(str(body["participant"]), int(body["round"]), body, bytes(sig))


def append_refusal(path: Path, refusal: SignedRefusal) -> None:
    """Append one record (fsync'd): the participant's own copy, whatever the coordinator does with it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(refusal.to_line() + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_refusals(path: Path) -> Iterator[tuple[int, SignedRefusal]]:
    """(line number, record) of a participant's refusals file; raises :class:`RefusalError` on a bad line."""
    for lineno, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
            body, sig = raw["body"], bytes.fromhex(raw["sig"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RefusalError(f"{path}:{lineno}: not a refusal record ({exc})") from None
        try:
            yield lineno, parse_refusal(canonical_text(body).encode(), sig)
        except RefusalError as exc:
            raise RefusalError(f"{path}:{lineno}: {exc}") from None


def record_files(paths: list[Path]) -> list[Path]:
    """The refusal files named, or found (``*.refusals.jsonl``) in the folders named."""
    out: list[Path] = []
    for p in paths:
        out += sorted(p.rglob(f"*{REFUSALS_SUFFIX}")) if p.is_dir() else [p]
    return out
