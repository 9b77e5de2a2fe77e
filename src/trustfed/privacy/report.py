"""The privacy record of a run: ``RUN_DIR/privacy.jsonl``, written round by round, and the report
that reads it back, re-derives every epsilon from the recorded mechanism, and plots the spend.

One JSON object per line:

- ``{"round", "party", "kind": "participant", "mode", "epsilon", "delta", "epsilon_round",
  "noise_multiplier", "sample_rate", "steps", "budget_epsilon"?}``: a participant's spend
  (local DP-SGD, or its own budget view of central DP);
- ``{"round", "party": "aggregator", "kind": "aggregator", ..., "released_in"}``: the central DP-FedAvg
  release; ``released_in`` is ``"enclave"`` when the attested enclave applied the noise (the values
  are then those of its signed receipt), ``"coordinator"`` otherwise; ``"lost": true`` marks a release
  the enclave made to a coordinator that stopped before recording it (the round ran again after a
  resume, and both count);
- ``{"round", "party", "kind": "absent"}``: a selected participant sent no update (it withdrew,
  for example because its budget was spent).

An auditor recomputes ``epsilon`` from the ``(noise_multiplier, sample_rate, steps)`` of every
earlier line of the same party; :func:`summarize` does exactly that.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trustfed.core.strategy import RoundPlan, RoundResult, Update
from trustfed.errors import TrustFedError
from trustfed.primitives.atomic import atomic_write_text
from trustfed.privacy.accounting import AccountantName, GaussianSteps, epsilon

PRIVACY_FILE = "privacy.jsonl"
_MECHANISM = ("noise_multiplier", "sample_rate", "steps")


def _participant_line(rnd: int, upd: Update, mode: str, accountant: str) -> dict[str, Any] | None:
    m = upd.metrics
    if "dp_epsilon" not in m:
        return None
    line: dict[str, Any] = {
        "round": rnd,
        "party": upd.participant_id,
        "kind": "participant",
        "mode": mode,
        "epsilon": m["dp_epsilon"],
        "delta": m["dp_delta"],
        "epsilon_round": m.get("dp_epsilon_round"),
        "noise_multiplier": m["dp_noise_multiplier"],
        "sample_rate": m["dp_sample_rate"],
        "steps": int(m["dp_steps"]),
        "accountant": accountant,
    }
    if "dp_budget_epsilon" in m:
        line["budget_epsilon"] = m["dp_budget_epsilon"]
    return line


class PrivacyRecorder:
    """A coordinator RoundObserver that appends each round's privacy spend to ``privacy.jsonl``."""

    def __init__(self, path: Path, mode: str, accountant: AccountantName = "rdp", *, resume: bool = False) -> None:
        self.path = path
        self.mode = mode
        self.accountant = accountant
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (resume and path.exists()):
            path.write_text("", encoding="utf-8")
        self.lines: dict[int, list[dict[str, Any]]] = {}  # round -> the lines written for it (the ledger signs them)
        self._lost: dict[int, list[dict[str, Any]]] = {}  # round -> releases made but not recorded (see count_lost)

    def count_lost(self, release: dict[str, Any]) -> None:
        """A resumed enclave run: the enclave released round ``release["round"]`` (its receipt privacy
        block) to a coordinator that stopped before recording it. The round runs again, and this line,
        ``"lost": true``, is written before that round's own, so the record counts both releases, as the
        enclave's accountant does."""
        rnd = int(release["round"])
        self._lost.setdefault(rnd, []).append(
            {
                "round": rnd,
                "party": "aggregator",
                "kind": "aggregator",
                "mode": "central",
                "epsilon": release["epsilon"],
                "delta": release["delta"],
                "noise_multiplier": release["noise_multiplier"],
                "sample_rate": release["sample_rate"],
                "steps": int(release["steps"]),
                "accountant": release["accountant"],
                "clip_norm": release.get("clip_norm"),
                "noise_std": release.get("noise_std_mean"),
                "released_in": "enclave",
                "lost": True,
            }
        )

    def keep_rounds_upto(self, last: int) -> int:
        """On resume: drop the lines of rounds after ``last`` (a round that was not recorded and will run
        again); returns how many lines were dropped."""
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        for text in self.path.read_text(encoding="utf-8").splitlines():
            if text.strip() and int(json.loads(text)["round"]) > last:
                dropped += 1
            elif text.strip():
                kept.append(text)
        atomic_write_text(self.path, "".join(t + "\n" for t in kept))
        return dropped

    def on_round_start(self, plan: RoundPlan, params: torch.Tensor) -> None:
        pass

    def on_round_end(self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: Any) -> None:
        lines: list[dict[str, Any]] = self._lost.pop(plan.round, [])
        got = {u.participant_id for u in updates}
        for u in updates:
            line = _participant_line(plan.round, u, self.mode, self.accountant)
            if line is not None:
                lines.append(line)
        lines += [{"round": plan.round, "party": p, "kind": "absent"} for p in plan.participants if p not in got]
        m = result.metrics
        if "dp_epsilon" in m:
            lines.append(
                {
                    "round": plan.round,
                    "party": "aggregator",
                    "kind": "aggregator",
                    "mode": "central",
                    "epsilon": m["dp_epsilon"],
                    "delta": m["dp_delta"],
                    "noise_multiplier": m["dp_noise_multiplier"],
                    "sample_rate": m["dp_sample_rate"],
                    "steps": 1,
                    "accountant": self.accountant,
                    "clip_norm": m.get("dp_clip_norm"),
                    "noise_std": m.get("dp_noise_std"),
                    "released_in": "enclave" if "enclave_simulated" in m else "coordinator",
                }
            )
        self.lines[plan.round] = lines
        with self.path.open("a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, sort_keys=True, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / PRIVACY_FILE
    if not path.is_file():
        raise TrustFedError(
            f"no {PRIVACY_FILE} in {run_dir}: run a federation with [privacy] mode = 'local' or 'central' "
            "and --out pointing there"
        )
    out = []
    for i, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TrustFedError(f"{path}:{i}: not a JSON line ({exc})") from None
        if not isinstance(rec, dict) or not {"round", "party", "kind"} <= set(rec):
            raise TrustFedError(f"{path}:{i}: expected an object with round, party and kind")
        out.append(rec)
    return out


@dataclass
class PartySummary:
    party: str
    kind: str
    rounds: list[int] = field(default_factory=list)
    epsilons: list[float] = field(default_factory=list)
    delta: float = math.nan
    budget_epsilon: float | None = None
    recomputed: float = math.nan
    absent_from: int | None = None

    @property
    def epsilon(self) -> float:
        return self.epsilons[-1] if self.epsilons else 0.0

    @property
    def verified(self) -> bool:
        """The recorded total matches the total re-derived from the recorded mechanisms."""
        return bool(self.epsilons) and math.isclose(self.epsilon, self.recomputed, rel_tol=1e-6, abs_tol=1e-9)

    @property
    def status(self) -> str:
        if self.absent_from is not None:
            return f"left at round {self.absent_from}"
        return "active"


def summarize(records: Sequence[dict[str, Any]], accountant: AccountantName = "rdp") -> list[PartySummary]:
    parties: dict[str, PartySummary] = {}
    events: dict[str, list[GaussianSteps]] = {}
    method: dict[str, AccountantName] = {}
    for r in sorted(records, key=lambda r: (int(r["round"]), str(r["party"]))):
        s = parties.setdefault(str(r["party"]), PartySummary(str(r["party"]), str(r["kind"])))
        if r["kind"] == "absent":
            if s.absent_from is None:
                s.absent_from = int(r["round"])
            continue
        events.setdefault(s.party, []).append(
            GaussianSteps(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"]))
        )
        s.kind = str(r["kind"])
        acc = r.get("accountant", accountant)
        if acc not in ("rdp", "pld", "prv"):
            raise TrustFedError(f"party {s.party} round {r['round']}: unknown accountant {acc!r}")
        method[s.party] = acc
        s.rounds.append(int(r["round"]))
        s.epsilons.append(float(r["epsilon"]))
        s.delta = float(r["delta"])
        if r.get("budget_epsilon") is not None:
            s.budget_epsilon = float(r["budget_epsilon"])
    for s in parties.values():
        if s.party in events:
            s.recomputed = epsilon(events[s.party], s.delta, method.get(s.party, accountant))
    return sorted(parties.values(), key=lambda s: (s.kind != "aggregator", s.party))


def plot_epsilon(summaries: Sequence[PartySummary], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for s in summaries:
        if not s.rounds:
            continue
        style: dict[str, Any] = {"color": "black", "linewidth": 2.5} if s.kind == "aggregator" else {}
        (line,) = ax.plot(s.rounds, s.epsilons, marker="o", markersize=3, label=s.party, **style)
        if s.budget_epsilon is not None:
            ax.axhline(s.budget_epsilon, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set(xlabel="round", ylabel="epsilon spent", title="Privacy spend per participant (dotted: budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
