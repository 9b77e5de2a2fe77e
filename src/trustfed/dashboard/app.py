"""The dashboard's web app (FastAPI): HTML pages rendered on the server, the same data as JSON.

    GET /                         the runs under the root folder
    GET /runs/{name}              one run: progress, accuracy chart, participants, incentives, privacy
    GET /runs/{name}/verify       the independent audit (``trustfed audit verify``), run on request
    GET /api/runs                 JSON: run names
    GET /api/runs/{name}          JSON: the run view
    GET /api/runs/{name}/verify   JSON: the audit verdict

Read-only: it never writes into a run folder. Every string from a run's files is HTML-escaped, and
pages use no scripts or external resources (``?refresh=N`` reloads a page every N seconds while a
run is recording). A SIMULATED enclave is labelled as such on every page that shows the run. The
figures a run page shows are the signed log's, flagged verified, MISMATCH (metrics.json reports other
figures, listed) or UNVERIFIED (no log that verifies backs them).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from trustfed.dashboard.runs import RunNotFound, RunView, list_runs, load_run, run_folder
from trustfed.ledger.verify import verify_run

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:72rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
th{background:#f3f3f3}.sim{background:#fff3cd;border:2px solid #e0a800;padding:.5rem 1rem;font-weight:bold}
.ok{color:#1a7f37;font-weight:bold}.bad{color:#c62828;font-weight:bold}.muted{color:#777}
code{font-size:.9em}
"""


_FIGURES = {
    "verified": '<span class="ok">verified</span> (signed log)',
    "mismatch": '<span class="bad">MISMATCH</span>: metrics.json differs from the signed log, shown here',
    "unverified": '<span class="bad">UNVERIFIED</span>: no signed log backs these figures',
}


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _page(title: str, body: str, refresh: int = 0) -> str:
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh > 0 else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}<title>{_e(title)} · trustfed</title>'
        f"<style>{_CSS}</style></head><body>{body}</body></html>"
    )


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else ("-" if v is None else str(v))


def accuracy_svg(rounds: list[dict[str, Any]], width: int = 560, height: int = 220) -> str:
    """Accuracy per round as an inline SVG polyline (empty string when no round has an accuracy)."""
    pts = [(int(r["round"]), float(r["accuracy"])) for r in rounds if r.get("accuracy") is not None]
    if not pts:
        return ""
    pad = 30
    last = max(p[0] for p in pts)
    first = min(p[0] for p in pts)
    span = max(last - first, 1)

    def xy(rnd: int, acc: float) -> str:
        x = pad + (rnd - first) / span * (width - 2 * pad)
        y = height - pad - max(0.0, min(1.0, acc)) * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(r, a) for r, a in pts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="accuracy per round">'
        f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" stroke="#ccc"/>'
        f'<text x="4" y="{pad + 4}" font-size="11">1.0</text><text x="4" y="{height - pad}" font-size="11">0.0</text>'
        f'<text x="{pad}" y="{height - 8}" font-size="11">round {first}</text>'
        f'<text x="{width - pad - 50}" y="{height - 8}" font-size="11">round {last}</text>'
        f'<polyline points="{line}" fill="none" stroke="#1565c0" stroke-width="2"/></svg>'
    )


def _enclave_banner(view: RunView) -> str:
    enc = view.enclave
    if not enc:
        return ""
    label = str(enc.get("label") or "")
    if label == "SIMULATED":
        return (
            '<p class="sim">Enclave: SIMULATED (software only, no hardware root of trust) · measurement '
            f"<code>{_e(str(enc.get('measurement') or '')[:16])}…</code></p>"
        )
    return f"<p>Enclave: {_e(label)} ({_e(enc.get('backend'))})</p>"


def render_index(names: list[str]) -> str:
    if not names:
        return _page("runs", "<h1>trustfed runs</h1><p>No run folders here yet.</p>")
    items = "".join(f'<li><a href="/runs/{_e(n)}">{_e(n)}</a></li>' for n in names)
    return _page("runs", f"<h1>trustfed runs</h1><ul>{items}</ul>")


