"""The run recorders a federation attaches for its config, shared by the simulation and the network.

``recorders_for(cfg, out_dir, spec, ids)`` returns the RoundObservers that record a run in its
folder: the privacy spend (``privacy.jsonl``) and the ledger (signed audit log, checkpoints, chain).
Both :func:`trustfed.simulation.runner.run_simulation` and
:func:`trustfed.coordinator.service.run_coordinator` call it, so a simulated and a networked run
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
transaction on the Incentives contract.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustfed.coordinator.engine import RoundObserver, RoundRecord
from trustfed.core.codec import ParamSpec
from trustfed.core.strategy import RoundPlan, RoundResult, Strategy, Update

if TYPE_CHECKING:
    from trustfed.app.loading import AppIdentity
    from trustfed.config import FederationConfig
    from trustfed.enclave.core import EnclaveClient
    from trustfed.enclave.policy import AttestationPolicy
    from trustfed.enclave.strategy import EnclaveStrategy
    from trustfed.incentives.book import RoundIncentives
    from trustfed.incentives.settings import IncentiveSettings
    from trustfed.ledger.audit import Signer
    from trustfed.ledger.backends import LedgerBackend
    from trustfed.ledger.recorder import Attachment, CommitmentSource, RoundAttachments
    from trustfed.privacy.report import PrivacyRecorder

log = logging.getLogger("trustfed.coordinator.recorders")

PRIVACY_KIND = "privacy_spend"
INCENTIVES_KIND = "incentives"
STAKE_KIND = "incentives_stake"
ATTESTATION_KIND = "enclave_attestation"
RECEIPT_KIND = "enclave_receipt"


@dataclass(frozen=True)
class NetworkIdentities:
    """Keys of a networked federation: the coordinator's own signer, everyone's certificate (PEM,
    keyed by id; the coordinator's under ``"coordinator"``) and the participants' signed commitments."""

    coordinator: Signer
    certificates: Mapping[str, bytes]
    commitments: CommitmentSource


@dataclass(frozen=True)
class EnclaveAttestation:
    """The coordinator's own attestation of the enclave: recorded so an auditor can re-verify it."""

    evidence: bytes
    nonce: bytes
    verified_at: float
    claims: Mapping[str, Any]


def attest_enclave(client: EnclaveClient, policy: AttestationPolicy, where: str = "coordinator") -> EnclaveAttestation:
    """Challenge ``client`` with a fresh nonce and verify the evidence against ``policy`` (raises if refused)."""
    from trustfed.enclave.attestation import raise_if_refused, verify_evidence

    nonce = os.urandom(32)
    now = time.time()
    evidence = client.evidence(nonce)
    verdict = verify_evidence(evidence, policy, nonce, now)
    raise_if_refused(verdict, where)
    return EnclaveAttestation(evidence, nonce, now, dict(verdict.claims))


class _PrivacySpend:
    """Each round's privacy.jsonl lines as signed audit entries (the recorder runs first)."""

    def __init__(self, recorder: PrivacyRecorder) -> None:
        self.recorder = recorder

    def genesis(self) -> Sequence[Attachment]:
        return []

    def for_round(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> Sequence[Attachment]:
        from trustfed.ledger.recorder import Attachment

        return [Attachment(PRIVACY_KIND, dict(line)) for line in self.recorder.lines.get(plan.round, [])]


class EnclaveRecord:
    """The enclave's attestation (before round 1) and every round's signed receipt, for the log."""

    def __init__(self, strategy: EnclaveStrategy, attestation: EnclaveAttestation) -> None:
        self.strategy = strategy
        self.attestation = attestation

    def genesis(self) -> Sequence[Attachment]:
        from trustfed.ledger.recorder import Attachment

        a = self.attestation
        simulated = bool(a.claims.get("simulated"))
        body = {
            "backend": str(a.claims.get("backend", "")),
            "simulated": simulated,
            "label": "SIMULATED" if simulated else "ATTESTED",
            "public_key": str(a.claims.get("public_key", "")),
            "measurement": str(a.claims.get("measurement", "")),
            "nonce": a.nonce.hex(),
            "verified_at": a.verified_at,
            "evidence": base64.b64encode(a.evidence).decode(),
        }
        return [Attachment(ATTESTATION_KIND, body)]

    def for_round(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> Sequence[Attachment]:
        from trustfed.enclave.receipts import receipt_hash
        from trustfed.ledger.recorder import Attachment
        from trustfed.ledger.records import LedgerError

        r = self.strategy.last_receipt
        if r is None or r.round != plan.round:
            raise LedgerError(f"round {plan.round}: the enclave returned no receipt for this round")
        if r.enclave_public_key.hex() != self.attestation.claims.get("public_key"):
            raise LedgerError(
                f"round {plan.round}: the receipt is signed by an enclave key that was not attested; the enclave "
                "restarted or was replaced: restart the federation so that it is attested again"
            )
        body = {"label": r.body.get("label"), "receipt": r.to_dict()}
        return [Attachment(RECEIPT_KIND, body, receipt_hash=receipt_hash(r))]

    def check_resume(self, last: int, audit_path: Path | None) -> dict[str, Any] | None:
        """Before a resumed run goes on through the enclave, from round ``last``: the enclave must be the
        one this run attested (the key in the log's attestation entry; keys never leave an enclave, so
        the same process, with its privacy accountant and adaptive clip norm), at round ``last``, or at
        ``last + 1`` when the coordinator stopped after the enclave's output of that round and before
        recording it. That round is then aggregated again (``redo``); its first release stays counted
        in the enclave's accountant, and is returned (its receipt privacy block, with central DP) so
        the privacy record counts it too. With central DP the accountant must hold the releases the
        round-``last`` receipt on record counts (plus that lost one). The enclave answers with a
        statement signed by its attested key over a fresh nonce; unrecorded runs (no audit log) check
        the round only. Then the coordinator takes the clip norm the enclave applies next."""
        from trustfed.enclave.receipts import verify_state
        from trustfed.errors import CheckpointError
        from trustfed.ledger.audit import parsed_entries

        attested = str(self.attestation.claims.get("public_key", ""))
        logged: str | None = None
        recorded: Any = None
        if audit_path is not None:
            for e in parsed_entries(audit_path):
                if e.kind == ATTESTATION_KIND:
                    logged = str(e.body.get("public_key", ""))
                elif e.kind == RECEIPT_KIND and e.round == last:
                    recorded = (e.body.get("receipt") or {}).get("body", {})
            if logged is None:
                raise CheckpointError(f"cannot resume: {audit_path} holds no enclave attestation")
            if logged != attested:
                raise CheckpointError(
                    "cannot resume through the enclave: it is not the one this run attested (its key "
                    f"{attested[:16]}… differs from the logged {logged[:16]}…): it restarted or was replaced, and "
                    "a new enclave's privacy accountant would start from nothing; start a new run"
                )
        nonce = os.urandom(32)
        state = verify_state(
            self.strategy.enclave.state(nonce), enclave_public_key=bytes.fromhex(attested), nonce=nonce
        )
        done = int(state["last_round"])
        if not last <= done <= last + 1:
            raise CheckpointError(
                f"cannot resume after round {last}: the enclave's last round is {done}, so it is not the enclave "
                "that aggregated this run's rounds (a restarted enclave starts from nothing); start a new run"
            )
        lost = done == last + 1
        if lost:
            self.strategy.redo_round = done
            log.warning(
                "the enclave aggregated round %d, which the run does not record: the round runs again (redo) and "
                "its first release stays counted",
                done,
            )
        if self.strategy.central_dp is None:
            return None
        privacy = state.get("privacy")
        if not isinstance(privacy, dict):
            raise CheckpointError("cannot resume: the enclave runs without central DP, the federation with it")
        release = privacy.get("last_release")
        extra = lost and isinstance(release, dict) and release.get("round") == done
        if audit_path is not None:
            want = (recorded or {}).get("privacy", {}).get("rounds_accounted")
            have = privacy.get("rounds_accounted")
            if not isinstance(want, int) or have != want + int(extra):
                raise CheckpointError(
                    f"cannot resume: the enclave's accountant holds {have!r} release(s); the round-{last} receipt "
                    f"on record counts {want!r}" + (f" and the enclave released round {done} since" if extra else "")
                )
        self.strategy.resume_clip_norm(float(privacy["clip_norm"]))
        log.warning(
            "resuming through the same enclave (key %s…): last round %d, %s release(s) accounted, epsilon %s",
            attested[:16],
            done,
            privacy.get("rounds_accounted"),
            privacy.get("epsilon"),
        )
        return dict(release) if extra and isinstance(release, dict) else None

    def receipt_json(self, rnd: int) -> bytes | None:
        """The signed receipt of round ``rnd`` (canonical JSON), for participants."""
        for r in reversed(self.strategy.receipts):
            if r.round == rnd:
                return r.to_json()
        return None

    @property
    def simulated(self) -> bool:
        return bool(self.attestation.claims.get("simulated"))

    def describe(self) -> dict[str, Any]:
        """For metrics.json and the demo banner: the enclave is labelled SIMULATED when it is."""
        return {
            "label": "SIMULATED" if self.simulated else "ATTESTED",
            "backend": str(self.attestation.claims.get("backend", "")),
            "measurement": str(self.attestation.claims.get("measurement", "")),
            "public_key": str(self.attestation.claims.get("public_key", "")),
            "receipts": len(self.strategy.receipts),
        }


class IncentivesRecord:
    """Scores every round and moves reputation and rewards (a RoundObserver that runs before the
    ledger recorder, and the source of that round's ``incentives`` entry and transaction).

    Contributions come from the updates themselves when the coordinator holds them in the clear
    (``source = "coordinator"``), from the enclave's signed receipt in enclave mode
    (``"enclave receipt"``), or, when the enclave releases none (central DP) or the round was a
    secure sum (its survivors), as equal shares of the updates the aggregator used
    (``"selection"``). Updates the aggregator left out (or the enclave rejected) are flagged. The book starts from the chain's accounts, so a resumed run goes
    on from where the chain stands."""

    def __init__(
        self, settings: IncentiveSettings, enclave: EnclaveRecord | None = None, participants: Sequence[str] = ()
    ) -> None:
        self.participants = list(participants)  # who stakes before round 1
        from trustfed.incentives.book import IncentiveBook

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
        from trustfed.secagg.updates import SecureSumUpdate, contributions

        ids = [p.participant_id for u in updates for p in contributions(u)]  # a secure sum: its survivors
        selected = [p.participant_id for i in result.aggregate.selected for p in contributions(updates[i])]
        if any(isinstance(u, SecureSumUpdate) for u in updates):
            from trustfed.incentives.book import selection_shares

            # only the sum is known: every survivor's masked input counted alike
            shares, source = selection_shares(ids, selected), "selection"
        else:
            shares, source = self._contributions(updates, result, selected)
        for pid in ids:
            self._restore(pid)
        flagged = set(ids) - set(selected) if self.settings.flag_unselected else set()
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
        import torch

        from trustfed.incentives.book import selection_shares
        from trustfed.incentives.scoring import contribution_scores

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
        from trustfed.ledger.records import LedgerError

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
        from trustfed.ledger.recorder import Attachment

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
        from trustfed.ledger.recorder import Attachment

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
            out.append(Attachment(STATUS_KIND, status, chain=_set_status(pid, "suspended")))
        return out


def use_reputation_selection(cfg: FederationConfig, strategy: Strategy, observers: Sequence[object]) -> None:
    """With ``[incentives] selection = "reputation"``, let the federation's FedAvg-family strategy (inside
    any enclave / DP wrapper) draw participants by the reputation the run's incentives record holds;
    with ``suspend_below``, never draw a participant the record has suspended."""
    inc = cfg.incentives
    if inc.selection != "reputation" and not (inc.enabled and inc.suspend_below > 0):
        return
    from trustfed.core.strategy import FedAvg
    from trustfed.incentives.book import ReputationSelector
    from trustfed.ledger.records import LedgerError

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


STATUS_KIND = "participant_status"


APP_KIND = "app"


class AppRecord:
    """The app that trained the model (target, code hash, config), a coordinator-signed entry before
    round 1. Each participant's signed commitments carry the code hash it ran and its data manifest's
    hash; ``audit verify`` reports a participant whose code hash differs."""

    def __init__(self, identity: AppIdentity) -> None:
        self.identity = identity

    def genesis(self) -> Sequence[Attachment]:
        from trustfed.ledger.recorder import Attachment

        return [Attachment(APP_KIND, self.identity.describe())]

    def for_round(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> Sequence[Attachment]:
        return []


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
        from trustfed.ledger.recorder import Attachment

        out = []
        for pid, reason in sorted(record.left.items()):
            status = "revoked" if reason == "revoked" else "exited"
            body = {"participant": pid, "status": status, "reason": reason}
            out.append(Attachment(STATUS_KIND, body, chain=_set_status(pid, status)))
        return out

    @staticmethod
    def check_resume(audit_path: Path, last: int, ledger: LedgerBackend) -> dict[str, str]:
        """On resume: a status the log records up to round ``last`` but the chain lacks (the coordinator
        stopped between the round's commitment and the status transaction) is sent now. Returns every
        participant the log has leave or be suspended (-> its status): the resumed run leaves them out."""
        from trustfed.ledger.audit import parsed_entries
        from trustfed.ledger.records import Status

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


def _set_status(pid: str, status: str) -> Callable[[LedgerBackend], object]:
    def send(ledger: LedgerBackend) -> object:
        from trustfed.ledger.records import Status

        return ledger.set_status(pid, Status[status.upper()])

    return send


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
) -> list[RoundObserver]:
    """The observers that record a run of ``cfg`` in ``out_dir`` (none without a folder).

    Order matters: the privacy recorder writes its lines before the ledger recorder signs them."""
    out: list[RoundObserver] = []
    if out_dir is None:
        return out
    attachments: list[RoundAttachments] = []
    if enclave is not None:
        attachments.append(enclave)
    if cfg.privacy.mode != "none":  # OUT/privacy.jsonl; before the ledger, which signs and anchors it
        from trustfed.privacy.wiring import privacy_recorder

        privacy = privacy_recorder(cfg.privacy, out_dir, resume=resume)
        out += privacy
        attachments += [_PrivacySpend(p) for p in privacy]
    incentives: IncentivesRecord | None = None
    if cfg.incentives.enabled and cfg.ledger.enabled:  # scores each round before the ledger records it
        incentives = IncentivesRecord(cfg.incentives, enclave, participant_ids)
        out.append(incentives)
        attachments.append(incentives)
    if cfg.ledger.enabled:  # audit log + checkpoints + chain, all in trustfed.ledger
        from trustfed.ledger.recorder import network_recorder, simulated_recorder

        attachments.append(StatusRecord())
        if app is not None:
            attachments.insert(0, AppRecord(app))
        if network is None:
            recorder = simulated_recorder(
                cfg.ledger, out_dir, spec, list(participant_ids), attachments, provenance=provenance
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
            )
        out.append(recorder)
        if incentives is not None:
            incentives.ledger = recorder.ledger
    return out
