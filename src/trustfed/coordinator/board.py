"""The round board: the state the coordinator's gRPC threads and its round loop share.

The round loop opens a round on the board and waits on its condition; the servicer's threads
check participants in, add their updates and secure-aggregation messages, and wait for receipts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from trustfed.coordinator.secagg import SecAggRound
from trustfed.core.strategy import RoundPlan, Update
from trustfed.ledger.participant import SignedCommitment
from trustfed.ledger.refusals import SignedRefusal
from trustfed.transport.errors import TransportError

MAX_POLL_S = 5.0  # a long poll holds a server thread at most this long
MAX_SECAGG_PARTICIPANTS = 4096  # bounds the maps of one secure-aggregation message


@dataclass(frozen=True)
class Refusal:
    """An update the coordinator refused for what it carried (not for how it travelled): ``reason`` is
    the code the participant was answered with (``non_finite``, ``too_many_examples``)."""

    reason: str
    detail: str


@dataclass
class OpenRound:
    plan: RoundPlan
    config_json: str
    payload: bytes
    deadline: float
    updates: dict[str, Update] = field(default_factory=dict)
    commitments: dict[str, SignedCommitment] = field(default_factory=dict)  # participant-signed (ledger)
    refused: dict[str, Refusal] = field(default_factory=dict)  # participant -> why its update was refused
    closed: bool = False
    secagg: SecAggRound | None = None  # secure aggregation: the protocol state of this round


@dataclass(frozen=True)
class ReceiptInfo:
    new_model_hash: str
    participants: tuple[str, ...]
    included: frozenset[str]
    leaves: tuple[bytes, ...] = ()  # the round's commitments, in the ledger's order
    enclave_receipt: bytes | None = None


class RoundBoard:
    """State shared by the gRPC threads and the coordinator's round loop."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.checked_in: dict[str, int] = {}  # participant id -> certificate serial
        self.certificates: dict[str, bytes] = {}  # participant id -> its TLS certificate (PEM), for the ledger
        self.withdrawn: dict[str, str] = {}  # participant -> why it left (its signed withdrawal's reason)
        self.current: OpenRound | None = None
        self.receipts: dict[int, ReceiptInfo] = {}
        self.done = False
        self.told_done: set[str] = set()
        self.aborted: str | None = None
        # participant -> the app code and data manifest hashes in its latest signed commitment
        self.provenance: dict[str, dict[str, str]] = {}
        self.refusals: list[SignedRefusal] = []  # participant-signed refusals sent with withdrawals

    def model_of(self, rnd: int) -> bytes | None:
        """The global model (float32 bytes) round ``rnd`` serves while it is the current round, else None."""
        with self.cond:
            cur = self.current
            return cur.payload if cur is not None and cur.plan.round == rnd else None

    def check_aborted(self) -> None:
        if self.aborted is not None:
            raise TransportError(f"federation aborted: {self.aborted}")
