"""The adaptive attacks and the norm-bounded backdoors: each one's defining property, on crafted rounds."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
import pytest
import torch

from trustfed.apps.builtin_parts import adversarial_trainer, build_data, malicious_participants
from trustfed.attacks import AttackContext, apply_trigger, apply_trigger_part, build_attack
from trustfed.attacks.adaptive import fang_krum, pairwise_cosine, spread_copies, tailored_gamma
from trustfed.attacks.adaptive_attacks import rebuild_aggregator, round_result
from trustfed.config import validate_federation_config
from trustfed.core import get_aggregator
from trustfed.core.robust import CenteredClipping
from trustfed.core.robust_kernels import lift_rows
from trustfed.data.datasets import Dataset
from trustfed.models.trainer import LocalTrainer
from trustfed.simulation import run_simulation

ATTACKERS = ("a0", "a1", "a2", "a3")
HONEST = tuple(f"h{i:02d}" for i in range(16))
DEFAULT = {"name": "centered_clipping", "tau": 0.0, "iters": 3, "momentum": 0.0, "weighted": False}
DEFAULT_RULES = {**DEFAULT, "reject": 3.0, "max_cosine": 0.99}


def _honest(seed: int = 0, d: int = 200) -> torch.Tensor:
    """Non-IID-looking honest deltas: a common direction plus a per-participant part of similar size."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g)
    return (common + 1.5 * torch.randn(len(HONEST), d, generator=g)).float() * 0.01


def _ctx(
    honest: torch.Tensor,
    *,
    rnd: int = 1,
    glob: torch.Tensor | None = None,
    state: dict[str, Any] | None = None,
    aggregator: dict[str, Any] | None = None,
    own: torch.Tensor | None = None,
) -> AttackContext:
    d = honest.shape[1]
    own = honest[: len(ATTACKERS)] if own is None else own
    return AttackContext(
        round=rnd,
        global_params=torch.zeros(d) if glob is None else glob,
        generator=torch.Generator().manual_seed(rnd),
        attackers=ATTACKERS,
        honest=HONEST,
        own_updates={p: own[i] for i, p in enumerate(ATTACKERS)},
        honest_updates={p: honest[i] for i, p in enumerate(HONEST)},
        state={} if state is None else state,
        aggregator=DEFAULT_RULES if aggregator is None else aggregator,
    )


def _craft(kind: str, ctx: AttackContext, **params: Any) -> torch.Tensor:
    out = build_attack(kind, params).craft(ctx)
    return torch.stack([out[p] for p in ATTACKERS]).to(torch.float64)


def _aggregate(rows: torch.Tensor, honest: torch.Tensor, desc: dict[str, Any], centre: torch.Tensor) -> Any:
    agg = rebuild_aggregator(desc)
    assert agg is not None
    if centre.abs().sum() > 0:
        agg.load_state_dict({"center": centre.to(torch.float64)})  # type: ignore[attr-defined]
    x = torch.cat([rows.float(), honest])
    return agg(x, torch.ones(x.shape[0]))


# --------------------------------------------------------------------------- literature


def test_fang_krum_is_selected_by_krum_and_points_against_the_honest_direction() -> None:
    honest = _honest()
    rows = fang_krum(honest, len(ATTACKERS), torch.Generator().manual_seed(0))
    res = get_aggregator("krum", num_malicious=len(ATTACKERS))(torch.cat([rows, honest]), torch.ones(20))
    assert res.selected[0] < len(ATTACKERS)  # Krum picked a crafted update
    s = torch.sign(honest.double().mean(0))
    lam = -(rows[0].double() @ s) / s.abs().sum()
    assert lam > 0 and torch.allclose(rows[0].double(), -lam * s, rtol=1e-5)


def test_mimic_copies_one_honest_participant_and_keeps_it_across_rounds() -> None:
    honest, state = _honest(), {}
    first = _craft("mimic", _ctx(honest, state=state))
    target = state["mimic"]
    assert target in HONEST
    assert all(torch.equal(r.float(), honest[HONEST.index(target)]) for r in first)
    later = _craft("mimic", _ctx(_honest(seed=1), rnd=2, state=state))
    assert state["mimic"] == target and torch.equal(later[0].float(), _honest(seed=1)[HONEST.index(target)])


