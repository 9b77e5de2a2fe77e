"""Attacks: their math, their wiring into the simulation, and one attack against FedAvg vs a robust rule."""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import numpy as np
import pytest
import torch

from trustfed.apps.builtin_parts import adversarial_trainer, build_data, malicious_participants
from trustfed.attacks import (
    AttackSettings,
    MaliciousTrainer,
    alie,
    alie_z,
    apply_trigger,
    backdoor,
    build_attack,
    flip_labels,
    ipm,
    min_max,
    min_sum,
)
from trustfed.attacks.model_poisoning import jitter_copies
from trustfed.config import validate_federation_config
from trustfed.core import RoundPlan, Update
from trustfed.core.anomaly import AnomalyMonitor, anomaly_scores
from trustfed.data.datasets import Dataset
from trustfed.errors import ConfigError
from trustfed.models.trainer import LocalTrainer
from trustfed.simulation import run_simulation
from trustfed.simulation.adversary import AttackTransport


def _deltas(seed: int, n: int = 10, d: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.1 + torch.randn(d, generator=g, dtype=torch.float64)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:2] = True
    return x.float(), mask


def test_malicious_choice_is_seeded_and_sized() -> None:
    ids = [f"p{i:03d}" for i in range(20)]
    a = AttackSettings(kind="sign_flip", fraction=0.2, seed=3)
    assert len(a.malicious(ids)) == 4
    assert a.malicious(ids) == AttackSettings(kind="sign_flip", fraction=0.2, seed=3).malicious(ids)
    assert a.malicious(ids) != AttackSettings(kind="sign_flip", fraction=0.2, seed=4).malicious(ids)
    assert AttackSettings().malicious(ids) == []


def test_attack_section_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"attack\.kind"):
        validate_federation_config({"attack": {"kind": "teleport"}})
    with pytest.raises(ConfigError, match=r"attack\.fraction"):
        validate_federation_config({"attack": {"kind": "ipm", "fraction": 1.5}})


def test_alie_matches_its_formula() -> None:
    x, mask = _deltas(0)
    out = alie(x, mask, {})
    benign = x[~mask].double()
    s = 10 // 2 + 1 - 2
    z = NormalDist().inv_cdf((10 - s) / 10)
    assert alie_z(10, 2) == pytest.approx(z)
    want = benign.mean(0) - z * benign.std(0, unbiased=False)
    assert torch.allclose(out[0].double(), want, atol=1e-6) and torch.allclose(out[1].double(), want, atol=1e-6)
    assert torch.equal(out[2:], x[2:])


def test_ipm_reverses_the_benign_mean() -> None:
    x, mask = _deltas(1)
    out = ipm(x, mask, {"epsilon": 2.0})
    assert torch.allclose(out[0].double(), -2.0 * x[2:].double().mean(0), atol=1e-6)


@pytest.mark.parametrize("direction", ["std", "unit", "sign"])
def test_min_max_and_min_sum_hit_their_bounds(direction: str) -> None:
    x, mask = _deltas(2)
    b = x[~mask].double()
    d2 = torch.cdist(b, b) ** 2
    mm = min_max(x, mask, {"direction": direction})[0].double()
    dist = ((b - mm) ** 2).sum(1)
    assert float(dist.max()) <= float(d2.max()) * (1 + 1e-6)
    assert float(dist.max()) >= float(d2.max()) * 0.999  # the largest gamma: the bound is tight
    ms = min_sum(x, mask, {"direction": direction})[0].double()
    s = float(((b - ms) ** 2).sum())
    assert float(d2.sum(1).max()) * 0.999 <= s <= float(d2.sum(1).max()) * (1 + 1e-6)


def test_data_poisoning() -> None:
    ds = Dataset("t", np.zeros((6, 1, 8, 8), np.float32), np.array([0, 1, 2, 3, 4, 9]), 10)
    assert flip_labels(ds).y.tolist() == [9, 8, 7, 6, 5, 0]
    trig = apply_trigger(ds.x, 3)
    assert trig[:, :, -3:, -3:].min() == 1.0 and trig[:, :, :-3, :].max() == 0.0 and ds.x.max() == 0.0
    bd = backdoor(ds, {"poison_fraction": 0.5, "target": 7}, seed=0)
    assert len(bd) == 9 and bd.y[6:].tolist() == [7, 7, 7] and bd.x[6:, :, -4:, -4:].min() == 1.0


class _Honest:
    participant_id = "p"

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        return Update("p", params + 1.0, 5)

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return {}


def test_malicious_trainer_transforms_the_delta_and_free_rider_skips_training() -> None:
    from trustfed.attacks import free_ride, sign_flip

    g = torch.zeros(3)
    plan = RoundPlan(1, ("p",), {})
    out = MaliciousTrainer(_Honest(), sign_flip, {"scale": 2.0}, 0).fit(g, plan)
    assert torch.equal(out.params, torch.full((3,), -2.0)) and out.num_examples == 5
    fr = MaliciousTrainer(_Honest(), free_ride, {}, 0, train=False, num_examples=9).fit(g, plan)
    assert torch.equal(fr.params, g) and fr.num_examples == 9


