"""The open attack interface: registration by name, a user's module run by ``trustfed simulate``, the
typed context each round, the checks on what an attack returns, and the literature attacks on it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from trustfed.attacks import Attack, AttackContext, AttackError, AttackSettings, build_attack, register_attack
from trustfed.attacks.api import craft_checked
from trustfed.config import validate_federation_config
from trustfed.core import FedAvg, RoundPlan, Update, get_aggregator
from trustfed.errors import ConfigError
from trustfed.simulation import run_simulation
from trustfed.simulation.adversary import AttackTransport

PLUGIN = '''
"""An attack that lives outside trustfed: it logs what it was given and pushes against the honest mean."""
import json
from pathlib import Path

import torch

from trustfed.attacks import Attack, register_attack

LOG = Path(__file__).resolve().parent.parent / "calls.jsonl"


@register_attack("push_away")
class PushAway(Attack):
    knowledge = "omniscient"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)

    def craft(self, ctx):
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1
        seen = {
            "round": ctx.round,
            "calls": ctx.state["calls"],
            "attackers": list(ctx.attackers),
            "honest": list(ctx.honest),
            "seen": sorted(ctx.honest_updates),
            "aggregator": ctx.aggregator.get("name"),
            "d": int(ctx.global_params.numel()),
            "draw": float(torch.rand(1, generator=ctx.generator)),
        }
        with LOG.open("a") as fh:
            fh.write(json.dumps(seen) + "\\n")
        push = -self.scale * ctx.stacked(ctx.honest).mean(0)
        return {pid: push for pid in ctx.attackers}
'''

FEDERATION = """
[federation]
name = "plugin-attack"
rounds = 2
participants = 4
seed = 0

[data]
dataset = "digits"
partition = {{ kind = "iid" }}

[model]
hidden = [8]

[training]
local_epochs = 1
batch_size = 64

[strategy]
aggregator = "median"

[attack]
kind = "{kind}"
module = "my_attacks.push"
fraction = 0.25
params = {{ scale = 3.0 }}
seed = 1
"""


def _simulate(tmp_path: Path, kind: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    fed = tmp_path / "fed"
    (fed / "my_attacks").mkdir(parents=True, exist_ok=True)
    (fed / "my_attacks" / "__init__.py").write_text("")
    (fed / "my_attacks" / "push.py").write_text(PLUGIN)
    (fed / "federation.toml").write_text(FEDERATION.format(kind=kind))
    elsewhere = tmp_path / "elsewhere"  # the attack must be found from the federation file's folder
    elsewhere.mkdir(exist_ok=True)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trustfed.cli", "simulate", "--config", str(fed / "federation.toml")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [*cmd, "--out", str(out), "--no-plot"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    return done, out


def test_simulate_runs_an_attack_registered_in_the_users_module(tmp_path: Path) -> None:
    done, out = _simulate(tmp_path, "push_away")
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    record = metrics["attack"]
    assert record["kind"] == "push_away" and record["module"] == "my_attacks.push"
    assert record["implementation"] == "my_attacks.push:PushAway" and record["knowledge"] == "omniscient"
    assert record["params"] == {"scale": 3.0} and len(record["malicious"]) == 1
    (bad,) = record["malicious"]
    calls = [json.loads(line) for line in (tmp_path / "fed" / "calls.jsonl").read_text().splitlines()]
    honest = sorted({"p000", "p001", "p002", "p003"} - {bad})
    assert [c["round"] for c in calls] == [1, 2]
    assert [c["calls"] for c in calls] == [1, 2]  # the state dict is kept across rounds
    assert all(c["attackers"] == [bad] and c["honest"] == honest and c["seen"] == honest for c in calls)
    assert all(c["aggregator"] == "median" and c["d"] > 0 for c in calls)
    assert calls[0]["draw"] != calls[1]["draw"]  # seeded per round


def test_an_unknown_attack_kind_is_a_config_error_listing_the_known_ones(tmp_path: Path) -> None:
    done, out = _simulate(tmp_path, "push_awya")
    text = done.stdout + done.stderr
    assert done.returncode == 2, text
    assert "attack.kind" in text and "push_awya" in text and "Traceback" not in text
    assert "push_away" in text and "fang_trimmed_mean" in text  # the module's names and the built-in ones
    assert not (out / "metrics.json").exists()


def test_metrics_say_no_attack_when_none_ran() -> None:
    raw = {"federation": {"rounds": 1, "participants": 2}, "model": {"hidden": [8]}}
    metrics = run_simulation(validate_federation_config(raw), plot=False).metrics
    assert metrics["attack"] == {"kind": "none", "summary": "no attack"}


# --------------------------------------------------------------------------- the context and its checks


class _Fixed:
    """A transport of four participants whose deltas are 1, 2, 3, 4."""

    def available(self) -> list[str]:
        return ["a", "b", "c", "d"]

    def fit(self, plan: RoundPlan, params: torch.Tensor) -> list[Update]:
        return [Update(p, params + i + 1, 10 + i) for i, p in enumerate(self.available())]

    def close(self) -> None:
        pass


class _Spy(Attack):
    def __init__(self) -> None:
        self.seen: list[AttackContext] = []

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        self.seen.append(ctx)
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return {pid: torch.full_like(ctx.global_params, -7.0) for pid in ctx.attackers}


class _OmniscientSpy(_Spy):
    knowledge = "omniscient"


def _run(attack: Attack, rounds: int = 2, seed: int = 5) -> list[list[Update]]:
    strategy = FedAvg(aggregator="median")
    t = AttackTransport(_Fixed(), attack, "spy", ["b", "d"], seed=seed, aggregator=strategy.describe()["aggregator"])
    return [t.fit(RoundPlan(r, ("a", "b", "c", "d"), {}), torch.zeros(3)) for r in range(1, rounds + 1)]


def test_the_context_carries_round_model_ids_state_generator_and_aggregator() -> None:
    spy = _OmniscientSpy()
    rounds = _run(spy)
    first, second = spy.seen
    assert (first.round, second.round) == (1, 2) and torch.equal(first.global_params, torch.zeros(3))
    assert first.attackers == ("b", "d") and first.honest == ("a", "c")
    assert sorted(first.own_updates) == ["b", "d"] and torch.equal(first.own_updates["d"], torch.full((3,), 4.0))
    assert sorted(first.honest_updates) == ["a", "c"] and torch.equal(first.honest_updates["c"], torch.full((3,), 3.0))
    assert first.state is second.state and second.state["n"] == 2
    assert first.aggregator["name"] == "median"
    again = _OmniscientSpy()
    _run(again)
    draw = [float(torch.rand(1, generator=c.generator)) for c in (*spy.seen, *again.seen)]
    assert draw[0] == draw[2] and draw[1] == draw[3] and draw[0] != draw[1]  # seeded by run and round
    for ups in rounds:  # the attackers' updates are replaced, the honest ones and the counts kept
        assert [float(u.params[0]) for u in ups] == [1.0, -7.0, 3.0, -7.0]
        assert [u.num_examples for u in ups] == [10, 11, 12, 13]


class _Diverged(_Fixed):
    """As :class:`_Fixed`, but participant a's training diverged: its update is NaN."""

    def fit(self, plan: RoundPlan, params: torch.Tensor) -> list[Update]:
        ups = super().fit(plan, params)
        return [Update("a", torch.full_like(params, float("nan")), 10), *ups[1:]]


