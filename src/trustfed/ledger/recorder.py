"""LedgerRecorder: a RoundObserver that writes every round to the audit log, a checkpoint and the chain.

Per round, in order: ``round_plan`` (coordinator), one ``commitment`` per update (signed by its
participant), ``aggregation`` (Merkle root of the commitments, metrics, new model hash, receipt hash),
``checkpoint`` (file and model hash); then one on-chain transaction
{round, model hash, Merkle root, receipt hash, log head}. Before round 1 it writes the identities,
registers them on chain (one transaction) and commits round 0, the initial model.

Run folder layout::

    RUN_DIR/audit.jsonl                   the signed, hash-chained log
    RUN_DIR/checkpoints/round_NNNN.f32    global model after round N (+ .spec.json); round 0 = initial
    RUN_DIR/ledger/deployment.json        backend, chain id and contract addresses
    RUN_DIR/ledger/transactions.jsonl     signed raw transactions (embedded backend only)
    RUN_DIR/keys/                         simulation only: private keys of the coordinator and participants
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from trustfed.core.codec import ParamSpec, model_hash, to_bytes
from trustfed.core.compression import CompressionPolicy
from trustfed.core.rounds import RoundRecord
from trustfed.core.strategy import RoundPlan, RoundResult, Update
from trustfed.ledger.accounts import dev_key_notice, is_dev_account
from trustfed.ledger.audit import AuditLog, EcdsaSigner, Signer, certificate_fingerprint, key_fingerprint, parse_entry
from trustfed.ledger.backends import LedgerBackend, open_backend
from trustfed.ledger.checkpoint import CHECKPOINT_DIR, save_checkpoint
from trustfed.ledger.kinds import LEDGER_KIND
from trustfed.ledger.participant import COMMITMENT_KIND, SignedCommitment, sign_update
from trustfed.ledger.records import ZERO32, Identity, LedgerError, Role, RoundCommitment
from trustfed.ledger.settings import LedgerSettings
from trustfed.primitives.atomic import atomic_write_text
from trustfed.primitives.merkle import merkle_root
from trustfed.secagg.updates import contributions

log = logging.getLogger("trustfed.ledger")

AUDIT_FILE = "audit.jsonl"
LEDGER_DIR = "ledger"
KEYS_DIR = "keys"
COORDINATOR_ID = "coordinator"

# Given the round plan and one update, return that participant's signed commitment. In simulation the
# participants' keys live in this process; over the network the signature arrives with the update.
CommitmentSource = Callable[[RoundPlan, Update], SignedCommitment]


@dataclass(frozen=True)
class Attachment:
    """An extra entry of a round (enclave attestation and receipt, privacy spend), signed by the
    coordinator, or by a participant (``signed_by``: its refusal of the round).

    ``receipt_hash`` is set on the entry that carries the round's enclave receipt: it goes on chain.
    ``chain``, when set, is called with the ledger after the round's commitment transaction (the
    round's incentive changes, for example)."""

    kind: str
    body: dict[str, Any]
    receipt_hash: str | None = None
    chain: Callable[[LedgerBackend], object] | None = None
    signed_by: tuple[str, bytes] | None = (
        None  # (author, signature): an entry a participant signed, not the coordinator
    )


