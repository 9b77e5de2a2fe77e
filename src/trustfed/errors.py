"""One exception hierarchy for trustfed.

Every message says what was wrong, where, and what to do. The CLI maps these to exit codes
and prints them without a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class TrustFedError(Exception):
    """Root of every error trustfed raises on purpose."""

    exit_code: int = 1


class ConfigError(TrustFedError):
    """A configuration file or CLI flag is invalid. Carries every problem found at once."""

    exit_code = 2

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{len(problems)} problem(s) in {source}:"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a configuration: where it is and what was expected."""

    field: str
    message: str
    got: str | None = None

    def __str__(self) -> str:
        got = f" (got {self.got})" if self.got is not None else ""
        return f"{self.field}: {self.message}{got}"


class CodecError(TrustFedError):
    """A parameter vector does not match its spec, or a model cannot be encoded exactly."""


class DataError(TrustFedError):
    """A dataset cannot be loaded or partitioned as asked: a user-input error, like a bad config."""

    exit_code = 2


class AppError(TrustFedError):
    """A federation app cannot be imported, is not an App, or one of its hooks failed."""

    exit_code = 2


class AggregationError(TrustFedError):
    """Updates cannot be aggregated (wrong shapes, too few, non-finite values)."""


class CheckpointError(TrustFedError):
    """A checkpoint is missing, corrupt, or does not match its recorded hash."""


class ResumeRefused(CheckpointError):
    """A run folder cannot be resumed as it is (a file does not verify, or does not match the chain);
    the resume changed nothing in it."""

    exit_code = 2


class RunFinished(ResumeRefused):
    """The run in the folder is finished: a resume would only rewrite its results."""


class ParticipantWithdrew(TrustFedError):
    """A participant declines the round and leaves the federation (for example, its privacy budget
    is spent). Transports drop it from ``available()`` for the rest of the run; the round goes on
    with the other updates."""

    def __init__(self, participant_id: str, reason: str) -> None:
        self.participant_id = participant_id
        self.reason = reason
        super().__init__(f"participant {participant_id} withdrew: {reason}")

    def __reduce__(self) -> tuple[type[ParticipantWithdrew], tuple[str, str]]:
        return type(self), (self.participant_id, self.reason)  # survives the multiprocess boundary
