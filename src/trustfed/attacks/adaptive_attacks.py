"""The adaptive attacks, registered by name on the :class:`~trustfed.attacks.api.Attack` interface.

From the literature: ``fang_krum`` (Fang et al. 2020, full knowledge), ``mimic`` (Karimireddy, He and
Jaggi 2022), ``agr_tailored`` (Shejwalkar and Houmansadr 2021, tailored to the run's aggregator). Adapted
to trustfed's default rule (centered clipping, ``reject``, ``max_cosine``): ``clip_radius`` (at the
clipping radius), ``reject_edge`` (just inside the rejection distance), ``cosine_edge`` (copies just
below the colluding-copies cosine); ``history_edge`` (at the radius, just above the history guard's
cosine threshold), ``consistency_edge`` (the same, and just above its consistency threshold),
``guard_edge`` (at the radius, its cosine to the round's aggregate, computed by the run's rule, just above
the guard's threshold, and consistent from round to round), ``lift_edge`` (the same, pushing only where
centered clipping's ``lift`` does not reach). The maths is in :mod:`trustfed.attacks.adaptive`.

Attacks aimed at centered clipping need its centre: the previous round's aggregate, which every
participant sees as the difference of two consecutive global models (kept in ``ctx.state``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from trustfed.attacks.adaptive import (
    at_cosine,
    at_radius,
    fang_krum,
    least_turn,
    mimic_choice,
    orthogonal_part,
    pairwise_cosine,
    spread_copies,
    tailored_gamma,
    turned_rows,
    unit,
)
from trustfed.attacks.api import Attack, AttackContext, AttackError, Scalar
from trustfed.attacks.builtin import number
from trustfed.attacks.model_poisoning import OMNISCIENT_FNS
from trustfed.attacks.registry import register_attack
from trustfed.core.aggregator import AggregateResult, Aggregator, get_aggregator
from trustfed.core.history_guard import trimmed_reference
from trustfed.core.robust import CenteredClipping, FLTrust
from trustfed.core.robust_kernels import lift_rows
from trustfed.errors import TrustFedError


def previous_step(ctx: AttackContext) -> torch.Tensor:
    """The previous round's aggregate delta (global now minus global before), where centered clipping
    starts its centre; zero in a participant's first round or after a round it missed (it then does not
    know it). Records this round's global model for the next call."""
    prev = ctx.state.get("previous_global")
    ctx.state["previous_global"] = (ctx.round, ctx.global_params.clone())
    if prev is not None and prev[0] == ctx.round - 1 and prev[1].shape == ctx.global_params.shape:
        step: torch.Tensor = ctx.global_params - prev[1]
        return step
    return torch.zeros_like(ctx.global_params)


