"""The dashboard served for real (uvicorn on 127.0.0.1, an ephemeral port) over recorded runs: pages and
JSON show the run, the ledger's accounts and incentives, the audit on request, and refuse what is not
a run folder; strings from run files are escaped; bad files become located problems, not errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from tests.ledger_helpers import read_lines, write_lines

from trustfed.config import validate_federation_config
from trustfed.simulation import run_simulation

uvicorn = pytest.importorskip("uvicorn", reason="the dashboard extra (uvicorn) is not installed")
pytest.importorskip("fastapi", reason="the dashboard extra (fastapi) is not installed")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    raw: dict[str, Any] = {
        "federation": {"name": "dash <b>", "rounds": 2, "participants": 3, "seed": 4},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"local_epochs": 1, "batch_size": 64, "lr": 0.05},
        "strategy": {"name": "fedavg", "min_participants": 2},
        "ledger": {"enabled": True},
        "incentives": {"enabled": True},
        "privacy": {"mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "budget_epsilon": 50.0},
    }
    run_simulation(validate_federation_config(raw, "test"), root / "good")
    (root / "not-a-run").mkdir()
    return root


@pytest.fixture(scope="module")
def base(root: Path) -> Iterator[str]:
    from trustfed.dashboard.app import create_app

    with serve(create_app(root)) as url:
        yield url


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 (an ephemeral port) in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws="none"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the dashboard server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def get(url: str) -> tuple[int, str]:
    status, body, _ = fetch(url)
    return status, body


def fetch(url: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def test_index_lists_run_folders_only(base: str) -> None:
    status, page = get(base + "/")
    assert status == 200 and 'href="/runs/good"' in page and "not-a-run" not in page
    assert json.loads(get(base + "/api/runs")[1]) == {"runs": ["good"]}


def test_run_page_shows_progress_accounts_incentives_and_privacy(base: str) -> None:
    status, page = get(base + "/runs/good")
    assert status == 200
    assert "2 / 2 rounds" in page and "<svg" in page and "<polyline" in page
    for text in ("Ledger accounts", "p002", "Incentives", "coordinator", "Privacy spend"):
        assert text in page
    view = json.loads(get(base + "/api/runs/good")[1])
    assert view["status"] == "finished" and len(view["rounds"]) == 2 and view["final_accuracy"] is not None
    assert all(r["updated_by"] == ["p000", "p001", "p002"] for r in view["rounds"])
    assert "<th>selected</th><th>updates</th>" in page
    accounts = {p["id"]: p for p in view["participants"]}
    assert sum(accounts[p]["balance"] for p in ("p000", "p001", "p002")) == 2000
    assert [i["round"] for i in view["incentives"]] == [1, 2]
    assert {p["party"] for p in view["privacy"]} == {"p000", "p001", "p002"}
    assert all(p["verified"] for p in view["privacy"])
    assert view["federation"]["name"] == "dash <b>" and "dash &lt;b&gt;" not in json.dumps(view)


def test_a_run_still_recording_shows_its_rounds_from_the_audit_log(root: Path, base: str) -> None:
    live = Path(shutil.copytree(root / "good", root / "live"))
    finished = json.loads((live / "metrics.json").read_text())
    (live / "metrics.json").unlink()  # as while the federation is still running
    status, page = get(base + "/runs/live?refresh=5")
    assert status == 200 and '<meta http-equiv="refresh" content="5">' in page and "recording" in page
    view = json.loads(get(base + "/api/runs/live")[1])
    assert view["status"] == "recording"
    assert [r["accuracy"] for r in view["rounds"]] == [r["accuracy"] for r in finished["rounds"]]
    assert get(base + "/runs/live?refresh=-1")[0] == 422


def test_audit_on_request_verifies(base: str) -> None:
    status, page = get(base + "/runs/good/verify")
    assert status == 200 and "VERIFIED" in page and "NOT VERIFIED" not in page
    v = json.loads(get(base + "/api/runs/good/verify")[1])
    assert v["ok"] and v["checked"]["incentive_rounds"] == 2 and v["failures"] == []


@pytest.mark.parametrize(
    "path", ["/runs/nope", "/runs/not-a-run", "/api/runs/%2e%2e", "/api/runs/..%2Fgood", "/runs/.hidden"]
)
def test_anything_but_a_run_folder_is_404(base: str, path: str) -> None:
    assert get(base + path)[0] == 404


def test_a_tampered_run_is_shown_with_its_located_failures(root: Path, base: str) -> None:
    bad = Path(shutil.copytree(root / "good", root / "tampered"))
    lines = read_lines(bad)
    lines[5] = lines[5].replace('"round":', '"round": ', 1) + " "  # still JSON, no longer the signed bytes
    lines.append("{not json")
    write_lines(bad, lines)
    status, page = get(base + "/runs/tampered/verify")
    assert status == 200 and "NOT VERIFIED" in page and "audit.jsonl:" in page
    view = json.loads(get(base + "/api/runs/tampered")[1])
    assert any(p.startswith(f"audit.jsonl:{len(lines)}: unreadable entry") for p in view["problems"])


def test_strings_from_run_files_are_escaped_and_a_simulated_enclave_is_labelled(root: Path, base: str) -> None:
    run = root / "sim"
    run.mkdir()
    metrics = {
        "final_accuracy": 0.5,
        "model_hash": "<script>alert(1)</script>",
        "rounds": [{"round": 1, "accuracy": 0.5, "loss": 1.0, "seconds": 0.1, "participants": ["<i>x</i>"]}],
        "config": {"federation": {"name": "n", "rounds": 1}},
        "enclave": {"label": "ATTESTED", "backend": "simulated", "measurement": "<img src=x>"},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    status, page = get(base + "/runs/sim")
    assert status == 200
    assert "<script>" not in page and "&lt;script&gt;" in page and "<img" not in page
    assert "SIMULATED" in page and "ATTESTED" not in page  # a simulated backend is never shown as attested


def test_unreadable_metrics_is_a_problem_line_not_an_error(root: Path, base: str) -> None:
    run = root / "broken"
    run.mkdir()
    (run / "metrics.json").write_text("[1, 2")
    status, page = get(base + "/runs/broken")
    assert status == 200 and "metrics.json: unreadable" in page
    assert json.loads(get(base + "/api/runs/broken")[1])["status"] == "unreadable"


def test_cli_refuses_a_missing_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from trustfed.cli import app

    r = CliRunner().invoke(app, ["dashboard", str(tmp_path / "absent")])
    assert r.exit_code != 0
    assert "folder does not exist" in str(r.exception) or "folder does not exist" in r.output


def test_an_edited_metrics_file_is_flagged_and_its_figures_are_not_shown(root: Path, base: str) -> None:
    """The headline and the round figures are the signed log's, checked as `audit verify` checks them;
    an edited metrics.json is flagged MISMATCH with what it reports, never shown as the headline."""
    edited = Path(shutil.copytree(root / "good", root / "edited"))
    metrics = json.loads((edited / "metrics.json").read_text())
    signed = metrics["final_accuracy"]
    assert signed < 0.95
    metrics["final_accuracy"] = 0.99
    metrics["rounds"][0]["accuracy"] = 0.98
    (edited / "metrics.json").write_text(json.dumps(metrics))
    status, page = get(base + "/runs/edited")
    assert status == 200 and "final accuracy <b>0.9900</b>" not in page
    assert f"final accuracy <b>{signed:.4f}</b>" in page
    assert "<td>0.9800</td>" not in page  # the rounds table shows the signed accuracy too
    assert "MISMATCH" in page and "does not match the signed log" in page
    good = json.loads(get(base + "/api/runs/good")[1])
    assert good["figures"] == "verified" and good["mismatches"] == []
    assert "verified</span> (signed log)" in get(base + "/runs/good")[1]
    view = json.loads(get(base + "/api/runs/edited")[1])
    assert view["figures"] == "mismatch" and view["final_accuracy"] == pytest.approx(signed)
    assert view["rounds"][0]["accuracy"] == pytest.approx(good["rounds"][0]["accuracy"])
    assert any(m.startswith("metrics.json final_accuracy: 0.99 is not") for m in view["mismatches"])
    assert any(m.startswith("metrics.json rounds[0].accuracy (round 1): 0.98") for m in view["mismatches"])


def test_figures_without_a_signed_log_are_marked_unverified(root: Path, base: str) -> None:
    bare = Path(shutil.copytree(root / "good", root / "unrecorded"))
    (bare / "audit.jsonl").unlink()
    status, page = get(base + "/runs/unrecorded")
    assert status == 200 and "UNVERIFIED" in page
    assert json.loads(get(base + "/api/runs/unrecorded")[1])["figures"] == "unverified"
    forged = Path(shutil.copytree(root / "good", root / "forged"))  # the log edited to agree with metrics.json
    lines = read_lines(forged)
    i = next(i for i, line in enumerate(lines) if '"kind":"aggregation"' in line)
    entry = json.loads(lines[i])
    entry["body"]["metrics"]["accuracy"] = 0.97
    lines[i] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    write_lines(forged, lines)
    metrics = json.loads((forged / "metrics.json").read_text())
    metrics["rounds"][0]["accuracy"] = 0.97
    (forged / "metrics.json").write_text(json.dumps(metrics))
    view = json.loads(get(base + "/api/runs/forged")[1])
    assert view["figures"] == "unverified" and view["rounds"][0]["accuracy"] == 0.97
    assert any("the audit log does not verify" in p for p in view["problems"])


def _row(page: str, run: str) -> str:
    m = re.search(rf'<tr data-run="{re.escape(run)}">(.*?)</tr>', page, re.S)
    assert m, f"no row for run {run} on the index"
    return m.group(1)


def test_index_shows_status_verified_accuracy_verdict_and_modes(root: Path, base: str) -> None:
    """Trust at a glance: each run's status, its verified final accuracy, the audit's verdict and how it
    was protected (enclave, secure aggregation, differential privacy with the epsilon spent)."""
    view = json.loads(get(base + "/api/runs/good")[1])
    status, page = get(base + "/")
    assert status == 200
    row = _row(page, "good")
    assert "<td>finished</td>" in row and "<td>2 / 2 rounds</td>" in row
    assert f"{view['final_accuracy']:.4f}" in row and '<span class="ok">verified</span>' in row
    assert 'data-verdict="verified">VERIFIED<' in row
    top = max(p["epsilon"] for p in view["privacy"])
    assert view["modes"] == {"enclave": "off", "secagg": "off", "privacy": f"local (max epsilon {top:.2f})"}
    assert f"<td>local (max epsilon {top:.2f})</td>" in row and row.count("<td>off</td>") == 2
    assert view["verdict"]["state"] == "verified" and view["verdict"]["ok"]


def test_run_page_shows_verdict_ledger_rounds_privacy_chart_and_loss(root: Path, base: str) -> None:
    status, page = get(base + "/runs/good")
    assert status == 200 and 'id="verdict">Audit: <span class="badge verified" data-verdict="verified">' in page
    view = json.loads(get(base + "/api/runs/good")[1])
    metrics = json.loads((root / "good" / "metrics.json").read_text())
    assert [r["round"] for r in view["ledger_rounds"]] == [0, 1, 2]
    assert view["ledger_rounds"][-1]["model_hash"] == metrics["model_hash"]
    assert [r["updates"] for r in view["ledger_rounds"]] == [0, 3, 3]
    ledger = page.split('id="ledger-rounds"')[1].split("</table>")[0]
    assert ledger.count("<tr>") == 4 and f"<code>{metrics['model_hash'][:16]}…</code>" in ledger
    chart = page.split('id="privacy-chart"')[1].split("</svg>")[0]
    for p in view["privacy"]:
        assert f'data-party="{p["party"]}"' in chart and f"{p['epsilon']:.2f}" in chart
    assert page.count("<polyline") == 2 and "loss (last " in page and "accuracy (last " in page
    assert f"loss (last {view['rounds'][-1]['loss']:.4f})" in page


def test_pages_update_themselves_with_the_packaged_script_only(base: str) -> None:
    status, page, headers = fetch(base + "/runs/good")
    assert status == 200 and '<script src="/static/live.js" defer></script>' in page
    assert 'data-src="/runs/good/live" data-every="3"' in page and "<script>" not in page
    assert (
        "script-src 'self'" in headers["content-security-policy"]
        and "default-src 'none'" in headers["content-security-policy"]
    )
    status, js, headers = fetch(base + "/static/live.js")
    assert status == 200 and "fetch(main.dataset.src" in js and headers["content-type"].startswith("text/javascript")
    status, fragment = get(base + "/runs/good/live")
    assert status == 200 and "<html" not in fragment and "Rounds on the ledger" in fragment
    assert 'data-verdict="verified"' in fragment
    assert get(base + "/static/app.py")[0] == 404 and get(base + "/static/..%2Fapp.py")[0] == 404
    assert 'data-every="0"' not in get(base + "/runs/good?poll=0")[1] and "data-src" not in get(base + "/?poll=0")[1]
    assert 'data-src="/live"' in get(base + "/")[1]


def test_the_verdict_is_computed_once_and_an_edit_after_caching_flips_the_badge(root: Path, tmp_path: Path) -> None:
    """The index and run pages show the cached verdict: one verification per state of the run's files.
    An edit after caching, even one that keeps the file's size and modification time, is verified anew."""
    from trustfed.dashboard.app import create_app
    from trustfed.dashboard.verdicts import VerdictCache
    from trustfed.ledger.verify import verify_run

    calls: list[Path] = []

    def counting(folder: Path) -> Any:
        calls.append(folder)
        return verify_run(folder)

    runs = tmp_path / "runs"
    shutil.copytree(root / "good", runs / "r")
    with serve(create_app(runs, VerdictCache(counting))) as url:
        assert 'data-verdict="verified"' in get(url + "/runs/r")[1] and len(calls) == 1
        assert 'data-verdict="verified"' in _row(get(url + "/")[1], "r")
        assert 'data-verdict="verified"' in get(url + "/runs/r/live")[1]
        assert len(calls) == 1  # cached
        metrics = runs / "r" / "metrics.json"
        text, st = metrics.read_text(), metrics.stat()
        acc = repr(json.loads(text)["rounds"][0]["accuracy"])  # "0.2006...": its first decimal changed
        forged = text.replace(acc, acc[:2] + str((int(acc[2]) + 1) % 10) + acc[3:], 1)
        assert len(forged) == len(text) and forged != text
        metrics.write_text(forged)
        os.utime(metrics, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same modification time
        page = get(url + "/runs/r")[1]
        assert re.search(r"data-verdict=\"failed\">NOT VERIFIED: \d+ failure\(s\)", page), page.split("<main")[1][:600]
        assert len(calls) == 2
        assert 'data-verdict="failed"' in _row(get(url + "/")[1], "r") and len(calls) == 2
        metrics.write_text(text)
        assert 'data-verdict="verified"' in get(url + "/runs/r")[1] and len(calls) == 3
        (runs / "r" / "logs").mkdir(exist_ok=True)
        (runs / "r" / "logs" / "p000.log").write_text("a participant's log is not audited\n")
        assert 'data-verdict="verified"' in get(url + "/runs/r")[1] and len(calls) == 3
