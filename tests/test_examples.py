"""Every example in ``examples/`` runs from its one command at small size and reaches a sane figure.

Each test copies the examples into a temporary folder (their generated data stays out of the
repository) and runs ``python examples/<name>/run.py --small`` in a subprocess, which writes each
site's data, runs the federation through the ``trustfed simulate`` CLI and scores the final model.
The figure is checked against a trivial baseline computed here from the sites' own files, not taken
from the example; the full-size figures are in each example's README.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import trustfed

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ("healthcare", "finance", "smart_city", "industry", "assistant")
GENERATED = ("sites", "sites-small", "base", "base-small", "__pycache__")


def run_small(name: str, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(figures.json, metrics.json, the example's copy) of ``run.py --small``."""
    copy = tmp_path / "examples"
    shutil.copytree(EXAMPLES, copy, ignore=shutil.ignore_patterns(*GENERATED))
    out = tmp_path / "run"
    env = dict(os.environ)
    src = str(Path(trustfed.__file__).resolve().parents[1])  # the trustfed under test
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(copy / name / "run.py"), "--small", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"{name}/run.py --small failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    figures = json.loads((out / "figures.json").read_text(encoding="utf-8"))
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    small = tomllib.loads((copy / name / "small.toml").read_text(encoding="utf-8"))
    assert figures["size"] == "small" and figures["model_hash"] == metrics["model_hash"]
    assert len(metrics["rounds"]) == small["federation"]["rounds"]
    hashes = {p["data_sha256"] for p in metrics["participants_provenance"].values()}
    assert len(hashes) == small["federation"]["participants"]  # every site holds its own data
    return figures, metrics, copy / name


def read_csv(path: Path) -> dict[str, list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    return {name: [r[j] for r in rows[1:]] for j, name in enumerate(rows[0])}


def site_folders(example: Path) -> list[Path]:
    return sorted(p / "data" for p in (example / "sites-small").iterdir())


def test_examples_have_their_files_and_a_small_twin() -> None:
    """Each example is a project: app, federation file, run.py, README with its command and figures;
    small.toml is the federation file at test size (only sizes and data folders differ)."""
    sizes = {"rounds", "path", "base", "targets", "length", "generate", "local_epochs"}
    for name in NAMES:
        folder = EXAMPLES / name
        for f in ("README.md", "federation.toml", "small.toml", "run.py"):
            assert (folder / f).is_file(), f"{name}: no {f}"
        readme = (folder / "README.md").read_text(encoding="utf-8")
        assert f"python examples/{name}/run.py" in readme, f"{name}: README does not give the one command"
        full, small = (
            tomllib.loads((folder / f).read_text(encoding="utf-8")) for f in ("federation.toml", "small.toml")
        )
        assert _strip(full, sizes) == _strip(small, sizes), f"{name}: small.toml differs beyond sizes"


def _strip(value: Any, keys: set[str]) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v, keys) for k, v in value.items() if k not in keys}
    return value


def test_healthcare_with_dp_beats_the_majority_class(tmp_path: Path) -> None:
    figures, metrics, example = run_small("healthcare", tmp_path)
    labels = np.concatenate(
        [np.array(read_csv(f / "eval.csv")["diagnosis"]) == "malignant" for f in site_folders(example)]
    )
    majority = max(labels.mean(), 1 - labels.mean())  # always answering the commoner diagnosis
    pooled = figures["pooled"]
    assert pooled["patients"] == len(labels)
    assert pooled["accuracy"] > majority + 0.1, (pooled, majority)
    assert pooled["auc"] > 0.85, pooled
    assert metrics["config"]["privacy"]["mode"] == "local"
    budget = metrics["config"]["privacy"]["budget_epsilon"]
    spent = figures["privacy"]
    assert set(spent) == set(metrics["participants_provenance"])
    assert all(s["verified"] and 0 < s["epsilon"] <= budget for s in spent.values()), spent


def test_finance_auc_beats_each_banks_default_rate(tmp_path: Path) -> None:
    figures, _, example = run_small("finance", tmp_path)
    # A trivial score: every loan gets its bank's default rate in training (separates banks only).
    y, score = [], []
    for f in site_folders(example):
        rate = np.array(read_csv(f / "train.csv")["default"], dtype=float).mean()
        held = np.array(read_csv(f / "eval.csv")["default"], dtype=float)
        y.append(held)
        score.append(np.full(len(held), rate))
    trivial = roc_auc_score(np.concatenate(y), np.concatenate(score))
    pooled = figures["pooled"]
    assert pooled["auc"] > max(trivial, 0.5) + 0.1, (pooled, trivial)
    assert 0.02 < pooled["defaults"] / pooled["loans"] < 0.1  # imbalanced: about 5% default


def test_smart_city_forecast_beats_each_districts_mean(tmp_path: Path) -> None:
    figures, _, example = run_small("smart_city", tmp_path)
    weeks = tomllib.loads((example / "small.toml").read_text(encoding="utf-8"))["app"]["config"]["eval_weeks"]
    held = weeks * 168
    mean_errors, naive_errors = [], []
    for f in site_folders(example):
        demand = np.array(read_csv(f / "demand.csv")["demand_mwh"], dtype=float)
        mean_errors.append(np.abs(demand[-held:] - demand[:-held].mean()))  # the district's mean, every hour
        naive_errors.append(np.abs(demand[-held:] - demand[-held - 168 : -168]))  # the same hour a week before
    pooled = figures["pooled"]
    trivial = float(np.concatenate(mean_errors).mean())
    naive = float(np.concatenate(naive_errors).mean())
    assert math.isclose(pooled["naive_mae"], naive, rel_tol=1e-3), (pooled, naive)  # scored on the same hours
    assert pooled["mae"] < 0.5 * trivial, (pooled, trivial)
    assert pooled["mae"] < 1.05 * naive and pooled["rmse"] >= pooled["mae"], pooled


def test_industry_fault_alarm_beats_always_alarming(tmp_path: Path) -> None:
    figures, _, example = run_small("industry", tmp_path)
    y = np.concatenate([np.array(read_csv(f / "eval.csv")["fault_24h"], dtype=float) for f in site_folders(example)])
    always = 2 * y.mean() / (1 + y.mean())  # F1 of an alarm that always rings
    pooled = figures["pooled"]
    assert pooled["faults"] == int(y.sum()) and y.mean() < 0.05  # faults are rare
    assert pooled["auc"] > 0.8, pooled
    assert pooled["f1"] > always + 0.2, (pooled, always)


def test_assistant_lora_lowers_perplexity(tmp_path: Path) -> None:
    pytest.importorskip("peft", reason="the assistant example needs trustfed[llm] (transformers, peft)")
    figures, metrics, _ = run_small("assistant", tmp_path)
    assert metrics["app"]["target"] == "trustfed.apps.assistant.app:app"
    base, final = figures["base"], figures["final"]
    assert final["perplexity"] < 0.5 * base["perplexity"], (base, final)
    assert figures["exchanged_values"] <= 0.02 * figures["base_parameters"]  # only the adapters travel
    # the report: the vendors' evaluation round by round, each vendor's DP-SGD spend, the audit verdict
    assert [r["model_round"] for r in figures["per_round"]] == list(range(len(metrics["rounds"])))
    assert sorted(figures["privacy"]) == ["p000", "p001", "p002"]
    assert all(0 < s["epsilon"] <= 8.0 and s["verified"] for s in figures["privacy"].values()), figures["privacy"]
    assert figures["audit"]["verdict"] == "VERIFIED" and figures["audit"]["checks"] > 0
