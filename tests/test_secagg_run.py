"""Secure aggregation as a run mode: the coordinator gets one masked-sum update per round, which equals
the unweighted mean of the participants' deltas up to quantisation, also when some drop out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from trustfed.config import validate_federation_config
from trustfed.errors import ConfigError
from trustfed.simulation import run_simulation


def raw(**over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "federation": {"name": "secagg", "rounds": 2, "participants": 4, "seed": 6},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"local_epochs": 1, "batch_size": 64, "lr": 0.05},
        "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 2},
        "secagg": {"enabled": True, "clip": 0.5, "bits": 24},
    }
    r.update(over)
    return r


class Seen:
    """A RoundObserver keeping what the coordinator's round loop received."""

    def __init__(self) -> None:
        self.ids: list[list[str]] = []
        self.metrics: list[dict[str, float]] = []

    def on_round_start(self, plan: Any, params: torch.Tensor) -> None:
        pass

    def on_round_end(self, plan: Any, updates: Sequence[Any], result: Any, record: Any) -> None:
        self.ids.append([u.participant_id for u in updates])
        self.metrics.append(dict(updates[0].metrics))


def test_secagg_equals_the_unweighted_mean_and_the_coordinator_sees_only_the_sum() -> None:
    seen = Seen()
    sec = run_simulation(validate_federation_config(raw()), observers=[seen])
    plain_raw = raw(strategy={"name": "fedavg", "aggregator": "trimmed_mean", "aggregator_params": {"beta": 0.0}})
    plain_raw["secagg"] = {"enabled": False}
    plain = run_simulation(validate_federation_config(plain_raw))  # trimmed mean with beta 0: the plain mean
    assert seen.ids == [["secagg"], ["secagg"]]
    assert [m["secagg_survivors"] for m in seen.metrics] == [4.0, 4.0]
    diff = torch.max(torch.abs(sec.params - plain.params)).item()
    assert diff <= 2 * 2 * 0.5 / (2**24 - 1) * 10  # a few quantisation steps after two rounds
    assert sec.metrics["final_accuracy"] == pytest.approx(plain.metrics["final_accuracy"], abs=0.01)


def test_secagg_on_the_multiprocess_backend_matches_in_process() -> None:
    """The participants train in worker processes; the protocol runs on what they return: the same
    secure sums (with a dropout), the same model, and the coordinator still sees one update a round."""
    r = raw(secagg={"enabled": True, "clip": 0.5, "bits": 24, "dropout": 0.25, "seed": 1})
    a = run_simulation(validate_federation_config(r))
    seen = Seen()
    b = run_simulation(validate_federation_config({**r, "simulation": {"backend": "multiprocess"}}), observers=[seen])
    assert seen.ids == [["secagg"], ["secagg"]] and [m["secagg_dropped"] for m in seen.metrics] == [1.0, 1.0]
    assert torch.equal(a.params, b.params)
    assert [x["updated_by"] for x in a.metrics["rounds"]] == [x["updated_by"] for x in b.metrics["rounds"]]


def test_participants_lost_after_masking_are_left_out_of_the_sum() -> None:
    from trustfed.apps.builtin_parts import build_data, build_trainer, model_factory
    from trustfed.core.codec import flatten
    from trustfed.core.strategy import RoundPlan

    seen = Seen()
    r = raw(secagg={"enabled": True, "dropout": 0.25, "seed": 1})
    r["federation"] = {**r["federation"], "rounds": 1}
    cfg = validate_federation_config(r)
    res = run_simulation(cfg, observers=[seen])
    assert [m["secagg_survivors"] for m in seen.metrics] == [3.0]
    assert [m["secagg_dropped"] for m in seen.metrics] == [1.0]
    # the survivors' unweighted mean, trained here in the clear from the same model
    data = build_data(cfg)
    p0 = flatten(model_factory(cfg, data.train.input_shape, data.train.num_classes)().state_dict())[0]
    ids = ["p000", "p001", "p002", "p003"]
    plan = RoundPlan(1, tuple(ids), {})
    deltas = {pid: build_trainer(cfg, data, pid).fit(p0.clone(), plan).params - p0 for pid in ids}
    means = {lost: p0 + torch.stack([d for pid, d in deltas.items() if pid != lost]).mean(dim=0) for lost in ids}
    best = min(means, key=lambda k: torch.max(torch.abs(means[k] - res.params)).item())
    assert torch.max(torch.abs(means[best] - res.params)).item() <= 3 * 2 * 0.5 / (2**24 - 1) * 4
    assert all(torch.max(torch.abs(means[k] - res.params)).item() > 1e-4 for k in ids if k != best)


@pytest.mark.parametrize(
    ("over", "where"),
    [
        ({"strategy": {"name": "fedavg", "aggregator": "median"}}, "strategy.aggregator"),
        ({"enclave": {"enabled": True}}, "enclave.enabled"),
    ],
)
def test_secagg_refuses_what_needs_individual_updates(over: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError, match=rf"{where.replace('.', '[.]')}: secure aggregation gives the coordinator"):
        validate_federation_config(raw(**over))


