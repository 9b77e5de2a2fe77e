"""Differential privacy: accounting, clipping, calibrated noise, budgets, recording and the CLI."""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from privacy_helpers import digits_dpsgd_trainer
from trustfed.config import validate_federation_config
from trustfed.core.strategy import FedAdam, FedAvg, RoundPlan, Update
from trustfed.errors import ConfigError
from trustfed.privacy.accounting import GaussianSteps, PrivacyError, epsilon, noise_multiplier_for
from trustfed.privacy.budget import BudgetExhausted
from trustfed.privacy.central import DPFedAvg, clip_rows, delta_noise_multiplier
from trustfed.privacy.dpsgd import DPSGDTrainer, dp_sgd_step
from trustfed.privacy.per_sample import clipped_grad_sum, fast_path_supported, sum_cross_entropy
from trustfed.privacy.report import load_records, summarize

torch.set_num_threads(1)


def opacus_rdp(z: float, q: float, steps: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(z, q, steps)]
    return float(acc.get_epsilon(delta))


# --- accounting -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("z", "q", "steps"),
    [(1.1, 0.01, 1000), (0.8, 0.05, 200), (2.0, 0.2, 50), (1.0, 1.0, 10), (1.5, 0.004, 5000)],
)
def test_rdp_accountant_agrees_with_opacus(z: float, q: float, steps: int) -> None:
    ours = epsilon([GaussianSteps(z, q, steps)], 1e-5, "rdp")  # Google dp-accounting underneath
    ref = opacus_rdp(z, q, steps, 1e-5)  # an independent implementation of the same analysis
    assert ours == pytest.approx(ref, rel=2e-3)


def test_prv_and_pld_are_tighter_than_rdp_and_close_to_each_other() -> None:
    ev = [GaussianSteps(1.1, 0.01, 1000)]
    rdp, pld, prv = (epsilon(ev, 1e-5, a) for a in ("rdp", "pld", "prv"))  # type: ignore[arg-type]
    from opacus.accountants import PRVAccountant

    ref = PRVAccountant()
    ref.history = [(1.1, 0.01, 1000)]
    assert prv == pytest.approx(float(ref.get_epsilon(1e-5)), rel=1e-6)
    assert pld < rdp and prv < rdp
    assert pld == pytest.approx(prv, rel=0.03)


def test_composition_over_rounds_equals_one_long_run() -> None:
    per_round = GaussianSteps(1.0, 0.02, 50)
    assert epsilon([per_round] * 8, 1e-5) == pytest.approx(epsilon([GaussianSteps(1.0, 0.02, 400)], 1e-5), rel=1e-9)
    # Mixed mechanisms compose too, and more rounds always cost more.
    mixed = [per_round, GaussianSteps(2.0, 0.1, 10)]
    assert epsilon(mixed, 1e-5) > epsilon([per_round], 1e-5)
    assert epsilon([], 1e-5) == 0.0


def test_noise_multiplier_calibration_matches_opacus() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    ours = noise_multiplier_for(3.0, 1e-5, 0.02, 500)
    with warnings.catch_warnings():  # Opacus' bisection probes orders at the edge of its range
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha", category=UserWarning)
        ref = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.02, steps=500, accountant="rdp")
    assert ours == pytest.approx(ref, rel=0.02)
    assert epsilon([GaussianSteps(ours, 0.02, 500)], 1e-5) <= 3.0


def test_invalid_mechanisms_are_refused() -> None:
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        GaussianSteps(0.0, 0.1, 1)
    with pytest.raises(PrivacyError, match="sample_rate"):
        GaussianSteps(1.0, 1.5, 1)
    with pytest.raises(PrivacyError, match="delta"):
        epsilon([GaussianSteps(1.0, 0.1, 1)], 0.0)


