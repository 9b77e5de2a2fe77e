"""Canonical JSON: the exact bytes that are hashed and signed, and a bounded reader for them.

Sorted keys, no whitespace (separators ``,`` and ``:``), UTF-8, and only JSON values (dicts with
string keys, lists, str, int, float, bool, None): anything else raises ``TypeError``. Two processes
that build the same value produce the same bytes, so signatures and hashes over them can be checked
anywhere.

The default is strict: characters outside ASCII are written as themselves (UTF-8) and NaN or
±Infinity raise ``ValueError``, since they are not JSON. Enclave evidence, sealed-update headers,
receipts and the measurement's config use the default. Two hash-chained formats were fixed with other
choices, and their logs on disk hash to those bytes, so they keep them through the two options:

* the ledger's audit log (``allow_nan=True``): an entry's body may carry a NaN or infinite metric,
  written as the tokens ``NaN`` / ``Infinity`` / ``-Infinity`` and signed that way;
* the distributed-training provenance log (``ensure_ascii=True, allow_nan=True``): its entry and
  config hashes escape every non-ASCII character as ``\\uXXXX``.

On ASCII-only values with finite numbers the three give the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

# ``json.dumps`` with non-default options builds a new encoder per call, which was a third of an
# audit-log append's time: one encoder per option pair, built once.
_ENCODERS = {
    (ensure_ascii, allow_nan): json.JSONEncoder(
        sort_keys=True, separators=(",", ":"), ensure_ascii=ensure_ascii, allow_nan=allow_nan
    )
    for ensure_ascii in (False, True)
    for allow_nan in (False, True)
}


def canonical_text(value: Any, *, ensure_ascii: bool = False, allow_nan: bool = False) -> str:
    """:func:`canonical_json` as a ``str``, for callers that splice it into a larger canonical text."""
    return _ENCODERS[ensure_ascii, allow_nan].encode(value)


def canonical_json(value: Any, *, ensure_ascii: bool = False, allow_nan: bool = False) -> bytes:
    """The canonical UTF-8 bytes of ``value``; see the module docstring for the two options."""
    return canonical_text(value, ensure_ascii=ensure_ascii, allow_nan=allow_nan).encode("utf-8")


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
