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