def test_secagg_rounds_are_recorded_on_the_ledger_with_incentives_and_verify(tmp_path: Path) -> None:
    """With the ledger on, each survivor's signed commitment to its masked input is in the round's
    Merkle root on chain; the lost participant's is not; the whole run re-verifies."""
    from tests.ledger_helpers import read_lines

    from trustfed.ledger.audit import parse_entry
    from trustfed.ledger.verify import verify_run

    r = raw(
        secagg={"enabled": True, "dropout": 0.25, "seed": 1},
        ledger={"enabled": True},
        incentives={"enabled": True, "reward_per_round": 900},
    )
    out = tmp_path / "run"
    run_simulation(validate_federation_config(r), out_dir=out)
    v = verify_run(out)
    assert v.ok, [str(f) for f in v.failures]
    assert v.checked["commitments"] == 6 and v.checked["chain_rounds"] == 3  # 3 survivors x 2 rounds
    entries = [parse_entry(line) for line in read_lines(out)]
    aggs = [e for e in entries if e.kind == "aggregation"]
    assert [len(e.body["participants"]) for e in aggs] == [3, 3]
    committed = {e.round: set() for e in aggs}
    for e in entries:
        if e.kind == "commitment":
            committed[e.round].add(e.author)
    assert all(committed[a.round] == set(a.body["participants"]) for a in aggs)
    # incentives: only the sum is known, so the survivors share each round's reward equally
    paid = [e for e in entries if e.kind == "incentives"]
    assert [sorted(e.body["contributions"]) for e in paid] == [sorted(a.body["participants"]) for a in aggs]
    assert all(set(e.body["contributions"].values()) == {1 / 3} for e in paid)
    assert all(e.body["source"] == "selection" for e in paid)
    assert v.checked["incentive_rounds"] == 2


def test_central_dp_over_a_secure_sum_matches_central_dp_over_clear_updates() -> None:
    """Each participant clips its own delta (the plan's clip norm) before masking; the aggregator noises
    the recovered sum. Same seeds, same noise draws: the model equals clear-update DP-FedAvg up to the
    fixed-point rounding, and the privacy spend is the same."""
    dp = {"mode": "central", "noise_multiplier": 0.8, "max_grad_norm": 0.1, "delta": 1e-5}  # every delta is clipped
    seen = Seen()
    spent: dict[str, list[float]] = {"secagg": [], "plain": []}
    sec = run_simulation(
        validate_federation_config(raw(privacy=dp)),
        observers=[seen],
        on_round=lambda rec: spent["secagg"].append(rec.metrics["dp_epsilon"]),
    )
    plain_raw = raw(privacy=dp)
    plain_raw["secagg"] = {"enabled": False}
    plain = run_simulation(
        validate_federation_config(plain_raw), on_round=lambda rec: spent["plain"].append(rec.metrics["dp_epsilon"])
    )
    assert seen.ids == [["secagg"], ["secagg"]]
    diff = torch.max(torch.abs(sec.params - plain.params)).item()
    assert 0 < diff <= 1e-4  # rounding to 24 bits, and the noise widened by that rounding's sensitivity
    assert len(spent["secagg"]) == 2 and spent["secagg"] == spent["plain"]
    assert sec.metrics["final_accuracy"] == pytest.approx(plain.metrics["final_accuracy"], abs=0.02)


def test_adaptive_clipping_is_refused_over_a_secure_sum() -> None:
    dp = {"mode": "central", "noise_multiplier": 1.0, "clipping": "adaptive"}
    with pytest.raises(ConfigError, match=r"privacy[.]clipping: secure aggregation gives the coordinator"):
        validate_federation_config(raw(privacy=dp))


def test_secagg_plus_in_the_simulation_sums_the_survivors() -> None:
    """Eight participants with four neighbours each, two lost after masking: exactly the mean of the six
    survivors' deltas (which two were lost is the seeded draw; only one pair fits)."""
    from itertools import combinations

    from trustfed.apps.builtin_parts import build_data, build_trainer, model_factory
    from trustfed.core.codec import flatten
    from trustfed.core.strategy import RoundPlan

    seen = Seen()
    r = raw(secagg={"enabled": True, "clip": 0.5, "bits": 24, "neighbours": 4, "threshold": 3, "dropout": 0.25})
    r["federation"] = {**r["federation"], "participants": 8, "rounds": 1}
    cfg = validate_federation_config(r)
    res = run_simulation(cfg, observers=[seen])
    assert [m["secagg_survivors"] for m in seen.metrics] == [6.0]
    data = build_data(cfg)
    p0 = flatten(model_factory(cfg, data.train.input_shape, data.train.num_classes)().state_dict())[0]
    ids = [f"p{i:03d}" for i in range(8)]
    plan = RoundPlan(1, tuple(ids), {})
    deltas = {pid: build_trainer(cfg, data, pid).fit(p0.clone(), plan).params - p0 for pid in ids}
    errs = {
        lost: torch.max(torch.abs(p0 + torch.stack([deltas[p] for p in ids if p not in lost]).mean(0) - res.params))
        for lost in combinations(ids, 2)
    }
    ranked = sorted(errs.values())
    assert ranked[0].item() <= 6 * 2 * 0.5 / (2**24 - 1) * 4 and ranked[1].item() > 1e-4


def test_weighted_secagg_equals_fedavg_on_unequal_shards() -> None:
    """``weighted = true``: each participant scales its delta by its (capped) example count before masking,
    so the secure sum gives FedAvg's example-weighted mean, here on a Dirichlet split of unequal shards."""
    r = raw(secagg={"enabled": True, "clip": 0.5, "bits": 24, "weighted": True, "max_weight": 2000})
    r["data"] = {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}}
    sec = run_simulation(validate_federation_config(r))
    plain_raw = {**r, "secagg": {"enabled": False}}
    plain = run_simulation(validate_federation_config(plain_raw))  # the mean aggregator: weighted by examples
    unweighted = run_simulation(validate_federation_config({**r, "secagg": {**r["secagg"], "weighted": False}}))
    assert torch.max(torch.abs(sec.params - plain.params)).item() <= 1e-4
    assert torch.max(torch.abs(unweighted.params - plain.params)).item() > 1e-3  # the weighting matters here
    with pytest.raises(ConfigError, match=r"secagg[.]weighted: secure aggregation gives the coordinator"):
        validate_federation_config({**r, "privacy": {"mode": "central", "noise_multiplier": 1.0}})
