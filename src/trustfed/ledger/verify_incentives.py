"""The audit verifier's incentive checks: reputation, rewards, selection and suspensions recomputed from
the log."""

from __future__ import annotations

import contextlib
import math
from typing import Any

from trustfed.incentives.book import IncentiveBook, selection_shares
from trustfed.incentives.scoring import IncentiveError, ReputationPolicy, reputation_weighted_selection
from trustfed.ledger.recorder import AUDIT_FILE
from trustfed.ledger.verify_base import Located, VerifierState


class IncentiveChecks(VerifierState):
    # ------------------------------------------------------------ incentives
    def check_incentives(self, facts: dict[int, dict[str, Any]]) -> None:
        """Recompute every round's reputation and rewards from the logged contributions and flags (and
        those from the round's aggregation entry and enclave receipt); the totals are compared with
        the chain's accounts in :meth:`_compare_chain`."""
        first = next((facts[r]["incentives"] for r in sorted(facts) if "incentives" in facts[r]), None)
        if first is not None:  # a malformed policy is reported with its entry below
            with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError, IncentiveError):
                self.book = IncentiveBook(
                    ReputationPolicy(**{k: float(v) for k, v in first.entry.body["policy"].items()})
                )
        genesis: Located | None = facts.get(0, {}).get("stake")
        if genesis is not None:
            try:
                stake = int(genesis.entry.body["stake"])
                ids = [str(p) for p in genesis.entry.body["participants"]]
            except (KeyError, TypeError, ValueError) as exc:
                self.fail(AUDIT_FILE, genesis.line, 0, "body", f"malformed stake entry: {exc}")
            else:
                self.book = self.book or IncentiveBook()
                self.book.stakes.update(dict.fromkeys(ids, stake))
        for rnd in sorted(facts):
            f = facts[rnd]
            self._selection(rnd, f)
            loc: Located | None = f.get("incentives")
            if loc is None:
                if self.book is not None and rnd > 0 and "aggregation" in f:
                    self.fail(
                        AUDIT_FILE, f["aggregation"].line, rnd, "incentives", "this round has no incentives entry"
                    )
                continue
            self._incentive_round(rnd, f, loc)

    def _selection(self, rnd: int, f: dict[str, Any]) -> None:
        """A reputation-weighted draw must be the one the reputations before this round give."""
        plan: Located | None = f.get("plan")
        config = plan.entry.body.get("config") if plan is not None else None
        if plan is None or not isinstance(config, dict) or config.get("selection") != "reputation":
            return
        if self.book is None:
            self.fail(AUDIT_FILE, plan.line, rnd, "body.config.selection", "reputation selection without incentives")
            return
        try:
            pool = [p for p in str(config["selection_available"]).split(",") if p]
            seed = int(config["selection_seed"])
            chosen = tuple(sorted(str(p) for p in plan.entry.body.get("participants", [])))
            want = reputation_weighted_selection(pool, {p: self.book.current(p) for p in pool}, len(chosen), seed, rnd)
        except (KeyError, TypeError, ValueError, IncentiveError) as exc:
            self.fail(AUDIT_FILE, plan.line, rnd, "body.config", f"malformed selection record: {exc}")
            return
        if chosen != want:
            self.fail(
                AUDIT_FILE,
                plan.line,
                rnd,
                "body.participants",
                f"{list(chosen)} is not the reputation-weighted draw {list(want)} from the reputations before the round",
            )
        self.checked["reputation_draws"] += 1

    def _incentive_round(self, rnd: int, f: dict[str, Any], loc: Located) -> None:
        b, ln = loc.entry.body, loc.line
        agg: Located | None = f.get("aggregation")
        if agg is None:
            self.fail(AUDIT_FILE, ln, rnd, "incentives", "incentives without the round's aggregation entry")
            return
        try:
            policy = ReputationPolicy(**{k: float(v) for k, v in dict(b["policy"]).items()})
            pool, source, flag_unselected = int(b["pool"]), str(b["source"]), bool(b["flag_unselected"])
            slash_fraction = float(b.get("slash_fraction", 0.0))
            contributions = {str(k): float(v) for k, v in dict(b["contributions"]).items()}
            flagged = {str(p) for p in b["flagged"]}
        except (KeyError, TypeError, ValueError, IncentiveError) as exc:
            self.fail(AUDIT_FILE, ln, rnd, "body", f"malformed incentives entry: {exc}")
            return
        if self.book is None:
            self.book = IncentiveBook(policy)
        elif policy != self.book.policy:
            self.fail(AUDIT_FILE, ln, rnd, "body.policy", "the reputation policy changed during the run")
        committers = [str(p) for p in agg.entry.body.get("participants", [])]
        # refused at upload for what their update carried: in the round's book with nothing, flagged
        refused = sorted(p for p, source in f.get("behaviour", {}).items() if source == "coordinator")
        participants = [*committers, *(p for p in refused if p not in committers)]
        selected = [str(p) for p in agg.entry.body.get("selected", [])]
        receipt: Located | None = f.get("receipt")
        rbody = (receipt.entry.body.get("receipt") or {}).get("body", {}) if receipt is not None else {}
        rejected = set(rbody.get("rejected", {})) & set(participants)
        suspended = {p for p, source in f.get("behaviour", {}).items() if source == "suspension"}
        want_flagged = (set(committers) - set(selected) if flag_unselected else set()) | rejected | set(refused)
        want_flagged |= suspended & set(committers)
        if flagged != want_flagged:
            self.fail(
                AUDIT_FILE, ln, rnd, "body.flagged", f"{sorted(flagged)}, the aggregation gives {sorted(want_flagged)}"
            )
        if set(contributions) != set(participants):
            self.fail(AUDIT_FILE, ln, rnd, "body.contributions", "names other participants than the aggregation")
            return
        if source == "enclave receipt":
            released = rbody.get("contributions")
            if not isinstance(released, dict):
                self.fail(AUDIT_FILE, ln, rnd, "body.source", "the round's receipt releases no contributions")
            elif any(contributions[p] != float(released.get(p, 0.0)) for p in participants):
                self.fail(AUDIT_FILE, ln, rnd, "body.contributions", "differ from the enclave receipt's")
        elif source == "selection":
            if contributions != selection_shares(participants, selected):
                self.fail(AUDIT_FILE, ln, rnd, "body.contributions", "are not equal shares of the selected updates")
        elif source == "coordinator":
            if self.enclave is not None:
                self.fail(AUDIT_FILE, ln, rnd, "body.source", "enclave run, but the coordinator scored the updates")
            total = sum(contributions.values())
            if total != 0.0 and not math.isclose(total, 1.0, rel_tol=1e-9):
                self.fail(AUDIT_FILE, ln, rnd, "body.contributions", f"sum to {total:.12g}, not 1 or 0")
        else:
            self.fail(AUDIT_FILE, ln, rnd, "body.source", f"unknown source {source!r}")
        try:
            change = self.book.apply(
                rnd, participants, contributions, flagged & set(participants), pool, slash_fraction
            )
        except IncentiveError as exc:
            self.fail(AUDIT_FILE, ln, rnd, "body", str(exc))
            return
        for key, want in (
            ("reputation_ppm", change.reputation),
            ("reputation_deltas", change.reputation_deltas),
            ("rewards", change.rewards),
            ("slashed", change.slashed),
            ("stake", change.stakes),
        ):
            got = b.get(key)
            if not isinstance(got, dict) or {str(k): v for k, v in got.items()} != want:
                self.fail(
                    AUDIT_FILE, ln, rnd, f"body.{key}", f"recorded {got!r}, the contributions and policy give {want!r}"
                )
        self._suspensions(rnd, ln, participants, b.get("suspend_below", 0.0))
        self.checked["incentive_rounds"] += 1

    def _suspensions(self, rnd: int, ln: int, participants: list[str], threshold: object) -> None:
        """The round's recomputed reputations call for exactly the suspensions its status entries record."""
        if not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            self.fail(AUDIT_FILE, ln, rnd, "body.suspend_below", f"expected a number in [0, 1], got {threshold!r}")
            return
        assert self.book is not None
        due = {p for p in participants if p not in self._due and self.book.current(p) < threshold}
        self._due |= due
        logged = {p for p, r in self.suspensions.items() if r == rnd}
        if due != logged:
            self.fail(
                AUDIT_FILE,
                ln,
                rnd,
                "participant_status",
                f"the reputations suspend {sorted(due)} in this round; the log suspends {sorted(logged)}",
            )
