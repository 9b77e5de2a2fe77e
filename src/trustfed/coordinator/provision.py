"""Provisioning kits: ``trustfed provision project.toml --out DIR`` writes one folder per site and one
for the coordinator, each ready to copy to its host and start.

A project file names the federation, where the coordinator is reached and the sites:

```toml
federation = "federation.toml"     # the federation file (relative to this one); or its sections
                                   # inline under [config] ([config.federation], [config.model], ...)
[coordinator]
host = "10.0.0.1"                  # the address sites dial; also a name in the coordinator's certificate
port = 50051
# listen = "0.0.0.0:50051"         # what it binds (default: every address, this port)
# hosts = ["coord.example.org"]    # more names for its certificate

[[sites]]
name = "hospital-a"                # its kit's folder
# id = "p000"                      # its participant id (default: p000, p001, ... in file order)
# coordinator = "10.1.0.1:50051"   # how this site reaches the coordinator (default: host:port)
# data = { path = "/srv/data/train.csv" }   # this site's own [data] (a federation app's loader)
[[sites]]
name = "hospital-b"
```

``DIR/coordinator`` holds ``federation.toml`` (with ``[transport]``), ``coordinator.pem``/``.key`` (0600),
``ca.pem``, ``crl.pem``, ``start.sh`` and ``README.md``; each ``DIR/<site>`` holds ``participant.toml``,
the same federation file (without the coordinator's ``[transport]``), ``<id>.pem``/``.key`` (0600),
``ca.pem``, ``crl.pem``, ``start.sh`` and ``README.md``. Every path in a kit is relative to the kit.
``DIR/ca`` keeps the CA's private key and its index: the operator's, for revocation, never shipped.

The files are those of :mod:`trustfed.coordinator.local_federation` (one writer for both). Every
problem in the project (unknown keys, missing site names, duplicate names or ids, a federation
that does not validate) is reported at once before anything is written; an existing kit folder is
replaced only with ``force``. Kits are written to a staging folder first and moved into place.
"""

from __future__ import annotations

import secrets
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trustfed.config import (
    load_federation_config,
    parse_toml,
    participant_ids,
    problems_from_validation,
    resolve_path,
    validate_federation_config,
)
from trustfed.coordinator.local_federation import participant_document, to_toml, transport_section
from trustfed.errors import ConfigError, ConfigProblem
from trustfed.pki.ca import CA_CERT, CRL_FILE, init_ca, issue

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_ADDRESS = r"^.+:[0-9]{1,5}$"
COORDINATOR_KIT = "coordinator"
CA_FOLDER = "ca"
# Sites may start long before the coordinator: about two and a half minutes of retries.
KIT_RETRY = {"attempts": 30, "initial_backoff_s": 0.5, "max_backoff_s": 5.0}


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CoordinatorEntry(_Entry):
    host: str = Field(min_length=1, description="the address sites dial (a DNS name or an IP address)")
    port: int = Field(ge=1, le=65535)
    listen: str | None = Field(None, pattern=_ADDRESS, description="host:port it binds (default 0.0.0.0:PORT)")
    hosts: list[str] = Field(default_factory=list, description="more names for the coordinator's certificate")


class SiteEntry(_Entry):
    name: str = Field(pattern=_NAME, description="the kit's folder name")
    id: str | None = Field(None, pattern=_NAME, description="participant id (default: by order, p000, p001, ...)")
    coordinator: str | None = Field(None, pattern=_ADDRESS, description="host:port this site dials")
    data: dict[str, Any] | None = Field(None, description="this site's own [data] section")


class ProjectFile(_Entry):
    federation: Path | None = Field(None, description="the federation file, relative to the project file")
    config: dict[str, Any] | None = Field(None, description="the federation file's sections, inline")
    coordinator: CoordinatorEntry
    sites: list[SiteEntry] = Field(min_length=1)


@dataclass(frozen=True)
class Kit:
    """One written kit: its folder, who it is (``coordinator`` or a participant id) and how it starts."""

    folder: Path
    identity: str
    start: str


