"""Secure aggregation over gRPC, the coordinator's side of one round.

The coordinator relays the steps of :mod:`trustfed.secagg.protocol`, plus a consistency check,
and recovers the sum of the survivors' clipped deltas, never one participant's update:

1. keys: each selected participant, after training, sends a key advertisement *it* signed (its
   certificate attached, bound to the round, the coordinator session and the model hash); the
   roster relays those signed messages unchanged, so every peer checks each entry against the
   federation CA and the coordinator cannot substitute keys;
2. shares: each roster member sends its AES-GCM-encrypted Shamir shares, one per peer; each gets
   back its inbox, the ciphertexts addressed to it;
3. masked input: each uploads its masked vector (uint32 per parameter) by ``UploadUpdate``; the
   coordinator signs the set of participants whose masked inputs arrived (the survivors);
4. consistency: each survivor signs the survivor set it was given and the coordinator relays
   every copy; a survivor goes on only when ``threshold`` survivors signed the same set, so a
   coordinator cannot show different sets to different participants (the check of the
   malicious-server protocol, with the federation's PKI as the signature scheme);
5. unmask: survivors send the shares that remove the survivors' self-masks and the dropped
   participants' pairwise masks; any ``threshold`` of them recover the sum.

A step closes when everyone expected has sent it or its deadline passes (the keys wait for the
round deadline, each later step ``[secagg].step_timeout_s``); fewer than ``threshold`` at any
step fails the round. Every submission is checked (the sender's step and share point, recipient
sets, sizes) and refused with a reason naming it; resending the same payload is a poll.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from trustfed.core.strategy import RoundPlan
from trustfed.secagg import shamir
from trustfed.secagg.protocol import (
    PublicKeys,
    SecAggError,
    SecAggParams,
    SecAggServer,
    UnmaskShares,
    share_points,
)
from trustfed.secagg.settings import SecAggSettings
from trustfed.transport import federation_pb2 as pb
from trustfed.transport.errors import MessageRejected

X25519_BYTES = 32
SHARE_CIPHERTEXT_BYTES = 12 + 2 * shamir.SHARE_BYTES + 16  # nonce, two shares, GCM tag

STEPS = ("keys", "shares", "masked", "consistency", "unmask", "done")


def _refuse(reason: str, detail: str) -> MessageRejected:
    return MessageRejected(reason, detail)


@dataclass
class SecAggRound:
    """One round's protocol state. Callers hold the round board's condition around every method."""

    plan: RoundPlan
    session: str
    params: SecAggParams
    server: SecAggServer
    index: dict[str, int]  # participant id -> share point
    step: str = "keys"
    keys: dict[int, pb.SignedMessage] = field(default_factory=dict)  # as each participant signed them
    examples: dict[int, int] = field(default_factory=dict)
    consistency: dict[int, pb.SignedMessage] = field(default_factory=dict)  # survivors' signed survivor sets
    failed: str | None = None
    _names: dict[int, str] = field(init=False, repr=False)  # share point -> participant id

    @classmethod
    def open(cls, settings: SecAggSettings, plan: RoundPlan, session: str, dim: int) -> SecAggRound:
        params = settings.params(len(plan.participants), plan.round)
        return cls(plan, session, params, SecAggServer(params, dim), share_points(plan.participants))

    def __post_init__(self) -> None:
        self._names = {i: p for p, i in self.index.items()}

    def pid_of(self, cid: int) -> str:
        return self._names[cid]

    # -- who is where
    def joined(self, pid: str) -> bool:
        """``pid`` advertised keys this round (a second try would need new keys: it is refused)."""
        return self.index.get(pid, 0) in self.keys

    def _done(self, step: str) -> Mapping[int, object]:
        """What each participant sent for ``step``, by share point."""
        srv = self.server
        by_step: dict[str, Mapping[int, object]] = {
            "keys": srv.roster,
            "shares": srv.shared,
            "masked": srv.masked,
            "consistency": self.consistency,
            "unmask": srv.unmask_answers,
        }
        return by_step[step]

    def completed(self, step: str) -> set[str]:
        """Who has sent its part of ``step``."""
        return {self.pid_of(c) for c in self._done(step)}

    def _expect(self, step: str, pid: str, what: str) -> int:
        if self.failed is not None:
            raise _refuse("round_not_open", f"secure aggregation of round {self.plan.round} failed: {self.failed}")
        if pid not in self.index:
            raise _refuse("not_selected", f"{pid} is not selected for round {self.plan.round}")
        if self.step != step:
            raise _refuse(
                "wrong_step", f"{what} arrived while round {self.plan.round} is at the {self.step!r} step, not {step!r}"
            )
        return self.index[pid]

    # -- submissions (each returns False when it repeats an earlier identical one)
    def submit_keys(self, pid: str, signed: pb.SignedMessage, body: pb.SecAggKeys) -> bool:
        cid = self.index.get(pid, 0)
        if (
            self.failed is None
            and cid in self.keys
            and self.keys[cid].SerializeToString() == signed.SerializeToString()
        ):
            return False
        cid = self._expect("keys", pid, f"keys of {pid}")
        if cid in self.keys:
            # e.g. the participant restarted: its first keys' shares are out; it sits this round out
            raise _refuse("already_in_round", f"{pid} already advertised other keys for round {self.plan.round}")
        wrong = {
            "round": body.round != self.plan.round,
            "participant_id": body.participant_id != pid,
            "index": body.index != cid,
            "session": body.session != self.session,
            "model_hash": body.model_hash != self.plan.model_hash,
            "cipher_pk": len(body.cipher_pk) != X25519_BYTES,
            "mask_pk": len(body.mask_pk) != X25519_BYTES,
        }
        bad = [k for k, v in wrong.items() if v]
        if bad:
            raise _refuse("bad_keys", f"key advertisement of {pid}: wrong {', '.join(bad)}")
        keys = PublicKeys(bytes(body.cipher_pk), bytes(body.mask_pk))
        if (
            any(
                keys.cipher_pk in (k.cipher_pk, k.mask_pk) or keys.mask_pk in (k.cipher_pk, k.mask_pk)
                for k in self.server.roster.values()
            )
            or keys.cipher_pk == keys.mask_pk
        ):
            raise _refuse("bad_keys", f"key advertisement of {pid} repeats a public key")
        self.keys[cid] = signed
        self.server.receive_keys(cid, keys)
        return True

    def submit_shares(self, pid: str, shares: dict[int, bytes]) -> bool:
        cid = self.index.get(pid, 0)
        if cid in self.server.shared and self.server.shared[cid] == shares and self.failed is None:
            return False
        cid = self._expect("shares", pid, f"shares of {pid}")
        if cid not in self.server.roster:
            raise _refuse("not_in_roster", f"{pid} is not in the roster of round {self.plan.round}")
        if cid in self.server.shared:
            raise _refuse("duplicate", f"{pid} already sent other shares for round {self.plan.round}")
        if any(len(ct) != SHARE_CIPHERTEXT_BYTES for ct in shares.values()):
            raise _refuse("bad_shares", f"shares of {pid}: every ciphertext must be {SHARE_CIPHERTEXT_BYTES} bytes")
        try:
            self.server.receive_shares(cid, shares)
        except SecAggError as exc:
            raise _refuse("bad_shares", str(exc)) from None
        return True

    def check_masked(self, pid: str) -> None:
        """Before a masked upload streams: this participant may send one now."""
        cid = self._expect("masked", pid, f"the masked input of {pid}")
        if cid not in self.server.shared:
            raise _refuse("not_in_roster", f"{pid} did not share keys in round {self.plan.round}")
        if cid in self.server.masked:
            raise _refuse("duplicate", f"{pid} already uploaded its masked input for round {self.plan.round}")

    def submit_masked(self, pid: str, y: np.ndarray, num_examples: int) -> None:
        self.check_masked(pid)
        cid = self.index[pid]
        try:
            self.server.receive_masked(cid, y)
        except SecAggError as exc:
            raise _refuse("bad_masked_input", str(exc)) from None
        self.examples[cid] = num_examples

    def submit_consistency(self, pid: str, signed: pb.SignedMessage, body: pb.SecAggSurvivors) -> bool:
        cid = self.index.get(pid, 0)
        if self.failed is None and self.consistency.get(cid, None) == signed:
            return False
        cid = self._expect("consistency", pid, f"the survivor set signed by {pid}")
        if cid not in self.server.masked:
            raise _refuse("not_a_survivor", f"{pid} is not a survivor of round {self.plan.round}")
        if cid in self.consistency:
            raise _refuse("duplicate", f"{pid} already signed another survivor set for round {self.plan.round}")
        wrong = {
            "round": body.round != self.plan.round,
            "participant_id": body.participant_id != pid,
            "session": body.session != self.session,
            "survivors": list(body.survivors) != sorted(self.server.masked),
        }
        bad = [k for k, v in wrong.items() if v]
        if bad:
            raise _refuse("bad_consistency", f"survivor set signed by {pid}: wrong {', '.join(bad)}")
        self.consistency[cid] = signed
        return True

    def submit_unmask(self, pid: str, self_mask: dict[int, bytes], key: dict[int, bytes]) -> bool:
        cid = self.index.get(pid, 0)
        done = self.server.unmask_answers.get(cid)
        if done is not None and done == UnmaskShares(self_mask, key) and self.failed is None:
            return False
        cid = self._expect("unmask", pid, f"unmasking shares of {pid}")
        if cid not in self.consistency:
            raise _refuse("not_a_survivor", f"{pid} did not sign the survivor set of round {self.plan.round}")
        if done is not None:
            raise _refuse("duplicate", f"{pid} already sent other unmasking shares for round {self.plan.round}")
        survivors, dropped = self.server.expected_unmask(cid)
        if set(self_mask) != survivors or set(key) != dropped:
            raise _refuse(
                "bad_unmask",
                f"unmasking shares of {pid} must cover exactly the survivors (self-mask) and the dropped (mask key) "
                "of its neighbourhood",
            )
        if any(len(s) != shamir.SHARE_BYTES for s in [*self_mask.values(), *key.values()]):
            raise _refuse("bad_unmask", f"unmasking shares of {pid}: every share must be {shamir.SHARE_BYTES} bytes")
        self.server.receive_unmask(cid, UnmaskShares(self_mask, key))
        return True

    # -- replies: None while the step a participant waits for is still open
    def reply(self, pid: str, step: pb.SecAggStep) -> pb.SecAggReply | None:
        if self.failed is not None:
            raise _refuse("round_not_open", f"secure aggregation of round {self.plan.round} failed: {self.failed}")
        cid = self.index.get(pid)
        if cid is None:
            raise _refuse("not_selected", f"{pid} is not selected for round {self.plan.round}")
        at = STEPS.index(self.step)
        out = pb.SecAggReply(round=self.plan.round, step=step, ready=True, session=self.session)
        if step == pb.SECAGG_KEYS:
            if cid not in self.keys:
                raise _refuse("not_submitted", f"{pid} asks for the roster without advertising keys")
            if at < STEPS.index("shares"):
                return None
            if cid not in self.server.roster:
                raise _refuse("not_in_roster", f"{pid}'s keys came after the roster of round {self.plan.round}")
            out.roster.extend(self.keys[c] for c in sorted(self.server.roster))
        elif step == pb.SECAGG_SHARES:
            if cid not in self.server.shared:
                raise _refuse("not_submitted", f"{pid} asks for its inbox without sharing keys")
            if at < STEPS.index("masked"):
                return None
            for u, ct in self.server.inbox_for(cid).items():
                out.inbox[u] = ct
        elif step == pb.SECAGG_SURVIVORS:
            if cid not in self.server.shared:
                raise _refuse("not_in_roster", f"{pid} did not share keys in round {self.plan.round}")
            if at < STEPS.index("consistency"):
                return None
            out.survivors.extend(sorted(self.server.masked))
        elif step == pb.SECAGG_CONSISTENCY:
            if cid not in self.consistency:
                raise _refuse("not_submitted", f"{pid} asks for the others' survivor sets without signing its own")
            if at < STEPS.index("unmask"):
                return None
            out.consistency.extend(self.consistency[c] for c in sorted(self.consistency))
        elif step == pb.SECAGG_UNMASK:
            if cid not in self.server.unmask_answers:
                raise _refuse("not_submitted", f"{pid} asks about unmasking without sending its shares")
        else:
            raise _refuse("bad_step", f"unknown secure-aggregation step {step}")
        return out

    # -- the coordinator closes the steps
    def close(self, step: str) -> None:
        """Close ``step`` (the current one) and open the next; fewer than threshold fails the round."""
        if self.step != step:
            raise SecAggError(f"cannot close {step!r}: round {self.plan.round} is at {self.step!r}")
        have = len(self._done(step))
        if have < self.params.threshold:
            self.failed = f"{have} participant(s) completed the {step!r} step, threshold {self.params.threshold}"
            raise SecAggError(self.failed)
        if step == "keys":
            self.server.roster_for_clients()  # fixes the neighbour graph (every participant derives the same one)
        self.step = STEPS[STEPS.index(step) + 1]

    def result(self) -> tuple[np.ndarray, list[str], int]:
        """After the unmask step: the float32 sum, the survivors and their example count."""
        total, who = self.server.aggregate()
        return total, [self.pid_of(c) for c in who], sum(self.examples[c] for c in who)
