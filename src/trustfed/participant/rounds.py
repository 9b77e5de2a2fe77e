"""What a participant knows of a round: the verified plan, the outcome its receipt states, and
:class:`RoundGone` when the coordinator no longer holds the round open."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trustfed.core.strategy import RoundPlan
from trustfed.primitives.merkle import InclusionProof
from trustfed.transport import federation_pb2 as pb
from trustfed.transport.errors import TransportError


class RoundGone(TransportError):
    """The round this participant is in is no longer open at the coordinator: its deadline passed, or
    the coordinator restarted (a standby took over) and never opened it. The participant drops the
    round and asks for the next plan."""


@dataclass(frozen=True)
class ReceivedPlan:
    """A verified round plan."""

    round: int
    plan: RoundPlan
    spec_json: str
    model_bytes: int
    chunk_bytes: int
    deadline_ms: int
    raw: pb.RoundPlan


@dataclass(frozen=True)
class RoundOutcome:
    round: int
    included: bool
    new_model_hash: str
    merkle_root: bytes = b""
    proof: InclusionProof | None = None  # this participant's commitment in the round's Merkle tree
    enclave_receipt: bytes = b""


def describe(outcomes: list[RoundOutcome]) -> dict[str, Any]:
    return {"rounds": [o.round for o in outcomes], "included": [o.included for o in outcomes]}