def _load_project(path: Path) -> tuple[ProjectFile, dict[str, Any]]:
    """The validated project and its federation as a raw dict (relative paths as written)."""
    raw = parse_toml(path)
    try:
        project = ProjectFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(str(path), problems_from_validation(exc)) from None
    problems = _site_problems(project)
    federation: dict[str, Any] = {}
    if (project.federation is None) == (project.config is None):
        problems.append(ConfigProblem("federation", "give exactly one: a federation file, or [config] sections"))
    elif project.federation is not None:
        fed_path = project.federation if project.federation.is_absolute() else path.parent / project.federation
        try:
            load_federation_config(fed_path)  # every problem of the federation file, in its own name
        except ConfigError as exc:
            problems += [ConfigProblem(f"federation: {p.field}", p.message, p.got) for p in exc.problems]
        else:
            federation = parse_toml(fed_path)
    else:
        federation = dict(project.config or {})
    if not problems:
        problems += _federation_problems(federation, project, path.parent)
    if problems:
        raise ConfigError(str(path), problems)
    return project, federation


def _site_problems(project: ProjectFile) -> list[ConfigProblem]:
    out: list[ConfigProblem] = []
    ids = _site_ids(project)
    for i, site in enumerate(project.sites):
        where = f"sites.{i}"
        if site.name in (COORDINATOR_KIT, CA_FOLDER):
            out.append(ConfigProblem(f"{where}.name", "reserved for the coordinator's kit and the CA", site.name))
        if [s.name for s in project.sites].count(site.name) > 1:
            out.append(ConfigProblem(f"{where}.name", "two sites have this name", site.name))
        if ids.count(ids[i]) > 1:
            out.append(ConfigProblem(f"{where}.id", "two sites have this participant id", ids[i]))
    expected = participant_ids(len(project.sites))
    if len(set(ids)) == len(ids) and sorted(ids) != expected:
        out.append(
            ConfigProblem(
                "sites.id",
                f"a federation of {len(ids)} participants has the ids {', '.join(expected)}",
                ", ".join(sorted(ids)),
            )
        )
    return out


def _site_ids(project: ProjectFile) -> list[str]:
    defaults = participant_ids(len(project.sites))
    return [site.id or defaults[i] for i, site in enumerate(project.sites)]


def _federation_problems(federation: dict[str, Any], project: ProjectFile, base: Path) -> list[ConfigProblem]:
    """The federation must validate, with as many participants as there are sites."""
    n = len(project.sites)
    section = federation.get("federation", {})
    given = section.get("participants") if isinstance(section, Mapping) else None
    if given is not None and given != n:
        return [ConfigProblem("federation.participants", f"the project has {n} sites", repr(given))]
    checked = _with_participants(federation, n)
    for key in ("data", "app"):  # resolved against the project's folder for the check only
        sec = checked.get(key)
        if isinstance(sec, dict) and isinstance(sec.get("path"), str):
            checked[key] = {**sec, "path": resolve_path(sec["path"], base)}
    try:
        validate_federation_config(checked, "the project's federation")
    except ConfigError as exc:
        return [ConfigProblem(f"config.{p.field}", p.message, p.got) for p in exc.problems]
    return []


def _with_participants(federation: Mapping[str, Any], n: int) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in federation.items()}
    out["federation"] = {**dict(federation.get("federation", {})), "participants": n}
    return out


