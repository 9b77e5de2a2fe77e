"""Canonical JSON: the exact bytes that are hashed and signed.

Sorted keys, no whitespace, UTF-8, no NaN/Infinity. Two processes that build the same value
produce the same bytes, so signatures and hashes over them can be checked anywhere.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` (dicts, lists, str, int, float, bool, None) canonically."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_json_object(data: bytes, what: str, max_bytes: int) -> dict[str, Any]:
    """Parse a JSON object, checking its size first. Raises ValueError naming ``what``."""
    if len(data) > max_bytes:
        raise ValueError(f"{what} is {len(data)} bytes, more than the limit of {max_bytes}")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} is not UTF-8 JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value
