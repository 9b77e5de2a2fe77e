"""DP-SGD on LoRA adapters: the assistant app under ``[privacy] mode = "local"``.

Per-example clipping of the trainable parameters only (checked against one backward pass per
example), per-vendor budgets enforced before any data is touched and recorded as the built-in
DP-SGD path records them (``privacy.jsonl``, the audit log, ``trustfed audit verify``), and the
adapters still learn at a moderate noise."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.assistant_helpers import make_workspace, raw_config
from torch import nn
from typer.testing import CliRunner

from trustfed.apps.runtime import Runtime
from trustfed.cli import app as cli_app
from trustfed.config import validate_federation_config
from trustfed.core.strategy import RoundPlan
from trustfed.errors import AppError
from trustfed.privacy.accounting import epsilon
from trustfed.privacy.budget import BudgetExhausted
from trustfed.privacy.dpsgd import dp_sgd_example_step
from trustfed.privacy.per_sample import clipped_example_grad_sum, fast_path_supported, trainable_parameters
from trustfed.privacy.report import load_records, summarize
from trustfed.simulation.runner import run_simulation

pytest.importorskip("peft", reason="the assistant app needs trustfed[llm] (transformers, peft)")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("assistant-dp"), steps=100)


def dp_config(root: Path, rounds: int, privacy: dict[str, Any], **training: Any) -> dict[str, Any]:
    raw = raw_config(root, rounds)
    raw["app"]["config"]["generate"] = 0
    raw["training"] = {"local_epochs": 1, "batch_size": 32, "lr": 0.03, "optimizer": "adamw", **training}
    raw["strategy"]["min_participants"] = 2
    raw["privacy"] = {"mode": "local", "max_grad_norm": 1.0, **privacy}
    return raw


def _lora(root: Path, frozen_a: bool) -> tuple[nn.Module, tuple[torch.Tensor, ...], Any]:
    raw = raw_config(root, 1)
    raw["app"]["config"]["frozen_a"] = frozen_a
    rt = Runtime(validate_federation_config(raw))
    model = rt.model_factory()()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(model):  # B away from zero, so A's gradients are not zero either
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    chats = rt.simulated_local_data("p000").train
    batch = tuple(t[:6] for t in chats.tensors)  # type: ignore[attr-defined]
    assert rt.app.example_loss is not None
    return model, batch, rt.app.example_loss


def _oracle(
    model: nn.Module, loss: Any, batch: tuple[torch.Tensor, ...], clip: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Slow, obviously correct: one backward pass per example."""
    params = trainable_parameters(model)
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(batch[0])):
        g = torch.autograd.grad(loss(model, tuple(t[i : i + 1] for t in batch)).sum(), params)
        n = torch.sqrt(sum((t**2).sum() for t in g))
        norms.append(n)
        f = min(1.0, clip / float(n))
        total = [a + f * b for a, b in zip(total, g, strict=True)]
    return total, torch.stack(norms)


