"""The audit verifier's checks of a round's entries: aggregation names, participant commitments (and the
compression they state), the app and its provenance, federated evaluation, participant status and
checkpoints."""

from __future__ import annotations

import math
from typing import Any

from trustfed.core.compression import CompressionRecord
from trustfed.core.evaluation import EVAL_PREFIX, FED_EVAL_PREFIX, combine
from trustfed.errors import CheckpointError, TrustFedError
from trustfed.ledger.checkpoint import hash_model_bytes
from trustfed.ledger.recorder import AUDIT_FILE, COORDINATOR_ID
from trustfed.ledger.records import update_commitment
from trustfed.ledger.verify_base import Located, VerifierState


class EntryChecks(VerifierState):
    def _aggregation_names(self, loc: Located, f: dict[str, Any]) -> None:
        """The aggregation names exactly the round's committers, in log order, and selects among them
        (a coordinator cannot claim an update that was never committed, nor drop one that was)."""
        e, ln = loc.entry, loc.line
        authors = list(f.get("authors", []))
        named = [str(p) for p in e.body.get("participants", [])]
        if named != authors:
            self.fail(
                AUDIT_FILE, ln, e.round, "body.participants", f"names {named}, the round's commitments are by {authors}"
            )
        stray = sorted(set(map(str, e.body.get("selected", []))) - set(authors))
        if stray:
            self.fail(AUDIT_FILE, ln, e.round, "body.selected", f"selects {stray}, who committed no update this round")

    def _declared_counts(self, loc: Located, f: dict[str, Any]) -> None:
        """With ``max_examples`` recorded (the coordinator enforced it), every count a participant signed in
        its commitment, and every count the enclave's receipt released, lies within it."""
        e, ln = loc.entry, loc.line
        bound = e.body.get("max_examples")
        if bound is None:
            return
        if not isinstance(bound, int) or isinstance(bound, bool) or bound < 1:
            self.fail(AUDIT_FILE, ln, e.round, "body.max_examples", f"expected a positive integer, got {bound!r}")
            return
        receipt: Located | None = f.get("receipt")
        released = (receipt.entry.body.get("receipt") or {}).get("body", {}) if receipt is not None else {}
        counts = [("commitment", p, n) for p, n in f.get("examples", {}).items()]
        counts += [("receipt", p, n) for p, n in dict(released.get("num_examples") or {}).items()]
        for where, pid, n in counts:
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= bound:
                self.fail(
                    AUDIT_FILE, ln, e.round, "body.max_examples", f"the {where} of {pid!r} declares {n!r} examples"
                )
        self.checked["declared_counts"] += len(counts)

    def _compression(self, loc: Located, f: dict[str, Any]) -> None:
        """With ``compression`` declared in the aggregation (``[transport] compression``), every commitment of
        the round states that codec and block and a measured error that is finite, >= 0 and within the
        declared ``max_error`` if there is one; its ``update_sha256`` (recomputed into the commitment above)
        is then the hash of the compressed bytes. Without a declaration, no commitment states compression."""
        e, ln = loc.entry, loc.line
        stated: dict[str, Any] = f.get("compression", {})
        declared = e.body.get("compression")
        if declared is None:
            for pid in sorted(p for p, rec in stated.items() if rec is not None):
                self.fail(AUDIT_FILE, ln, e.round, "body.compression", f"none declared, yet {pid!r} states one")
            return
        spec = declared if isinstance(declared, dict) else {}
        codec, block, bound = spec.get("codec"), spec.get("block"), spec.get("max_error")
        bad_bound = bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | float) or bound <= 0)
        if codec not in ("fp16", "int8") or not isinstance(block, int) or bad_bound:
            self.fail(AUDIT_FILE, ln, e.round, "body.compression", f"malformed declaration {declared!r}")
            return
        for pid, rec in stated.items():
            why = _record_problems(rec, codec, block, None if bound is None else float(bound))
            if why:
                self.fail(AUDIT_FILE, ln, e.round, "body.compression", f"the commitment of {pid!r}: {'; '.join(why)}")
        self.checked["compression_records"] += len(stated)

    def _behaviour(self, loc: Located, plan: Located | None, f: dict[str, Any]) -> None:
        """An update refused for what it carried: recorded by the coordinator, naming a participant the round
        selected. Refused at upload (``source = "coordinator"``): it committed nothing this round. Rejected
        by the enclave: the round's signed receipt rejects it. Suspended by the history guard
        (``source = "suspension"``): it committed this round, and no later round may select it."""
        e, ln, b = loc.entry, loc.line, loc.entry.body
        pid, reason, source = str(b.get("participant", "")), b.get("reason"), b.get("source")
        if e.author != COORDINATOR_ID:
            self.fail(AUDIT_FILE, ln, e.round, "author", "a behaviour record is the coordinator's")
            return
        if plan is None or pid not in plan.entry.body.get("participants", []):
            self.fail(AUDIT_FILE, ln, e.round, "body.participant", f"{pid!r} was not selected in this round's plan")
            return
        if not isinstance(reason, str) or not reason or pid in f.get("behaviour", {}):
            self.fail(AUDIT_FILE, ln, e.round, "body.reason", f"{pid!r}: one record with a reason code per round")
            return
        if source == "coordinator":
            if pid in f.get("authors", []):
                self.fail(AUDIT_FILE, ln, e.round, "body.source", f"{pid!r} was refused at upload, yet committed")
                return
        elif source == "suspension":  # the history guard: scored its update this round, then suspended it
            if pid not in f.get("authors", []):
                self.fail(
                    AUDIT_FILE, ln, e.round, "body.source", f"{pid!r} is suspended for an update it never committed"
                )
                return
            self.held_out[pid] = e.round
        elif source == "enclave":
            receipt: Located | None = f.get("receipt")
            rejected = (receipt.entry.body.get("receipt") or {}).get("body", {}).get("rejected", {}) if receipt else {}
            if pid not in rejected:
                self.fail(
                    AUDIT_FILE, ln, e.round, "body.source", f"the round's enclave receipt does not reject {pid!r}"
                )
                return
        else:
            self.fail(
                AUDIT_FILE, ln, e.round, "body.source", f"expected coordinator, suspension or enclave, got {source!r}"
            )
            return
        f.setdefault("behaviour", {})[pid] = str(source)
        self.checked["behaviour_records"] += 1
        if source == "suspension":
            self.notes.append(f"round {e.round}: {pid} was suspended ({reason})")
        else:
            self.notes.append(f"round {e.round}: the update of {pid} was refused by the {source} ({reason})")

    def _commitment(self, loc: Located, plan: Located | None, f: dict[str, Any]) -> None:
        e, ln, b = loc.entry, loc.line, loc.entry.body
        if e.author in f.setdefault("authors", []):
            self.fail(AUDIT_FILE, ln, e.round, "author", f"a second commitment by {e.author!r} this round")
        f["authors"].append(e.author)
        if b.get("participant") != e.author:
            self.fail(AUDIT_FILE, ln, e.round, "body.participant", "commitment names someone other than its author")
        if plan is None or e.author not in plan.entry.body.get("participants", []):
            self.fail(AUDIT_FILE, ln, e.round, "author", f"{e.author!r} was not selected in this round's plan")
        gone = self.left.get(e.author)
        if gone is not None and gone[1] < e.round:
            self.fail(AUDIT_FILE, ln, e.round, "author", f"{e.author!r} left the federation in round {gone[1]}")
        try:
            real = update_commitment(e.round, e.author, bytes.fromhex(str(b.get("update_sha256")))).hex()
        except (ValueError, TrustFedError) as exc:
            self.fail(AUDIT_FILE, ln, e.round, "body.update_sha256", f"malformed: {exc}")
            return
        if real != b.get("commitment"):
            self.fail(AUDIT_FILE, ln, e.round, "body.commitment", "is not H(round, id, H(update))")
        self.checked["commitments"] += 1
        f.setdefault("examples", {})[e.author] = b.get("num_examples")
        f.setdefault("compression", {})[e.author] = b.get("compression")
        self._provenance(loc, f)
        f["leaves"].append(bytes.fromhex(real))
        f.setdefault("commitments", {})[e.author] = f["leaves"][-1]  # author -> commitment, for the receipt

    # ------------------------------------------------------------ the app and its provenance
    def _app(self, loc: Located) -> None:
        """The app that trained the model, named once by the coordinator before round 1."""
        e, ln, b = loc.entry, loc.line, loc.entry.body
        code = str(b.get("code_sha256", ""))
        if e.author != COORDINATOR_ID or e.round != 0 or self.app_code is not None:
            self.fail(AUDIT_FILE, ln, e.round, "kind", "the app is named once, by the coordinator, before round 1")
        elif len(code) != 64 or any(c not in "0123456789abcdef" for c in code):
            self.fail(AUDIT_FILE, ln, e.round, "body.code_sha256", "must be 64 lowercase hex digits")
        else:
            self.app_code = code
            self.checked["app"] += 1

    def _provenance(self, loc: Located, f: dict[str, Any]) -> None:
        """A participant's commitment states the code it ran; it must be the federation's app. Its
        federated-evaluation scores are kept for the round's aggregation check."""
        e, ln, b = loc.entry, loc.line, loc.entry.body
        if self.app_code is not None:
            ran = b.get("app_sha256")
            if ran is None:
                self.fail(AUDIT_FILE, ln, e.round, "body.app_sha256", f"{e.author!r} does not state the code it ran")
            elif ran != self.app_code:
                self.fail(
                    AUDIT_FILE,
                    ln,
                    e.round,
                    "body.app_sha256",
                    f"{e.author!r} ran code {str(ran)[:16]}…, not the federation's app ({self.app_code[:16]}…)",
                )
            else:
                self.checked["provenance"] += 1
        evaluation = b.get("evaluation")
        if isinstance(evaluation, dict):
            try:
                f.setdefault("evaluations", []).append({EVAL_PREFIX + str(k): float(v) for k, v in evaluation.items()})
            except (TypeError, ValueError):
                self.fail(AUDIT_FILE, ln, e.round, "body.evaluation", "scores must be numbers")

    def _federated_evaluation(self, loc: Located, f: dict[str, Any]) -> None:
        """The round's federated evaluation must be the example-weighted mean of the signed scores."""
        e, ln = loc.entry, loc.line
        metrics = e.body.get("metrics", {})
        recorded = (
            {k: v for k, v in metrics.items() if k.startswith(FED_EVAL_PREFIX)} if isinstance(metrics, dict) else {}
        )
        real = combine(f.get("evaluations", []), e.round - 1)
        if not recorded and not real:
            return
        same = set(recorded) == set(real) and all(
            isinstance(recorded[k], int | float) and math.isclose(recorded[k], v, rel_tol=1e-9, abs_tol=1e-12)
            for k, v in real.items()
        )
        if not same:
            self.fail(
                AUDIT_FILE,
                ln,
                e.round,
                "body.metrics",
                "the federated evaluation is not the example-weighted mean of the participants' signed scores",
            )
        else:
            self.checked["federated_evaluations"] += 1

    def _status(self, loc: Located) -> None:
        """A participant left the federation: known to the log, once, as exited or revoked."""
        e, ln, b = loc.entry, loc.line, loc.entry.body
        pid, status = str(b.get("participant", "")), b.get("status")
        if e.author != COORDINATOR_ID:
            self.fail(AUDIT_FILE, ln, e.round, "author", "a status is recorded by the coordinator only")
        elif pid not in self.identities:
            self.fail(AUDIT_FILE, ln, e.round, "body.participant", f"{pid!r} is not a registered identity")
        elif status not in ("exited", "revoked", "suspended"):
            self.fail(AUDIT_FILE, ln, e.round, "body.status", f"expected exited, revoked or suspended, got {status!r}")
        elif pid in self.left and not (self.left[pid][0] == "suspended" and status != "suspended"):
            self.fail(AUDIT_FILE, ln, e.round, "body.participant", f"{pid!r} already left in round {self.left[pid][1]}")
        else:  # a suspended participant may still exit or be revoked (final)
            self.left[pid] = (str(status), e.round)
            if status == "suspended":
                self.suspensions[pid] = e.round
            self.checked["departures"] += 1

    def _checkpoint(self, loc: Located) -> str:
        e, ln, b = loc.entry, loc.line, loc.entry.body
        recorded = str(b.get("model_hash", ""))
        if "file" not in b:
            return recorded
        f32, spec = self.run_dir / str(b["file"]), self.run_dir / str(b.get("spec_file", ""))
        try:
            real = hash_model_bytes(f32.read_bytes(), spec.read_text(encoding="utf-8"))
        except (OSError, CheckpointError, TrustFedError) as exc:
            self.fail(str(b["file"]), None, e.round, "file", f"checkpoint unreadable ({exc}); logged at line {ln}")
            return recorded
        self.checked["checkpoints"] += 1
        if real != recorded:
            self.fail(
                str(b["file"]),
                None,
                e.round,
                "model_hash",
                f"file hashes to {real[:16]}…, the log (line {ln}) records {recorded[:16]}…: swapped or altered",
            )
        return recorded


def _record_problems(rec: object, codec: str, block: int, bound: float | None) -> list[str]:
    """Why a commitment's ``compression`` entry does not meet the round's declaration (empty: it does)."""
    keys = ("codec", "block", "max_abs_error", "rel_l2_error")
    if not isinstance(rec, dict) or set(rec) != set(keys):
        return [f"states no compression record with {', '.join(keys)} (got {rec!r})"]
    err, rel = rec["max_abs_error"], rec["rel_l2_error"]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (err, rel)):
        return ["its measured errors are not numbers"]
    if rec["codec"] != codec or rec["block"] != block:
        return [f"states {rec['codec']!r} in blocks of {rec['block']!r}; the round declares {codec!r} in {block}"]
    return CompressionRecord(codec, block, float(err), float(rel)).problems(bound)
