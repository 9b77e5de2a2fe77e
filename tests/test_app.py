"""The app seam: a user's own model, data, loss and optimiser, run in simulation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from app_helpers import write_project
from trustfed.cli import main
from trustfed.config import load_federation_config
from trustfed.errors import ConfigError
from trustfed.simulation.runner import run_simulation


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``trustfed ARGS`` in this process, as a user's shell runs it: (exit code, stdout + stderr)."""
    monkeypatch.setattr("sys.argv", ["trustfed", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out + out.err


def test_user_app_regression_with_batchnorm_runs_in_simulation(tmp_path: Path) -> None:
    fed = write_project(tmp_path / "proj", "houses_sim", rounds=6)
    cfg = load_federation_config(fed)
    result = run_simulation(cfg, tmp_path / "out")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # the app and its code are named
    assert m["app"]["target"] == "houses_sim.app:app"
    assert len(m["app"]["code_sha256"]) == 64
    assert m["app"]["files"] == ["houses_sim/__init__.py", "houses_sim/app.py"]
    assert m["app"]["config"] == {"hidden": 16}
    # every participant's data manifest hash, each different (each site has its own files)
    prov = m["participants_provenance"]
    assert sorted(prov) == ["p000", "p001", "p002"]
    assert len({p["data_sha256"] for p in prov.values()}) == 3
    assert {p["app_sha256"] for p in prov.values()} == {m["app"]["code_sha256"]}
    # federated evaluation on the sites' held-out data: the MSE falls from the initial model's
    fed_eval = [r["federated_evaluation"] for r in m["rounds"]]
    assert [f["model_round"] for f in fed_eval] == list(range(6))
    assert all(f["participants"] == 3 and f["num_examples"] == 120 for f in fed_eval)
    assert fed_eval[-1]["loss"] < 0.5 * fed_eval[0]["loss"]
    assert set(fed_eval[0]) >= {"loss", "mae", "rmse"}
    assert math.isclose(
        fed_eval[-1]["rmse"] ** 2, fed_eval[-1]["mse"] if "mse" in fed_eval[-1] else fed_eval[-1]["rmse"] ** 2
    )
    # no coordinator-side data: no central accuracy
    assert math.isnan(m["final_accuracy"])
    assert result.params.isfinite().all()


def test_wrong_app_target_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = write_project(tmp_path / "proj", "houses_wrong")
    text = fed.read_text().replace('target = "houses_wrong.app:app"', 'target = "houses_wrong.nope:app"')
    fed.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_federation_config(fed)
    assert "app.target" in str(exc.value) and "houses_wrong.nope" in str(exc.value)
    code, output = run_cli(["simulate", "--config", str(fed), "--out", str(tmp_path / "out")], capsys, monkeypatch)
    assert code == 2, output
    assert "app.target" in output
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_loader_error_names_the_file_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = write_project(tmp_path / "proj", "houses_badcsv")
    bad = tmp_path / "proj" / "sites" / "p001" / "train.csv"
    bad.write_text("rooms,area,age,distance,cost\n1,2,3,4,5\n")
    code, output = run_cli(["simulate", "--config", str(fed), "--out", str(tmp_path / "out")], capsys, monkeypatch)
    assert code == 2, output
    text = " ".join(output.split())
    assert "p001" in text and "price" in text and "train.csv" in text
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_audit_names_a_participant_that_ran_other_code_and_a_forged_federated_evaluation(tmp_path: Path) -> None:
    import shutil

    from ledger_helpers import find, has, read_lines, rechain, resign, write_lines
    from trustfed.ledger.audit import EcdsaSigner, make_entry, parse_entry
    from trustfed.ledger.settings import LedgerSettings
    from trustfed.ledger.verify import verify_run

    fed = write_project(tmp_path / "proj", "houses_audit", rounds=2)
    cfg = load_federation_config(fed)
    out = tmp_path / "run"
    run_simulation(cfg.model_copy(update={"ledger": LedgerSettings(enabled=True)}), out)
    ok = verify_run(out)
    assert ok.ok, ok.failures
    assert ok.checked["app"] == 1 and ok.checked["provenance"] == 6 and ok.checked["federated_evaluations"] == 2
    forged = tmp_path / "forged"
    shutil.copytree(out, forged)
    # p001 signs that it ran other code than the federation's app
    lines = read_lines(out)
    i = find(lines, "commitment", 2, nth=1)
    e = parse_entry(lines[i])
    body = json.loads(json.dumps(e.body))
    body["app_sha256"] = "ab" * 32
    signer = EcdsaSigner.load(e.author, out / "keys" / "participants" / f"{e.author}.pem")
    lines[i] = make_entry(e.seq, e.prev, e.kind, e.round, body, signer)[1].rstrip("\n")
    write_lines(out, rechain(lines, i))
    bad = verify_run(out)
    assert has(bad.failures, file="audit.jsonl", line=i + 1, rnd=2, field="body.app_sha256"), bad.failures
    assert any(e.author in f.message for f in bad.failures if f.field == "body.app_sha256")
    # a coordinator that reports a better federated evaluation than the participants signed
    j = resign(
        forged, forged / "keys" / "coordinator.pem", "aggregation", 2, lambda b: b["metrics"].update(fed_eval_loss=1e-3)
    )
    bad = verify_run(forged)
    assert has(bad.failures, file="audit.jsonl", line=j + 1, rnd=2, field="body.metrics"), bad.failures


CUSTOM_ALGORITHMS = '''

from dataclasses import dataclass

from trustfed.core.aggregator import AggregateResult
from trustfed.core.strategy import FedAvg


@dataclass
class FirstOnly:
    """An aggregator of the app's own: keeps only the first update (so a test can tell it ran)."""

    name: str = "first_only"

    def __call__(self, updates, weights):
        return AggregateResult(updates[0].clone(), (0,))

    def describe(self):
        return {"name": self.name}


class Halfway(FedAvg):
    """A strategy of the app's own: moves the global model half way to the aggregate."""

    name = "halfway"

    def aggregate(self, plan, params, updates):
        result = super().aggregate(plan, params, updates)
        return type(result)(params + 0.5 * (result.params - params), result.metrics, result.aggregate)


app = App(model=model, data=data, strategies={"halfway": Halfway}, aggregators={"first_only": FirstOnly})
'''


def test_the_app_registers_its_own_strategy_and_aggregator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from trustfed.core import aggregator

    # the app's aggregator goes into a copy of the registry: other tests iterate over the built-in ones
    monkeypatch.setattr(aggregator, "_REGISTRY", dict(aggregator._REGISTRY))

    fed = write_project(tmp_path / "proj", "houses_algos", rounds=1)
    app_py = tmp_path / "proj" / "houses_algos" / "app.py"
    app_py.write_text(app_py.read_text() + CUSTOM_ALGORITHMS)
    text = fed.read_text().replace("[strategy]\n", '[strategy]\nname = "halfway"\naggregator = "first_only"\n')
    fed.write_text(text)
    cfg = load_federation_config(fed)
    assert (cfg.strategy.name, cfg.strategy.aggregator) == ("halfway", "first_only")
    result = run_simulation(cfg)
    from trustfed.apps.runtime import Runtime

    rt = Runtime(cfg)
    start = rt.initial[0]
    first = rt.simulated_trainer("p000").fit(start.clone(), _plan(1))
    assert torch.allclose(result.params, start + 0.5 * (first.params - start), atol=1e-6)
    assert result.metrics["strategy"]["aggregator"]["name"] == "first_only"
    # an unknown name is a config error listing the app's own names too
    fed.write_text(text.replace('name = "halfway"', 'name = "nope"'))
    with pytest.raises(ConfigError) as exc:
        load_federation_config(fed)
    assert "halfway" in str(exc.value)


def _plan(rnd: int) -> object:
    from trustfed.core.strategy import RoundPlan

    return RoundPlan(rnd, ("p000",), {})


def test_an_edited_metrics_file_fails_the_audit(tmp_path: Path) -> None:
    from trustfed.ledger.settings import LedgerSettings
    from trustfed.ledger.verify import verify_run

    fed = write_project(tmp_path / "proj", "houses_metrics", rounds=2)
    cfg = load_federation_config(fed).model_copy(update={"ledger": LedgerSettings(enabled=True)})
    out = tmp_path / "run"
    run_simulation(cfg, out)
    report = verify_run(out)
    assert report.ok and report.checked["metrics_file"] == 1, report.failures
    path = out / "metrics.json"
    original = json.loads(path.read_text())
    for edit in (
        lambda m: m.update(final_loss=0.001),
        lambda m: m["rounds"][0]["federated_evaluation"].update(mae=0.01),
        lambda m: m["rounds"][1].update(model_hash="00" * 32),
    ):
        m = json.loads(json.dumps(original))
        edit(m)
        path.write_text(json.dumps(m))
        bad = verify_run(out)
        assert not bad.ok and all(f.file == "metrics.json" for f in bad.failures), bad.failures
