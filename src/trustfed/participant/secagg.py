"""Secure aggregation over gRPC, a participant's side of one round (see
:mod:`trustfed.coordinator.secagg` for the coordinator's).

After training, the participant runs :class:`~trustfed.secagg.protocol.SecAggClient` with its
delta through the coordinator: it advertises keys it signs itself, checks every roster entry
against the federation CA (a substituted key fails its signature), sends encrypted shares,
uploads only its masked input and, if it is among the survivors, the unmasking shares. The
protocol parameters (threshold, clip, bits) come from this participant's copy of the federation
file and the signed plan, never from the coordinator; every reply is signed by the coordinator,
so a survivor set it handed out is evidence of what it asked for.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import numpy as np
import torch

from trustfed.core.strategy import Update
from trustfed.ledger.participant import update_bytes
from trustfed.participant.rounds import ReceivedPlan, RoundGone
from trustfed.secagg.protocol import PublicKeys, SecAggClient, SecAggError, TooFewParticipants, share_points
from trustfed.secagg.settings import SecAggSettings
from trustfed.secagg.updates import MaskedInput, prepare_delta
from trustfed.transport import federation_pb2 as pb
from trustfed.transport.envelope import Signer, Verified, Verifier
from trustfed.transport.errors import MessageRejected, TransportError

log = logging.getLogger("trustfed.participant.secagg")

_STEP_NAMES = {
    pb.SECAGG_CONSISTENCY: "survivor-set copies",
    pb.SECAGG_KEYS: "roster",
    pb.SECAGG_SHARES: "inbox",
    pb.SECAGG_SURVIVORS: "survivors",
    pb.SECAGG_UNMASK: "unmask acknowledgement",
}


class SecAggChannel(Protocol):
    """What a round of secure aggregation needs from the participant's connection to the coordinator
    (:class:`~trustfed.participant.client.ParticipantClient` provides it)."""

    pid: str
    address: str
    relay_signer: Signer  # signs messages the coordinator relays to peers (carries the certificate)
    verifier: Verifier
    poll_wait_ms: int

    def upload(self, rp: ReceivedPlan, update: Update, payload: bytes) -> None: ...

    def secagg_call(self, what: str, rnd: int, req: pb.SecAggRequest, timeout: float) -> Verified:
        """Sign ``req``, send it (with retries) and return the coordinator's verified reply."""
        ...


