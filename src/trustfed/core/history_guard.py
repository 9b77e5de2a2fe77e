"""A strategy wrapper that suspends participants who push against the federation round after round.

Per-round robust rules see one round's tensors: an attacker that stays inside every rule of a round
(within the clipping radius, below the copies cosine) is kept every round, and a few of them moving the
centre a little each round add up. What gives them away is persistence: the same participants send
updates that point against the aggregate in every round, while an honest participant on skewed data
points somewhat along it. Measured on non-IID MNIST-5k (20 participants, 4 attackers, seeds 0-3,
docs/robust.md): an honest participant's cosine to the robust aggregate went down to -0.16 in single
rounds, its mean over 3 rounds no lower than +0.006; the attackers at the clipping radius sat below
-0.83 in each of their first 3 rounds.

:class:`HistoryGuard` wraps a FedAvg-family strategy. After each round it scores every update by the
cosine of its delta (``update - global``) to a reference delta and keeps each participant's last
``rounds`` scores. The reference is the round's aggregate delta (``reference = "aggregate"``), or the
coordinate-wise trimmed mean of the deltas the rule kept (``"trimmed_mean"``): attackers who capture the
aggregate (by claiming large example counts a weighted rule believes, or in the first rounds) make the
honest participants look opposed to it, while a minority of at most ``trim`` cannot move the trimmed mean
outside the range the others span in any coordinate. A participant whose mean over its last ``rounds``
scores is below ``min_cosine`` is suspended: never selected again, and its update refused if one still arrives.
:meth:`HistoryGuard.suspended_in` tells the recorders who was suspended in a round, and why.

A second rule (``min_consistency``, off unless set above -1) follows each participant's own updates: an
honest participant trains on the same data every round, so its delta points much as its delta of the
round before did (FLDetector's observation, Zhang et al. 2022: honest updates are predictable from the
participant's previous ones). Measured on the same setup: the mean over 3 rounds of that cosine was at
least +0.44 for every honest participant; attackers that push in a fresh direction every round
(``history_edge``) stayed below +0.21, free riders (zero deltas, cosine 0) at 0. A participant whose mean
over its last ``rounds`` consistency scores is below ``min_consistency`` is suspended, with the reason
``inconsistent_updates``. It keeps each participant's last delta (``n x d`` float32, also in the state).

Fail-safe: suspensions never reach half of the participants the guard has scored (the rule assumes an
honest majority; with more, it would be the honest ones who look opposed); with the trimmed-mean
reference they never pass ``int(trim * n)``, the share of attackers that reference assumes. Pure: tensors
and plain values, no I/O.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trustfed.core.aggregator import AggregateResult
from trustfed.core.anomaly import cosines
from trustfed.core.robust_kernels import trimmed_mean
from trustfed.core.strategy import FedAvg, RoundPlan, RoundResult, Strategy, Update
from trustfed.errors import AggregationError

log = logging.getLogger("trustfed.core.history_guard")

#: The reason codes of a suspension in the audit log's ``participant_behaviour`` entry: its updates opposed
#: the aggregate, or they did not follow from one round to the next.
SUSPENSION_REASON = "persistent_opposition"
INCONSISTENCY_REASON = "inconsistent_updates"
REASONS = (SUSPENSION_REASON, INCONSISTENCY_REASON)
#: What the opposition rule compares each update with: the round's aggregate, or the coordinate-wise trimmed
#: mean of the updates the rule kept (unweighted, :func:`trimmed_reference`), which a minority cannot move
#: outside the others' range in any coordinate, whatever example counts it claims.
REFERENCES = ("aggregate", "trimmed_mean")
_REFERENCE_NAME = {"aggregate": "aggregate", "trimmed_mean": "round's trimmed mean"}


@dataclass(frozen=True)
class SuspensionRule:
    """Suspend a participant once the mean cosine of its last ``rounds`` deltas to the rounds' aggregate
    deltas is below ``min_cosine``, or (``min_consistency > -1``) once the mean cosine of each of its last
    ``rounds`` deltas to its own delta before is below ``min_consistency``; never suspend half of the
    scored participants or more."""

    min_cosine: float = -0.2
    rounds: int = 3
    min_consistency: float = -1.0  # -1: off (no mean of cosines is below -1)
    reference: str = "aggregate"  # or "trimmed_mean": what the opposition scores compare each update with
    trim: float = 0.2  # with "trimmed_mean": the share cut at each end of every coordinate

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise AggregationError(f"suspension reference must be one of {list(REFERENCES)}, got {self.reference!r}")
        if not 0.0 <= self.trim < 0.5:
            raise AggregationError(f"suspension trim must be in [0, 0.5), got {self.trim}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise AggregationError(f"suspension min_cosine must be in [-1, 1], got {self.min_cosine}")
        if not -1.0 <= self.min_consistency <= 1.0:
            raise AggregationError(f"suspension min_consistency must be in [-1, 1], got {self.min_consistency}")
        if self.rounds < 1:
            raise AggregationError(f"suspension rounds must be >= 1, got {self.rounds}")


@dataclass(frozen=True)
class Suspension:
    """Who was suspended, in which round, why (one of :data:`REASONS`), with which mean cosine over how
    many rounds."""

    participant: str
    round: int
    score: float
    rounds: int
    reason: str = SUSPENSION_REASON

    def threshold(self, rule: SuspensionRule) -> float:
        return rule.min_cosine if self.reason == SUSPENSION_REASON else rule.min_consistency

    def detail(self, rule: SuspensionRule) -> str:
        if self.reason == INCONSISTENCY_REASON:
            what = f"mean cosine {self.score:.4f} of its last {self.rounds} updates to its update before"
        else:
            what = f"mean cosine {self.score:.4f} to the {_REFERENCE_NAME[rule.reference]} over its last {self.rounds} rounds"
        return f"{what} is below {self.threshold(rule)}: suspended, not selected again"


def trimmed_reference(deltas: torch.Tensor, selected: Sequence[int], trim: float, federation: int = 0) -> torch.Tensor:
    """The coordinate-wise trimmed mean (float64) of the finite rows of ``deltas`` the rule ``selected``,
    ``int(trim * n)`` cut at each end, ``n`` the larger of the round's finite rows and ``federation`` (the
    participants scored so far, suspended ones included); of all finite rows when the selected ones are not
    more than twice that cut, and never more than the median's cut. Counting only the selected rows keeps
    out copies the rule left out (``max_cosine``): five equal rows of twenty would otherwise sit inside the
    trimmed range and pull it their way. Cutting as many as from the whole federation keeps the guarantee
    when the rule left out honest rows or honest participants were suspended: any ``int(trim * n)`` rows
    still cannot move a coordinate outside the others' range."""
    finite = torch.isfinite(deltas).all(dim=1)
    cut = int(trim * max(int(finite.sum()), federation))
    chosen = torch.zeros_like(finite)
    chosen[list(selected)] = True
    rows = deltas[chosen & finite]
    if rows.shape[0] <= 2 * cut:
        rows = deltas[finite]
    return trimmed_mean(rows.to(torch.float32), min(cut, (rows.shape[0] - 1) // 2)).to(torch.float64)


def opposition_reference(
    rule: SuspensionRule, deltas: torch.Tensor, aggregate: torch.Tensor, selected: Sequence[int], federation: int
) -> torch.Tensor:
    """The delta the opposition scores compare with (float64): ``aggregate`` (the round's aggregate delta),
    or :func:`trimmed_reference` of ``deltas``."""
    if rule.reference == "aggregate":
        return aggregate
    return trimmed_reference(deltas, selected, rule.trim, federation)


def opposition_scores(ids: Sequence[str], deltas: torch.Tensor, aggregate: torch.Tensor) -> dict[str, float]:
    """Each finite update's cosine to the round's aggregate delta (``deltas`` ``[n, d]`` and ``aggregate``
    both from the global model); updates with NaN or infinite values get no score (the strategy already
    leaves them out)."""
    cos = cosines(deltas, aggregate).tolist()
    return {pid: float(c) for pid, c in zip(ids, cos, strict=True) if c == c}


def consistency_scores(
    ids: Sequence[str], deltas: torch.Tensor, previous: Mapping[str, torch.Tensor]
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Each finite update's cosine to the same participant's previous delta (0 when either is zero; no score
    for a participant's first update), and the deltas to keep as the next round's ``previous`` (float32)."""
    scores: dict[str, float] = {}
    kept: dict[str, torch.Tensor] = {}
    for pid, d in zip(ids, deltas, strict=True):
        if not bool(torch.isfinite(d).all()):
            continue
        before = previous.get(pid)
        if before is not None and before.shape == d.shape:
            scores[pid] = float(cosines(d[None, :], before)[0])
        kept[pid] = d.to(torch.float32)
    return scores, kept


class HistoryGuard(Strategy):
    """``inner`` (a FedAvg-family strategy) whose participants are scored every round and suspended by
    ``rule`` when they persistently oppose the aggregate (see the module docstring)."""

    name = "history_guard"

    def __init__(self, inner: FedAvg, rule: SuspensionRule | None = None) -> None:
        self.inner = inner
        self.rule = rule or SuspensionRule()
        self.scores: dict[str, deque[float]] = {}
        self.consistency: dict[str, deque[float]] = {}
        self.previous: dict[str, torch.Tensor] = {}  # each participant's last delta (the consistency rule)
        self.suspended: dict[str, Suspension] = {}

    @property
    def checks_consistency(self) -> bool:
        return self.rule.min_consistency > -1.0

    def configure_round(self, rnd: int, params: torch.Tensor, available: Sequence[str]) -> RoundPlan:
        return self.inner.configure_round(rnd, params, [p for p in available if p not in self.suspended])

    def aggregate(self, plan: RoundPlan, params: torch.Tensor, updates: Sequence[Update]) -> RoundResult:
        keep = [i for i, u in enumerate(updates) if u.participant_id not in self.suspended]
        if len(keep) < len(updates):
            late = sorted({u.participant_id for u in updates} - {updates[i].participant_id for i in keep})
            log.warning("round %d: refused the update(s) of suspended %s", plan.round, ", ".join(late))
        if not keep:
            raise AggregationError(f"round {plan.round}: every update comes from a suspended participant")
        kept = [updates[i] for i in keep]
        res = self.inner.aggregate(plan, params, kept)
        g = params.to(torch.float64)
        ids = [u.participant_id for u in kept]
        deltas = torch.stack([u.params for u in kept]).to(torch.float64) - g  # once, for both scores
        consistency: dict[str, float] = {}
        if self.checks_consistency:
            consistency, last = consistency_scores(ids, deltas, self.previous)
            self.previous.update(last)
        federation = len(set(self.scores) | set(ids))
        reference = opposition_reference(
            self.rule, deltas, res.params.to(torch.float64) - g, res.aggregate.selected, federation
        )
        self._score(plan.round, opposition_scores(ids, deltas, reference), consistency)
        agg = _remap(res.aggregate, keep, len(updates))
        metrics = {**res.metrics, "num_suspended": float(len(self.suspended))}
        return RoundResult(res.params, metrics, agg)

    def _score(self, rnd: int, scores: Mapping[str, float], consistency: Mapping[str, float]) -> None:
        k = self.rule.rounds
        for pid, s in scores.items():
            self.scores.setdefault(pid, deque(maxlen=k)).append(s)
        for pid, s in consistency.items():
            self.consistency.setdefault(pid, deque(maxlen=k)).append(s)
        due: dict[str, tuple[float, float, str]] = {}  # margin below, mean, reason; opposition wins a tie
        for reason, history, threshold in (
            (INCONSISTENCY_REASON, self.consistency, self.rule.min_consistency),
            (SUSPENSION_REASON, self.scores, self.rule.min_cosine),
        ):
            for pid, h in history.items():
                if pid not in self.suspended and len(h) == k and sum(h) / k < threshold:
                    due[pid] = (sum(h) / k - threshold, sum(h) / k, reason)
        most = self.most_suspended(len(self.scores))
        for pid, (_, mean, reason) in sorted(due.items(), key=lambda kv: (kv[1][0], kv[0])):  # farthest below first
            if len(self.suspended) + 1 > most:
                log.warning(
                    "round %d: %s's mean %s score %.4f is below its threshold, but suspending it would take the "
                    "suspended past %d of the %d participants scored: not suspended",
                    rnd,
                    pid,
                    "consistency" if reason == INCONSISTENCY_REASON else "opposition",
                    mean,
                    most,
                    len(self.scores),
                )
                continue
            self.suspended[pid] = Suspension(pid, rnd, mean, k, reason)
            log.warning("round %d: %s suspended (%s)", rnd, pid, self.suspended[pid].detail(self.rule))

    def most_suspended(self, scored: int) -> int:
        """How many of ``scored`` participants may be suspended: fewer than half (the rule assumes an honest
        majority); with the trimmed-mean reference no more than ``int(trim * scored)``, the share of
        attackers it assumes (suspending more would suspend honest participants, and the attackers left
        would then be more than its cut)."""
        half = (scored - 1) // 2
        return min(half, int(self.rule.trim * scored)) if self.rule.reference == "trimmed_mean" else half

    def suspended_in(self, rnd: int) -> list[Suspension]:
        """The suspensions decided in round ``rnd``, by participant."""
        return sorted((s for s in self.suspended.values() if s.round == rnd), key=lambda s: s.participant)

    def evaluate(self, rnd: int, params: torch.Tensor) -> dict[str, float] | None:
        return self.inner.evaluate(rnd, params)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inner": self.inner.describe(),
            "min_cosine": self.rule.min_cosine,
            "min_consistency": self.rule.min_consistency,
            "rounds": self.rule.rounds,
            "reference": self.rule.reference,
            **({"trim": self.rule.trim} if self.rule.reference == "trimmed_mean" else {}),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The inner strategy's state under ``inner.``; the scores and suspensions under ``guard.``:
        ``ids`` (the participants' UTF-8 ids joined by newlines, one byte per value), ``scores`` and
        ``consistency`` ``[n, rounds]`` (NaN where fewer rounds are in), ``since`` (the round each was
        suspended in; 0: not suspended), ``suspended_score``, ``reason`` (an index into :data:`REASONS`) and,
        with the consistency rule, ``previous`` ``[n, d]`` (each one's last delta; NaN: none yet)."""
        out = {f"inner.{k}": v for k, v in self.inner.state_dict().items()}
        ids = sorted(set(self.scores) | set(self.suspended) | set(self.consistency) | set(self.previous))
        if not ids:
            return out
        sus = [self.suspended.get(pid) for pid in ids]
        out["guard.ids"] = torch.tensor(list("\n".join(ids).encode("utf-8")), dtype=torch.int64)
        out["guard.scores"] = self._history(ids, self.scores)
        out["guard.consistency"] = self._history(ids, self.consistency)
        out["guard.since"] = torch.tensor([s.round if s else 0 for s in sus], dtype=torch.int64)
        out["guard.suspended_score"] = torch.tensor([s.score if s else 0.0 for s in sus], dtype=torch.float64)
        out["guard.reason"] = torch.tensor([REASONS.index(s.reason) if s else 0 for s in sus], dtype=torch.int64)
        if self.previous:
            d = next(iter(self.previous.values())).numel()
            prev = torch.full((len(ids), d), float("nan"), dtype=torch.float32)
            for i, pid in enumerate(ids):
                if pid in self.previous and self.previous[pid].numel() == d:
                    prev[i] = self.previous[pid]
            out["guard.previous"] = prev
        return out

    def _history(self, ids: Sequence[str], held: Mapping[str, deque[float]]) -> torch.Tensor:
        k = self.rule.rounds
        scores = torch.full((len(ids), k), float("nan"), dtype=torch.float64)
        for i, pid in enumerate(ids):
            h = list(held.get(pid, ()))
            if h:
                scores[i, k - len(h) :] = torch.tensor(h, dtype=torch.float64)
        return scores

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        own = {k: v for k, v in state.items() if k.startswith("guard.")}
        unknown = sorted(k for k in state if k not in own and not k.startswith("inner."))
        if unknown:
            raise AggregationError(f"strategy {self.name} got unknown state keys {unknown}")
        self.inner.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("inner.")})
        self.scores, self.consistency, self.previous, self.suspended = {}, {}, {}, {}
        if not own:
            return
        need = {"guard.ids", "guard.scores", "guard.since", "guard.suspended_score"}
        optional = {"guard.consistency", "guard.reason", "guard.previous"}  # not in checkpoints before them
        if not need <= set(own) <= need | optional:
            raise AggregationError(
                f"strategy {self.name} state needs {sorted(need)} (and may hold {sorted(optional)}), got {sorted(own)}"
            )
        ids = bytes(own["guard.ids"].tolist()).decode("utf-8").split("\n")
        n, k = len(ids), self.rule.rounds
        scores, since, score = own["guard.scores"], own["guard.since"], own["guard.suspended_score"]
        consistency = own.get("guard.consistency", torch.full((n, k), float("nan"), dtype=torch.float64))
        reason = own.get("guard.reason", torch.zeros(n, dtype=torch.int64))
        prev = own.get("guard.previous")
        if (
            scores.shape != (n, k)
            or consistency.shape != (n, k)
            or since.shape != (n,)
            or score.shape != (n,)
            or reason.shape != (n,)
            or (prev is not None and (prev.dim() != 2 or prev.shape[0] != n))
        ):
            raise AggregationError(
                f"strategy {self.name} state holds {n} participants but scores {tuple(scores.shape)}, consistency "
                f"{tuple(consistency.shape)}, since {tuple(since.shape)}, reason {tuple(reason.shape)}; expected "
                f"[{n}, {k}] and [{n}]"
            )
        if bool(((reason < 0) | (reason >= len(REASONS))).any()):
            raise AggregationError(f"strategy {self.name} state has a suspension reason outside 0..{len(REASONS) - 1}")
        for i, pid in enumerate(ids):
            for held, row in ((self.scores, scores[i]), (self.consistency, consistency[i])):
                h = [float(v) for v in row.tolist() if v == v]
                if h:
                    held[pid] = deque(h, maxlen=k)
            if prev is not None and bool(torch.isfinite(prev[i]).all()):
                self.previous[pid] = prev[i].to(torch.float32).clone()
            if int(since[i]) > 0:
                self.suspended[pid] = Suspension(pid, int(since[i]), float(score[i]), k, REASONS[int(reason[i])])


def _remap(res: AggregateResult, keep: Sequence[int], n: int) -> AggregateResult:
    """``res`` (over the kept updates) with its selection and per-update scores indexed like all ``n``."""
    if len(keep) == n:
        return res
    scores = {}
    for name, s in res.scores.items():
        if s.shape == (len(keep),):
            full = torch.full((n,), float("nan"), dtype=s.dtype if s.is_floating_point() else torch.float64)
            full[list(keep)] = s.to(full.dtype)
            scores[name] = full
    return AggregateResult(res.params, tuple(keep[i] for i in res.selected), scores)