@pytest.mark.parametrize(("frozen_a", "norm_trainable"), [(True, False), (False, False), (True, True)])
def test_clipped_example_gradients_on_lora_match_the_oracle(
    workspace: Path, frozen_a: bool, norm_trainable: bool
) -> None:
    model, batch, loss = _lora(workspace, frozen_a)
    if norm_trainable:  # a trainable RMSNorm is not on the fast path: one backward pass per example
        next(p for n, p in model.named_parameters() if n.endswith("model.norm.weight")).requires_grad_(True)
    assert fast_path_supported(model) is not norm_trainable
    params = trainable_parameters(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_B" in n or (not frozen_a and "lora_A" in n) or "norm" in n for n in names), names
    ref, ref_norms = _oracle(model, loss, batch, 1.0)
    clip = float(ref_norms.median())  # some examples clipped, some not
    ref, ref_norms = _oracle(model, loss, batch, clip)
    cg = clipped_example_grad_sum(model, lambda b: loss(model, b), batch, 6, clip)
    assert len(cg.grads) == len(params)
    assert bool((ref_norms > clip).any()) and bool((ref_norms < clip).any())
    assert torch.allclose(cg.norms, ref_norms, rtol=1e-4, atol=1e-6)
    for a, b in zip(cg.grads, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_dp_step_moves_the_trainable_adapters_only(workspace: Path) -> None:
    model, batch, loss = _lora(workspace, True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    dp_sgd_example_step(
        model,
        opt,
        lambda b: loss(model, b),
        batch,
        6,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=6.0,
        generator=torch.Generator().manual_seed(0),
    )
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n  # the base model and A get nothing
        else:
            assert p.grad is not None and not torch.equal(p, trained[n]), n


def test_budget_refuses_a_round_before_training(workspace: Path) -> None:
    probe = Runtime(validate_federation_config(dp_config(workspace, 2, {"noise_multiplier": 1.0})))
    trainer = probe.simulated_trainer("p001")
    event = trainer.plan_event(trainer.round_settings(RoundPlan(1, ("p001",), {})))  # type: ignore[attr-defined]
    one, two = epsilon([event], 1e-5), epsilon([event] * 2, 1e-5)
    raw = dp_config(workspace, 2, {"noise_multiplier": 1.0, "budgets": {"p001": {"epsilon": (one + two) / 2}}})
    rt = Runtime(validate_federation_config(raw))
    trainer = rt.simulated_trainer("p001")
    params = rt.initial[0]
    upd = trainer.fit(params, RoundPlan(1, ("p001",), {}))
    assert upd.metrics["dp_epsilon"] == pytest.approx(one) and upd.metrics["dp_budget_epsilon"] > one
    assert upd.metrics["dp_steps"] == event.steps and 0 <= upd.metrics["dp_clipped_fraction"] <= 1
    assert not torch.equal(upd.params, params) and upd.params.numel() == rt.spec.size
    with pytest.raises(BudgetExhausted, match="p001 withdrew: round 2 would raise"):
        trainer.fit(upd.params, RoundPlan(2, ("p001",), {}))
    assert trainer.guard.spent() == pytest.approx(one)  # type: ignore[attr-defined]


def test_assistant_under_local_dp_spends_within_each_vendors_budget_and_verifies(
    workspace: Path, tmp_path: Path
) -> None:
    """p001 declares room for one round: it trains round 1, is refused round 2 (absent) and never
    selected again; the others train every round within the default budget; audit verify passes."""
    budgets = {"p001": {"epsilon": 5.5}}  # one round spends 5.2 (sigma 1.0, q = 1/3, 3 steps); two 6.8
    raw = dp_config(workspace, 3, {"noise_multiplier": 1.0, "budget_epsilon": 12.0, "budgets": budgets})
    raw["ledger"] = {"enabled": True}
    out = tmp_path / "run"
    run_simulation(validate_federation_config(raw), out)
    recs = load_records(out)
    p1 = [r for r in recs if r["party"] == "p001"]
    assert [r["round"] for r in p1 if r["kind"] == "participant"] == [1]
    assert [r["round"] for r in p1 if r["kind"] == "absent"] == [2]
    for pid in ("p000", "p002"):
        mine = [r for r in recs if r["party"] == pid and r["kind"] == "participant"]
        assert [r["round"] for r in mine] == [1, 2, 3]
        assert mine[-1]["epsilon"] <= 12.0 and mine[-1]["epsilon"] > mine[0]["epsilon"]
    assert all(r["epsilon"] <= 5.5 for r in p1 if r["kind"] == "participant")
    assert all(s.verified for s in summarize(recs))
    r = CliRunner().invoke(cli_app, ["audit", "verify", str(out)])
    assert r.exit_code == 0 and "VERIFIED" in r.output, r.output
    assert "3 privacy parties" in " ".join(r.output.split())


def test_adapters_still_learn_under_dp(workspace: Path, tmp_path: Path) -> None:
    """sigma 1.0, clip 1.0, q = 1/3 (batch 32 of 96 chats), 2 local epochs, AdamW lr 0.03: the held-out
    perplexity after two rounds is under half the base model's."""
    raw = dp_config(workspace, 3, {"noise_multiplier": 1.0}, local_epochs=2)
    result = run_simulation(validate_federation_config(raw), tmp_path / "run")
    fed = [r["federated_evaluation"] for r in result.metrics["rounds"]]
    base, last = fed[0], fed[-1]  # model_round 0 is the base model with zero adapters
    assert base["model_round"] == 0 and last["participants"] == 3
    assert last["perplexity"] < 0.5 * base["perplexity"], (base, last)


def test_an_app_without_a_per_example_loss_is_refused(workspace: Path) -> None:
    rt = Runtime(validate_federation_config(dp_config(workspace, 1, {"noise_multiplier": 1.0})))
    rt.app = dataclasses.replace(rt.app, example_loss=None)
    with pytest.raises(AppError, match=r"participant p000: privacy.mode = 'local' \(DP-SGD\).*example_loss"):
        rt.simulated_trainer("p000")


@pytest.mark.slow  # three participant processes that load transformers and peft: over a minute on 2 cores
def test_assistant_under_local_dp_over_grpc_with_the_ledger(workspace: Path, tmp_path: Path) -> None:
    """The deployment path: each vendor a `trustfed client` process keeping its spend in its budget
    state file; p001's budget holds one round, so it withdraws from round 2 on; the signed spend
    entries verify."""
    from trustfed.coordinator.local_federation import run_local_federation

    raw = dp_config(workspace, 2, {"noise_multiplier": 1.0, "budgets": {"p001": {"epsilon": 5.5}}})
    del raw["simulation"]
    raw["ledger"] = {"enabled": True}
    out = tmp_path / "run"
    data = {f"p{i:03d}": {"path": str(workspace / f"v{i}")} for i in range(3)}
    run_local_federation(raw, out, round_timeout_s=300, participant_data=data)
    recs = load_records(out)
    trained = sorted((r["party"], r["round"]) for r in recs if r["kind"] == "participant")
    assert trained == [("p000", 1), ("p000", 2), ("p001", 1), ("p002", 1), ("p002", 2)]
    assert [r["round"] for r in recs if r["kind"] == "absent"] == [2]
    assert all(s.verified for s in summarize(recs))
    r = CliRunner().invoke(cli_app, ["audit", "verify", str(out)])
    assert r.exit_code == 0 and "VERIFIED" in r.output, r.output
