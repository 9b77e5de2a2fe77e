"""Incentives in a recorded run: each round's contributions, reputation and rewards as an audit entry
and an ``applyRound`` transaction, and selection by reputation."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from trustfed.config import FederationConfig
from trustfed.coordinator.enclave_record import EnclaveRecord
from trustfed.core.rounds import RoundRecord
from trustfed.core.strategy import FedAvg, RoundPlan, RoundResult, Strategy, Update
from trustfed.incentives.book import IncentiveBook, ReputationSelector, RoundIncentives, selection_shares
from trustfed.incentives.scoring import contribution_scores
from trustfed.incentives.settings import IncentiveSettings
from trustfed.ledger.backends import LedgerBackend
from trustfed.ledger.kinds import INCENTIVES_KIND, STAKE_KIND, STATUS_KIND
from trustfed.ledger.recorder import Attachment
from trustfed.ledger.records import LedgerError, Status
from trustfed.secagg.updates import SecureSumUpdate, contributions

log = logging.getLogger("trustfed.coordinator.recorders")


class IncentivesRecord:
    """Scores every round and moves reputation and rewards (a RoundObserver that runs before the
    ledger recorder, and the source of that round's ``incentives`` entry and transaction).

    Contributions come from the updates themselves when the coordinator holds them in the clear
    (``source = "coordinator"``), from the enclave's signed receipt in enclave mode
    (``"enclave receipt"``), or, when the enclave releases none (central DP) or the round was a
    secure sum (its survivors), as equal shares of the updates the aggregator used
    (``"selection"``). Updates the aggregator left out (or the enclave rejected) are flagged; so is a
    participant whose update the coordinator refused at upload for what it carried (``refusals``: it
    takes part in the round's book with a contribution of 0), and so is one the history guard suspends in
    the round (``suspended``). The book starts from the chain's
    accounts, so a resumed run goes on from where the chain stands."""

    def __init__(
        self,
        settings: IncentiveSettings,
        enclave: EnclaveRecord | None = None,
        participants: Sequence[str] = (),
        refusals: Callable[[int], Mapping[str, object]] = lambda _rnd: {},
        suspended: Callable[[int], Sequence[str]] | None = None,
    ) -> None:
        self.participants = list(participants)  # who stakes before round 1
        self.refusals = refusals
        self.suspended_by_guard = suspended  # the history guard's suspensions of a round: flagged
        self.settings = settings
        self.book = IncentiveBook(settings.policy())
        self.enclave = enclave
        self.ledger: LedgerBackend | None = None  # set by recorders_for: where to read accounts back
        self._global: Any = None
        self._pending: dict[int, tuple[RoundIncentives, str]] = {}
        self._restored: set[str] = set()
        self.suspended: dict[str, int] = {}  # participant -> the round it was suspended in (never selected again)

    def on_round_start(self, plan: RoundPlan, params: Any) -> None:
        self._global = params.detach().clone()

    def on_round_end(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> None:
        ids = [p.participant_id for u in updates for p in contributions(u)]  # a secure sum: its survivors
        selected = [p.participant_id for i in result.aggregate.selected for p in contributions(updates[i])]
        if any(isinstance(u, SecureSumUpdate) for u in updates):
            # only the sum is known: every survivor's masked input counted alike
            shares, source = selection_shares(ids, selected), "selection"
        else:
            shares, source = self._contributions(updates, result, selected)
        refused = sorted(set(self.refusals(plan.round)) - set(ids))
        shares = {**shares, **{pid: 0.0 for pid in refused}}
        for pid in [*ids, *refused]:
            self._restore(pid)
        flagged = set(ids) - set(selected) if self.settings.flag_unselected else set()
        flagged |= set(refused)
        if self.suspended_by_guard is not None:
            flagged |= set(self.suspended_by_guard(plan.round)) & set(ids)
        ids = [*ids, *refused]
        if self.enclave is not None and (receipt := self.enclave.strategy.last_receipt) is not None:
            flagged |= set(receipt.body.get("rejected", {})) & set(ids)
        s = self.settings
        change = self.book.apply(plan.round, ids, shares, flagged, s.reward_per_round, s.slash_fraction)
        self._pending[plan.round] = (change, source)
        for pid in sorted(ids):
            if pid not in self.suspended and self.book.current(pid) < s.suspend_below:
                self.suspended[pid] = plan.round

    def _contributions(
        self, updates: Sequence[Update], result: RoundResult, selected: Sequence[str]
    ) -> tuple[dict[str, float], str]:
        ids = [u.participant_id for u in updates]
        if self.enclave is not None:
            receipt = self.enclave.strategy.last_receipt
            released = receipt.body.get("contributions") if receipt is not None else None
            if isinstance(released, dict):
                return {pid: float(released.get(pid, 0.0)) for pid in ids}, "enclave receipt"
            return selection_shares(ids, selected), "selection"
        deltas = torch.stack([u.params for u in updates]) - self._global
        scores = contribution_scores(deltas, result.params - self._global)
        return {pid: float(s) for pid, s in zip(ids, scores.tolist(), strict=True)}, "coordinator"

    def reputation(self, pid: str) -> float:
        """``pid``'s reputation now (read back from the chain the first time): what selection uses."""
        self._restore(pid)
        return self.book.current(pid)

    def _restore(self, pid: str) -> None:
        if pid in self._restored:
            return
        self._restored.add(pid)
        if self.ledger is None or pid in self.book.reputation:
            return
        acct = self.ledger.account(pid)
        if acct.reputation:
            self.book.reputation[pid] = acct.reputation
        if acct.balance:
            self.book.balances[pid] = acct.balance
        self.book.stakes[pid] = acct.stake

    def check_resume(self, audit_path: Path, last: int) -> None:
        """On resume after round ``last``: the chain must hold the reputations that round's incentives
        entry records. If it holds those from before that round (the coordinator stopped between the
        round's commitment and its incentives transaction), the entry's transaction is sent now."""
        if self.ledger is None or last <= 0:
            return

        body: dict[str, Any] | None = None
        for text in audit_path.read_text(encoding="utf-8").splitlines():
            e = json.loads(text)
            if e.get("kind") == INCENTIVES_KIND and int(e.get("round", -1)) == last:
                body = e["body"]
            if e.get("kind") == STATUS_KIND and e["body"].get("status") == "suspended" and int(e["round"]) <= last:
                self.suspended[str(e["body"]["participant"])] = int(e["round"])
        if body is None:
            return
        after = {str(k): int(v) for k, v in body["reputation_ppm"].items()}
        deltas = {str(k): int(v) for k, v in body["reputation_deltas"].items()}
        held = {pid: self.ledger.account(pid).reputation for pid in after}
        if held == after:
            return
        if held == {pid: after[pid] - deltas[pid] for pid in after}:
            ids = sorted(after)
            for pid, amount in sorted(body.get("slashed", {}).items()):  # slashes go first, one by one
                stake, want = self.ledger.account(pid).stake, int(body["stake"][pid])
                if stake == want + int(amount):
                    self.ledger.slash(pid, last, int(amount), "flagged by the aggregator")
                elif stake != want:
                    raise LedgerError(f"cannot resume: {pid}'s stake on chain ({stake}) fits no state of round {last}")
            self.ledger.apply_incentives(last, ids, [deltas[p] for p in ids], [int(body["rewards"][p]) for p in ids])
            log.warning("resume: sent round %d's incentives transaction, which the chain did not have", last)
            return
        raise LedgerError(
            f"cannot resume: the chain's reputations {held} match neither round {last}'s incentives entry nor the "
            "state before it"
        )

    def genesis(self) -> Sequence[Attachment]:
        """Before round 1: every participant's stake (an ``incentives_stake`` entry, one tx each)."""
        stake = self.settings.stake
        if stake == 0:
            return []
        ids = sorted(self.participants)
        for pid in ids:
            self.book.stakes[pid] = stake
            self._restored.add(pid)  # a fresh run: nothing to read back

        def put(ledger: LedgerBackend) -> object:
            return [ledger.add_stake(pid, stake) for pid in ids]

        return [Attachment(STAKE_KIND, {"stake": stake, "participants": ids}, chain=put)]

    def for_round(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> Sequence[Attachment]:
        change, source = self._pending.pop(plan.round)
        s = self.settings
        body = change.to_body(s.reward_per_round, source, self.book.policy, s.flag_unselected, s.slash_fraction)
        if s.suspend_below > 0:
            body["suspend_below"] = s.suspend_below
        ids = sorted(change.rewards)
        deltas = [change.reputation_deltas[p] for p in ids]
        rewards = [change.rewards[p] for p in ids]

        def apply(ledger: LedgerBackend) -> object:
            for pid, amount in sorted(change.slashed.items()):  # before applyRound: see check_resume
                ledger.slash(pid, plan.round, amount, "flagged by the aggregator")
            return ledger.apply_incentives(plan.round, ids, deltas, rewards)

        out = [Attachment(INCENTIVES_KIND, body, chain=apply)]
        for pid in sorted(p for p, r in self.suspended.items() if r == plan.round):
            reason = f"reputation {self.book.current(pid):.6f} below {s.suspend_below}"
            log.warning("round %d: %s is suspended (%s): it is not selected again", plan.round, pid, reason)
            status = {"participant": pid, "status": "suspended", "reason": reason}
            out.append(Attachment(STATUS_KIND, status, chain=set_status_on_chain(pid, "suspended")))
        return out


def use_reputation_selection(cfg: FederationConfig, strategy: Strategy, observers: Sequence[object]) -> None:
    """With ``[incentives] selection = "reputation"``, let the federation's FedAvg-family strategy (inside
    any enclave / DP wrapper) draw participants by the reputation the run's incentives record holds;
    with ``suspend_below``, never draw a participant the record has suspended."""
    inc = cfg.incentives
    if inc.selection != "reputation" and not (inc.enabled and inc.suspend_below > 0):
        return

    record = next((o for o in observers if isinstance(o, IncentivesRecord)), None)
    if record is None:
        raise LedgerError(
            "incentives.selection = 'reputation' (or suspend_below) needs the run to be recorded (an output folder "
            "and [ledger] enabled)"
        )
    inner: Any = strategy
    while not isinstance(inner, FedAvg) and hasattr(inner, "inner"):
        inner = inner.inner
    if not isinstance(inner, FedAvg):
        raise LedgerError(f"strategy {strategy.name!r} does not draw participants the FedAvg way")
    if inc.selection == "reputation":
        inner.selector = ReputationSelector(record.reputation, cfg.federation.seed)
    if inc.suspend_below > 0:
        suspended = record.suspended
        inner.excluded = lambda: suspended


def set_status_on_chain(pid: str, status: str) -> Callable[[LedgerBackend], object]:
    def send(ledger: LedgerBackend) -> object:
        return ledger.set_status(pid, Status[status.upper()])

    return send
