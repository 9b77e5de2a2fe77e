"""``trustfed enclave``: run the attested aggregation service and inspect its artefacts.

trustfed enclave --config enclave.toml            serve evidence + aggregation over mutual TLS
trustfed enclave measure --config enclave.toml    print the (simulated) measurement to pin
trustfed enclave verify-receipt RECEIPT.json      check a receipt's signature and fields
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from trustfed.enclave.measurement import measure as _measure
from trustfed.enclave.receipts import Receipt, receipt_hash, verify_receipt
from trustfed.enclave.service import serve
from trustfed.enclave.settings import load_enclave_config

app = typer.Typer(
    help="Attested aggregation enclave: `trustfed enclave --config enclave.toml` serves it.",
    invoke_without_command=True,
    no_args_is_help=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="enclave TOML file")] = None,
    listen: Annotated[str | None, typer.Option(help="override enclave.listen (host:port)")] = None,
) -> None:
    """Serve the enclave (evidence + aggregation over gRPC with mutual TLS) until interrupted."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)

    cfg = load_enclave_config(config)
    server, port, enclave = serve(cfg, listen=listen)
    label = "SIMULATED (software only, no hardware root of trust)" if enclave.simulated else enclave.backend.name
    typer.echo(
        f"enclave serving on port {port}: backend {label}, key {enclave.key_id[:16]}…, "
        f"measurement {enclave.measurement}"
    )
    sys.stdout.flush()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(grace=2))
    try:
        server.wait_for_termination()
    finally:
        server.stop(grace=2)


@app.command()
def measure(config: Annotated[Path, typer.Option("--config", "-c", help="enclave TOML file")]) -> None:
    """Print the simulated backend's measurement of this code + the config's [aggregation]."""
    cfg = load_enclave_config(config, check_files=False)
    typer.echo(_measure(cfg.aggregation.measured()))


@app.command("verify-receipt")
def verify_receipt_cmd(
    receipt: Annotated[Path, typer.Argument(help="receipt JSON file")],
    measurement: Annotated[list[str] | None, typer.Option(help="expected measurement (repeatable)")] = None,
    output_hash: Annotated[str | None, typer.Option(help="expected output model hash")] = None,
    allow_simulated: Annotated[bool, typer.Option(help="accept SIMULATED receipts")] = False,
) -> None:
    """Verify a receipt's signature and, if given, its measurement and output hash (exit 1 if refused)."""
    try:
        data = receipt.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {receipt}: {exc.strerror}") from None
    r = Receipt.from_json(data)
    v = verify_receipt(
        r,
        expected_measurements=measurement or None,
        output_model_hash=output_hash,
        allow_simulated=allow_simulated,
    )
    label = " [SIMULATED]" if r.simulated else ""
    if v.ok:
        typer.echo(f"OK{label}: round {r.round}, receipt hash {receipt_hash(r)}")
        return
    typer.echo(f"REFUSED{label}: " + "; ".join(v.reasons), err=True)
    raise typer.Exit(1)
