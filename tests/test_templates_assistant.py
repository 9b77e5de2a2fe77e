"""``trustfed new DIR --template assistant``: a project with its own tiny pre-trained base model, three
vendors' chats and an app module over the built-in assistant app, that runs as written."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trustfed.cli import app as cli_app
from trustfed.config import load_federation_config
from trustfed.simulation.runner import run_simulation
from trustfed.templates import new_project, package_name

pytest.importorskip("peft", reason="the assistant template needs trustfed[llm] (transformers, peft)")


def test_assistant_project_runs_as_written_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "vendors"
    fed = new_project(folder, "assistant", base_steps=40)  # short pre-training: the suite runs on 2 cores
    base = folder / "base"
    assert (base / "model.safetensors").is_file() and (base / "trustfed_tokenizer.json").is_file()
    assert not [p for p in base.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]  # safetensors only
    assert (folder / package_name(folder) / "app.py").is_file() and (folder / "tests" / "test_project.py").is_file()
    written = tomllib.loads(fed.read_text())
    assert written["app"]["config"]["base"] == "base"  # relative to the project, wherever it is run from
    chats = set()
    for i in range(3):
        site = folder / "sites" / f"p{i:03d}"
        part = tomllib.loads((site / "participant.toml").read_text())
        assert part["data"]["path"] == "data"
        assert (site / "data" / "train.jsonl").is_file() and (site / "data" / "eval.jsonl").is_file()
        chats.add((site / "data" / "train.jsonl").read_text())
    assert len(chats) == 3  # three vendors, each its own chats

    cfg = load_federation_config(fed)
    assert cfg.app is not None
    cfg = cfg.model_copy(  # small size: 2 rounds, perplexity only (no generated tool calls); the log on a chain
        update={
            "federation": cfg.federation.model_copy(update={"rounds": 2}),
            "app": cfg.app.model_copy(update={"config": {**cfg.app.config, "generate": 0}}),
            "ledger": cfg.ledger.model_copy(update={"enabled": True}),
        }
    )
    monkeypatch.chdir(tmp_path)  # not the project folder: the app finds base/ from its own location
    out = tmp_path / "run"
    result = run_simulation(cfg, out)
    m = result.metrics
    assert m["app"]["target"] == f"{package_name(folder)}.app:app"
    fed_eval = [r["federated_evaluation"] for r in m["rounds"]]
    base_eval, last = fed_eval[0], fed_eval[-1]  # model_round 0: the base model (LoRA B at zero)
    assert base_eval["model_round"] == 0 and last["participants"] == 3
    assert last["perplexity"] < base_eval["perplexity"], (base_eval, last)
    assert len({p["data_sha256"] for p in m["participants_provenance"].values()}) == 3
    r = CliRunner().invoke(cli_app, ["audit", "verify", str(out)])
    assert r.exit_code == 0 and "VERIFIED" in r.output, r.output


def test_assistant_template_refuses_a_folder_in_use(tmp_path: Path) -> None:
    from trustfed.errors import ConfigError

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep").write_text("x")
    with pytest.raises(ConfigError, match="DIR"):
        new_project(tmp_path / "used", "assistant", base_steps=1)
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == ["keep"]


def test_assistant_template_without_the_llm_extra_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from trustfed.errors import ConfigError
    from trustfed.templates import assistant_project

    real = importlib.util.find_spec
    monkeypatch.setattr(
        assistant_project.importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"trustfed\[llm\].*no peft"):
        new_project(tmp_path / "new", "assistant")
    assert not (tmp_path / "new").exists()  # nothing written
