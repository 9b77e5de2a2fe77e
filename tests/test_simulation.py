from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from trustfed.cli import main
from trustfed.config import validate_federation_config
from trustfed.simulation import run_simulation


def small(**over: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "federation": {"rounds": 3, "participants": 4, "seed": 1},
        "data": {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "training": {"local_epochs": 1},
        "strategy": {"min_participants": 2},
    }
    raw.update(over)
    return raw


def test_multiprocess_matches_in_process() -> None:
    a = run_simulation(validate_federation_config(small()))
    b = run_simulation(validate_federation_config(small(simulation={"backend": "multiprocess", "workers": 2})))
    assert torch.allclose(a.params, b.params, atol=1e-6, rtol=0)
    assert [r["participants"] for r in a.metrics["rounds"]] == [r["participants"] for r in b.metrics["rounds"]]


@pytest.mark.parametrize("name", ["fedprox", "fedadam", "fedyogi", "fedadagrad"])
def test_every_strategy_learns(name: str) -> None:
    lr = 0.1 if name == "fedadagrad" else 0.03  # Adagrad's accumulator shrinks steps faster
    strat = {"name": name, "min_participants": 2, "server_lr": lr}
    res = run_simulation(validate_federation_config(small(strategy=strat)))
    accs = [r["accuracy"] for r in res.metrics["rounds"]]
    assert accs[-1] > 0.5, accs


def test_runs_are_reproducible() -> None:
    cfg = validate_federation_config(small(data={"dataset": "synthetic", "partition": {"kind": "iid"}}))
    assert run_simulation(cfg).metrics["model_hash"] == run_simulation(cfg).metrics["model_hash"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``trustfed demo`` as a user runs it: coordinator + 5 participant processes, SIMULATED enclave, ledger,
    DP-SGD, one malicious participant; what it printed is kept beside the run (``printed.txt``)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(sys, "argv", ["trustfed", "demo", "--out", str(out), "--port", "8123"])
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None)
    (out.parent / "printed.txt").write_text(printed.getvalue())
    return out


def test_demo_shows_dp_the_malicious_participant_caught_the_verdict_and_the_dashboard(demo_run: Path) -> None:
    """The first demo shows everything: progress through the silent start-up and first round, DP on (the
    epsilon each honest participant spent), one malicious participant left out by Multi-Krum in every
    round, flagged and its reputation down, the audit's verdict and the dashboard's address."""
    from trustfed.coordinator.run_report import reputations
    from trustfed.privacy.report import load_records, summarize

    text = " ".join((demo_run.parent / "printed.txt").read_text().split())  # rich wraps long lines
    m = json.loads((demo_run / "metrics.json").read_text())
    (bad,) = m["attack"]["malicious"]
    assert m["config"]["privacy"]["mode"] == "local" and m["config"]["strategy"]["aggregator"] == "multi_krum"
    for step in ("PKI ready in", "enclave process serving on", "coordinator listening on", "waiting for them to join"):
        assert step in text
    assert text.index("round 1 running: 5 participants") < text.index("round 1: accuracy")
    entries = [json.loads(line) for line in (demo_run / "audit.jsonl").read_text().splitlines()]
    assert [e["body"]["flagged"] for e in entries if e["kind"] == "incentives"] == [[bad]] * 10
    rep = reputations(demo_run)
    assert rep[bad] < 0.1 < 0.9 < min(r for pid, r in rep.items() if pid != bad)
    assert f"malicious {bad}: flagged in 10 of 10 rounds; reputation {rep[bad]:.3f}" in text
    spent = {s.party: s.epsilon for s in summarize(load_records(demo_run)) if s.epsilons}
    assert set(spent) == {"p000", "p001", "p002", "p003", "p004"} - {bad}
    assert all(f"{pid} {eps:.2f}" in text for pid, eps in spent.items())
    assert "audit: VERIFIED" in text
    assert f"trustfed dashboard {demo_run.parent.resolve()} --port 8123" in text
    assert "http://127.0.0.1:8123/runs/run" in text


def test_demo_reaches_088_and_writes_its_contract(demo_run: Path) -> None:
    m = json.loads((demo_run / "metrics.json").read_text())
    assert m["final_accuracy"] >= 0.88  # with DP-SGD in every participant and one of them malicious
    assert len(m["rounds"]) == 10
    assert set(m["rounds"][0]) >= {"round", "accuracy", "loss", "seconds"}
    assert m["config"]["federation"]["participants"] == 5 and "torch" in m["versions"]
    assert (demo_run / "metrics.png").stat().st_size > 1000


def test_demo_run_passes_the_independent_audit(demo_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trustfed.ledger.verify import verify_run

    verdict = verify_run(demo_run)
    assert verdict.ok, [str(f) for f in verdict.failures]
    assert verdict.checked["receipts"] == 10 and verdict.checked["attestations"] == 1
    assert verdict.checked["chain_rounds"] == 11 and verdict.checked["commitments"] == 50
    assert any("SIMULATED" in n for n in verdict.notes)  # the simulated enclave is never hidden
    # incentives: every round scored from the contributions in the enclave's signed receipt, paid on chain
    assert verdict.checked["incentive_rounds"] == 10 and verdict.checked["incentive_accounts"] == 6
    entries = [json.loads(line) for line in (demo_run / "audit.jsonl").read_text().splitlines()]
    scored = [e["body"] for e in entries if e["kind"] == "incentives"]
    receipts = [e["body"]["receipt"]["body"] for e in entries if e["kind"] == "enclave_receipt"]
    assert {b["source"] for b in scored} == {"enclave receipt"}
    assert [b["contributions"] for b in scored] == [r["contributions"] for r in receipts]
    assert all(sum(b["rewards"].values()) == 1000 for b in scored)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["trustfed", "audit", "verify", str(demo_run)])
        with pytest.raises(SystemExit) as exc:
            main()
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "VERIFIED" in out and "SIMULATED" in out


def _forge(
    demo_run: Path, tmp_path: Path, kind: str, rnd: int, edit: Callable[[dict[str, Any]], None]
) -> tuple[Path, int]:
    """Copy the demo run, let a forger holding the coordinator's key edit one entry's body, re-sign it
    and re-chain the log; returns the copy and the edited entry's 0-based index."""
    from ledger_helpers import resign

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    return run, resign(run, run / "pki" / "coordinator.key", kind, rnd, edit)


def test_coordinator_paying_itself_more_fails_the_audit(demo_run: Path, tmp_path: Path) -> None:
    """The coordinator (holding its key) moves round 4's rewards from one participant to another and
    re-signs: the recomputed rewards and the chain's balances both disagree."""
    from ledger_helpers import has
    from trustfed.ledger.verify import verify_run

    def edit(body: dict[str, Any]) -> None:
        body["rewards"]["p000"] += body["rewards"]["p001"]
        body["rewards"]["p001"] = 0

    run, i = _forge(demo_run, tmp_path, "incentives", 4, edit)
    verdict = verify_run(run)
    assert has(verdict.failures, file="audit.jsonl", line=i + 1, rnd=4, field="body.rewards")
    assert not has(verdict.failures, file="audit.jsonl", field="sig")
    assert not has(verdict.failures, file="chain", field="incentives.p000")  # chain paid what the rules give


def test_altered_enclave_receipt_fails_the_audit(demo_run: Path, tmp_path: Path) -> None:
    """A forger holding the coordinator's key rewrites round 3's receipt (output model), re-signs the
    entry and re-chains the log: the enclave's signature on the receipt still gives it away."""
    from ledger_helpers import has
    from trustfed.ledger.verify import verify_run

    def edit(body: dict[str, Any]) -> None:
        body["receipt"]["body"]["output_model_hash"] = "ab" * 32

    run, i = _forge(demo_run, tmp_path, "enclave_receipt", 3, edit)
    verdict = verify_run(run)
    assert not verdict.ok
    assert has(verdict.failures, file="audit.jsonl", line=i + 1, rnd=3, field="body.receipt")
    reasons = " ".join(f.message for f in verdict.failures if f.field == "body.receipt")
    assert "receipt signature does not verify" in reasons and "output model hash" in reasons
    assert not has(verdict.failures, file="audit.jsonl", field="sig")  # the forger's signature is valid


@pytest.mark.parametrize("plot", [True, False])
def test_simulate_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plot: bool) -> None:
    cfg = tmp_path / "f.toml"
    cfg.write_text(
        '[federation]\nrounds = 2\nparticipants = 3\n[data]\ndataset = "breast_cancer"\n[data.partition]\nkind = "iid"\n'
    )
    argv = ["trustfed", "simulate", "--config", str(cfg), "--out", str(tmp_path / "o")]
    monkeypatch.setattr(sys, "argv", argv if plot else [*argv, "--no-plot"])
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None)
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["final_accuracy"] > 0.8
    assert (tmp_path / "o" / "model.f32").is_file()
    assert (tmp_path / "o" / "metrics.png").is_file() is plot