# --- clipping ---------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 6),
    d=st.integers(1, 40),
    scale=st.floats(1e-3, 1e3),
    clip=st.floats(1e-2, 10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_clip_rows_bounds_every_norm(n: int, d: int, scale: float, clip: float, seed: int) -> None:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    out, norms = clip_rows(x, clip)
    assert bool((out.norm(dim=1) <= clip * (1 + 1e-9)).all())
    inside = norms <= clip
    assert torch.allclose(out[inside], x[inside])  # short rows are left alone


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, (3, 2), stride=2, dilation=(1, 2), bias=False),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def _layernorm_model() -> nn.Module:  # not on the fast path: torch.func fallback
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Slow, obviously correct: one backward pass per example."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(x)):
        g = torch.autograd.grad(sum_cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        n = torch.sqrt(sum((t**2).sum() for t in g))
        norms.append(n)
        f = min(1.0, clip / float(n))
        total = [a + f * b for a, b in zip(total, g, strict=True)]
    return total, torch.stack(norms)


@pytest.mark.parametrize(
    ("make", "shape", "fast"),
    [(_mlp, (12,), True), (_cnn, (1, 6, 6), True), (_layernorm_model, (12,), False)],
)
def test_per_example_clipping_matches_the_oracle(make: object, shape: tuple[int, ...], fast: bool) -> None:
    assert callable(make)
    model = make()
    assert fast_path_supported(model) is fast
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, *shape, generator=gen) * 3
    y = torch.randint(0, 3, (9,), generator=gen)
    cg = clipped_grad_sum(model, x, y, 0.5)
    ref, ref_norms = _oracle(model, x, y, 0.5)
    assert torch.allclose(cg.norms, ref_norms, rtol=1e-4, atol=1e-6)
    assert bool((ref_norms > 0.5).any())  # the test really clips
    for a, b in zip(cg.grads, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_clipped_sums_scale_and_accumulate_into_given_tensors() -> None:
    model = _cnn()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1, 6, 6, generator=gen) * 3
    y = torch.randint(0, 3, (5,), generator=gen)
    plain = clipped_grad_sum(model, x, y, 0.5)
    base = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    into = [t.clone() for t in base]
    out = clipped_grad_sum(model, x, y, 0.5, scale=0.25, into=into)
    for got, b, g, t in zip(out.grads, base, plain.grads, into, strict=True):
        assert got is t  # accumulated in place
        assert torch.allclose(got, b + 0.25 * g, rtol=1e-5, atol=1e-6)
    with pytest.raises(PrivacyError, match="into"):
        clipped_grad_sum(model, x, y, 0.5, into=base[:1])


def test_each_example_contributes_at_most_the_clip_norm() -> None:
    model = _mlp()
    gen = torch.Generator().manual_seed(2)
    for i in range(5):
        x = torch.randn(1, 12, generator=gen) * 10**i
        cg = clipped_grad_sum(model, x, torch.tensor([i % 3]), 0.3)
        norm = float(torch.sqrt(sum((g**2).sum() for g in cg.grads)))
        assert norm <= 0.3 * (1 + 1e-5)


# --- calibrated noise ---------------------------------------------------------------------------
def test_central_noise_has_the_calibrated_std() -> None:
    d, n, z, clip = 200_000, 4, 1.3, 0.7
    params = torch.zeros(d)
    dp = DPFedAvg(FedAvg(), noise_multiplier=z, clip_norm=clip, seed=3)
    plan = dp.configure_round(1, params, [f"p{i}" for i in range(n)])
    res = dp.aggregate(plan, params, [Update(p, params.clone(), 10) for p in plan.participants])
    noise = res.params.to(torch.float64)
    expected = z * clip / n
    # std estimate from d samples has relative standard error 1/sqrt(2d) = 0.16%; allow 1% (6 SE).
    assert float(noise.std()) == pytest.approx(expected, rel=0.01)
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(d)
    assert res.metrics["dp_noise_std"] == pytest.approx(expected)


def test_dp_sgd_step_noise_has_the_calibrated_std() -> None:
    torch.manual_seed(0)
    model = nn.Linear(500, 200)  # 100,200 parameters
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    z, clip, expected_batch = 1.1, 2.0, 8.0
    empty = torch.zeros(0, 500)  # a Poisson batch may be empty: the step is pure noise
    dp_sgd_step(
        model,
        opt,
        empty,
        torch.zeros(0, dtype=torch.long),
        max_grad_norm=clip,
        noise_multiplier=z,
        expected_batch_size=expected_batch,
        generator=torch.Generator().manual_seed(5),
    )
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    step = (before - after).to(torch.float64)
    assert float(step.std()) == pytest.approx(z * clip / expected_batch, rel=0.01)  # 1/sqrt(2*100200): 0.22% SE