def _rows(ctx: AttackContext, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {pid: rows[i].to(torch.float32) for i, pid in enumerate(ctx.attackers)}


def _cosine_param(attack: str, key: str, value: Scalar) -> float:
    """A parameter that is a cosine: a number in ``[-1, 1]``, or an :class:`AttackError` naming it."""
    v = number(attack, key, value)
    if not -1 <= v <= 1:
        raise AttackError(f"attack '{attack}': {key} must be in [-1, 1], got {v}")
    return v


def _cosine_below(ctx: AttackContext, given: float) -> float:
    """The pairwise cosine the attackers keep to: ``given`` when positive, else 0.005 below the aggregator's
    ``max_cosine``, or 0.99 when it has none."""
    if given > 0:
        return given
    rule = float(ctx.aggregator.get("max_cosine", 0.0) or 0.0)
    return rule - 0.005 if rule > 0 else 0.99


@register_attack("fang_krum", builtin=True)
class FangKrum(Attack):
    """Fang et al. 2020's full-knowledge attack on Krum / Multi-Krum (see :func:`fang_krum`)."""

    knowledge = "omniscient"

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = number("fang_krum", "eps", eps)

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        if not ctx.honest:
            return dict(ctx.own_updates)
        return _rows(ctx, fang_krum(ctx.stacked(ctx.honest), len(ctx.attackers), ctx.generator, self.eps))


@register_attack("mimic", builtin=True)
class Mimic(Attack):
    """Every attacker sends the delta of one honest participant, chosen in the attackers' first round as
    the one farthest along the honest deltas' top principal direction, and kept while it takes part."""

    knowledge = "omniscient"

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        if not ctx.honest:
            return dict(ctx.own_updates)
        target = ctx.state.get("mimic")
        if target not in ctx.honest:
            target = ctx.honest[mimic_choice(ctx.stacked(ctx.honest))]
            ctx.state["mimic"] = target
        copy = ctx.honest_updates[target]
        return {pid: copy.clone() for pid in ctx.attackers}


@register_attack("clip_radius", builtin=True)
class ClipRadius(Attack):
    """Adapted to centered clipping: each attacker at ``radius`` times the clipping radius from the centre
    (1: at the radius, so clipping does not shorten it), in one harmful direction (opposite the honest
    mean), pairwise cosine at most ``max_cosine`` (0: just below the aggregator's, see :func:`at_radius`)."""

    knowledge = "omniscient"

    def __init__(self, radius: float = 1.0, max_cosine: float = 0.0) -> None:
        self.radius = number("clip_radius", "radius", radius)
        self.max_cosine = number("clip_radius", "max_cosine", max_cosine)
        if self.radius <= 0 or not 0 <= self.max_cosine < 1:
            raise AttackError("attack 'clip_radius': need radius > 0 and 0 <= max_cosine < 1")

    def _radius(self, ctx: AttackContext) -> float:
        return self.radius

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        centre = previous_step(ctx)
        if not ctx.honest:
            return dict(ctx.own_updates)
        rows = at_radius(
            ctx.stacked(ctx.honest),
            centre,
            len(ctx.attackers),
            self._radius(ctx),
            _cosine_below(ctx, self.max_cosine),
            ctx.generator,
        )
        return _rows(ctx, rows)


@register_attack("reject_edge", builtin=True)
class RejectEdge(ClipRadius):
    """Just inside centered clipping's rejection rule: as ``clip_radius`` at ``margin`` times the
    aggregator's ``reject`` radii from the centre (its updates are clipped to the radius, never dropped)."""

    def __init__(self, margin: float = 0.97, max_cosine: float = 0.0) -> None:
        super().__init__(1.0, max_cosine)
        self.margin = number("reject_edge", "margin", margin)
        if not 0 < self.margin < 1:
            raise AttackError(f"attack 'reject_edge': margin must be in (0, 1), got {self.margin}")

    def _radius(self, ctx: AttackContext) -> float:
        reject = float(ctx.aggregator.get("reject", 0.0) or 0.0)
        return self.margin * reject if reject >= 1 else 1.0


@register_attack("history_edge", builtin=True)
class HistoryEdge(ClipRadius):
    """Adapted to the history guard (``[strategy.suspension]``): as ``clip_radius``, its direction turned
    just enough that each row's cosine to the honest mean is at least ``target`` (default -0.1: 0.1 above
    the guard's default ``min_cosine``), see :func:`at_cosine`. Opposes the federation every round while
    staying above the suspension threshold."""

    def __init__(self, radius: float = 1.0, max_cosine: float = 0.0, target: float = -0.1) -> None:
        super().__init__(radius, max_cosine)
        self.target = _cosine_param("history_edge", "target", target)

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        centre = previous_step(ctx)
        if not ctx.honest:
            return dict(ctx.own_updates)
        honest = ctx.stacked(ctx.honest)
        cos = _cosine_below(ctx, self.max_cosine)
        return _rows(ctx, at_cosine(honest, centre, len(ctx.attackers), self.radius, cos, ctx.generator, self.target))


def least_mix(
    with_mix: Callable[[float], tuple[torch.Tensor, torch.Tensor]],
    consistent: Callable[[torch.Tensor], bool],
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``with_mix(mix)`` (a direction and its rows) for the least ``mix`` in ``[0, 1]`` of the last round's
    direction whose rows are ``consistent`` with the last round's (bisection, ``steps`` steps; 1 when none
    is): as fresh a direction as a consistency rule lets through."""
    out = with_mix(0.0)
    if consistent(out[1]):
        return out
    lo, hi = 0.0, 1.0
    out = with_mix(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2.0
        cand = with_mix(mid)
        if consistent(cand[1]):
            hi, out = mid, cand
        else:
            lo = mid
    return out


@register_attack("consistency_edge", builtin=True)
class ConsistencyEdge(HistoryEdge):
    """Adapted to both rules of the history guard: as ``history_edge`` (at the radius, cosine to the honest
    mean at least ``target``), its direction turned from round to round only as far as keeps each
    attacker's delta at cosine ``consistency`` or more to its delta of the round before (default 0.4: 0.1
    above the guard's ``min_consistency`` of the default robust configuration). Each round: a fresh random
    direction mixed with the last one, the least of the last one that keeps the cosine (bisection)."""

    def __init__(
        self, radius: float = 1.0, max_cosine: float = 0.0, target: float = -0.1, consistency: float = 0.4
    ) -> None:
        super().__init__(radius, max_cosine, target)
        self.consistency = _cosine_param("consistency_edge", "consistency", consistency)

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        centre = previous_step(ctx)
        if not ctx.honest:
            return dict(ctx.own_updates)
        honest = ctx.stacked(ctx.honest)
        cos = _cosine_below(ctx, self.max_cosine)
        seed = ctx.state.setdefault("spread_seed", int(torch.randint(0, 2**62, (1,), generator=ctx.generator)))
        fresh = torch.randn(honest.shape[1], generator=ctx.generator, dtype=torch.float64)
        fresh = unit(fresh)
        last_w: torch.Tensor | None = ctx.state.get("direction")
        last: dict[str, torch.Tensor] = ctx.state.get("rows", {})

        def rows(mix: float) -> tuple[torch.Tensor, torch.Tensor]:
            w = fresh if last_w is None else mix * last_w + math.sqrt(1.0 - mix * mix) * fresh
            gen = torch.Generator().manual_seed(seed)  # the same spread every round
            return w, at_cosine(honest, centre, len(ctx.attackers), self.radius, cos, gen, self.target, w)

        def consistent(r: torch.Tensor) -> bool:
            before = [last[p] for p in ctx.attackers if p in last]
            if len(before) < len(ctx.attackers):
                return True
            both = torch.cat([r.to(torch.float64), torch.stack(before).to(torch.float64)])
            k = len(ctx.attackers)
            return float(pairwise_cosine(both)[range(k), range(k, 2 * k)].min()) >= self.consistency

        w, out = least_mix(rows, consistent, 12)
        ctx.state["direction"] = unit(w)
        ctx.state["rows"] = {p: out[i].clone() for i, p in enumerate(ctx.attackers)}
        return _rows(ctx, out)


@register_attack("guard_edge", builtin=True)
class GuardEdge(Attack):
    """Adapted to the history guard with full knowledge of the round: at the clipping radius, turned from
    "against the honest mean" toward a direction ``w`` orthogonal to it only as far as keeps every row's
    cosine to what the guard compares it with (:func:`guard_reference`: the round's aggregate, the run's
    rule rebuilt from its description and run on the candidate round with the counts claimed as weights,
    centered clipping from the centre every participant can infer; or the candidate round's trimmed mean)
    at ``min_cosine + margin`` (the guard suspends below ``min_cosine``); ``w`` mixes the last
    round's with a fresh random one, as little of the last as keeps each row's cosine to its row of the
    round before at ``consistency`` or more. Unless given, ``min_cosine`` is the guard's (``ctx.guard``;
    -0.2 without one) and ``consistency`` 0.1 above the guard's ``min_consistency`` (0.4 without a guard).
    Pairwise cosine just below the rule's ``max_cosine``. The rows carry the centre (the previous
    aggregate): so they point along the aggregate enough for the guard while their push opposes it."""

    knowledge = "omniscient"

    def __init__(
        self,
        min_cosine: float | None = None,
        margin: float = 0.05,
        consistency: float | None = None,
        radius: float = 1.0,
    ) -> None:
        self.min_cosine = None if min_cosine is None else _cosine_param("guard_edge", "min_cosine", min_cosine)
        self.margin = number("guard_edge", "margin", margin)
        self.consistency = None if consistency is None else _cosine_param("guard_edge", "consistency", consistency)
        self.radius = number("guard_edge", "radius", radius)
        if self.radius <= 0:
            raise AttackError(f"attack 'guard_edge': radius must be > 0, got {self.radius}")

    def _against(self, ctx: AttackContext, honest: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The unit direction the rows push against (the honest mean), and unit directions they leave
        alone (none)."""
        return unit(honest.mean(dim=0)), []

    def _thresholds(self, ctx: AttackContext) -> tuple[float, float]:
        """The least cosine to the guard's reference to keep, and the least to the row of the round before."""
        floor = float(ctx.guard.get("min_cosine", -0.2)) if self.min_cosine is None else self.min_cosine
        if self.consistency is not None:
            return floor + self.margin, self.consistency
        rule = float(ctx.guard.get("min_consistency", 0.3))
        return floor + self.margin, (min(rule + 0.1, 1.0) if rule > -1.0 else -1.0)

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        c = previous_step(ctx).to(torch.float64)
        if not ctx.honest:
            return dict(ctx.own_updates)
        honest = ctx.stacked(ctx.honest).to(torch.float64)
        m, d = len(ctx.attackers), honest.shape[1]
        floor, consistency = self._thresholds(ctx)
        u, kept = self._against(ctx, honest)
        big_r = self.radius * float((honest - c).norm(dim=1).median())
        kappa = _cosine_below(ctx, 0.0)
        seed = ctx.state.setdefault("spread_seed", int(torch.randint(0, 2**62, (1,), generator=ctx.generator)))
        raw = torch.randn((d, m), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        fresh = torch.randn(d, generator=ctx.generator, dtype=torch.float64)
        fresh = unit(fresh)
        last_w: torch.Tensor | None = ctx.state.get("direction")
        last: torch.Tensor | None = ctx.state.get("rows")
        aggregate = guard_reference(ctx, c)
        anchors = torch.stack([u, *kept, c]) if float(c.norm()) > 0 else torch.stack([u, *kept])

        def to_aggregate(rows: torch.Tensor) -> float:  # the least cosine of a row to what the guard compares with
            a = aggregate(torch.cat([rows, honest])).to(torch.float64)
            return float(((rows @ a) / (rows.norm(dim=1) * a.norm()).clamp_min(1e-30)).min())

        def with_mix(mix: float) -> tuple[torch.Tensor, torch.Tensor]:
            w = orthogonal_part(fresh if last_w is None else mix * last_w + math.sqrt(1.0 - mix * mix) * fresh, anchors)
            q, _ = torch.linalg.qr(torch.cat([torch.cat([anchors, w[None, :]]).T, raw], dim=1))
            spread = q[:, anchors.shape[0] + 1 :].T  # orthonormal, orthogonal to u, w and the centre
            rows = least_turn(lambda t: turned_rows(c, u, w, spread, big_r, kappa, t), to_aggregate, floor)
            return w, rows

        def consistent(rows: torch.Tensor) -> bool:
            if last is None or last.shape != rows.shape:
                return True
            return float(pairwise_cosine(torch.cat([rows, last]))[range(m), range(m, 2 * m)].min()) >= consistency

        w, rows = least_mix(with_mix, consistent, 7)
        ctx.state["direction"], ctx.state["rows"] = w, rows
        return _rows(ctx, rows)


@register_attack("lift_edge", builtin=True)
class LiftEdge(GuardEdge):
    """Adapted to centered clipping's ``lift`` as well as to the history guard: as ``guard_edge``, but it
    pushes against the part of the honest mean that the lift does not protect, the part orthogonal to the
    consensus direction (the honest rows' own, lifted at the rule's ``lift``, 0.35 when it has none: see
    :func:`~trustfed.core.robust_kernels.lift_rows`), and leaves that direction alone, where the lift would
    undo its pull."""

    def _against(self, ctx: AttackContext, honest: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        mean = honest.mean(dim=0)
        v = unit(lift_rows(honest, float(ctx.aggregator.get("lift", 0.0) or 0.35)).mean(dim=0))
        return unit(mean - (mean @ v) * v), [v]


@register_attack("cosine_edge", builtin=True)
class CosineEdge(Attack):
    """Just inside the colluding-copies rule: the point of an omniscient attack (``base``: alie, ipm,
    min_max or min_sum) sent as copies whose pairwise cosine is exactly ``max_cosine`` (0: 0.005 below the
    aggregator's threshold), see :func:`spread_copies`."""

    knowledge = "omniscient"

    def __init__(self, base: str = "ipm", max_cosine: float = 0.0, epsilon: float = 0.5) -> None:
        if base not in OMNISCIENT_FNS:
            raise AttackError(f"attack 'cosine_edge': base must be one of {sorted(OMNISCIENT_FNS)}, got {base!r}")
        self.base = base
        self.max_cosine = number("cosine_edge", "max_cosine", max_cosine)
        self.epsilon = number("cosine_edge", "epsilon", epsilon)

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        if not ctx.honest:
            return dict(ctx.own_updates)
        deltas = ctx.stacked(ctx.attackers + ctx.honest)
        mask = torch.arange(deltas.shape[0]) < len(ctx.attackers)
        point = OMNISCIENT_FNS[self.base](deltas, mask, {"epsilon": self.epsilon})[0]
        return _rows(ctx, spread_copies(point, len(ctx.attackers), _cosine_below(ctx, self.max_cosine), ctx.generator))


def rebuild_aggregator(desc: Mapping[str, Any]) -> Aggregator | None:
    """A fresh aggregator from a strategy's description (``{"name": ..., params}``; a wrapper's ``inner``
    description flattened to ``inner`` + ``inner_<param>``); None when it cannot be rebuilt (FLTrust's
    server data, an unknown rule)."""
    params = {k: v for k, v in desc.items() if k != "name"}
    inner = params.pop("inner", None)
    if isinstance(inner, Mapping):
        params["inner"] = inner.get("name")
        params.update({f"inner_{k}": v for k, v in inner.items() if k not in ("name", "inner")})
    try:
        agg = get_aggregator(str(desc.get("name", "mean")), **params)
    except (TrustFedError, TypeError, ValueError):
        return None
    return None if isinstance(agg, FLTrust) else agg  # its root update is the server's data: unknown to attackers


def round_result(ctx: AttackContext, centre: torch.Tensor) -> Callable[[torch.Tensor], AggregateResult]:
    """The run's aggregation rule as the attackers can rebuild it (:func:`rebuild_aggregator`; the median
    when it cannot be), run on a candidate round's rows (the attackers' first, then the honest ones) as the
    coordinator would: weighing the counts claimed, centered clipping from ``centre`` (the previous
    aggregate, which every participant can infer), also when it is the inner rule of a wrapper (bucketing,
    the Krum filter, server momentum). A wrapper's own randomness (bucketing's shuffle) stays unknown."""
    agg = rebuild_aggregator(ctx.aggregator) or get_aggregator("median")
    weights = ctx.claimed(ctx.attackers + ctx.honest)
    clipping = agg
    while not isinstance(clipping, CenteredClipping) and hasattr(clipping, "inner"):
        clipping = clipping.inner

    def run(rows: torch.Tensor) -> AggregateResult:
        if isinstance(clipping, CenteredClipping):
            clipping.load_state_dict({"center": centre})
        return agg(rows.to(torch.float32), weights)

    return run


def round_rule(ctx: AttackContext, centre: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The aggregate of :func:`round_result` on a candidate round's rows."""
    rule = round_result(ctx, centre)
    return lambda rows: rule(rows).params


def guard_reference(ctx: AttackContext, centre: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the history guard (``ctx.guard``) compares each update of a candidate round with: with
    ``reference = "trimmed_mean"`` the trimmed mean of the rows the rule keeps
    (:func:`~trustfed.core.history_guard.trimmed_reference`), else the round's aggregate (:func:`round_rule`)."""
    if ctx.guard.get("reference") != "trimmed_mean":
        return round_rule(ctx, centre)
    trim = float(ctx.guard.get("trim", 0.2))
    rule = round_result(ctx, centre)
    seen = len(ctx.attackers) + len(ctx.honest)  # the most participants of a round so far: the federation
    federation = ctx.state["federation"] = max(int(ctx.state.get("federation", 0)), seen)

    def run(rows: torch.Tensor) -> torch.Tensor:
        return trimmed_reference(rows.to(torch.float64), rule(rows).selected, trim, federation)

    return run


@register_attack("agr_tailored", builtin=True)
class AgrTailored(Attack):
    """Shejwalkar and Houmansadr 2021's aggregator-tailored attack: the attackers send ``mean + gamma * p``
    (``p`` opposite the honest mean, or ``-std`` with ``direction = "std"``), ``gamma`` chosen each round
    by running the run's own aggregation rule on candidate rounds (:func:`round_rule`, :func:`tailored_gamma`).
    Copies keep the pairwise cosine of ``cosine_edge`` when the rule leaves out near-copies."""

    knowledge = "omniscient"

    def __init__(self, direction: str = "unit") -> None:
        if direction not in ("unit", "std"):
            raise AttackError(f"attack 'agr_tailored': direction must be 'unit' or 'std', got {direction!r}")
        self.direction = direction

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        centre = previous_step(ctx)
        if not ctx.honest:
            return dict(ctx.own_updates)
        honest = ctx.stacked(ctx.honest).to(torch.float64)
        m = len(ctx.attackers)
        p = -honest.std(dim=0, unbiased=False) if self.direction == "std" else -honest.mean(dim=0)
        spread = float(ctx.aggregator.get("max_cosine", 0.0) or 0.0)
        kappa = spread - 0.005 if spread > 0 else 1.0
        seed = int(torch.randint(0, 2**31, (1,), generator=ctx.generator))

        def craft_rows(point: torch.Tensor) -> torch.Tensor:  # the same spread for every candidate gamma
            return spread_copies(point, m, kappa, torch.Generator().manual_seed(seed))

        gamma = tailored_gamma(honest, p, craft_rows, round_rule(ctx, centre))
        rows = craft_rows(honest.mean(dim=0) + gamma * unit(p))
        return _rows(ctx, rows)
