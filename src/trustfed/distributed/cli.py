"""``trustfed train``: distributed training (DDP / TP / PP / DDP+PP) launched with torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trustfed.distributed.launch import launch_training
from trustfed.distributed.settings import load_train_config
from trustfed.distributed.verification import verify_run_report
from trustfed.errors import ConfigError, ConfigProblem

app = typer.Typer(
    help="Distributed training with torch.distributed: `trustfed train --config train.toml`.",
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback(invoke_without_command=True)
def train(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="train.toml")] = None,
    selfcheck: Annotated[
        bool, typer.Option(help="first check DDP/TP/PP against single-process results on this machine")
    ] = False,
) -> None:
    """Launch torchrun workers for CONFIG (strategy ddp | tp | pp | ddp+pp); resume from the newest
    verified checkpoint in the run folder if there is one."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console

    if config is None:
        raise ConfigError("trustfed train", [ConfigProblem("--config", "a train.toml file is required")])
    cfg = load_train_config(config)
    console = Console()
    la, p = cfg.launch, cfg.parallel
    console.print(
        f"[bold]trustfed train[/bold]: {p.strategy} on {la.nproc_per_node} process(es) x {la.nnodes} node(s), "
        f"{cfg.train.steps} steps -> {cfg.run.out}"
    )
    metrics = launch_training(cfg, selfcheck=selfcheck)
    if selfcheck:
        console.print(f"selfcheck: {cfg.run.out / 'selfcheck.json'}")
    losses = metrics.get("losses") or []
    last = losses[-1][1] if isinstance(losses, list) and losses else float("nan")
    console.print(
        f"done: step {metrics['steps']} (resumed from {metrics['start_step']}), loss {last:.4f}, "
        f"{float(str(metrics['tokens_per_s'])):.0f} tokens/s, model hash {str(metrics['model_hash'])[:16]}…; "
        f"provenance in {cfg.run.out / 'provenance.jsonl'}"
    )


@app.command("verify")
def verify(
    run_dir: Annotated[Path, typer.Argument(help="run folder of `trustfed train`")],
    rpc_url: Annotated[
        str | None, typer.Option(help="JSON-RPC node to read the anchors from (ledger = 'jsonrpc'; default: the run's)")
    ] = None,
) -> None:
    """Check the run's provenance chain and every checkpoint's hashes, and, when the run anchors on a
    ledger, every on-chain record against the log and the files (exit 1 on any mismatch)."""
    from rich.console import Console
    from rich.markup import escape

    v = verify_run_report(run_dir, rpc_url)
    console = Console()
    if v.problems:
        for pr in v.problems:
            console.print(f"[red]FAIL[/red] {escape(pr)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    anchored = f"; {v.anchors} on-chain record(s) match ({v.chain})" if v.chain else ""
    console.print(
        f"[green]OK[/green] {escape(str(run_dir))}: provenance chain intact, {v.checkpoints} checkpoint(s) match "
        f"their hashes{escape(anchored)}",
        soft_wrap=True,
    )