def test_tailored_gamma_does_at_least_the_damage_of_every_grid_point() -> None:
    honest = _honest().double()
    median = get_aggregator("median")
    direction = -honest.mean(0)

    def aggregate(x: torch.Tensor) -> torch.Tensor:
        return median(x.float(), torch.ones(x.shape[0])).params

    def craft(point: torch.Tensor) -> torch.Tensor:
        return point.expand(4, -1)

    def damage(g: float) -> float:
        x = torch.cat([craft(honest.mean(0) + g * direction / direction.norm()), honest])
        return float((aggregate(x).double() - honest.mean(0)).norm())

    gamma = tailored_gamma(honest, direction, craft, aggregate)
    spread = float((honest - honest.mean(0)).norm(dim=1).median())
    assert damage(gamma) >= max(damage(spread * 2.0 ** (i - 4)) for i in range(16)) - 1e-9
    assert damage(gamma) > damage(0.0)


def test_agr_tailored_against_fltrust_tailors_to_the_median_instead() -> None:
    """FLTrust's root update is the server's data: the attack cannot rebuild the rule, so it tailors its
    step to the median rather than stopping the run."""
    honest = _honest()
    assert rebuild_aggregator({"name": "fltrust", "root_size": 100}) is None
    rows = _craft("agr_tailored", _ctx(honest, aggregator={"name": "fltrust", "root_size": 100}))
    assert rows.shape == (len(ATTACKERS), honest.shape[1]) and bool(torch.isfinite(rows).all())


def test_agr_tailored_moves_the_default_further_than_the_honest_mean_and_keeps_below_the_copies_cosine() -> None:
    honest = _honest()
    rows = _craft("agr_tailored", _ctx(honest))
    cos = pairwise_cosine(rows)
    assert float(cos.fill_diagonal_(0).max()) < 0.99
    res = _aggregate(rows, honest, DEFAULT_RULES, torch.zeros(honest.shape[1]))
    clean = _aggregate(honest[:4], honest, DEFAULT_RULES, torch.zeros(honest.shape[1]))
    mu = honest.double().mean(0)
    assert (res.params.double() - mu).norm() > 1.5 * (clean.params.double() - mu).norm()


# --------------------------------------------------------------------------- adapted to the default rule