def test_honest_updates_with_nan_are_not_shown_to_the_attack() -> None:
    """The coordinator leaves a non-finite update out; an attack that ran the rule on it would fail (the
    aggregator refuses NaN), so it sees only the honest updates that count, and the NaN one goes on as sent."""
    spy = _OmniscientSpy()
    t = AttackTransport(_Diverged(), spy, "spy", ["b", "d"], aggregator={"name": "median"})
    ups = t.fit(RoundPlan(1, ("a", "b", "c", "d"), {}), torch.zeros(3))
    assert spy.seen[0].honest == ("c",) and sorted(spy.seen[0].honest_updates) == ["c"]
    assert bool(torch.isnan(ups[0].params).all()) and [float(u.params[0]) for u in ups[1:]] == [-7.0, 3.0, -7.0]
    rows = build_attack("agr_tailored", {}).craft(
        dataclasses.replace(spy.seen[0], aggregator={"name": "centered_clipping", "weighted": True})
    )
    assert all(bool(torch.isfinite(r).all()) for r in rows.values())


def test_the_context_carries_the_claimed_counts_and_claim_overrides_the_attackers() -> None:
    spy = _Spy()
    _run(spy, rounds=1)
    assert dict(spy.seen[0].counts) == {"a": 10, "b": 11, "c": 12, "d": 13}
    assert spy.seen[0].claimed(("d", "a", "x")).tolist() == [13.0, 10.0, 1.0]  # 1 where not known
    claiming = _Spy()
    t = AttackTransport(_Fixed(), claiming, "spy", ["b", "d"], claim=1000)
    ups = t.fit(RoundPlan(1, ("a", "b", "c", "d"), {}), torch.zeros(3))
    assert dict(claiming.seen[0].counts) == {"a": 10, "b": 1000, "c": 12, "d": 1000}
    assert [u.num_examples for u in ups] == [10, 1000, 12, 1000]  # what the strategy sees


@pytest.mark.parametrize("bad", [0, -5, "many"])
def test_claim_is_checked_where_it_is_set(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"attack\.claim"):
        validate_federation_config({"attack": {"kind": "sign_flip", "claim": bad}})


def test_an_attack_that_knows_only_its_own_updates_sees_no_honest_update() -> None:
    spy = _Spy()
    _run(spy, rounds=1)
    assert spy.seen[0].honest == ("a", "c") and dict(spy.seen[0].honest_updates) == {}


def _ctx(d: int = 3) -> AttackContext:
    z = torch.zeros(d)
    return AttackContext(1, z, torch.Generator(), ("b",), ("a",), {"b": z}, {}, {}, {})