def provision(project_path: Path, out: Path, *, force: bool = False) -> list[Kit]:
    """Write the kits of ``project_path`` in ``out``; returns them (the coordinator's first)."""
    project_path = Path(project_path)
    project, federation = _load_project(project_path)
    federation = _with_participants(federation, len(project.sites))
    ids = _site_ids(project)
    folders = [CA_FOLDER, COORDINATOR_KIT, *(s.name for s in project.sites)]
    taken = [name for name in folders if (out / name).exists()]
    if taken and not force:
        raise ConfigError(
            str(out),
            [
                ConfigProblem(f"{out / name}", "a kit folder is already there; pass --force to replace it")
                for name in taken
            ],
        )
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".provision-{secrets.token_hex(4)}"
    try:
        kits = _write_kits(staging, project, federation, ids)
        for name in folders:
            if (out / name).exists():
                shutil.rmtree(out / name)
            (staging / name).rename(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [Kit(out / k.folder.name, k.identity, k.start) for k in kits]


def _write_kits(staging: Path, project: ProjectFile, federation: dict[str, Any], ids: list[str]) -> list[Kit]:
    c = project.coordinator
    name = str(federation.get("federation", {}).get("name", "federation"))
    ca = staging / CA_FOLDER
    init_ca(ca, common_name=f"{name} CA")
    kits = [_coordinator_kit(staging / COORDINATOR_KIT, ca, c, federation)]
    address = f"{c.host}:{c.port}"
    for site, pid in zip(project.sites, ids, strict=True):
        kits.append(_site_kit(staging / site.name, ca, site, pid, site.coordinator or address, federation))
    return kits


def _shared_files(kit: Path, ca: Path) -> None:
    kit.mkdir(parents=True)
    shutil.copyfile(ca / CA_CERT, kit / CA_CERT)
    shutil.copyfile(ca / CRL_FILE, kit / CRL_FILE)


def _coordinator_kit(kit: Path, ca: Path, c: CoordinatorEntry, federation: dict[str, Any]) -> Kit:
    _shared_files(kit, ca)
    issue(ca, "coordinator", "coordinator", out=kit, hosts=(c.host, *c.hosts))
    listen = c.listen or f"0.0.0.0:{c.port}"
    fed = {k: v for k, v in federation.items() if k != "transport"}
    fed["transport"] = transport_section(federation, listen=listen, tls_dir=".")
    (kit / "federation.toml").write_text(_HEADER + to_toml(fed), encoding="utf-8")
    start = 'exec ${TRUSTFED:-trustfed} server --config federation.toml --out run "$@"'
    _start_script(kit, start)
    _readme(kit, _COORDINATOR_README.format(listen=listen, address=f"{c.host}:{c.port}"))
    return Kit(kit, "coordinator", "./start.sh")


def _site_kit(kit: Path, ca: Path, site: SiteEntry, pid: str, address: str, federation: dict[str, Any]) -> Kit:
    _shared_files(kit, ca)
    issue(ca, "participant", pid, out=kit)
    fed = {k: v for k, v in federation.items() if k != "transport"}
    (kit / "federation.toml").write_text(_HEADER + to_toml(fed), encoding="utf-8")
    doc = participant_document(
        pid, address, federation_config="federation.toml", tls_dir=".", data=site.data, retry=KIT_RETRY
    )
    (kit / "participant.toml").write_text(_HEADER + to_toml(doc), encoding="utf-8")
    _start_script(kit, 'exec ${TRUSTFED:-trustfed} client --config participant.toml "$@"')
    _readme(kit, _SITE_README.format(name=site.name, pid=pid, address=address))
    return Kit(kit, pid, "./start.sh")


def _start_script(kit: Path, command: str) -> None:
    path = kit / "start.sh"
    path.write_text(
        "#!/bin/sh\n# Starts this kit from its own folder. TRUSTFED: the command to run (default: trustfed).\n"
        f'set -eu\ncd "$(dirname "$0")"\n{command}\n',
        encoding="utf-8",
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _readme(kit: Path, text: str) -> None:
    (kit / "README.md").write_text(text, encoding="utf-8")


_HEADER = "# written by `trustfed provision`; paths are relative to this kit's folder\n"

_COORDINATOR_README = """# Coordinator kit

Copy this folder to the coordinator's host and run `./start.sh`. It binds `{listen}`; sites dial
`{address}` and check that the server holds a coordinator certificate of this federation's CA.

- `coordinator.key` is this coordinator's private key (mode 0600): it stays on this host.
- `federation.toml` is the federation (rounds, data, model, strategy) with its `[transport]` section.
- `ca.pem` is the federation's CA; `crl.pem` its revocation list, re-read while the coordinator runs:
  after `trustfed pki revoke --ca ca --name ID` in the provisioning folder, copy `ca/crl.pem` here.
- The run is written to `run/`; check it with `trustfed audit verify run`.
"""

_SITE_README = """# Site kit: {name} (participant {pid})

Copy this folder to the site's host and run `./start.sh`. It dials the coordinator at `{address}`
over mutual TLS and retries for about two and a half minutes if the coordinator is not up yet.

- `{pid}.key` is this site's private key (mode 0600): it never leaves this host.
- `participant.toml` names the participant, the coordinator and its TLS files; add a `[data]`
  section when the federation's app reads this site's own data.
- `federation.toml` is the federation every site and the coordinator run.
- `ca.pem` is the federation's CA; `crl.pem` its revocation list (a revoked coordinator is refused).
"""