def render_run(view: RunView, refresh: int = 0) -> str:
    fed = view.federation
    total = fed.get("rounds")
    done = len(view.rounds)
    progress = f"{done} / {total} rounds" if total else f"{done} rounds"
    parts = [
        f"<h1>Run {_e(view.name)}</h1>",
        _enclave_banner(view),
        f"<p>Status: <b>{_e(view.status)}</b> · {_e(progress)}",
        f" · final accuracy <b>{_fmt(view.final_accuracy)}</b>" if view.final_accuracy is not None else "",
        f" {_FIGURES[view.figures]}",
        f" · model <code>{_e(view.model_hash[:16])}…</code>" if view.model_hash else "",
        f' · <a href="/runs/{_e(view.name)}/verify">verify the audit log</a></p>',
    ]
    if view.mismatches:
        parts.append(
            '<h2 class="bad">metrics.json does not match the signed log</h2><p>The figures on this page are the '
            "signed ones; metrics.json reports these others:</p>" + _table(["mismatch"], [[m] for m in view.mismatches])
        )
    if view.problems:
        parts.append(
            "<h2>Problems</h2>"
            + _table(
                [
                    "file",
                ],
                [[p] for p in view.problems],
            )
        )
    parts.append("<h2>Accuracy</h2>" + (accuracy_svg(view.rounds) or '<p class="muted">no accuracy yet</p>'))
    parts.append(
        "<h2>Rounds</h2>"
        + _table(
            ["round", "accuracy", "loss", "seconds", "selected", "updates"],
            [
                [
                    r["round"],
                    _fmt(r["accuracy"]),
                    _fmt(r["loss"]),
                    _fmt(r["seconds"], 2),
                    len(r["participants"]),
                    len(r["updated_by"]),
                ]
                for r in view.rounds
            ],
        )
    )
    if view.participants:
        parts.append(
            "<h2>Ledger accounts</h2>"
            + _table(
                ["id", "role", "status", "reputation", "balance"],
                [[p["id"], p["role"], p["status"], _fmt(p["reputation"]), p["balance"]] for p in view.participants],
            )
        )
    if view.incentives:
        parts.append(
            "<h2>Incentives</h2>"
            + _table(
                ["round", "source", "rewards", "flagged"],
                [
                    [
                        i["round"],
                        i["source"],
                        ", ".join(f"{k} {v}" for k, v in sorted(i["rewards"].items())),
                        ", ".join(i["flagged"]) or "-",
                    ]
                    for i in view.incentives
                ],
            )
        )
    if view.privacy:
        parts.append(
            "<h2>Privacy spend</h2>"
            + _table(
                ["party", "kind", "epsilon", "budget", "rounds", "recomputed"],
                [
                    [p["party"], p["kind"], _fmt(p["epsilon"]), _fmt(p["budget"]), p["rounds"], p["verified"]]
                    for p in view.privacy
                ],
            )
        )
    parts.append('<p><a href="/">all runs</a></p>')
    return _page(f"run {view.name}", "".join(parts), refresh)


def verdict_json(folder: Path) -> dict[str, Any]:
    v = verify_run(folder)
    return {
        "ok": v.ok,
        "checked": dict(v.checked),
        "notes": list(v.notes),
        "failures": [
            {"file": f.file, "line": f.line, "round": f.round, "field": f.field, "message": f.message}
            for f in v.failures
        ],
    }


def render_verdict(name: str, v: dict[str, Any]) -> str:
    head = (
        '<p class="ok">VERIFIED</p>' if v["ok"] else f'<p class="bad">NOT VERIFIED: {len(v["failures"])} failure(s)</p>'
    )
    notes = "".join(f"<li>{_e(n)}</li>" for n in v["notes"])
    checked = _table(["checked", "count"], [[k, c] for k, c in sorted(v["checked"].items())])
    fails = (
        _table(
            ["where", "round", "field", "message"],
            [
                [
                    f["file"] + (f":{f['line']}" if f["line"] is not None else ""),
                    _fmt(f["round"]),
                    f["field"],
                    f["message"],
                ]
                for f in v["failures"]
            ],
        )
        if v["failures"]
        else ""
    )
    body = f"<h1>Audit of {_e(name)}</h1>{head}<ul>{notes}</ul>{checked}{fails}"
    return _page(f"audit {name}", body + f'<p><a href="/runs/{_e(name)}">back to the run</a></p>')


def create_app(root: Path) -> Any:
    """The dashboard over the run folders directly under ``root`` (or ``root`` itself)."""
    from fastapi import FastAPI, HTTPException, Query
    from fastapi.responses import HTMLResponse

    app = FastAPI(title="trustfed dashboard", docs_url=None, redoc_url=None, openapi_url=None)

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

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return render_index(list_runs(root))

    @app.get("/runs/{name}", response_class=HTMLResponse)
    def run_page(name: str, refresh: int = Query(0, ge=0, le=3600)) -> str:
        return render_run(view_of(name), refresh)

    @app.get("/runs/{name}/verify", response_class=HTMLResponse)
    def verify_page(name: str) -> str:
        return render_verdict(name, verdict_json(folder_of(name)))

    @app.get("/api/runs")
    def api_runs() -> dict[str, Any]:
        return {"runs": list_runs(root)}

    @app.get("/api/runs/{name}")
    def api_run(name: str) -> dict[str, Any]:
        return view_of(name).to_json()

    @app.get("/api/runs/{name}/verify")
    def api_verify(name: str) -> dict[str, Any]:
        return verdict_json(folder_of(name))

    return app