class RoundAttachments(Protocol):
    """Something that adds entries to the log: before round 1 (``genesis``) and in every round."""

    def genesis(self) -> Sequence[Attachment]: ...

    def for_round(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> Sequence[Attachment]: ...


class LedgerRecorder:
    """Records rounds; plugs into ``Coordinator(observers=[...])``."""

    def __init__(
        self,
        run_dir: Path,
        ledger: LedgerBackend,
        coordinator: Signer,
        participant_keys: Mapping[str, bytes],
        spec: ParamSpec,
        commitments: CommitmentSource,
        *,
        checkpoints: bool = True,
        certificates: Mapping[str, bytes] | None = None,
        attachments: Sequence[RoundAttachments] = (),
        max_examples: int | None = None,
        compression: CompressionPolicy | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.compression = compression  # [transport] compression: declared in every aggregation entry
        self.max_examples = max_examples  # the bound on declared counts the coordinator enforced, if it did
        self.ledger = ledger
        self.coordinator = coordinator
        self.participant_keys = dict(participant_keys)
        self.spec = spec
        self.commitments = commitments
        self.checkpoints = checkpoints
        self.certificates = dict(certificates or {})  # id -> certificate PEM: registered by certificate fingerprint
        self.attachments = list(attachments)
        self.audit_path = run_dir / AUDIT_FILE
        self.seconds: dict[int, float] = {}  # time spent recording, per round
        self._ready = False

    # ------------------------------------------------------------------ observer hooks
    def on_round_start(self, plan: RoundPlan, params: torch.Tensor) -> None:
        t0 = time.perf_counter()
        with AuditLog(self.audit_path) as audit:
            if not self._ready:
                self._start(plan, params, audit)
            audit.append(
                "round_plan",
                plan.round,
                {
                    "participants": list(plan.participants),
                    "config": dict(plan.config),
                    "model_hash": plan.model_hash,
                },
                self.coordinator,
            )
        self.seconds[plan.round] = self.seconds.get(plan.round, 0.0) + time.perf_counter() - t0

    def on_round_end(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> None:
        t0 = time.perf_counter()
        rnd = plan.round
        leaves: list[bytes] = []
        committed = [part for upd in updates for part in contributions(upd)]  # a secure sum: its masked inputs
        with AuditLog(self.audit_path) as audit:
            for upd in committed:
                sc = self.commitments(plan, upd)
                if sc.participant_id != upd.participant_id or sc.round != rnd:
                    raise LedgerError(
                        f"round {rnd}: commitment for {sc.participant_id!r} round {sc.round} does not match "
                        f"the update of {upd.participant_id!r}"
                    )
                audit.append(COMMITMENT_KIND, rnd, sc.body, _AuthorOnly(upd.participant_id), sig=sc.sig)
                leaves.append(sc.commitment)
            root = merkle_root(leaves).hex()
            atts = [att for source in self.attachments for att in source.for_round(plan, updates, result, record)]
            on_chain = self._append_attachments(audit, rnd, atts)
            receipt = next((att.receipt_hash for att in reversed(atts) if att.receipt_hash), "")
            selected = [p.participant_id for i in result.aggregate.selected for p in contributions(updates[i])]
            body: dict[str, Any] = {
                "participants": [u.participant_id for u in committed],
                "selected": selected,
                "merkle_root": root,
                "num_updates": len(committed),
                "metrics": {k: float(v) for k, v in record.metrics.items()},
                "model_hash": record.model_hash,
                "receipt_hash": receipt,
            }
            if self.max_examples is not None:  # every commitment's num_examples is within it (audit verify checks)
                body["max_examples"] = self.max_examples
            if self.compression is not None and self.compression.enabled:  # audit verify checks each commitment
                body["compression"] = self.compression.declaration()
            audit.append("aggregation", rnd, body, self.coordinator)
            self._checkpoint(audit, rnd, result.params, record.model_hash)
            audit.sync()
            head = audit.head
        tx = self.ledger.commit_round(
            RoundCommitment(rnd, record.model_hash, root, receipt or ZERO32, head, len(committed))
        )
        for action in on_chain:
            action(self.ledger)
        self.seconds[rnd] = self.seconds.get(rnd, 0.0) + time.perf_counter() - t0
        log.info("round %d recorded: root %s…, head %s…, tx %s", rnd, root[:12], head[:12], tx.tx_hash[:12])

    def prepare_resume(self) -> int:
        """Before a resumed coordinator's first round: the last round on chain (0 for none), with the
        audit log cut back to the head that round anchored. Entries after it (a round that was being
        recorded when the coordinator stopped) are moved to ``audit.unanchored-<UTC time>.jsonl``,
        never deleted; that round runs again."""
        nxt = self.ledger.next_round()
        if nxt == 0:
            return 0
        last = nxt - 1
        rec = self.ledger.read_round(last)
        if rec is None or not self.audit_path.is_file():
            raise LedgerError(f"cannot resume: the chain has round {last} but {self.audit_path} is missing")
        lines = self.audit_path.read_text(encoding="utf-8").splitlines(keepends=True)
        cut = next((i for i, text in enumerate(lines) if parse_entry(text).hash == rec.log_head), None)
        if cut is None:
            raise LedgerError(
                f"cannot resume: round {last}'s anchored log head {rec.log_head[:16]}… is no entry of {self.audit_path}"
            )
        tail = lines[cut + 1 :]
        if tail:
            aside = self.run_dir / f"audit.unanchored-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.jsonl"
            atomic_write_text(aside, "".join(tail))  # on disk before the log loses them
            atomic_write_text(self.audit_path, "".join(lines[: cut + 1]))
            log.warning("resume: %d unanchored log entries after round %d moved to %s", len(tail), last, aside)
        return last

    # ------------------------------------------------------------------ internals
    def _start(self, plan: RoundPlan, params: torch.Tensor, audit: AuditLog) -> None:
        nxt = self.ledger.next_round()
        h = model_hash(params, self.spec)
        if nxt == 0:
            self._genesis(audit, params, h)
        else:
            prev = self.ledger.read_round(nxt - 1)
            if plan.round != nxt or prev is None or prev.model_hash != h:
                raise LedgerError(
                    f"resuming at round {plan.round} with model {h[:16]}…, but the chain expects round {nxt} "
                    f"from model {prev.model_hash[:16] if prev else '?'}…; resume from the checkpoint of round "
                    f"{nxt - 1} in {self.run_dir / CHECKPOINT_DIR}"
                )
            log.info("continuing the ledger of %s at round %d", self.run_dir, nxt)
        self._ready = True

    def _fingerprint(self, ident_id: str, pem: bytes) -> str:
        """The certificate's fingerprint where the identity has a PKI certificate, else the key's."""
        cert = self.certificates.get(ident_id)
        if cert is None:
            return key_fingerprint(pem)
        fp, cert_key = certificate_fingerprint(cert)
        if key_fingerprint(cert_key) != key_fingerprint(pem):
            raise LedgerError(f"the certificate of {ident_id!r} does not hold the key it signs with")
        return fp

    def _genesis(self, audit: AuditLog, params: torch.Tensor, h: str) -> None:
        pems = {COORDINATOR_ID: self.coordinator.public_key_pem(), **self.participant_keys}
        idents = [Identity(COORDINATOR_ID, self._fingerprint(COORDINATOR_ID, pems[COORDINATOR_ID]), Role.COORDINATOR)]
        idents += [
            Identity(pid, self._fingerprint(pid, pem), Role.PARTICIPANT) for pid, pem in self.participant_keys.items()
        ]
        for ident in idents:
            body: dict[str, Any] = {
                "id": ident.id,
                "role": ident.role.name.lower(),
                "fingerprint": ident.fingerprint,
                "public_key_pem": pems[ident.id].decode(),
            }
            if ident.id in self.certificates:
                body["certificate_pem"] = self.certificates[ident.id].decode()
            audit.append("identity", 0, body, self.coordinator)
        audit.append(LEDGER_KIND, 0, ledger_account(self.ledger.deployment()), self.coordinator)
        self.ledger.register(idents)
        on_chain = self._append_attachments(audit, 0, [att for source in self.attachments for att in source.genesis()])
        self._checkpoint(audit, 0, params, h)
        audit.sync()
        self.ledger.commit_round(RoundCommitment(0, h, ZERO32, ZERO32, audit.head, 0))
        for action in on_chain:
            action(self.ledger)

    def _append_attachments(
        self, audit: AuditLog, rnd: int, atts: Sequence[Attachment]
    ) -> list[Callable[[LedgerBackend], object]]:
        """Sign ``atts`` into the log; returns their on-chain actions, to run after the round's commitment."""
        for att in atts:
            if att.signed_by is None:
                audit.append(att.kind, rnd, att.body, self.coordinator)
            else:
                audit.append(att.kind, rnd, att.body, _AuthorOnly(att.signed_by[0]), sig=att.signed_by[1])
        return [att.chain for att in atts if att.chain is not None]

    def _checkpoint(self, audit: AuditLog, rnd: int, params: torch.Tensor, h: str) -> None:
        body: dict[str, object] = {"model_hash": h, "size": int(params.numel())}
        if self.checkpoints:
            f32, spec_path = save_checkpoint(self.run_dir, rnd, to_bytes(params), self.spec)
            body["file"] = f32.relative_to(self.run_dir).as_posix()
            body["spec_file"] = spec_path.relative_to(self.run_dir).as_posix()
        audit.append("checkpoint", rnd, body, self.coordinator)


def ledger_account(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ledger_account`` entry (and metrics.json's ``ledger``): the chain, its contracts and the one
    account that may write them; ``dev_key`` and a notice when that account's key is public."""
    account = str(deployment.get("admin", ""))
    body: dict[str, Any] = {
        "backend": deployment.get("backend"),
        "chain_id": deployment.get("chain_id"),
        "contracts": dict(deployment.get("contracts", {})),
        "account": account,
        "dev_key": is_dev_account(account),
    }
    if body["dev_key"]:
        body["notice"] = dev_key_notice(account)
    return body


class _AuthorOnly:
    """Names the author of an entry whose signature was made elsewhere (by the participant)."""

    def __init__(self, key_id: str) -> None:
        self._key_id = key_id

    @property
    def key_id(self) -> str:
        return self._key_id

    def public_key_pem(self) -> bytes:
        raise LedgerError(f"the coordinator holds no key of {self._key_id!r}")

    def sign(self, data: bytes) -> bytes:
        raise LedgerError(f"the coordinator cannot sign for {self._key_id!r}; the participant signs its commitment")


# ---------------------------------------------------------------------- simulation wiring
def _load_or_create(path: Path, key_id: str) -> EcdsaSigner:
    if path.is_file():
        return EcdsaSigner.load(key_id, path)
    signer = EcdsaSigner.generate(key_id)
    signer.save(path)
    return signer


def _archive_previous_run(run_dir: Path) -> None:
    """A simulation always starts at round 1: move an earlier recorded run aside (never delete it)."""
    parts = [run_dir / n for n in (AUDIT_FILE, LEDGER_DIR, CHECKPOINT_DIR, KEYS_DIR)]
    if not any(p.exists() for p in parts):
        return
    dest = run_dir / "archive" / time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    n = 0
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
    dest.mkdir(parents=True)
    for p in parts:
        if p.exists():
            p.rename(dest / p.name)
    log.warning("%s held an earlier recorded run; moved it to %s", run_dir, dest)


def simulated_recorder(
    settings: LedgerSettings,
    run_dir: Path,
    spec: ParamSpec,
    participant_ids: Sequence[str],
    attachments: Sequence[RoundAttachments] = (),
    *,
    provenance: Mapping[str, Mapping[str, str]] | None = None,
    compression: CompressionPolicy | None = None,
) -> LedgerRecorder:
    """A recorder for a simulation: every participant gets its own key (kept in RUN_DIR/keys).

    Simulated participants live in the coordinator's process, so their private keys do too; over the
    network each participant keeps its key and sends its signed commitment with its update.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    _archive_previous_run(run_dir)
    keys = run_dir / KEYS_DIR
    coordinator = _load_or_create(keys / f"{COORDINATOR_ID}.pem", COORDINATOR_ID)
    signers = {pid: _load_or_create(keys / "participants" / f"{pid}.pem", pid) for pid in participant_ids}
    ledger = open_backend(
        settings.backend,
        run_dir / LEDGER_DIR,
        settings.rpc_url,
        settings.key_file,
        allow_dev_keys=settings.allow_dev_keys,
    )

    def commitments(plan: RoundPlan, update: Update) -> SignedCommitment:
        signer = signers.get(update.participant_id)
        if signer is None:
            raise LedgerError(f"round {plan.round}: no key for participant {update.participant_id!r}")
        return sign_update(signer, plan.round, update, (provenance or {}).get(update.participant_id))

    return LedgerRecorder(
        run_dir,
        ledger,
        coordinator,
        {pid: s.public_key_pem() for pid, s in signers.items()},
        spec,
        commitments,
        checkpoints=settings.checkpoints,
        attachments=attachments,
        compression=compression,
    )


def network_recorder(
    settings: LedgerSettings,
    run_dir: Path,
    spec: ParamSpec,
    coordinator: Signer,
    certificates: Mapping[str, bytes],
    commitments: CommitmentSource,
    attachments: Sequence[RoundAttachments] = (),
    *,
    resume: bool = False,
    max_examples: int | None = None,
    compression: CompressionPolicy | None = None,
) -> LedgerRecorder:
    """A recorder for a networked federation: nobody's private key but the coordinator's is here.

    ``coordinator`` signs the coordinator's entries (its PKI key); ``certificates`` maps the coordinator
    (``"coordinator"``) and every participant to its PKI certificate, whose fingerprint is registered on
    chain; ``commitments`` returns the commitment each participant signed with its own key and sent with
    its update."""
    if coordinator.key_id != COORDINATOR_ID:
        raise LedgerError(f"the coordinator's audit key id must be {COORDINATOR_ID!r}, got {coordinator.key_id!r}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        _archive_previous_run(run_dir)
    keys = {pid: certificate_fingerprint(pem)[1] for pid, pem in certificates.items() if pid != COORDINATOR_ID}
    ledger = open_backend(
        settings.backend,
        run_dir / LEDGER_DIR,
        settings.rpc_url,
        settings.key_file,
        allow_dev_keys=settings.allow_dev_keys,
    )
    return LedgerRecorder(
        run_dir,
        ledger,
        coordinator,
        keys,
        spec,
        commitments,
        checkpoints=settings.checkpoints,
        certificates=certificates,
        attachments=attachments,
        max_examples=max_examples,
        compression=compression,
    )
