"""The ``trustfed`` command: a thin typer front over the library.

User mistakes (bad config, flags, files) print one clear message and exit non-zero without a
traceback; see :class:`trustfed.errors.TrustFedError`.
"""

from __future__ import annotations

import gc
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

import trustfed
from trustfed.config import load_federation_config, validate_federation_config
from trustfed.coordinator.local_federation import run_local_federation
from trustfed.coordinator.provision import provision as provision_kits
from trustfed.coordinator.run_report import trust_report
from trustfed.core.evaluation import final_headline, round_headline
from trustfed.core.rounds import RoundRecord
from trustfed.core.strategy import RoundPlan, RoundResult, Update
from trustfed.errors import ConfigError, ConfigProblem, TrustFedError
from trustfed.simulation.runner import run_simulation, versions
from trustfed.templates import new_project

app = typer.Typer(
    name="trustfed",
    help="Trusted federated learning and distributed training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Check federation configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console()
err_console = Console(stderr=True)

# Component command groups: each module exposes ``app: typer.Typer`` and keeps heavy imports
# inside its commands, so ``trustfed --help`` stays fast. One line per component.
COMPONENT_APPS: list[tuple[str, str]] = [
    ("ledger", "trustfed.ledger.cli"),
    ("audit", "trustfed.ledger.audit_cli"),
    ("privacy", "trustfed.privacy.cli"),
    ("pki", "trustfed.pki.cli"),
    ("server", "trustfed.coordinator.server_cli"),
    ("client", "trustfed.participant.client_cli"),
    ("enclave", "trustfed.enclave.cli"),
    ("train", "trustfed.distributed.cli"),
    ("dashboard", "trustfed.dashboard.cli"),
]


def _print_version(value: bool) -> None:
    if value:
        console.print(f"trustfed {trustfed.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print trustfed's version and exit"),
    ] = False,
) -> None:
    """Trusted federated learning and distributed training."""


def _register_components() -> None:
    for name, module in COMPONENT_APPS:
        sub = importlib.import_module(module).app
        app.add_typer(sub, name=name)


@app.command()
def version() -> None:
    """Print trustfed's version and those of its key dependencies."""
    for k, v in versions().items():
        console.print(f"{k} {v}")


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="federation TOML file")]) -> None:
    """Validate FILE and list every problem at once (exit 2 when invalid)."""
    cfg = load_federation_config(file)
    f = cfg.federation
    console.print(
        f"[green]OK[/green] {file}: federation {f.name!r}, {f.participants} participants, {f.rounds} rounds, "
        f"dataset {cfg.data.dataset}, strategy {cfg.strategy.name} ({cfg.strategy.aggregator})"
    )