def test_malformed_attestation_record_is_a_located_failure(demo_run: Path, tmp_path: Path) -> None:
    """A garbled enclave key in the recorded attestation is reported at its line, not raised."""
    from ledger_helpers import has
    from trustfed.ledger.verify import verify_run

    run, i = _forge(demo_run, tmp_path, "enclave_attestation", 0, lambda body: body.update(public_key="not hex"))
    verdict = verify_run(run)
    assert has(verdict.failures, file="audit.jsonl", line=i + 1, rnd=0, field="body")
    # without a usable attestation no receipt can be trusted: every round's receipt is flagged
    assert sum(f.field == "kind" and "without an attested enclave" in f.message for f in verdict.failures) == 10


def test_multiprocess_dp_run_matches_in_process_and_a_spent_budget_leaves_mid_run(tmp_path: Path) -> None:
    """Local DP-SGD on the multiprocess backend: the budgets live in per-participant state files shared by
    the workers, so the run (and p002 leaving once its budget is spent) is the same as in process."""
    privacy = {"mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "budgets": {"p002": {"epsilon": 3.5}}}
    a = run_simulation(validate_federation_config(small(privacy=privacy)), tmp_path / "a")
    b = run_simulation(
        validate_federation_config(small(privacy=privacy, simulation={"backend": "multiprocess", "workers": 2})),
        tmp_path / "b",
    )
    rounds = [r["participants"] for r in b.metrics["rounds"]]
    assert rounds == [r["participants"] for r in a.metrics["rounds"]]
    assert torch.allclose(a.params, b.params, atol=1e-6, rtol=0)
    spent = (tmp_path / "b" / "privacy.jsonl").read_text()
    assert spent == (tmp_path / "a" / "privacy.jsonl").read_text()
    p002 = [(r["round"], r["kind"]) for r in map(json.loads, spent.splitlines()) if r["party"] == "p002"]
    assert p002 == [(1, "participant"), (2, "absent")]  # trained once, then withdrew before round 2's data
    assert "p002" not in rounds[-1] and "p003" in rounds[-1]  # the run went on without it


def test_demo_with_secure_aggregation_verifies(tmp_path: Path) -> None:
    """``trustfed demo --confidentiality secagg``: no enclave; the coordinator recovers only sums, the
    survivors' commitments are on chain, the audit passes; a wrong value is refused by name."""
    from trustfed.ledger.verify import verify_run

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        argv = ["trustfed", "demo", "--out", str(out), "--rounds", "2", "--participants", "3"]
        mp.setattr(sys, "argv", [*argv, "--confidentiality", "secagg"])
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None)
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["secagg"]["enabled"] and not m["config"]["enclave"]["enabled"]
    verdict = verify_run(out)
    assert verdict.ok, [str(f) for f in verdict.failures]
    assert verdict.checked["commitments"] == 6 and verdict.checked["incentive_rounds"] == 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["trustfed", "demo", "--out", str(tmp_path / "x"), "--confidentiality", "none"])
        with pytest.raises(SystemExit) as exc:
            main()
    assert exc.value.code not in (0, None)
