"""The last lines of ``trustfed demo``: what a finished run shows about trust, read back from its files.

Who was flagged and in how many rounds (the signed incentives entries of the audit log), the
malicious participants' and the others' reputation on the chain, the epsilon each party spent
(privacy.jsonl, recomputed by the accountant), the independent audit's verdict (``verify_run``, as
``trustfed audit verify``), and the command that serves the run on the dashboard.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from trustfed.errors import TrustFedError
from trustfed.incentives.book import REPUTATION_SCALE
from trustfed.ledger.backends import EmbeddedLedger, read_deployment
from trustfed.ledger.recorder import AUDIT_FILE
from trustfed.ledger.records import Role
from trustfed.ledger.verify import verify_run
from trustfed.privacy.report import PRIVACY_FILE, load_records, summarize


def flag_counts(out: Path) -> tuple[int, Counter[str]]:
    """(rounds scored, how many of them flagged each participant), from the audit log's incentives entries."""
    rounds, flags = 0, Counter[str]()
    path = out / AUDIT_FILE
    if not path.is_file():
        return rounds, flags
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry.get("kind") == "incentives":
            rounds += 1
            flags.update(entry["body"].get("flagged") or [])
    return rounds, flags


def reputations(out: Path) -> dict[str, float]:
    """Each participant's reputation on the run's embedded chain (empty without one)."""
    ledger_dir = out / "ledger"
    dep = read_deployment(ledger_dir)
    if dep is None or dep.get("backend") != "embedded":
        return {}
    ledger = EmbeddedLedger(ledger_dir, read_only=True)
    try:
        return {
            i.id: ledger.account(i.id).reputation / REPUTATION_SCALE
            for i in ledger.participants()
            if i.role == Role.PARTICIPANT
        }
    finally:
        ledger.close()


def trust_report(out: Path, malicious: Sequence[str], port: int) -> list[str]:
    """The lines: flags and reputation, epsilon spent, the audit's verdict, the dashboard command."""
    lines: list[str] = []
    rounds, flags = flag_counts(out)
    rep: dict[str, float] = {}
    try:
        rep = reputations(out)
    except TrustFedError as exc:
        lines.append(f"ledger: cannot read the chain ({exc})")
    for pid in malicious:
        caught = f"flagged in {flags[pid]} of {rounds} rounds" if rounds else "not scored (no incentives)"
        lines.append(f"malicious {pid}: {caught}; reputation {rep.get(pid, float('nan')):.3f}")
    others = sorted(pid for pid in flags if pid not in malicious)
    if others:
        lines.append("also flagged: " + ", ".join(f"{pid} ({flags[pid]} rounds)" for pid in others))
    honest = [r for pid, r in rep.items() if pid not in malicious]
    if honest:
        lines.append(f"honest participants' reputation: {min(honest):.3f} to {max(honest):.3f}")
    if (out / PRIVACY_FILE).is_file():
        spent = [s for s in summarize(load_records(out)) if s.epsilons]
        if spent:
            each = ", ".join(f"{s.party} {s.epsilon:.2f}" for s in spent)
            lines.append(f"differential privacy: epsilon spent (delta {spent[0].delta:g}): {each}")
    verdict = verify_run(out)
    if verdict.ok:
        lines.append(f"audit: VERIFIED ({sum(verdict.checked.values())} checks; trustfed audit verify {out})")
    else:
        lines.append(f"audit: NOT VERIFIED, {len(verdict.failures)} failure(s); see trustfed audit verify {out}")
        lines += [f"  {f}" for f in verdict.failures[:5]]
    root, name = out.resolve().parent, out.resolve().name
    lines.append(f"dashboard: trustfed dashboard {root} --port {port}  then open http://127.0.0.1:{port}/runs/{name}")
    return lines
