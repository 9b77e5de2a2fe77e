"""Who the coordinator serves, and how many examples one may declare.

A certificate from the federation CA proves an identity, not membership: the CA may have issued
certificates to other federations' participants, to test ids or to anyone it later replaced. The
coordinator serves a participant only when it is in the federation:

* its roster: the federation file's participant ids (``run_coordinator`` installs them; a transport
  built without one, as in unit tests, admits every participant certificate of the CA until then);
* with a ledger, once the registry on chain holds the federation (after round 0): an identity the
  registry holds, with status ``active`` and the very certificate it registered (a suspended, exited
  or revoked participant, or a second certificate for the same id, is refused).

Anyone else is refused on every RPC, before anything is done for it, with reason ``not_registered``
(or ``not_active``), which the servicer answers with PERMISSION_DENIED. The same object carries the
bound on the example count an update may declare (``[strategy] max_examples``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustfed.core.rounds import RoundRecord
from trustfed.core.strategy import DEFAULT_MAX_EXAMPLES, RoundPlan, RoundResult, Update
from trustfed.ledger.backends import LedgerBackend
from trustfed.ledger.records import Identity, Role, Status
from trustfed.transport.errors import MessageRejected

log = logging.getLogger("trustfed.coordinator.service")


class Admission:
    """The participants the coordinator serves (thread-safe: read by every RPC, set by the round loop)."""

    def __init__(self, participants: Iterable[str] | None = None, max_examples: int = DEFAULT_MAX_EXAMPLES) -> None:
        self._lock = threading.Lock()
        self._roster: frozenset[str] | None = frozenset(participants) if participants is not None else None
        self._registry: dict[str, Identity] | None = None
        self.max_examples = max_examples

    def set_roster(self, participants: Iterable[str]) -> None:
        with self._lock:
            self._roster = frozenset(participants)

    def set_registry(self, identities: Sequence[Identity]) -> None:
        """The registry on chain, as the ledger reads it now: participants only."""
        with self._lock:
            self._registry = {i.id: i for i in identities if i.role == Role.PARTICIPANT}

    def admits(self, participant_id: str) -> bool:
        with self._lock:
            return self._roster is None or participant_id in self._roster

    def check(self, participant_id: str, cert: x509.Certificate) -> None:
        """Raise :class:`MessageRejected` unless ``participant_id`` (presenting ``cert``) is served."""
        with self._lock:
            roster, registry = self._roster, self._registry
        if roster is not None and participant_id not in roster:
            raise MessageRejected(
                "not_registered", f"{participant_id} is not a participant of this federation (its certificate is)"
            )
        if registry is None:
            return
        ident = registry.get(participant_id)
        if ident is None:
            raise MessageRejected("not_registered", f"{participant_id} is not in the participant registry on chain")
        if ident.status != Status.ACTIVE:
            raise MessageRejected(
                "not_active", f"{participant_id} is {ident.status.name.lower()} in the participant registry on chain"
            )
        fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        if fingerprint != ident.fingerprint:
            raise MessageRejected(
                "not_registered",
                f"{participant_id} presents a certificate ({fingerprint[:16]}…) other than the one registered on "
                f"chain ({ident.fingerprint[:16]}…)",
            )


class RegistryAdmission:
    """A RoundObserver (attached after the ledger recorder) that keeps :class:`Admission` on the registry
    on chain: read when round 1 starts (the recorder registered the federation just before) and after
    every round (statuses change after the round's commitment: exits, revocations, suspensions)."""

    def __init__(self, admission: Admission, ledger: LedgerBackend) -> None:
        self.admission = admission
        self.ledger = ledger

    def refresh(self) -> None:
        self.admission.set_registry(self.ledger.participants())

    def on_round_start(self, plan: RoundPlan, params: object) -> None:
        self.refresh()

    def on_round_end(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> None:
        self.refresh()
