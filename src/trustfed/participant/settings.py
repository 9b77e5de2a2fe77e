"""``participant.toml``: how one participant reaches its coordinator.

```toml
[participant]
id = "p000"                              # must equal the id in its certificate
coordinator = "127.0.0.1:50051"
federation_config = "federation.toml"    # the shared federation file (data, model, training)

[tls]
ca = "pki/ca.pem"
cert = "pki/p000.pem"
key = "pki/p000.key"
crl = "pki/crl.pem"                      # optional: refuse a revoked coordinator certificate

[ledger]                                 # optional: check models and inclusion proofs against the chain
dir = "runs/demo/ledger"                 # embedded: replay its signed journal; jsonrpc: contract addresses
# rpc_url = "http://127.0.0.1:8545"      # jsonrpc: query the node directly

[retry]
attempts = 8
initial_backoff_s = 0.5
max_backoff_s = 5.0

[state]                                  # optional: this participant's own state
dir = "state"                            # default: this file's folder; holds <id>.privacy-budget.json

[data]                                   # this participant's own data, handed to the federation app's
path = "data/train.csv"                  # loader as trustfed.app.DataSpec (path + every other key);
target = "label"                         # without it, the built-in app gives it its partition
```
Relative paths resolve against the file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trustfed.config import parse_toml, problems_from_validation
from trustfed.errors import ConfigError, ConfigProblem
from trustfed.transport.settings import Limits


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParticipantSection(_Section):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    coordinator: str = Field(pattern=r"^.+:[0-9]{1,5}$", description="host:port of the coordinator")
    federation_config: Path


class TlsSection(_Section):
    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None


class RetrySection(_Section):
    attempts: int = Field(8, ge=1, le=1000)
    initial_backoff_s: float = Field(0.5, gt=0, le=60)
    max_backoff_s: float = Field(5.0, gt=0, le=600)
    poll_wait_ms: int = Field(4000, ge=0, le=60_000, description="long-poll budget per plan/receipt request")


class LedgerViewSection(_Section):
    """Where this participant reads the chain itself (never through the coordinator)."""

    dir: Path = Field(description="the run's ledger folder (deployment.json; the embedded chain's journal)")
    rpc_url: str | None = Field(None, description="JSON-RPC node to query (jsonrpc ledgers)")


class StateSection(_Section):
    """What this participant keeps across restarts: its privacy spend (``<id>.privacy-budget.json``)."""

    dir: Path = Field(description="folder of the participant's state files (default: the participant file's folder)")


class ParticipantConfig(_Section):
    participant: ParticipantSection
    tls: TlsSection
    retry: RetrySection = RetrySection()
    limits: Limits = Limits()
    ledger: LedgerViewSection | None = None
    state: StateSection | None = Field(None, description="set by the loader when the file has no [state]")
    data: dict[str, Any] | None = Field(
        None, description="this participant's own data: path (a file or folder) and free keys for the app's loader"
    )
    source: str = Field("<participant file>", description="the file this came from (set by the loader)")


def _resolve(raw: dict[str, object], base: Path) -> None:
    for section, keys in (
        ("participant", ("federation_config",)),
        ("tls", ("ca", "cert", "key", "crl")),
        ("ledger", ("dir",)),
        ("state", ("dir",)),
        ("data", ("path",)),
    ):
        sec = raw.get(section)
        if isinstance(sec, dict):
            for k in keys:
                v = sec.get(k)
                if isinstance(v, str):
                    p = Path(v).expanduser()
                    sec[k] = str(p if p.is_absolute() else base / p)


def load_participant_config(path: str | Path) -> ParticipantConfig:
    p = Path(path)
    raw = parse_toml(p)
    raw["source"] = str(p)
    state = raw.setdefault("state", {})
    if isinstance(state, dict):
        state.setdefault("dir", ".")  # next to this file
    _resolve(raw, p.parent)
    try:
        cfg = ParticipantConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(str(p), problems_from_validation(exc)) from None
    problems = [
        ConfigProblem(f"tls.{name}", "no such file", str(f))
        for name, f in (("ca", cfg.tls.ca), ("cert", cfg.tls.cert), ("key", cfg.tls.key), ("crl", cfg.tls.crl))
        if f is not None and not f.is_file()
    ]
    if not cfg.participant.federation_config.is_file():
        problems.append(
            ConfigProblem("participant.federation_config", "no such file", str(cfg.participant.federation_config))
        )
    data_path = (cfg.data or {}).get("path")
    if data_path is not None and (not isinstance(data_path, str) or not Path(data_path).exists()):
        problems.append(ConfigProblem("data.path", "no such file or folder", str(data_path)))
    if problems:
        raise ConfigError(str(p), problems)
    return cfg