def test_adaptive_clipping_moves_towards_the_quantile_and_splits_the_noise() -> None:
    d, n, z = 50, 10, 1.0
    params = torch.zeros(d)
    big = DPFedAvg(FedAvg(), noise_multiplier=z, clip_norm=1.0, clipping="adaptive", clip_count_stddev=2.0, seed=1)
    small = DPFedAvg(FedAvg(), noise_multiplier=z, clip_norm=1.0, clipping="adaptive", clip_count_stddev=2.0, seed=1)
    ids = [f"p{i}" for i in range(n)]
    for rnd in range(1, 11):
        for dp, norm in ((big, 10.0), (small, 0.01)):
            plan = dp.configure_round(rnd, params, ids)
            ups = [Update(p, torch.full((d,), norm / math.sqrt(d)), 1) for p in plan.participants]
            res = dp.aggregate(plan, params, ups)
            assert res.metrics["dp_noise_std"] == pytest.approx(
                delta_noise_multiplier(z, 2.0) * res.metrics["dp_clip_norm"] / n
            )
    assert big.clip_norm > 2.0 and small.clip_norm < 0.5
    assert delta_noise_multiplier(1.0, 2.0) == pytest.approx((1 - 1 / 16) ** -0.5)
    with pytest.raises(PrivacyError, match="clip_count_stddev"):
        delta_noise_multiplier(1.0, 0.4)


def test_central_dp_bounds_the_aggregate_and_wraps_server_optimisers() -> None:
    d = 30
    params = torch.zeros(d)
    dp = DPFedAvg(FedAdam(server_lr=0.5), noise_multiplier=1e-6, clip_norm=0.25, seed=0, sampling_amplification=False)
    plan = dp.configure_round(1, params, ["a", "b", "c"])
    assert plan.config["dp_central_noise_multiplier"] == 1e-6
    ups = [Update(p, torch.full((d,), 100.0 * (i + 1)), 5) for i, p in enumerate(plan.participants)]
    # Without the server optimiser the mean delta is bounded by the clip norm.
    plain = DPFedAvg(FedAvg(), noise_multiplier=1e-6, clip_norm=0.25, seed=0)
    r0 = plain.aggregate(plain.configure_round(1, params, ["a", "b", "c"]), params, ups)
    assert float(r0.params.norm()) <= 0.25 * (1 + 1e-4)
    r1 = dp.aggregate(plan, params, ups)
    assert r1.aggregate.selected == (0, 1, 2) and r1.metrics["dp_epsilon"] > 0
    state = dp.state_dict()
    fresh = DPFedAvg(FedAdam(server_lr=0.5), noise_multiplier=1e-6, clip_norm=9.0, seed=0)
    fresh.load_state_dict(state)
    assert fresh.clip_norm == 0.25 and fresh.accountant.history == dp.accountant.history


def test_central_dp_refuses_a_robust_aggregator() -> None:
    with pytest.raises(PrivacyError, match="aggregator = 'mean'"):
        DPFedAvg(FedAvg(aggregator="median"), noise_multiplier=1.0, clip_norm=1.0)


# --- budgets ------------------------------------------------------------------------------------
def _digits_trainer(budget: float | None) -> tuple[DPSGDTrainer, torch.Tensor]:
    return digits_dpsgd_trainer(budget)


def test_budget_exhaustion_refuses_before_training() -> None:
    trainer, params = _digits_trainer(None)
    per_round = epsilon([trainer.plan_event(trainer.config)], 1e-5)
    two_rounds = epsilon([trainer.plan_event(trainer.config)] * 2, 1e-5)
    trainer, params = _digits_trainer((per_round + two_rounds) / 2)  # room for one round, not two
    upd = trainer.fit(params, RoundPlan(1, ("p007",), {}))
    assert upd.metrics["dp_epsilon"] == pytest.approx(per_round)
    assert upd.metrics["dp_epsilon_round"] == pytest.approx(per_round)
    assert not torch.equal(upd.params, params)
    with pytest.raises(BudgetExhausted, match="p007 withdrew: round 2 would raise") as info:
        trainer.fit(params, RoundPlan(2, ("p007",), {}))
    assert trainer.guard.spent() == pytest.approx(per_round)  # nothing recorded for the refused round
    again = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries intact
    assert isinstance(again, BudgetExhausted) and again.participant_id == "p007"