def _cfg(agg: str, kind: str, **extra: Any) -> Any:
    raw: dict[str, Any] = {
        "federation": {"rounds": 3, "participants": 10, "seed": 1},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"hidden": [32]},
        "training": {"local_epochs": 2, "lr": 0.1},
        "strategy": {"aggregator": agg, "aggregator_params": extra},
        "attack": {"kind": kind, "fraction": 0.2, "seed": 0},
    }
    return validate_federation_config(raw)


def test_simulation_wraps_exactly_the_malicious_trainers() -> None:
    cfg = _cfg("mean", "sign_flip")
    data = build_data(cfg)
    bad = malicious_participants(cfg)
    assert len(bad) == 2
    for pid in data.shards:
        tr = adversarial_trainer(cfg, data, pid)
        assert (tr is not None) == (pid in bad)
    # omniscient or not, an attacker trains plainly; the simulation's transport crafts what it sends
    assert isinstance(adversarial_trainer(_cfg("mean", "alie"), data, bad[0]), LocalTrainer)
    rider = adversarial_trainer(_cfg("mean", "free_rider"), data, bad[0])
    assert rider is not None and torch.equal(
        rider.fit(torch.ones(3), RoundPlan(1, (bad[0],), {})).params, torch.ones(3)
    )


def test_attack_transport_rewrites_only_malicious_updates() -> None:
    class T:
        def available(self) -> list[str]:
            return ["a", "b", "c", "d"]

        def fit(self, plan: RoundPlan, params: torch.Tensor) -> list[Update]:
            return [Update(p, params + i, 1) for i, p in enumerate(self.available())]

        def close(self) -> None:
            pass

    t = AttackTransport(T(), build_attack("ipm", {"epsilon": 1.0}), "ipm", ["a"])
    ups = t.fit(RoundPlan(1, ("a", "b", "c", "d"), {}), torch.zeros(2))
    assert torch.allclose(ups[0].params, torch.full((2,), -2.0))  # -mean of deltas 1, 2, 3
    assert [float(u.params[0]) for u in ups[1:]] == [1.0, 2.0, 3.0]


def test_anomaly_scores_and_monitor_flag_the_attacker() -> None:
    x, _ = _deltas(4)
    x[0] = -5 * x[1]
    s = anomaly_scores(x, x[1:].mean(0))
    assert float(s["cosine"][0]) < 0 < float(s["cosine"][5])
    assert int(torch.argmax(s["distance_z"])) == 0
    mon = AnomalyMonitor()
    cfg = _cfg("median", "gaussian_noise")
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 2})})
    run_simulation(cfg, observers=[mon])
    bad = set(malicious_participants(cfg))
    assert len(mon.history) == 10 and all(len(v) == 2 for v in mon.history.values())
    worst = sorted(mon.history, key=lambda p: mon.mean(p, "distance"))[-2:]
    assert set(worst) == bad
    first, second = ({p: v[r]["consistency"] for p, v in mon.history.items()} for r in (0, 1))
    assert all(c != c for c in first.values())  # no update before the first: NaN
    # fresh noise every round does not follow from the last; honest training on the same data does
    assert max(second[p] for p in bad) < 0.2 < min(c for p, c in second.items() if p not in bad)


def test_gaussian_noise_breaks_fedavg_but_not_median_or_centered_clipping() -> None:
    clean = run_simulation(_cfg("mean", "none")).metrics["final_accuracy"]
    attacked = run_simulation(_cfg("mean", "gaussian_noise")).metrics["final_accuracy"]
    med = run_simulation(_cfg("median", "gaussian_noise")).metrics["final_accuracy"]
    cc = run_simulation(_cfg("centered_clipping", "gaussian_noise")).metrics["final_accuracy"]
    assert clean > 0.6
    assert attacked < clean - 0.2
    assert med > 0.9 * clean and cc > 0.9 * clean


def test_fltrust_is_wired_in_simulation_and_resists_sign_flip() -> None:
    clean = run_simulation(_cfg("mean", "none")).metrics["final_accuracy"]
    fedavg = run_simulation(_cfg("mean", "sign_flip")).metrics["final_accuracy"]
    fl = run_simulation(_cfg("fltrust", "sign_flip", root_size=100)).metrics["final_accuracy"]
    assert fedavg < 0.5 * clean
    assert fl > 0.8 * clean


def test_jitter_makes_colluding_copies_distinct_with_the_benign_spread() -> None:
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(10, 4000, generator=gen) * torch.linspace(0.1, 2.0, 4000)
    bad = torch.tensor([i >= 7 for i in range(10)])
    copies = ipm(deltas, bad, {"epsilon": 0.5})
    assert torch.equal(copies[7], copies[9])
    out = jitter_copies(copies, deltas, bad, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(out[~bad], deltas[~bad])  # honest rows untouched
    noise = (out[bad] - copies[bad]).double()
    sd = deltas[~bad].double().std(dim=0, unbiased=False)
    assert float((noise / sd).std()) == pytest.approx(1.0, rel=0.03)  # 12,000 samples: SE 0.65%
    cos = torch.nn.functional.cosine_similarity(out[7], out[8], dim=0)
    assert float(cos) < 0.9
    assert torch.equal(jitter_copies(copies, deltas, bad, 0.0, gen), copies)
