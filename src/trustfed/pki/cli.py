"""``trustfed pki``: create a federation CA, issue and revoke certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from trustfed.pki.ca import PkiError, init_ca, issue, revoke

app = typer.Typer(help="Certificate authority: init, issue, revoke (ECDSA P-256).", no_args_is_help=True)
console = Console()


@app.command("init")
def init_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for ca.pem, ca.key (0600), crl.pem")],
    name: Annotated[str, typer.Option(help="CA common name")] = "trustfed root CA",
    days: Annotated[int, typer.Option(min=1, help="validity in days")] = 3650,
    force: Annotated[bool, typer.Option(help="replace an existing CA in OUT")] = False,
) -> None:
    """Create a root CA and an empty revocation list in OUT."""
    path = init_ca(out, common_name=name, days=days, force=force)
    console.print(
        f"[green]CA created[/green]: {path} (key {out / 'ca.key'}, mode 0600; revocation list {out / 'crl.pem'})"
    )


@app.command("issue")
def issue_cmd(
    ca: Annotated[Path, typer.Option("--ca", help="CA folder (from `trustfed pki init`)")],
    role: Annotated[str, typer.Option(help="coordinator | participant | enclave | admin")],
    name: Annotated[str, typer.Option(help="identity: the participant id (e.g. p000) or a coordinator name")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="folder for NAME.pem / NAME.key (default: the CA folder)")
    ] = None,
    host: Annotated[list[str] | None, typer.Option("--host", help="DNS name or IP to add as SAN (repeatable)")] = None,
    days: Annotated[int, typer.Option(min=1, help="validity in days")] = 365,
) -> None:
    """Issue a certificate carrying ROLE and NAME, signed by the CA."""
    cert, key = issue(ca, role, name, out=out, hosts=tuple(host or ()), days=days)
    console.print(f"[green]issued[/green] {role} certificate for {name}: {cert} (key {key}, mode 0600)")


@app.command("revoke")
def revoke_cmd(
    ca: Annotated[Path, typer.Option("--ca", help="CA folder")],
    name: Annotated[str | None, typer.Option(help="revoke every certificate issued to NAME")] = None,
    serial: Annotated[str | None, typer.Option(help="revoke one certificate by serial (hex)")] = None,
) -> None:
    """Add certificates to the CA's revocation list (crl.pem); a running coordinator re-reads it."""
    try:
        sn = int(serial, 16) if serial is not None else None
    except ValueError:
        raise PkiError(f"--serial {serial!r} is not a hexadecimal number") from None
    new = revoke(ca, name=name, serial=sn)
    what = name if name is not None else serial
    console.print(f"[yellow]revoked[/yellow] {what}: {len(new)} new serial(s) in {ca / 'crl.pem'}")