class SecAggParticipant:
    """One round of secure aggregation for ``client``; :meth:`run` returns whether it survived
    (its masked input is in the sum)."""

    def __init__(self, client: SecAggChannel, settings: SecAggSettings, rp: ReceivedPlan) -> None:
        self.client = client
        self.settings = settings
        self.rp = rp
        self.session = rp.raw.session
        self.index = share_points(rp.plan.participants)
        self.me = self.index[client.pid]
        self.params = settings.params(len(rp.plan.participants), rp.round)
        self.protocol = SecAggClient(self.me, self.params)
        # replies may wait for the round deadline (the keys), then one step timeout per later step
        self.give_up_at = max(rp.deadline_ms / 1000, time.time()) + 5 * settings.step_timeout_s + 30

    def run(self, global_params: torch.Tensor, update: Update) -> bool:
        rnd = self.rp.round
        roster = self.check_roster(self.step(pb.SECAGG_KEYS, keys=self.advertisement()))
        inbox = self.step(pb.SECAGG_SHARES, shares=self.protocol.share_keys(roster)).inbox
        # central DP: the aggregator sees only the sum, so the clip happens here; weighted: scaled by my weight
        delta = prepare_delta(
            update.params - global_params, update.num_examples, self.settings, dict(self.rp.plan.config)
        )
        y = self.protocol.masked_input(delta.numpy(), {int(u): bytes(ct) for u, ct in inbox.items()})
        self.upload_masked(y, update.num_examples)
        survivors = [int(u) for u in self.step(pb.SECAGG_SURVIVORS).survivors]
        if self.me not in survivors:
            log.warning("participant %s: round %d went on without my masked input", self.client.pid, rnd)
            return False
        self.check_consistency(
            survivors, self.step(pb.SECAGG_CONSISTENCY, survivors_signed=self.sign_survivors(survivors))
        )
        answer = self.protocol.unmask(survivors)
        self.step(pb.SECAGG_UNMASK, self_mask_shares=answer.self_mask_shares, key_shares=answer.key_shares)
        log.info(
            "participant %s: round %d secure aggregation done (%d of %d survived)",
            self.client.pid,
            rnd,
            len(survivors),
            len(roster),
        )
        return True

    def advertisement(self) -> pb.SignedMessage:
        k = self.protocol.advertise_keys()
        body = pb.SecAggKeys(
            round=self.rp.round,
            participant_id=self.client.pid,
            index=self.me,
            cipher_pk=k.cipher_pk,
            mask_pk=k.mask_pk,
            session=self.session,
            model_hash=self.rp.plan.model_hash,
        )
        return self.client.relay_signer.sign("secagg_keys", self.rp.round, body.SerializeToString())

    def check_roster(self, reply: pb.SecAggReply) -> dict[int, PublicKeys]:
        """Every entry must be signed by the participant it names (certificate from the CA, not revoked),
        for this round, session and model, at that participant's share point."""
        out: dict[int, PublicKeys] = {}
        for entry in reply.roster:
            who, raw = self._from_peer(entry, "secagg_keys", "a roster entry")
            body = pb.SecAggKeys.FromString(raw)
            wrong = [
                name
                for name, bad in {
                    "participant_id": body.participant_id != who,
                    "index": self.index.get(who) != body.index,
                    "round": body.round != self.rp.round,
                    "session": body.session != self.session,
                    "model_hash": body.model_hash != self.rp.plan.model_hash,
                }.items()
                if bad
            ]
            if wrong:
                raise SecAggError(f"round {self.rp.round}: the roster entry of {who} has the wrong {', '.join(wrong)}")
            if body.index in out:
                raise SecAggError(f"round {self.rp.round}: the roster names share point {body.index} twice")
            out[body.index] = PublicKeys(bytes(body.cipher_pk), bytes(body.mask_pk))
        return out

    def _from_peer(self, msg: pb.SignedMessage, msg_type: str, what: str) -> tuple[str, bytes]:
        """A message a peer signed and the coordinator relayed: (its signer, its body), or refused."""
        try:
            v = self.client.verifier.verify_relayed(msg, expected_type=msg_type, role="participant")
        except MessageRejected as exc:
            raise SecAggError(f"round {self.rp.round}: {what} does not verify: {exc.detail}") from None
        return v.identity.name, v.body

    def sign_survivors(self, survivors: list[int]) -> pb.SignedMessage:
        body = pb.SecAggSurvivors(
            round=self.rp.round, participant_id=self.client.pid, session=self.session, survivors=sorted(survivors)
        )
        return self.client.relay_signer.sign("secagg_survivors", self.rp.round, body.SerializeToString())

    def check_consistency(self, survivors: list[int], reply: pb.SecAggReply) -> None:
        """Before unmasking: at least ``threshold`` survivors signed exactly the set I was given (each copy
        verified against the CA), so the coordinator did not show different sets to different participants."""
        mine = sorted(survivors)
        signers: set[int] = set()
        for entry in reply.consistency:
            who, raw = self._from_peer(entry, "secagg_survivors", "a survivor set copy")
            body = pb.SecAggSurvivors.FromString(raw)
            if body.participant_id != who or body.round != self.rp.round or body.session != self.session:
                raise SecAggError(f"round {self.rp.round}: the survivor set signed by {who} is for another round")
            if list(body.survivors) != mine:
                raise SecAggError(
                    f"round {self.rp.round}: {who} was shown another survivor set than I was "
                    f"({list(body.survivors)} vs {mine}); refusing to unmask"
                )
            if self.index.get(who) not in mine:
                raise SecAggError(f"round {self.rp.round}: {who} signed the survivor set but is not a survivor")
            signers.add(self.index[who])
        if self.me not in signers:
            raise SecAggError(f"round {self.rp.round}: the coordinator left my own copy of the survivor set out")
        if len(signers) < self.params.threshold:  # survivors went away between the steps: nobody misbehaved
            raise TooFewParticipants(
                f"round {self.rp.round}: {len(signers)} survivor(s) confirmed the survivor set, threshold "
                f"{self.params.threshold}"
            )

    def upload_masked(self, y: np.ndarray, num_examples: int) -> None:
        """The masked input by the usual upload stream (committed to on the ledger like any upload),
        flagged as masked, with no metrics: nothing travels in the clear."""
        part = MaskedInput.of(self.client.pid, y, num_examples)
        self.client.upload(self.rp, part, update_bytes(part))

    def step(
        self,
        step: pb.SecAggStep,
        *,
        keys: pb.SignedMessage | None = None,
        survivors_signed: pb.SignedMessage | None = None,
        shares: dict[int, bytes] | None = None,
        self_mask_shares: dict[int, bytes] | None = None,
        key_shares: dict[int, bytes] | None = None,
    ) -> pb.SecAggReply:
        """Submit this step's payload, then poll until the coordinator closes the step."""
        c, rnd = self.client, self.rp.round
        what = f"the secure-aggregation {_STEP_NAMES[step]} of round {rnd}"
        req = pb.SecAggRequest(round=rnd, step=step, wait_ms=c.poll_wait_ms)
        if keys is not None:
            req.keys.CopyFrom(keys)
        if survivors_signed is not None:
            req.survivors_signed.CopyFrom(survivors_signed)
        for field, values in (("shares", shares), ("self_mask_shares", self_mask_shares), ("key_shares", key_shares)):
            for k, data in (values or {}).items():
                getattr(req, field)[k] = data
        timeout = c.poll_wait_ms / 1000 + 15
        while True:
            v = c.secagg_call(what, rnd, req, timeout)
            reply: pb.SecAggReply = pb.SecAggReply.FromString(v.body)
            if reply.round != rnd or reply.step != step or v.envelope.round != rnd:
                raise c.verifier.reject("round_mismatch", f"{what}: the reply is for another round or step", "secagg")
            if self.session and reply.session != self.session:
                raise RoundGone(f"{what}: the coordinator restarted (session {self.session} -> {reply.session})")
            if reply.ready:
                return reply
            if time.time() > self.give_up_at:
                raise TransportError(f"{what}: no answer from {c.address} before the round's deadlines passed")
            req = pb.SecAggRequest(round=rnd, step=step, wait_ms=c.poll_wait_ms)