def _cfg(tmp: Path, privacy: dict[str, object], rounds: int = 4, **strategy: object) -> object:
    raw = {
        "federation": {"name": "dp-test", "rounds": rounds, "participants": 3, "seed": 0},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [32]},
        "training": {"local_epochs": 1, "batch_size": 64, "lr": 0.1, "momentum": 0.0},
        "strategy": {"name": "fedavg", "min_participants": 1, **strategy},
        "privacy": privacy,
    }
    return validate_federation_config(raw, "test")


def test_run_continues_without_a_participant_whose_budget_is_spent(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from trustfed.cli import app
    from trustfed.simulation.runner import run_simulation

    cfg = _cfg(
        tmp_path,
        {"mode": "local", "noise_multiplier": 1.5, "max_grad_norm": 1.0, "budgets": {"p001": {"epsilon": 2.4}}},
        rounds=3,
    )
    out = tmp_path / "run"
    res = run_simulation(cfg, out)  # type: ignore[arg-type]
    rounds = res.metrics["rounds"]
    assert len(rounds) == 3 and all(math.isfinite(r["accuracy"]) for r in rounds)
    recs = load_records(out)
    p1 = [r for r in recs if r["party"] == "p001"]
    trained = [r["round"] for r in p1 if r["kind"] == "participant"]
    absent = [r["round"] for r in p1 if r["kind"] == "absent"]
    assert trained and absent == [trained[-1] + 1]  # refused once, then never selected again
    assert trained == [1, 2]  # epsilon 1.79 after one round, 2.26 after two, 2.65 after three
    assert all(r["epsilon"] <= 2.4 for r in p1 if r["kind"] == "participant")
    assert {r["round"] for r in recs if r["party"] == "p000"} == {1, 2, 3}
    by_party = {s.party: s for s in summarize(recs)}
    assert by_party["p001"].status.startswith("left at round") and all(s.verified for s in by_party.values())
    assert by_party["p000"].epsilon > by_party["p001"].epsilon
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # typer's CliRunner on click 8.5
        cli = CliRunner().invoke(app, ["privacy", "report", str(out)])
    assert cli.exit_code == 0, cli.output
    assert "p001" in cli.output and "left at round" in cli.output and (out / "privacy.png").stat().st_size > 1000


def test_report_detects_a_tampered_record(tmp_path: Path) -> None:
    path = tmp_path / "privacy.jsonl"
    line = {"round": 1, "party": "p0", "kind": "participant", "epsilon": 0.5, "delta": 1e-5}
    line |= {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10}
    path.write_text(json.dumps(line) + "\n")
    (s,) = summarize(load_records(tmp_path))
    assert not s.verified and s.recomputed == pytest.approx(epsilon([GaussianSteps(1.0, 0.1, 10)], 1e-5))


def test_central_run_records_the_release(tmp_path: Path) -> None:
    from trustfed.simulation.runner import run_simulation

    cfg = _cfg(
        tmp_path,
        {
            "mode": "central",
            "noise_multiplier": 0.5,
            "max_grad_norm": 2.0,
            "clipping": "adaptive",
            "budget_epsilon": 1e6,
        },
        rounds=3,
        fraction_fit=0.67,
    )
    out = tmp_path / "central"
    run_simulation(cfg, out)  # type: ignore[arg-type]
    agg = [r for r in load_records(out) if r["kind"] == "aggregator"]
    assert [r["round"] for r in agg] == [1, 2, 3]
    assert agg[0]["sample_rate"] == pytest.approx(2 / 3) and agg[0]["epsilon"] < agg[-1]["epsilon"]
    assert all(s.verified for s in summarize(load_records(out)))


def test_privacy_config_problems_are_reported() -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(Path("."), {"mode": "central", "budgets": {"p999": {"epsilon": 1.0}}}, aggregator="median")
    text = str(info.value)
    assert "privacy.budgets" in text and "p999" in text and "central DP needs strategy.aggregator" in text
    with pytest.raises(ConfigError, match="privacy"):
        _cfg(Path("."), {"mode": "local", "noise_multiplier": 0.0})
    assert _cfg(Path("."), {}).privacy.mode == "none"  # type: ignore[attr-defined]
