"""The aggregator benchmark runs end to end (at a tiny size) and agrees with Flower."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_aggregators_benchmark_small_run_agrees_with_flower(tmp_path: Path) -> None:
    pytest.importorskip("flwr", reason="flwr (dev extra) not installed")
    out = tmp_path / "agg.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "aggregators.py"), "--n", "12", "--d", "3000", "--f", "2"]
    cmd += ["--repeats", "1", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    rows = {r["aggregator"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"median", "trimmed_mean", "krum", "multi_krum", "bulyan"}
    assert all(r["agree_1e-6"] for r in rows.values()), rows


def test_byzantine_benchmark_quick_run_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "byz.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "byzantine.py"), "--quick", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    default = res["setup"]["default_robust"]
    assert set(res["aggregators"]) == {"fedavg (mean)", "median", default}
    assert res["aggregators"][default]["suspension"]["min_consistency"] == 0.3  # the guard is part of it
    assert set(res["accuracy"]["0"][default]) == {"none", "sign_flip", "gaussian_noise", "ipm_large"}
    assert res["false_suspensions"][default] == {"0": 0}
    assert (tmp_path / "byz.png").is_file()
