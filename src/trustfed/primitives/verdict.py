"""A verifier's answer: ``ok`` and, when not ok, the reasons.

Verifiers fail closed: they collect every reason to refuse and build the verdict with
:meth:`Verdict.of`, which is ok only when there is none. A verdict cannot be ok and carry reasons;
one that is not ok may carry none (refused by default). ``claims`` are the facts the verifier read
or established on the way (an enclave's measurement, the number of log entries checked), for the
caller to act on once the verdict is ok.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reasons: tuple[str, ...] = ()
    claims: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ok and self.reasons:
            raise ValueError(f"a verdict with reasons cannot be ok: {'; '.join(self.reasons)}")

    @classmethod
    def of(cls, reasons: Iterable[str], claims: Mapping[str, Any] | None = None) -> Verdict:
        """Ok exactly when ``reasons`` is empty."""
        found = tuple(reasons)
        return cls(not found, found, dict(claims or {}))
