"""The command line's own manners: ``--version``, the dashboard's documented argument order, and the
result table that fits the terminal it is printed on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

import trustfed
import trustfed.cli as cli


def test_version_flag_prints_the_package_version() -> None:
    r = subprocess.run([sys.executable, "-m", "trustfed.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"trustfed {trustfed.__version__}"


def test_dashboard_takes_the_folder_then_the_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``trustfed dashboard DIR --port N``, as docs/dashboard.md writes it (options after the folder)."""
    uvicorn = pytest.importorskip("uvicorn")
    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(kw))
    r = CliRunner().invoke(cli.app, ["dashboard", str(tmp_path), "--port", "9000", "--host", "127.0.0.1"])
    assert r.exit_code == 0, r.output
    assert served["port"] == 9000 and served["host"] == "127.0.0.1"
    r = CliRunner().invoke(cli.app, ["dashboard", str(tmp_path / "absent"), "--port", "9000"])
    assert r.exit_code != 0 and "No such command" not in r.output


def _metrics(rounds: int) -> dict[str, Any]:
    rows = [
        {
            "round": i,
            "accuracy": 0.9,
            "loss": 0.25,
            "seconds": 1.5,
            "federated_evaluation": {"model_round": i - 1, "accuracy": 0.88, "loss": 0.3, "num_examples": 90},
        }
        for i in range(1, rounds + 1)
    ]
    return {"rounds": rows, "total_seconds": 9.0, "model_hash": "ab" * 32, "final_accuracy": 0.9, "final_loss": 0.25}


@pytest.mark.parametrize("width,height", [(60, 24), (120, 40)])
def test_the_result_table_fits_the_terminal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, width: int, height: int
) -> None:
    console = Console(width=width, height=height, force_terminal=True, record=True, color_system=None)
    monkeypatch.setattr(cli, "console", console)
    cli._final_table(_metrics(200), tmp_path, plot=False)
    lines = console.export_text().splitlines()
    assert len(lines) <= height, f"{len(lines)} lines on a {height}-line terminal"
    assert max(len(line) for line in lines) <= width
    text = "\n".join(lines)
    assert "│   200 │" in text and "│     1 │" in text  # the first and the last round stay
    table = text[: text.index("└")]
    assert "left" in table and "metrics.json" in table  # how many rounds were left out, and where they are


def test_a_short_run_shows_every_round(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    console = Console(width=100, height=40, force_terminal=True, record=True, color_system=None)
    monkeypatch.setattr(cli, "console", console)
    cli._final_table(_metrics(5), tmp_path, plot=False)
    text = console.export_text()
    assert all(f"│     {i} │" in text for i in range(1, 6)) and "left out" not in text


def test_simulate_says_which_round_is_running(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The progress bar's status names the round that has started (and, before, what start-up does)."""
    from trustfed.config import validate_federation_config

    seen: list[str] = []
    real = cli.RoundStatus.on_round_start

    def spy(self: cli.RoundStatus, plan: Any, params: Any) -> None:
        seen.append(str(self.progress.tasks[0].fields["status"]))
        real(self, plan, params)
        seen.append(str(self.progress.tasks[0].fields["status"]))

    monkeypatch.setattr(cli.RoundStatus, "on_round_start", spy)
    monkeypatch.setattr(cli, "console", Console(width=100, force_terminal=False, record=True))
    raw = {
        "federation": {"name": "s", "rounds": 2, "participants": 2},
        "model": {"name": "mlp", "hidden": [8]},
        "data": {"partition": {"kind": "iid"}},
    }
    cli._run_with_progress(validate_federation_config(raw, "test"), tmp_path / "run", plot=False)
    assert seen[0] == "starting: data and model"
    assert seen[1] == "round 1 running (2 participants)" and seen[3] == "round 2 running (2 participants)"
