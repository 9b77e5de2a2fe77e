"""Peer-controlled text made safe for logs and status details, and a budget on log volume.

Whatever a peer sends (a message type, a participant id, a withdrawal reason, a protobuf parse
error) may hold newlines that forge log lines, terminal escapes, or megabytes of padding. Every
such value goes through :func:`clean` before it reaches a log line or a gRPC status detail: every
character that is not printable is escaped (line breaks ``\\n``, terminal escapes ``\\x1b``,
bidirectional overrides ``\\u202e``, zero-width characters) and the text is cut
to a few dozen characters, with the number of characters left out. A :class:`LogBudget` caps how
many refusal lines a flood can write: past its burst, lines are counted instead of written, and
the count is logged with the next line the budget allows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

DEFAULT_LIMIT = 80


def _escape(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    code = ord(ch)
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def clean(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """``value`` as one printable line of at most ``limit`` characters (plus a length note)."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value[: limit + 1])
        text, total = raw.decode("latin-1"), len(value)
    else:
        full = value if isinstance(value, str) else str(value)
        text, total = full[: limit + 1], len(full)
    out: list[str] = []
    used = 0
    for i, ch in enumerate(text):
        piece = ch if ch.isprintable() and ch != "\\" else _escape(ch)
        if used + len(piece) > limit:  # never cut an escape in half
            return "".join(out) + f"...(+{total - i} chars)"
        out.append(piece)
        used += len(piece)
    return "".join(out)


class LogBudget:
    """A token bucket per key (e.g. a refusal reason): at most ``burst`` lines at once and ``rate``
    lines per second after that. :meth:`take` says whether to write the line and how many lines of
    that key were suppressed since the last one written."""

    def __init__(self, rate: float = 5.0, burst: int = 20, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._suppressed: dict[str, int] = {}

    def take(self, key: str) -> tuple[bool, int]:
        """(write this line?, lines of ``key`` suppressed before it)."""
        now = self._clock()
        with self._lock:
            if key not in self._tokens and len(self._tokens) >= 1024:  # keys are reason codes; bound them anyway
                self._tokens.clear()
            tokens, last = self._tokens.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._tokens[key] = (tokens, now)
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False, 0
            self._tokens[key] = (tokens - 1.0, now)
            return True, self._suppressed.pop(key, 0)
