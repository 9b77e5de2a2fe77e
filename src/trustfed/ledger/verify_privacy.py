"""The audit verifier's privacy checks: every party's spend recomputed from the signed privacy entries."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from trustfed.errors import TrustFedError
from trustfed.ledger.recorder import AUDIT_FILE
from trustfed.ledger.verify_base import Located, VerifierState
from trustfed.privacy.report import summarize


class PrivacyChecks(VerifierState):
    # ------------------------------------------------------------ 4. privacy spend
    def check_privacy(self, facts: dict[int, dict[str, Any]]) -> None:
        """Every party's recorded epsilon must be the total its recorded mechanisms give (recomputed
        with the same accountant over all its rounds so far) and must stay within its declared budget;
        a release the enclave made must match the ``privacy`` block of that round's signed receipt."""
        if not self.privacy:
            return

        for loc in self.privacy:
            b, rnd = loc.entry.body, loc.entry.round
            if b.get("kind") != "aggregator" or b.get("released_in") != "enclave" or b.get("lost") is True:
                continue  # a lost release (made, then redone after a resume) has no receipt on record; it adds spend
            receipt: Located | None = facts.get(rnd, {}).get("receipt")
            block = (receipt.entry.body.get("receipt") or {}).get("body", {}).get("privacy") if receipt else None
            if not isinstance(block, dict):
                self.fail(
                    AUDIT_FILE, loc.line, rnd, "body.released_in", "enclave release without a receipt privacy block"
                )
                continue
            for key in ("noise_multiplier", "sample_rate", "delta", "epsilon"):
                mine, theirs = b.get(key), block.get(key)
                same = isinstance(mine, int | float) and isinstance(theirs, int | float)
                if not same or not math.isclose(float(mine), float(theirs), rel_tol=1e-9, abs_tol=1e-12):  # type: ignore[arg-type]
                    self.fail(
                        AUDIT_FILE, loc.line, rnd, f"body.{key}", f"{mine!r} differs from the receipt's {theirs!r}"
                    )
            self.checked["privacy_receipts"] += 1

        seen: dict[str, list[Located]] = defaultdict(list)
        for loc in self.privacy:
            seen[str(loc.entry.body.get("party", ""))].append(loc)
        for party, locs in sorted(seen.items()):
            for k in range(len(locs)):  # the running total at every recorded round, not only the last
                try:
                    (s,) = summarize([dict(x.entry.body) for x in locs[: k + 1]])
                except (TrustFedError, KeyError, TypeError, ValueError) as exc:
                    self.fail(AUDIT_FILE, locs[k].line, locs[k].entry.round, "body", f"malformed privacy spend: {exc}")
                    break
                if not s.epsilons:
                    continue
                if not s.verified and (s.kind == "aggregator" or s.epsilon < s.recomputed):
                    self.fail(
                        AUDIT_FILE,
                        locs[k].line,
                        locs[k].entry.round,
                        "body.epsilon",
                        f"{party} records epsilon {s.epsilon:.6g}, its recorded mechanisms give {s.recomputed:.6g}",
                    )
                elif not s.verified and k == len(locs) - 1:
                    # A participant counting more than the log shows is conservative, not a hidden release: it
                    # also counts updates that left it in rounds the log does not hold (one dropped when a
                    # standby coordinator took over, for example).
                    self.notes.append(
                        f"privacy: {party} counts epsilon {s.epsilon:.6g}, more than the {s.recomputed:.6g} of the "
                        "rounds in the log (it also counts rounds not recorded here)"
                    )
                if s.budget_epsilon is not None and s.recomputed > s.budget_epsilon * (1 + 1e-9):
                    self.fail(
                        AUDIT_FILE,
                        locs[k].line,
                        locs[k].entry.round,
                        "body.epsilon",
                        f"{party} spent epsilon {s.recomputed:.6g}, over its budget {s.budget_epsilon:g}",
                    )
            self.checked["privacy_parties"] += 1
        self.checked["privacy_entries"] += len(self.privacy)
