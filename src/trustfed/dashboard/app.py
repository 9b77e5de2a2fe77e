"""The dashboard's web app (FastAPI): HTML pages rendered on the server, the same data as JSON.

    GET /                         the runs: status, verified final accuracy, audit verdict, protection modes
    GET /runs/{name}              one run: verdict badge, progress, accuracy and loss, rounds (and those on
                                  the ledger), participants and flags, incentives, privacy spend per party
    GET /runs/{name}/verify       the independent audit (``trustfed audit verify``) in full
    GET /live, /runs/{name}/live  the page's body alone: what the page's script fetches to update itself
    GET /api/runs                 JSON: run names
    GET /api/runs/{name}          JSON: the run view and its verdict
    GET /api/runs/{name}/verify   JSON: the audit verdict

Read-only: it never writes into a run folder. Pages are Jinja2 templates with autoescaping on, so every
string from a run's files is HTML-escaped; charts are inline SVG drawn from numbers computed here. The
only script, served from the package (no CDN, no network), re-fetches the page's body every few
seconds (``?poll=N``, 0: off; ``?refresh=N`` reloads the page instead); a Content-Security-Policy
allows nothing else. Verdicts come from a :class:`~trustfed.dashboard.verdicts.VerdictCache`: one
verification per state of a run's files. A SIMULATED enclave is labelled as such on every page that
shows the run. The figures a run page shows are the signed log's, flagged verified, MISMATCH
(metrics.json reports other figures, listed) or UNVERIFIED (no log that verifies backs them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from trustfed.dashboard.charts import line_chart, privacy_chart
from trustfed.dashboard.runs import RunNotFound, RunView, list_runs, load_run, run_folder
from trustfed.dashboard.verdicts import Verdict, VerdictCache, report_json
from trustfed.ledger.verify import verify_run

#: The browser may load this page's own stylesheet and script and fetch its own fragments; nothing else.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATIC = {"dashboard.css": "text/css; charset=utf-8", "live.js": "text/javascript; charset=utf-8"}
DEFAULT_POLL_S = 3


def fmt(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else ("-" if v is None else str(v))


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("trustfed.dashboard", "templates"),
        autoescape=True,  # every template, whatever its name: run files' strings are never markup
        undefined=StrictUndefined,
        trim_blocks=False,
    )
    env.filters["fmt"] = fmt
    return env


@dataclass(frozen=True)
class RunRow:
    view: RunView
    verdict: Verdict
    progress: str


def progress_of(view: RunView) -> str:
    total, done = view.federation.get("rounds"), len(view.rounds)
    return f"{done} / {total} rounds" if total else f"{done} rounds"


def flag_counts(view: RunView) -> dict[str, int]:
    """How many rounds each participant was flagged in (its update left out or rejected)."""
    return dict(Counter(pid for i in view.incentives for pid in i["flagged"]))


class Pages:
    """Renders the pages from run views and the cached verdicts."""

    def __init__(self, root: Path, verdicts: VerdictCache) -> None:
        self.root, self.verdicts, self.env = root, verdicts, environment()

    def _render(self, template: str, **ctx: Any) -> str:
        return self.env.get_template(template).render(**ctx)

    def rows(self) -> list[RunRow]:
        out = []
        for name in list_runs(self.root):
            try:
                view = load_run(self.root, name)
            except RunNotFound:
                continue  # removed since it was listed
            out.append(RunRow(view, self.verdicts.verdict(run_folder(self.root, name)), progress_of(view)))
        return out

    def index(self, poll: int, fragment: bool = False) -> str:
        ctx = {"runs": self.rows(), "title": "runs", "refresh": 0, "live_src": "/live", "poll": poll}
        return self._render("index_body.html" if fragment else "index.html", **ctx)

    def run(self, view: RunView, verdict: Verdict, refresh: int, poll: int, fragment: bool = False) -> str:
        ctx = {
            "view": view,
            "verdict": verdict,
            "progress": progress_of(view),
            "acc_chart": line_chart(view.rounds, "accuracy", "accuracy", unit_range=True),
            "loss_chart": line_chart(view.rounds, "loss", "loss", unit_range=False),
            "privacy_chart": privacy_chart(view.privacy),
            "flags": flag_counts(view),
            "title": f"run {view.name}",
            "refresh": refresh,
            "live_src": f"/runs/{view.name}/live",
            "poll": poll,
        }
        return self._render("run_body.html" if fragment else "run.html", **ctx)

    def verify(self, name: str, v: dict[str, Any]) -> str:
        checked = [[k, c] for k, c in sorted(v["checked"].items())]
        failures = [
            [
                f["file"] + (f":{f['line']}" if f["line"] is not None else ""),
                fmt(f["round"]),
                f["field"],
                f["message"],
            ]
            for f in v["failures"]
        ]
        return self._render(
            "verify.html",
            name=name,
            v=v,
            checked=checked,
            failures=failures,
            title=f"audit {name}",
            refresh=0,
            live_src=None,
            poll=0,
        )


def verdict_json(folder: Path) -> dict[str, Any]:
    """The audit of ``folder`` run now (the verify page runs it on request, whatever is cached)."""
    return report_json(verify_run(folder))


def create_app(root: Path, verdicts: VerdictCache | None = None) -> Any:
    """The dashboard over the run folders directly under ``root`` (or ``root`` itself)."""
    from fastapi import FastAPI, HTTPException, Query, Request, Response
    from fastapi.responses import HTMLResponse

    app = FastAPI(title="trustfed dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    pages = Pages(root, verdicts or VerdictCache())

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        return response

    def view_of(name: str) -> RunView:
        try:
            return load_run(root, name)
        except RunNotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    def folder_of(name: str) -> Path:
        try:
            return run_folder(root, name)
        except RunNotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    poll_q = Query(DEFAULT_POLL_S, ge=0, le=3600)

    @app.get("/", response_class=HTMLResponse)
    def index(poll: int = poll_q) -> str:
        return pages.index(poll)

    @app.get("/live", response_class=HTMLResponse)
    def index_live() -> str:
        return pages.index(0, fragment=True)

    @app.get("/runs/{name}", response_class=HTMLResponse)
    def run_page(name: str, refresh: int = Query(0, ge=0, le=3600), poll: int = poll_q) -> str:
        view = view_of(name)
        return pages.run(view, pages.verdicts.verdict(folder_of(name)), refresh, 0 if refresh else poll)

    @app.get("/runs/{name}/live", response_class=HTMLResponse)
    def run_live(name: str) -> str:
        view = view_of(name)
        return pages.run(view, pages.verdicts.verdict(folder_of(name)), 0, 0, fragment=True)

    @app.get("/runs/{name}/verify", response_class=HTMLResponse)
    def verify_page(name: str) -> str:
        return pages.verify(name, verdict_json(folder_of(name)))

    @app.get("/static/{file}")
    def static(file: str) -> Response:
        if file not in STATIC:
            raise HTTPException(status_code=404, detail="no such file")
        body = resources.files("trustfed.dashboard").joinpath("static", file).read_bytes()
        return Response(body, media_type=STATIC[file])

    @app.get("/api/runs")
    def api_runs() -> dict[str, Any]:
        return {"runs": list_runs(root)}

    @app.get("/api/runs/{name}")
    def api_run(name: str) -> dict[str, Any]:
        view = view_of(name)
        return {**view.to_json(), "verdict": pages.verdicts.verdict(folder_of(name)).to_json()}

    @app.get("/api/runs/{name}/verify")
    def api_verify(name: str) -> dict[str, Any]:
        return verdict_json(folder_of(name))

    return app
