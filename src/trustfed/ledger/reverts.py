"""Custom Solidity errors decoded from a reverted call or transaction, by the contracts' ABIs."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any


def revert_reason(exc: Exception, abi_sets: Sequence[list[dict[str, Any]]]) -> str:
    """Decode a custom Solidity error (name and arguments) from a revert, where possible."""
    from eth_abi.abi import decode
    from eth_utils.crypto import keccak

    data: bytes | None = None
    raw = getattr(exc, "data", None)
    if isinstance(raw, str) and raw.startswith("0x"):
        data = bytes.fromhex(raw[2:])
    elif exc.args and isinstance(exc.args[0], str) and "execution reverted: b" in exc.args[0]:
        try:
            lit = ast.literal_eval(exc.args[0].split("execution reverted: ", 1)[1])
            data = lit if isinstance(lit, bytes) else None
        except (ValueError, SyntaxError):
            data = None
    if data and len(data) >= 4:
        for abi in abi_sets:
            for item in abi:
                if item.get("type") != "error":
                    continue
                types = [i["type"] for i in item.get("inputs", [])]
                if keccak(text=f"{item['name']}({','.join(types)})")[:4] == data[:4]:
                    try:
                        args = decode(types, data[4:])
                    except Exception:  # malformed payload: show the name alone
                        args = ()
                    return f"{item['name']}{tuple(args)!r}"
    return str(exc)
