"""The audit verifier's refusal checks: a participant's signed refusal against the round it refused.

A ``refusal`` entry in the log (authored and signed by the participant, :mod:`trustfed.ledger.refusals`)
and every record in the participants' own refusal files (``--participant-records``) are compared with
the round's logged plan. A refusal whose served model, or whose plan's model, differs from that plan
shows the coordinator served two different models in one round: a failure naming the participant and
the round. A record a participant holds that the log lacks is a failure too: the coordinator left the
evidence out. A refusal consistent with the plan is reported as a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trustfed.ledger.kinds import REFUSAL_KIND
from trustfed.ledger.recorder import AUDIT_FILE
from trustfed.ledger.refusals import RefusalError, SignedRefusal, read_refusals, record_files
from trustfed.ledger.verify_base import Located, VerifierState


class RefusalChecks(VerifierState):
    def _refusal(self, loc: Located, plan: Located | None) -> None:
        """A refusal entry of the log, checked when its round is read (``plan``: that round's plan)."""
        e = loc.entry
        refusal = SignedRefusal(e.author, e.round, dict(e.body), e.sig)
        if e.body.get("participant") != e.author or e.body.get("round") != e.round:
            self.fail(AUDIT_FILE, loc.line, e.round, "body.participant", "refusal names another participant or round")
        self.checked["refusals"] += 1
        planned = plan.entry.body.get("model_hash") if plan is not None else None
        self._against_plan(AUDIT_FILE, loc.line, refusal, planned)

    def _against_plan(self, file: str, line: int, r: SignedRefusal, planned: object) -> None:
        pid, rnd, b = r.participant_id, r.round, r.body
        served, named = str(b.get("served_model_hash", "")), str(b.get("plan_model_hash", ""))
        if planned is None:
            self.fail(file, line, rnd, "refusal.round", f"{pid} refused round {rnd}, for which the log has no plan")
        elif served != planned or named != planned:
            self.fail(
                file,
                line,
                rnd,
                "refusal.served_model_hash",
                f"{pid} was served model {served[:16]}… (its signed plan named {named[:16]}…) in round {rnd}, but "
                f"the coordinator's logged plan sends {str(planned)[:16]}…: the coordinator served two different "
                "models in one round",
            )
        else:
            self.notes.append(f"{pid} refused round {rnd} ({b.get('reason')}): {str(b.get('detail', ''))[:200]}")

    def check_participant_records(self, paths: list[Path], facts: dict[int, dict[str, Any]]) -> None:
        """Each participant-held refusal: signed by that participant's registered key, present in the log,
        and consistent with the round's plan."""
        logged = {
            (loc.entry.author, loc.entry.round, loc.entry.sig) for loc in self.entries if loc.entry.kind == REFUSAL_KIND
        }
        for path in record_files(paths):
            name = str(path)
            try:
                records = list(read_refusals(path))
            except (OSError, RefusalError) as exc:
                self.fail(name, None, None, "file", f"unreadable participant records: {exc}")
                continue
            for line, r in records:
                key = self.keys.get(r.participant_id)
                if key is None or r.participant_id not in self.identities:
                    self.fail(name, line, r.round, "participant", f"{r.participant_id!r} is no identity of this run")
                    continue
                if not r.verifies(key):
                    self.fail(name, line, r.round, "sig", f"does not verify with {r.participant_id}'s registered key")
                    continue
                self.checked["participant_refusals"] += 1
                if (r.participant_id, r.round, r.sig) in logged:
                    continue  # checked as the log's entry
                self.fail(
                    name,
                    line,
                    r.round,
                    "refusal",
                    f"the signed refusal of {r.participant_id} in round {r.round} is missing from the audit log: "
                    "the coordinator left out a participant's evidence",
                )
                plan = facts.get(r.round, {}).get("plan")
                self._against_plan(name, line, r, plan.entry.body.get("model_hash") if plan is not None else None)