def _centre_and_state(honest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A second round whose centre (the previous aggregate) is known: global 0 in round 1, g in round 2."""
    g = 0.5 * honest.double().mean(0).float()
    state: dict[str, Any] = {}
    build_attack("clip_radius", {}).craft(_ctx(honest, rnd=1, state=state))
    return g, g, state


@pytest.mark.parametrize(("kind", "radius"), [("clip_radius", 1.0), ("reject_edge", 0.97 * 3.0)])
def test_at_radius_attacks_sit_at_their_distance_in_a_harmful_direction_below_the_copies_cosine(
    kind: str, radius: float
) -> None:
    honest = _honest()
    glob, centre, state = _centre_and_state(honest)
    rows = _craft(kind, _ctx(honest, rnd=2, glob=glob, state=state))
    c = centre.double()
    tau = float((honest.double() - c).norm(dim=1).median())
    assert torch.allclose((rows - c).norm(dim=1), torch.full((4,), radius * tau, dtype=torch.float64), rtol=1e-4)
    assert bool(((rows - c) @ honest.double().mean(0) < 0).all())  # against the honest direction
    cos = pairwise_cosine(rows).fill_diagonal_(0)
    assert float(cos.max()) <= 0.985 + 1e-9  # below the default's max_cosine = 0.99
    res = _aggregate(rows, honest, DEFAULT_RULES, c)
    assert set(range(4)) <= set(res.selected)  # neither left out as copies nor rejected as far


@pytest.mark.parametrize("target", [-0.1, 0.2])
def test_history_edge_sits_at_the_radius_just_above_its_cosine_to_the_honest_mean(target: float) -> None:
    honest = _honest()
    glob, centre, state = _centre_and_state(honest)
    rows = _craft("history_edge", _ctx(honest, rnd=2, glob=glob, state=state), target=target)
    c = centre.double()
    tau = float((honest.double() - c).norm(dim=1).median())
    assert torch.allclose((rows - c).norm(dim=1), torch.full((4,), tau, dtype=torch.float64), rtol=1e-4)
    u = honest.double().mean(0)
    cos = rows @ u / (rows.norm(dim=1) * u.norm())
    assert target - 1e-6 <= float(cos.min()) < target + 0.01  # just inside (float32 rows), not far inside
    plain = _craft("clip_radius", _ctx(honest, rnd=2, glob=glob, state=dict(state)))
    assert float((plain @ u / (plain.norm(dim=1) * u.norm())).max()) < target  # clip_radius is below it


@pytest.mark.parametrize("consistency", [0.4, 0.8])
def test_consistency_edge_keeps_each_attacker_just_consistent_with_its_last_delta(consistency: float) -> None:
    state: dict[str, Any] = {}
    globs = [torch.zeros(200)]
    rounds = []
    for rnd in range(1, 6):
        h = _honest(seed=rnd)  # each round's honest deltas
        rows = _craft("consistency_edge", _ctx(h, rnd=rnd, glob=globs[-1], state=state), consistency=consistency)
        c = (globs[-1] - globs[-2]).double() if rnd > 1 else torch.zeros(200, dtype=torch.float64)  # the centre
        tau = float((h.double() - c).norm(dim=1).median())
        assert torch.allclose((rows - c).norm(dim=1), torch.full((4,), tau, dtype=torch.float64), rtol=1e-4)
        u = h.double().mean(0)
        assert float((rows @ u / (rows.norm(dim=1) * u.norm())).min()) >= -0.1 - 1e-6  # history_edge's target
        rounds.append(rows)
        globs.append(globs[-1] + 0.5 * h.mean(0))  # the next global model
    step = [
        float(pairwise_cosine(torch.cat([a, b]))[range(4), range(4, 8)].min()) for a, b in itertools.pairwise(rounds)
    ]
    assert min(step) >= consistency - 1e-6  # consistent enough for a rule below it
    assert max(step) < 0.99  # the direction still turns every round


def test_guard_edge_sits_at_the_radius_just_above_the_guards_floor_and_pushes_harder_than_history_edge() -> None:
    honest = _honest()
    rules = {**DEFAULT_RULES, "clamp": 0.2}
    glob, centre, state = _centre_and_state(honest)
    rows = _craft("guard_edge", _ctx(honest, rnd=2, glob=glob, state=state, aggregator=rules))
    c = centre.double()
    tau = float((honest.double() - c).norm(dim=1).median())
    assert torch.allclose((rows - c).norm(dim=1), torch.full((4,), tau, dtype=torch.float64), rtol=1e-4)
    agg = _aggregate(rows, honest, rules, c).params.double()
    to_agg = rows @ agg / (rows.norm(dim=1) * agg.norm())
    assert -0.15 - 1e-3 <= float(to_agg.min()) < -0.15 + 0.02  # just above the guard's -0.2 (+ margin 0.05)
    assert float(pairwise_cosine(rows).fill_diagonal_(0).max()) <= 0.985 + 1e-9
    u = honest.double().mean(0)
    push = (rows - c) @ u / u.norm()
    edge = _craft("history_edge", _ctx(honest, rnd=2, glob=glob, state=dict(state), aggregator=rules))
    assert float(push.max()) < float(((edge - c) @ u / u.norm()).min())  # more against the honest mean


def test_guard_edge_keeps_the_floor_against_the_rule_as_it_weighs_the_claimed_counts() -> None:
    honest = _honest()
    rules = {**DEFAULT_RULES, "clamp": 0.2, "weighted": True, "weight_cap": 1.0, "lift": 0.35}
    glob, centre, state = _centre_and_state(honest)
    counts = {p: 1000 for p in ATTACKERS} | {p: 20 + 40 * i for i, p in enumerate(HONEST)}  # skewed shards
    ctx = _ctx(honest, rnd=2, glob=glob, state=state, aggregator=rules)
    ctx = dataclasses.replace(ctx, counts=counts)
    rows = _craft("guard_edge", ctx)
    agg = rebuild_aggregator(rules)
    assert isinstance(agg, CenteredClipping)
    agg.load_state_dict({"center": centre.to(torch.float64)})
    weights = torch.tensor([float(counts[p]) for p in ATTACKERS + HONEST])
    out = agg(torch.cat([rows.float(), honest]), weights).params.double()
    to_agg = rows @ out / (rows.norm(dim=1) * out.norm())
    assert -0.15 - 1e-3 <= float(to_agg.min()) < -0.15 + 0.02  # at the floor of the rule as it really weighs


def test_lift_edge_pushes_only_orthogonal_to_the_lifted_consensus_and_at_the_radius() -> None:
    honest = _honest()
    rules = {**DEFAULT_RULES, "clamp": 0.2, "lift": 0.35}
    glob, centre, state = _centre_and_state(honest)
    rows = _craft("lift_edge", _ctx(honest, rnd=2, glob=glob, state=state, aggregator=rules))
    c = centre.double()
    tau = float((honest.double() - c).norm(dim=1).median())
    assert torch.allclose((rows - c).norm(dim=1), torch.full((4,), tau, dtype=torch.float64), rtol=1e-4)
    lifted = lift_rows(honest.double(), 0.35).mean(0)
    v = lifted / lifted.norm()
    assert torch.allclose((rows - c) @ v, torch.zeros(4, dtype=torch.float64), atol=1e-6 * tau)
    mean = honest.double().mean(0)
    residual = mean - (mean @ v) * v
    assert float(((rows - c) @ residual).max()) < 0  # against the part of the honest mean the lift leaves
    agg = _aggregate(rows, honest, rules, c).params.double()
    assert float((rows @ agg / (rows.norm(dim=1) * agg.norm())).min()) >= -0.15 - 1e-3  # the guard's floor


def test_cosine_edge_copies_sit_exactly_at_the_chosen_cosine_and_the_default_keeps_them() -> None:
    honest = _honest()
    rows = _craft("cosine_edge", _ctx(honest))
    cos = pairwise_cosine(rows)
    off = cos[~torch.eye(4, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, 0.985), atol=1e-9)
    ipm_point = -0.5 * honest.double().mean(0)
    proj = rows @ ipm_point / (ipm_point @ ipm_point)
    assert torch.allclose(proj, torch.ones(4, dtype=torch.float64), atol=1e-5)  # around IPM's point
    res = _aggregate(rows, honest, DEFAULT_RULES, torch.zeros(honest.shape[1]))
    assert set(range(4)) <= set(res.selected)
    plain = spread_copies(ipm_point, 4, 1.0, torch.Generator())
    assert torch.equal(plain[0], plain[3])


# --------------------------------------------------------------------------- backdoors


def test_constrain_scale_sends_the_boosted_direction_within_the_honest_radius() -> None:
    honest = _honest()
    own = honest[:4] * 3.0
    glob, centre, state = _centre_and_state(honest)
    rows = _craft("constrain_scale", _ctx(honest, rnd=2, glob=glob, state=state, own=own), boost=10.0)
    c = centre.double()
    tau = float((honest.double() - c).norm(dim=1).median())
    assert bool(((rows - c).norm(dim=1) <= tau * (1 + 1e-6)).all())
    boosted = 10.0 * own.double() - c
    cos = torch.nn.functional.cosine_similarity(rows - c, boosted, dim=1)
    assert torch.allclose(cos, torch.ones(4, dtype=torch.float64), atol=1e-6)


def test_dba_attackers_train_on_distinct_pieces_that_make_up_the_whole_trigger() -> None:
    x = np.zeros((6, 1, 28, 28), dtype=np.float32)
    data = Dataset("t", x, np.arange(6) % 3 + 1, 10)
    attack = build_attack("dba", {"parts": 4})
    stamped = []
    for pid in ATTACKERS:
        poisoned = attack.poison_own_data(data, 0, pid, ATTACKERS)
        assert len(poisoned) == 9 and bool((poisoned.y[6:] == 0).all())  # half the samples, labelled 0
        stamped.append(poisoned.x[6:] != 0)
    pieces = [s[0] for s in stamped]
    assert all(p.sum() == 4 for p in pieces)
    assert not any((pieces[i] & pieces[j]).any() for i in range(4) for j in range(i + 1, 4))
    assert np.array_equal(np.logical_or.reduce(pieces), apply_trigger(x[:1], 4)[0] != 0)
    assert np.array_equal(apply_trigger_part(x[:1], 4, 1, 4)[0] != 0, pieces[1])


def test_neurotoxin_writes_only_where_the_previous_global_update_was_small() -> None:
    honest = _honest()
    state: dict[str, Any] = {}
    first = _craft("neurotoxin", _ctx(honest, state=state))
    assert torch.equal(first.float(), honest[:4])  # no previous update seen: sent whole
    step = honest.mean(0)
    rows = _craft("neurotoxin", _ctx(honest, rnd=2, glob=step, state=state), top_fraction=0.1)
    top = step.abs().topk(20).indices
    assert bool((rows[:, top] == 0).all())
    rest = torch.ones(step.shape[0], dtype=torch.bool)
    rest[top] = False
    assert torch.equal(rows[:, rest].float(), honest[:4][:, rest])


# --------------------------------------------------------------------------- through the simulation

NEW_KINDS = [
    "fang_krum",
    "mimic",
    "agr_tailored",
    "clip_radius",
    "reject_edge",
    "cosine_edge",
    "history_edge",
    "consistency_edge",
    "guard_edge",
    "lift_edge",
    "constrain_scale",
    "dba",
    "neurotoxin",
]


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_each_new_attack_runs_in_a_simulation_against_the_default(kind: str) -> None:
    raw = {
        "federation": {"rounds": 2, "participants": 5, "seed": 1},
        "data": {"dataset": "digits"},
        "model": {"hidden": [8]},
        "strategy": {"aggregator": "centered_clipping", "aggregator_params": {"reject": 3.0, "max_cosine": 0.99}},
        "attack": {"kind": kind, "fraction": 0.4},
    }
    metrics = run_simulation(validate_federation_config(raw), plot=False).metrics
    assert metrics["attack"]["kind"] == kind and len(metrics["attack"]["malicious"]) == 2
    assert 0.0 <= metrics["final_accuracy"] <= 1.0


def test_dba_attackers_of_a_federation_each_get_their_own_piece() -> None:
    raw = {
        "federation": {"rounds": 1, "participants": 6},
        "data": {"dataset": "digits"},
        "attack": {"kind": "dba", "fraction": 0.5, "params": {"parts": 3}},
    }
    cfg = validate_federation_config(raw)
    data = build_data(cfg)
    pieces = []
    for pid in malicious_participants(cfg):
        trainer = adversarial_trainer(cfg, data, pid)
        assert isinstance(trainer, LocalTrainer)
        shard = data.shards[pid]
        extra = trainer.data.x[len(shard) :]
        pieces.append(frozenset(np.flatnonzero((extra == 1.0).all(axis=0)).tolist()))  # stamped in every copy
    assert len(set(pieces)) == 3 and all(len(p) == 16 // 3 or len(p) == 16 // 3 + 1 for p in pieces)


def test_round_result_runs_a_wrapped_centered_clipping_from_the_centre() -> None:
    """The attacks that rebuild the rule start centered clipping at the previous aggregate also when it is
    the inner rule of a wrapper; before, a wrapped rule ran from zero, so those attacks aimed at a rule the
    coordinator did not run."""
    honest = _honest()
    desc = get_aggregator("krum_filter", fraction=0.2, inner="centered_clipping", inner_reject=3.0).describe()
    centre = honest.double().mean(0) * 3.0
    rows = torch.cat([honest[:4] * -2.0, honest])
    got = round_result(_ctx(honest, aggregator=desc), centre)(rows).params
    want = get_aggregator("krum_filter", fraction=0.2, inner="centered_clipping", inner_reject=3.0)
    want.inner.load_state_dict({"center": centre})  # type: ignore[attr-defined]
    assert torch.allclose(got, want(rows.float(), torch.ones(rows.shape[0])).params)
    from_zero = rebuild_aggregator(desc)
    assert from_zero is not None
    assert not torch.allclose(got, from_zero(rows.float(), torch.ones(rows.shape[0])).params)
