"""The run recorders a federation attaches for its config, shared by the simulation and the network.

``recorders_for(cfg, out_dir, spec, ids)`` returns the RoundObservers that record a run in its
folder: the privacy spend (``privacy.jsonl``) and the ledger (signed audit log, checkpoints, chain).
Both :func:`trustfed.simulation.runner.run_simulation` and
:func:`trustfed.coordinator.run.run_coordinator` call it, so a simulated and a networked run
are recorded the same way. What differs is who holds the keys:

* simulation (``network=None``): the participants live in this process, so do their keys
  (``RUN_DIR/keys``);
* network (:class:`NetworkIdentities`): the coordinator signs with its PKI key, participants are
  registered by their certificates' fingerprints, and each commitment is the one the participant
  signed with its own key and sent with its update.

The privacy spend lines and the enclave's attestation and receipts become coordinator-signed audit
entries (:class:`~trustfed.ledger.recorder.Attachment`), anchored on chain with the round; the
receipt's hash goes in the chain's ``receiptHash`` slot. With ``[incentives]`` every round's
contributions, reputation and rewards become an ``incentives`` entry and one ``applyRound``
transaction on the Incentives contract. An update refused for what it carried (non-finite values, a
declared example count over ``max_examples``), by the coordinator at upload or by the enclave, becomes a
``participant_behaviour`` entry naming the participant and the reason, and a flag in the incentives; so
does a participant the history guard (``[strategy.suspension]``) suspends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trustfed.app.loading import AppIdentity
from trustfed.config import FederationConfig
from trustfed.coordinator.board import Refusal
from trustfed.coordinator.enclave_record import EnclaveRecord
from trustfed.coordinator.incentives_record import IncentivesRecord, set_status_on_chain
from trustfed.coordinator.tracking import trackers_for
from trustfed.core.codec import ParamSpec
from trustfed.core.history_guard import HistoryGuard
from trustfed.core.rounds import RoundObserver, RoundRecord
from trustfed.core.strategy import RoundPlan, RoundResult, Update
from trustfed.ledger.audit import Signer, parsed_entries
from trustfed.ledger.backends import LedgerBackend
from trustfed.ledger.kinds import APP_KIND, BEHAVIOUR_KIND, PRIVACY_KIND, REFUSAL_KIND, STATUS_KIND
from trustfed.ledger.recorder import (
    Attachment,
    CommitmentSource,
    LedgerRecorder,
    RoundAttachments,
    ledger_account,
    network_recorder,
    simulated_recorder,
)
from trustfed.ledger.records import Status
from trustfed.ledger.refusals import SignedRefusal
from trustfed.privacy.report import PrivacyRecorder
from trustfed.privacy.wiring import privacy_recorder

log = logging.getLogger("trustfed.coordinator.recorders")


@dataclass(frozen=True)
class NetworkIdentities:
    """Keys of a networked federation: the coordinator's own signer, everyone's certificate (PEM,
    keyed by id; the coordinator's under ``"coordinator"``), the participants' signed commitments and
    the signed refusals they sent with their withdrawals (per round)."""

    coordinator: Signer
    certificates: Mapping[str, bytes]
    commitments: CommitmentSource
    participant_refusals: Callable[[int], Sequence[SignedRefusal]] | None = None  # sent with withdrawals
    upload_refusals: Callable[[int], Mapping[str, Refusal]] = field(default=lambda _rnd: {})  # refused at upload
    max_examples: int | None = None  # the bound the coordinator enforced on declared counts, recorded


class RefusalRecord:
    """Each participant's signed refusal of a round (the model it was served, the one it expected) as
    an entry of the round it refused, authored and signed by the participant: ``audit verify`` checks it
    against the round's plan, and against the participants' own copies."""

    def __init__(self, refusals: Callable[[int], Sequence[SignedRefusal]]) -> None:
        self.refusals = refusals

    def genesis(self) -> Sequence[Attachment]:
        return []

    def for_round(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> Sequence[Attachment]:
        return [
            Attachment(REFUSAL_KIND, r.body, signed_by=(r.participant_id, r.sig)) for r in self.refusals(plan.round)
        ]


class _PrivacySpend:
    """Each round's privacy.jsonl lines as signed audit entries (the recorder runs first)."""

    def __init__(self, recorder: PrivacyRecorder) -> None:
        self.recorder = recorder

    def genesis(self) -> Sequence[Attachment]:
        return []

    def for_round(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> Sequence[Attachment]:
        return [Attachment(PRIVACY_KIND, dict(line)) for line in self.recorder.lines.get(plan.round, [])]


class AppRecord:
    """The app that trained the model (target, code hash, config), a coordinator-signed entry before
    round 1. Each participant's signed commitments carry the code hash it ran and its data manifest's
    hash; ``audit verify`` reports a participant whose code hash differs."""

    def __init__(self, identity: AppIdentity) -> None:
        self.identity = identity

    def genesis(self) -> Sequence[Attachment]:
        return [Attachment(APP_KIND, self.identity.describe())]

    def for_round(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> Sequence[Attachment]:
        return []


def _reason_code(why: str) -> str:
    """The reason code an enclave rejection starts with (``non_finite: ...``), else ``enclave_rejected``."""
    head = why.split(":", 1)[0]
    return head if head and all(c.isalpha() or c == "_" for c in head) and head.islower() else "enclave_rejected"


class BehaviourRecord:
    """Each update refused for what it carried, as a coordinator-signed ``participant_behaviour`` entry in
    its round: ``{participant, reason, detail, source}``, ``source`` being ``"coordinator"`` (refused at
    upload; the participant was answered INVALID_ARGUMENT with the reason) or ``"enclave"`` (rejected in
    the enclave's signed receipt). ``audit verify`` checks each against the round's commitments or
    receipt and lists them."""

    def __init__(self, refusals: Callable[[int], Mapping[str, Refusal]], enclave: EnclaveRecord | None = None):
        self.refusals = refusals
        self.enclave = enclave

    def genesis(self) -> Sequence[Attachment]:
        return []

    def for_round(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> Sequence[Attachment]:
        out = []
        for pid, r in sorted(self.refusals(plan.round).items()):
            body = {"participant": pid, "reason": r.reason, "detail": r.detail, "source": "coordinator"}
            out.append(Attachment(BEHAVIOUR_KIND, body))
        receipt = self.enclave.strategy.last_receipt if self.enclave is not None else None
        if receipt is not None and receipt.round == plan.round:
            for pid, why in sorted(dict(receipt.body.get("rejected", {})).items()):
                body = {"participant": pid, "reason": _reason_code(str(why)), "detail": str(why), "source": "enclave"}
                out.append(Attachment(BEHAVIOUR_KIND, body))
        for att in out:
            log.warning(
                "round %d: %s's update refused by the %s (%s)",
                plan.round,
                att.body["participant"],
                att.body["source"],
                att.body["reason"],
            )
        return out


class SuspensionRecord:
    """Each participant the history guard suspended, as a coordinator-signed ``participant_behaviour``
    entry in the round it was suspended in: ``{participant, reason, detail, source = "suspension", score,
    rounds, min_cosine, min_consistency, reference}`` (``reason``: ``persistent_opposition`` or
    ``inconsistent_updates``). ``audit verify`` checks that it committed that round and that no later round
    selects it; with ``[incentives]`` the participant is flagged in that round's incentives entry."""

    def __init__(self, guard: HistoryGuard) -> None:
        self.guard = guard

    def genesis(self) -> Sequence[Attachment]:
        return []

    def for_round(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> Sequence[Attachment]:
        rule = self.guard.rule
        return [
            Attachment(
                BEHAVIOUR_KIND,
                {
                    "participant": s.participant,
                    "reason": s.reason,
                    "detail": s.detail(rule),
                    "source": "suspension",
                    "score": s.score,
                    "rounds": s.rounds,
                    "min_cosine": rule.min_cosine,
                    "min_consistency": rule.min_consistency,
                    "reference": rule.reference,
                },
            )
            for s in self.guard.suspended_in(plan.round)
        ]


class StatusRecord:
    """A participant that left the federation (withdrew, was revoked, its host was lost) gets a signed
    ``participant_status`` entry in the round it left ({participant, status, reason}) and its status
    in the on-chain registry set (``exited``, or ``revoked``) after the round's commitment: the
    registry says who is still in the federation, and ``audit verify`` checks it against the log."""

    def genesis(self) -> Sequence[Attachment]:
        return []

    def for_round(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> Sequence[Attachment]:
        out = []
        for pid, reason in sorted(record.left.items()):
            status = "revoked" if reason == "revoked" else "exited"
            body = {"participant": pid, "status": status, "reason": reason}
            out.append(Attachment(STATUS_KIND, body, chain=set_status_on_chain(pid, status)))
        return out

    @staticmethod
    def check_resume(audit_path: Path, last: int, ledger: LedgerBackend) -> dict[str, str]:
        """On resume: a status the log records up to round ``last`` but the chain lacks (the coordinator
        stopped between the round's commitment and the status transaction) is sent now. Returns every
        participant the log has leave or be suspended (-> its status): the resumed run leaves them out."""
        out: dict[str, str] = {}
        for e in parsed_entries(audit_path):
            if e.kind != STATUS_KIND or e.round > last:
                continue
            pid, status = str(e.body["participant"]), Status[str(e.body["status"]).upper()]
            ident = next((i for i in ledger.participants() if i.id == pid), None)
            if ident is not None and ident.status != status:
                ledger.set_status(pid, status)
                log.warning("resume: set %s's status to %s on chain, as round %d recorded", pid, status.name, e.round)
            out[pid] = status.name.lower()
        return out


def recorders_for(
    cfg: FederationConfig,
    out_dir: Path | None,
    spec: ParamSpec,
    participant_ids: Sequence[str],
    *,
    network: NetworkIdentities | None = None,
    enclave: EnclaveRecord | None = None,
    resume: bool = False,
    provenance: Mapping[str, Mapping[str, str]] | None = None,
    app: AppIdentity | None = None,
    guard: HistoryGuard | None = None,
) -> list[RoundObserver]:
    """The observers that record a run of ``cfg`` in ``out_dir`` (none without a folder). ``guard``: the
    run's history guard, whose suspensions are recorded and flagged.

    Order matters: the privacy recorder writes its lines before the ledger recorder signs them, and the
    trackers (``[tracking]``) read the audit-log head the ledger recorder has just written."""
    out: list[RoundObserver] = []
    if out_dir is None:
        return out
    attachments: list[RoundAttachments] = []
    if enclave is not None:
        attachments.append(enclave)
    if cfg.privacy.mode != "none":  # OUT/privacy.jsonl; before the ledger, which signs and anchors it
        privacy = privacy_recorder(cfg.privacy, out_dir, resume=resume)
        out += privacy
        attachments += [_PrivacySpend(p) for p in privacy]
    refusals = network.upload_refusals if network is not None else (lambda _rnd: {})
    incentives: IncentivesRecord | None = None
    if cfg.incentives.enabled and cfg.ledger.enabled:  # scores each round before the ledger records it
        suspended = (lambda rnd: [s.participant for s in guard.suspended_in(rnd)]) if guard is not None else None
        incentives = IncentivesRecord(cfg.incentives, enclave, participant_ids, refusals, suspended)
        out.append(incentives)
        attachments.append(incentives)
    if cfg.ledger.enabled:  # audit log + checkpoints + chain, all in trustfed.ledger
        attachments.append(StatusRecord())
        if network is not None and network.participant_refusals is not None:
            attachments.append(RefusalRecord(network.participant_refusals))
        attachments.append(BehaviourRecord(refusals, enclave))
        if guard is not None:
            attachments.append(SuspensionRecord(guard))
        if app is not None:
            attachments.insert(0, AppRecord(app))
        if network is None:
            recorder = simulated_recorder(
                cfg.ledger,
                out_dir,
                spec,
                list(participant_ids),
                attachments,
                provenance=provenance,
                compression=cfg.transport.compression_policy,
            )
        else:
            recorder = network_recorder(
                cfg.ledger,
                out_dir,
                spec,
                network.coordinator,
                network.certificates,
                network.commitments,
                attachments,
                resume=resume,
                max_examples=network.max_examples,
                compression=cfg.transport.compression_policy,
            )
        out.append(recorder)
        if incentives is not None:
            incentives.ledger = recorder.ledger
    if cfg.tracking.enabled:  # last: a round's audit-log head is written by the time they read it
        out += trackers_for(cfg, out_dir)
    return out


def ledger_metrics(observers: Sequence[RoundObserver]) -> dict[str, object]:
    """metrics.json's ``ledger``: the chain and the account that signed it (with a notice when that
    account's key is a public development key); nothing without a ledger."""
    for o in observers:
        if isinstance(o, LedgerRecorder):
            return {"ledger": ledger_account(o.ledger.deployment())}
    return {}
