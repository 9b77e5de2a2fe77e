"""A participant's privacy spend on disk, so that a restarted participant process resumes it.

One small JSON file per participant, owned by it (``<state dir>/<id>.privacy-budget.json``,
mode 0600), holding every Gaussian mechanism its budget guard has recorded::

    {"format": "trustfed-privacy-budget-v1", "participant_id": "p001", "accountant": "rdp",
     "delta": 1e-05, "last_round": 2,
     "events": [{"round": 1, "noise_multiplier": 1.1, "sample_rate": 0.12, "steps": 8}, ...]}

Epsilon is never stored: it is recomputed from ``events`` at the guard's delta. The file is
written atomically (temporary file, fsync, rename, fsync of the folder) *before* the update that
spent the budget leaves the participant, and checked field by field on load; a file that does
not parse is an error naming it, never a fresh budget. A save holds an exclusive lock on
``.<name>.lock`` beside the file and replaces only the state this process read, so two processes
spending one participant's budget at once are refused instead of losing an update. Plain JSON
only (no pickle).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trustfed.primitives.atomic import atomic_write_bytes
from trustfed.privacy.accounting import GaussianSteps, PrivacyError

STATE_FORMAT = "trustfed-privacy-budget-v1"
STATE_SUFFIX = ".privacy-budget.json"
MAX_STATE_BYTES = 16 * 1024 * 1024


class BudgetStateError(PrivacyError):
    """A participant's privacy budget state file is unreadable, corrupt or someone else's."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Event(_Strict):
    round: int = Field(ge=0)
    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)


class _State(_Strict):
    format: Literal["trustfed-privacy-budget-v1"]
    participant_id: str = Field(min_length=1)
    accountant: Literal["rdp", "pld", "prv"]
    delta: float = Field(gt=0, lt=1)
    last_round: int = Field(ge=0)
    events: list[_Event]


@dataclass(frozen=True)
class RecordedStep:
    """One recorded mechanism and the round it was spent in."""

    round: int
    event: GaussianSteps


@dataclass(frozen=True)
class BudgetState:
    participant_id: str
    accountant: str
    delta: float
    last_round: int
    steps: tuple[RecordedStep, ...]

    @property
    def events(self) -> list[GaussianSteps]:
        return [s.event for s in self.steps]


def encode_budget_state(state: BudgetState) -> bytes:
    """The file's bytes (sorted keys, one line, no NaN)."""
    doc = {
        "format": STATE_FORMAT,
        "participant_id": state.participant_id,
        "accountant": state.accountant,
        "delta": state.delta,
        "last_round": state.last_round,
        "events": [{"round": s.round, **s.event.to_json()} for s in state.steps],
    }
    return (json.dumps(doc, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def decode_budget_state(data: bytes, where: str, participant_id: str) -> BudgetState:
    """Parse and check a state file's bytes; raises BudgetStateError naming ``where``."""

    def bad(reason: str) -> BudgetStateError:
        return BudgetStateError(
            f"{where}: the privacy budget state of participant {participant_id} is not usable: {reason}. It records "
            "the privacy this participant has already spent, so it is not silently reset: restore it from a backup, "
            "or remove it only if you accept that the earlier spend is forgotten"
        )

    if len(data) > MAX_STATE_BYTES:
        raise bad(f"{len(data)} bytes, more than the limit of {MAX_STATE_BYTES}")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not UTF-8 JSON ({exc})") from None
    try:
        doc = _State.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise bad(f"{loc}: {first['msg']} ({exc.error_count()} problem(s))") from None
    if doc.participant_id != participant_id:
        raise bad(f"it belongs to participant {doc.participant_id!r}")
    steps = tuple(RecordedStep(e.round, GaussianSteps(e.noise_multiplier, e.sample_rate, e.steps)) for e in doc.events)
    if any(s.round > doc.last_round for s in steps):
        raise bad("an event is for a round after last_round")
    return BudgetState(doc.participant_id, doc.accountant, doc.delta, doc.last_round, steps)


class BudgetStateFile:
    """Where one participant keeps its spend; :meth:`load` and :meth:`save` are the only I/O."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._seen: bytes | None = None  # the file as this object last read or wrote it (None: absent)

    @classmethod
    def in_dir(cls, folder: Path, participant_id: str) -> BudgetStateFile:
        return cls(Path(folder) / f"{participant_id}{STATE_SUFFIX}")

    def load(self, participant_id: str) -> BudgetState | None:
        """The recorded state, or None when the participant has never spent any budget here."""
        data = self._read()
        self._seen = data
        if data is None:
            return None
        return decode_budget_state(data, str(self.path), participant_id)

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BudgetStateError(f"{self.path}: cannot read the privacy budget state: {exc.strerror}") from None

    def save(
        self, participant_id: str, accountant: str, delta: float, last_round: int, steps: Sequence[RecordedStep]
    ) -> None:
        """Replace the file atomically: a crash leaves the old or the new state, never a torn one. Under an
        exclusive lock (``.<name>.lock`` beside it), and only if the file is still what this object last
        read or wrote: a second process spending the same participant's budget meanwhile (two processes
        run as one participant) is refused, not overwritten."""
        data = encode_budget_state(BudgetState(participant_id, accountant, delta, last_round, tuple(steps)))
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock_fd = os.open(folder / f".{self.path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise BudgetStateError(
                f"{self.path}: cannot lock the privacy budget state ({exc.strerror}); the update is not sent"
            ) from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if self._read() != self._seen:
                raise BudgetStateError(
                    f"{self.path}: participant {participant_id}'s privacy budget state changed on disk since this "
                    "process read it: another process is spending the same participant's budget. Run one process "
                    "per participant and state folder; the update is not sent"
                )
            self._write(data)
            self._seen = data
        finally:
            os.close(lock_fd)  # releases the lock

    def _write(self, data: bytes) -> None:
        try:
            atomic_write_bytes(self.path, data, mode=0o600)
        except OSError as exc:
            raise BudgetStateError(
                f"{self.path}: cannot write the privacy budget state ({exc.strerror}); the update is not sent"
            ) from None