class RoundStatus:
    """A RoundObserver that shows, in the progress bar's status, which round is running: otherwise the
    bar says nothing while the first round (or a long one) runs."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress, self.task = progress, task

    def on_round_start(self, plan: RoundPlan, params: torch.Tensor) -> None:
        n = len(plan.participants)
        self.progress.update(self.task, status=f"round {plan.round} running ({n} participants)")

    def on_round_end(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> None:
        pass


def _run_with_progress(cfg: Any, out: Path, *, plot: bool = True) -> dict[str, Any]:
    # What is loaded by now (torch, the config models: some 200k objects) lives as long as this
    # command's process: frozen, it is no longer rescanned by the collector's full passes and at exit
    # (about half a second of a short simulation).
    gc.freeze()
    with Progress(
        TextColumn("[bold]rounds"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        auto_refresh=console.is_terminal,  # redrawn ten times a second on a terminal only; a pipe gets the rounds
    ) as progress:
        task = progress.add_task("rounds", total=cfg.federation.rounds, status="starting: data and model")

        def on_round(rec: Any) -> None:
            figures = round_headline(rec.metrics)
            progress.console.print(
                f"round {rec.round:>3}: {figures}  ({len(rec.participants)} participants, {rec.seconds:.2f} s)"
            )
            progress.update(task, advance=1, status=figures.split("  ")[0])

        result = run_simulation(cfg, out, on_round, [RoundStatus(progress, task)], plot=plot)
    return result.metrics


def _result_rows(metrics: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for r in metrics["rounds"]:
        fed = r.get("federated_evaluation", {})
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in fed.items() if k not in ("num_examples", "participants", "model_round")
        )
        rows.append((str(r["round"]), f"{r['accuracy']:.4f}", f"{r['loss']:.4f}", shown, f"{r['seconds']:.2f}"))
    return rows


def _result_table(rows: list[tuple[str, ...]], keep: int, out: Path) -> Table:
    """The rounds as a table; beyond ``keep`` rows, the first few and the last ones with a line that
    says how many were left out and where they all are."""
    table = Table(title="federation result")
    table.add_column("round", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("federated evaluation", justify="left")
    table.add_column("seconds", justify="right")
    if keep >= len(rows):
        shown: list[tuple[str, ...]] = rows
    else:
        first = min(3, keep // 3)
        left_out = len(rows) - keep
        gap = ("…", "", "", f"{left_out} rounds left out; see metrics.json", "")
        shown = [*rows[:first], gap, *rows[len(rows) - (keep - first) :]]
    for row in shown:
        table.add_row(*row)
    return table


def _height(renderable: Any) -> int:
    return len(console.render_lines(renderable, console.options, pad=False))


def _rows_that_fit(rows: list[tuple[str, ...]], out: Path, budget: int) -> int:
    """How many rows of the table fit in ``budget`` terminal lines (at least two: the first and last round)."""
    if len(rows) <= 2 or _height(_result_table(rows, len(rows), out)) <= budget:
        return len(rows)
    per_row = max(1, _height(_result_table(rows[:2], 2, out)) - _height(_result_table(rows[:1], 1, out)))
    keep = max(2, (budget - _height(_result_table(rows[:1], 1, out))) // per_row)
    while keep > 2 and _height(_result_table(rows, keep, out)) > budget:
        keep -= 1
    return keep


def _final_table(metrics: dict[str, Any], out: Path, *, plot: bool = True) -> None:
    """The rounds and the headline; on a terminal, cut to fit its height (metrics.json has every round)."""
    headline = escape(final_headline(metrics))
    files = f"{out}/metrics.json and {out}/metrics.png" if plot else f"{out}/metrics.json"
    summary = (
        f"{headline} in {metrics['total_seconds']:.1f} s; model hash {metrics['model_hash'][:16]}…; results in {files}"
    )
    rows = _result_rows(metrics)
    keep = len(rows)
    if console.is_terminal:  # a pipe or a file gets every round
        keep = _rows_that_fit(rows, out, console.size.height - _height(summary) - 1)  # and the shell's prompt
    console.print(_result_table(rows, keep, out))
    console.print(summary)


@app.command("new")
def new(
    folder: Annotated[Path, typer.Argument(help="the new project's folder (must not exist, or be empty)")],
    template: Annotated[str, typer.Option(help="tabular | vision | text | assistant")] = "tabular",
    sites: Annotated[int, typer.Option(help="how many sites (participants), each with its own data folder")] = 3,
    seed: Annotated[int, typer.Option(min=0, help="seed of the generated sample data")] = 0,
) -> None:
    """Write a ready federation project: the app module, the federation file, one participant file and
    data folder per site (generated samples), a README and a test (assistant: and a tiny pre-trained
    base language model)."""
    if template == "assistant":
        console.print("pre-training the assistant's tiny base model into base/ (seconds to a minute)…", highlight=False)
    fed = new_project(folder, template, sites=sites, seed=seed)
    console.print(f"[green]created[/green] {folder} ({template}, {sites} sites). Next:")
    console.print(f"  cd {folder} && trustfed simulate --config {fed.name} --out runs/sim", highlight=False)
    console.print("  (README.md shows how to run each site as its own process)", highlight=False)


@app.command()
def provision(
    project: Annotated[Path, typer.Argument(help="project file: the federation, the coordinator's address, the sites")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="folder for the kits (one per site, the coordinator's)")
    ] = Path("kits"),
    force: Annotated[bool, typer.Option("--force", help="replace kit folders already in OUT")] = False,
) -> None:
    """Write a startup kit per site and the coordinator's: certificate and key, CA and revocation list,
    config, start.sh and README; OUT/ca keeps the CA's key (not shipped). See docs/deploy.md."""
    kits = provision_kits(project, out, force=force)
    table = Table(title=f"kits in {out}")
    table.add_column("kit")
    table.add_column("identity")
    table.add_column("start")
    for kit in kits:
        table.add_row(str(kit.folder), kit.identity, f"cd {kit.folder} && {kit.start}")
    console.print(table)
    console.print(f"the CA's private key stays in {out}/ca (revoke with `trustfed pki revoke --ca {out}/ca`)")


