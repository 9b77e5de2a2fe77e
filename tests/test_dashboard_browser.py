"""The dashboard in a real browser during a live run: headless Chromium (the system's package, driven by
selenium) watches ``trustfed demo`` run (coordinator, SIMULATED enclave and participant processes over
mutual TLS, DP-SGD, one malicious participant) and checks, without reloading the page, that it moves
from recording to finished, shows the run's real figures and the audit's verdict, and flips the badge
when a file is edited afterwards. Screenshots go to ``test-artifacts/dashboard-browser/`` (ignored by
git). Skips, saying why, where chromium, chromedriver or selenium is missing (``make test`` installs
chromium with apt-get when it can)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.test_dashboard import serve

from trustfed.ledger.verify import signed_figures, verify_run
from trustfed.privacy.report import load_records, summarize

pytest.importorskip("uvicorn", reason="the dashboard extra (uvicorn) is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "no chromium / chromedriver on PATH: the browser test needs them (apt-get install chromium chromium-driver, "
        "or make test as root)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
from selenium.webdriver.chrome.service import Service  # noqa: E402

# Keep Chromium off the network (this machine has none) and runnable as root.
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ROUNDS = 3


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Path:
    folder = Path(request.config.rootpath) / "test-artifacts" / "dashboard-browser"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"screenshots in {folder}")
    return folder


@pytest.fixture
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for a in ARGS:
        options.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 2400, "deviceScaleFactor": 1, "mobile": False}
    )
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(
    what: str, check: Callable[[], bool], timeout_s: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return
        if proc is not None and proc.poll() not in (None, 0):
            raise AssertionError(f"the demo exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# The page swaps its body in place every second: read it in one script call, never through element
# references that the next swap makes stale.
def text_of(driver: Any, css: str) -> str:
    return str(
        driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)
    )


def texts_of(driver: Any, css: str) -> list[str]:
    got = driver.execute_script("return [...document.querySelectorAll(arguments[0])].map(e => e.textContent);", css)
    return [str(t) for t in got]


def verdict_of(driver: Any) -> str:
    return text_attr(driver, "#verdict [data-verdict]", "data-verdict")


def text_attr(driver: Any, css: str, attr: str) -> str:
    script = "const e = document.querySelector(arguments[0]); return e ? (e.getAttribute(arguments[1]) || '') : '';"
    return str(driver.execute_script(script, css, attr))


def test_the_dashboard_follows_a_live_run_in_chromium(tmp_path: Path, artifacts: Path, browser: Any) -> None:
    from trustfed.dashboard.app import create_app

    root = tmp_path / "runs"
    run = root / "live"
    root.mkdir()
    log = (artifacts / "demo.log").open("wb")
    cmd = [sys.executable, "-m", "trustfed.cli", "demo", "--out", str(run), "--rounds", str(ROUNDS)]
    proc = subprocess.Popen([*cmd, "--participants", "4"], stdout=log, stderr=subprocess.STDOUT)
    try:
        with serve(create_app(root)) as url:
            wait_for("the run's audit log", lambda: (run / "audit.jsonl").is_file(), 300, proc)
            browser.get(f"{url}/runs/live?poll=1")
            assert text_of(browser, "#status") == "recording" and verdict_of(browser) == "pending"
            browser.save_screenshot(str(artifacts / "1-recording.png"))
            browser.execute_script("window.notReloaded = true;")  # gone if the page reloads

            def finished() -> bool:
                return text_of(browser, "#status") == "finished" and verdict_of(browser) != "pending"

            wait_for("the page to show the finished run", finished, 600, proc)
            assert proc.wait(timeout=120) == 0
            browser.save_screenshot(str(artifacts / "2-finished.png"))
            assert browser.execute_script("return window.notReloaded === true;"), "the page was reloaded"
            assert int(text_attr(browser, "#live", "data-updates") or 0) >= 1

            # the run's real values: the signed final accuracy, the verifier's verdict, every round,
            # the chain's round records, the epsilon each party spent, the malicious participant flagged
            metrics = json.loads((run / "metrics.json").read_text())
            signed = signed_figures(run, metrics).aggregations[ROUNDS]["metrics"]["accuracy"]
            assert text_of(browser, "#final-accuracy") == f"final accuracy {signed:.4f}"
            assert verify_run(run).ok and verdict_of(browser) == "verified"
            assert text_of(browser, "#verdict [data-verdict]") == "VERIFIED"
            assert text_of(browser, "#progress") == f"{ROUNDS} / {ROUNDS} rounds"
            assert len(texts_of(browser, "#rounds tr")) == ROUNDS + 1
            assert len(texts_of(browser, "#ledger-rounds tr")) == ROUNDS + 2  # and round 0, the initial model
            for s in summarize(load_records(run)):
                (bar,) = texts_of(browser, f'#privacy-chart g[data-party="{s.party}"]')
                assert f"{s.epsilon:.2f}" in bar
            (bad,) = metrics["attack"]["malicious"]
            assert texts_of(browser, "#incentives td.flagged") == [bad] * ROUNDS
            assert "SIMULATED" in text_of(browser, "#modes") and "local (max epsilon" in text_of(browser, "#modes")

            browser.get(f"{url}/?poll=1")
            row = text_of(browser, 'tr[data-run="live"]')
            assert "VERIFIED" in row and f"{signed:.4f}" in row and "finished" in row
            browser.save_screenshot(str(artifacts / "3-index.png"))

            # an edit after the verdict was cached flips the badge on the open page, still without reload
            browser.get(f"{url}/runs/live?poll=1")
            browser.execute_script("window.notReloaded = true;")
            metrics["final_accuracy"] = 0.99
            (run / "metrics.json").write_text(json.dumps(metrics))
            wait_for("the badge to flip", lambda: verdict_of(browser) == "failed", 60)
            assert browser.execute_script("return window.notReloaded === true;")
            assert "NOT VERIFIED" in text_of(browser, "#verdict") and "0.9900" not in text_of(
                browser, "#final-accuracy"
            )
            browser.save_screenshot(str(artifacts / "4-edited.png"))
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        log.close()
    for name in ("1-recording", "2-finished", "3-index", "4-edited"):
        assert (artifacts / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