class _Returns(Attack):
    def __init__(self, out: Any) -> None:
        self.out = out

    def craft(self, ctx: AttackContext) -> Mapping[str, torch.Tensor]:
        return self.out  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "out,match",
    [
        ({}, r"round 1: .*missing \['b'\]"),
        ({"b": torch.zeros(3), "a": torch.zeros(3)}, r"not attackers \['a'\]"),
        ({"b": torch.zeros(4)}, r"round 1: participant b's delta is \(4,\), expected \(3,\)"),
        ([torch.zeros(3)], "not a mapping"),
    ],
)
def test_what_an_attack_returns_is_checked(out: Any, match: str) -> None:
    with pytest.raises(AttackError, match=match):
        craft_checked(_Returns(out), "mine", _ctx())


def test_registry_refuses_to_shadow_a_built_in_attack_and_non_attacks() -> None:
    class Other(_Spy):
        pass

    with pytest.raises(AttackError, match="'sign_flip' is built in"):
        register_attack("sign_flip")(Other)
    with pytest.raises(AttackError, match="Attack subclass"):
        register_attack("not_an_attack")(int)  # type: ignore[type-var]
    with pytest.raises(AttackError, match="its parameters: scale"):
        build_attack("sign_flip", {"scal": 2.0})
    with pytest.raises(AttackError, match="must be a number"):
        build_attack("ipm", {"epsilon": "big"})


def test_an_attack_module_that_does_not_import_is_a_config_error(tmp_path: Path) -> None:
    problems = AttackSettings(kind="x", module="no_such_attacks", path=tmp_path).problems()
    assert [p.field for p in problems] == ["attack.module"] and "no_such_attacks" in problems[0].message


# --------------------------------------------------------------------------- literature attacks on the interface


def _omniscient_ctx(n_honest: int = 8, m: int = 2, d: int = 200, seed: int = 0) -> AttackContext:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g)
    honest = {f"h{i}": base + 0.3 * torch.randn(d, generator=g) for i in range(n_honest)}
    own = {f"m{i}": base + 0.3 * torch.randn(d, generator=g) for i in range(m)}
    return AttackContext(
        1, torch.zeros(d), torch.Generator().manual_seed(seed + 1), tuple(own), tuple(honest), own, honest, {}, {}
    )


def test_fang_trimmed_mean_attack_sends_values_beyond_the_honest_extreme_against_the_honest_direction() -> None:
    """Fang et al. 2020 (full knowledge): where the honest mean rises, every crafted value lies in
    [min/b, min] (min > 0) or [b min, min] (min <= 0), and mirrored where it falls; so the trimmed mean
    that trims as many values as there are attackers lands on the other side of the honest mean."""
    ctx = _omniscient_ctx()
    crafted = craft_checked(build_attack("fang_trimmed_mean", {"b": 2.0}), "fang_trimmed_mean", ctx)
    honest = ctx.stacked(ctx.honest).double()
    rows = torch.stack([crafted[p] for p in ctx.attackers]).double()
    up = honest.mean(0) > 0
    lo, hi = honest.min(0).values, honest.max(0).values
    edge = torch.where(up, lo, hi)
    near, far = edge, torch.where((edge > 0) != up, 2.0 * edge, edge / 2.0)
    low, high = torch.minimum(near, far), torch.maximum(near, far)
    eps = 1e-6
    assert bool(((rows >= low - eps) & (rows <= high + eps)).all())
    assert bool((rows[:, up] <= lo[up] + eps).all()) and bool((rows[:, ~up] >= hi[~up] - eps).all())
    assert not torch.equal(rows[0], rows[1])  # each attacker draws its own values
    n = len(ctx.honest) + len(ctx.attackers)
    attacked = get_aggregator("trimmed_mean", beta=len(ctx.attackers) / n)(
        torch.cat([rows, honest]).float(), torch.ones(n)
    ).params.double()
    sign = torch.where(up, 1.0, -1.0).double()
    assert bool((sign * attacked <= sign * honest.mean(0) + 1e-5).all())


@pytest.mark.parametrize("kind", ["min_max", "min_sum"])
def test_min_max_and_min_sum_on_the_interface_stay_within_the_honest_spread(kind: str) -> None:
    """Shejwalkar & Houmansadr 2021, aggregator-agnostic: min-max's update is no farther from any honest
    update than the two farthest honest ones are from each other; min-sum's sum of squared distances to the
    honest updates is no larger than the largest such sum of an honest update. Both sit on that bound."""
    ctx = _omniscient_ctx()
    crafted = craft_checked(build_attack(kind, {}), kind, ctx)
    honest = ctx.stacked(ctx.honest).double()
    pairwise = torch.cdist(honest, honest) ** 2
    bad = crafted[ctx.attackers[0]].double()
    assert torch.equal(crafted[ctx.attackers[0]], crafted[ctx.attackers[1]])
    dist = ((honest - bad) ** 2).sum(1)
    got, bound = (dist.max(), pairwise.max()) if kind == "min_max" else (dist.sum(), pairwise.sum(1).max())
    assert float(bound) * 0.999 <= float(got) <= float(bound) * (1 + 1e-6)