@app.command()
def simulate(
    config: Annotated[Path, typer.Option("--config", "-c", help="federation TOML file")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for metrics.json and the plot")],
    backend: Annotated[str | None, typer.Option(help="override simulation.backend: inprocess|multiprocess|ray")] = None,
    plot: Annotated[bool, typer.Option(help="also draw DIR/metrics.png (matplotlib adds about a second)")] = True,
) -> None:
    """Run N virtual participants on this machine and write DIR/metrics.json and a plot."""
    cfg = load_federation_config(config)
    if backend is not None:
        raw = cfg.model_dump(mode="json")
        raw["simulation"]["backend"] = backend
        cfg = validate_federation_config(raw, f"--backend {backend}")
    metrics = _run_with_progress(cfg, out, plot=plot)
    _final_table(metrics, out, plot=plot)


class FirstRoundNotice:
    """A RoundObserver that says when the first round starts: the participants have joined, and the
    minute of training before its result would otherwise pass in silence."""

    def on_round_start(self, plan: RoundPlan, params: torch.Tensor) -> None:
        if plan.round == 1:
            console.print(f"round   1 running: {len(plan.participants)} participants train locally…")

    def on_round_end(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> None:
        pass


def demo_config(rounds: int, participants: int, seed: int) -> dict[str, Any]:
    """The demo federation: digits, an even split, FedAvg through Multi-Krum; DP-SGD in every honest
    participant; one participant in five malicious (its updates reversed and scaled ten times); the
    ledger and incentives on, so that the robust aggregator's verdict flags it and costs it reputation."""
    return {
        "federation": {"name": "digits-demo", "rounds": rounds, "participants": participants, "seed": seed},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [128]},
        "training": {"local_epochs": 2, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
        # Multi-Krum keeps the n - 1 updates closest to the others: a malicious one is left out, and flagged
        "strategy": {
            "name": "fedavg",
            "aggregator": "multi_krum",
            "aggregator_params": {"num_malicious": 1},
            "min_participants": min(2, participants),
        },
        # DP-SGD in each participant: every example's gradient clipped to 1, Gaussian noise of std 1
        "privacy": {"mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "budget_epsilon": 20.0},
        "attack": {"kind": "sign_flip", "fraction": 0.2, "params": {"scale": 10.0}, "seed": seed},
        "ledger": {"enabled": True},  # audit log, checkpoints and the embedded chain in OUT
        # contributions, reputation and rewards each round, on chain; a stake that flagged updates lose a share of
        "incentives": {"enabled": True, "stake": 1000, "slash_fraction": 0.1},
    }


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the run's results")] = Path("runs/demo"),
    rounds: Annotated[int, typer.Option(min=1, max=1000, help="federated rounds")] = 10,
    participants: Annotated[int, typer.Option(min=2, max=100, help="participants")] = 5,
    seed: Annotated[int, typer.Option(min=0, help="seed for data split, partition and training")] = 0,
    transport: Annotated[
        str,
        typer.Option(
            help="grpc: a fresh PKI, the coordinator and one process per participant over mutual TLS; inprocess: the simulation"
        ),
    ] = "grpc",
    ddp_workers: Annotated[
        int, typer.Option(min=0, max=8, help="train participant p000 across N DDP worker processes (torchrun)")
    ] = 0,
    confidentiality: Annotated[
        str,
        typer.Option(
            help="grpc: how updates stay hidden from the coordinator: enclave (a SIMULATED enclave aggregates sealed "
            "updates) or secagg (secure aggregation: the coordinator recovers only the sum of masked inputs)"
        ),
    ] = "enclave",
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="the port of the dashboard command printed at the end")
    ] = 8080,
) -> None:
    """A whole federation on scikit-learn's digits with differential privacy on and one malicious
    participant that the robust aggregator catches; ends with the audit's verdict and the dashboard."""
    raw = demo_config(rounds, participants, seed)
    if confidentiality not in ("enclave", "secagg"):
        raise ConfigError(
            "--confidentiality",
            [ConfigProblem("--confidentiality", "expected enclave or secagg", repr(confidentiality))],
        )
    secagg = confidentiality == "secagg"
    if secagg:  # pairwise masks + Shamir shares; see trustfed.secagg (the server sees sums: no robust rule)
        raw["secagg"] = {"enabled": True, "clip": 0.5, "bits": 20, "weighted": True}  # FedAvg weights
        raw["strategy"] = {**raw["strategy"], "aggregator": "mean", "aggregator_params": {}}
        raw.pop("attack")
        raw.pop("privacy")
    elif transport == "grpc":  # aggregation in a SIMULATED enclave process (software only; see trustfed.enclave)
        raw["enclave"] = {
            "enabled": True,
            "backend": "simulated",
            "allow_simulated_tee": True,
            "policy": {"allow_simulated_tee": True},
        }
    if ddp_workers:  # see trustfed.distributed.participant (DP-SGD does not run across DDP workers)
        raw.pop("privacy", None)
        raw["participant_training"] = {
            "trainer": "ddp",
            "workers": ddp_workers,
            "participants": ["p000"],
            "workdir": str((out / "ddp").resolve()),
        }
    cfg = validate_federation_config(raw, "demo flags")
    bad = cfg.attack.malicious([f"p{i:03d}" for i in range(participants)])
    console.print(
        f"[bold]trustfed demo[/bold]: {participants} participants, digits, {rounds} rounds, seed {seed} -> {out}"
    )
    if cfg.privacy.mode != "none":
        console.print("differential privacy: DP-SGD in every participant (clip 1.0, noise multiplier 1.0)")
    if bad:
        console.print(
            f"malicious: {', '.join(bad)} sends its update reversed and scaled x10 "
            f"(attack {cfg.attack.kind}); the aggregator is {cfg.strategy.aggregator}"
        )
    if (
        transport == "grpc"
    ):  # trustfed.coordinator.local_federation: OUT/pki, OUT/federation.toml, OUT/participants, OUT/logs
        console.print(
            f"fresh PKI in {out}/pki; coordinator here, {participants} participant processes, mutual TLS on 127.0.0.1"
        )
        if secagg:
            console.print(
                "secure aggregation: participants sign their keys, mask their deltas and commit to the masked inputs "
                "on chain; the coordinator recovers only their sum"
            )
        else:
            console.print(
                "[bold yellow]enclave: SIMULATED[/bold yellow] (software only, no hardware root of trust; allowed by "
                "this demo's config): participants attest it, seal their updates to it; the coordinator relays "
                "ciphertext"
            )
        metrics = run_local_federation(
            raw,
            out,
            on_round=lambda rec: console.print(
                f"round {rec.round:>3}: accuracy {rec.metrics.get('accuracy', float('nan')):.4f}  ({rec.seconds:.2f} s)"
            ),
            observers=[FirstRoundNotice()],
            on_progress=lambda line: console.print(line, highlight=False),
        )[1]
    elif transport == "inprocess":
        metrics = _run_with_progress(cfg, out)
    else:
        raise ConfigError("--transport", [ConfigProblem("--transport", "expected grpc or inprocess", repr(transport))])
    _final_table(metrics, out)
    for line in trust_report(out, bad, port):
        console.print(line, highlight=False)


_register_components()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except TrustFedError as exc:
        err_console.print(
            f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True
        )
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
