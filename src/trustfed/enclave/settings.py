"""Configuration of the enclave: the service file ``enclave.toml`` and the federation's ``[enclave]``.

Pure pydantic models; this module must not import :mod:`trustfed.config` (config imports it).

``enclave.toml``::

    [enclave]
    backend = "simulated"            # simulated | sgx-dcap | tdx-dcap
    allow_simulated_tee = true       # the simulated backend refuses to start without it
    listen = "127.0.0.1:50070"
    report_data_hash = "sha512"

    [tls]                            # mutual TLS (ECDSA P-256 certificates), paths relative to the file
    cert = "pki/enclave.crt"
    key = "pki/enclave.key"
    ca = "pki/ca.crt"

    [aggregation]                    # part of the measurement: changing it changes the enclave identity
    strategy = "fedavg"
    aggregator = "mean"

    [aggregation.central_dp]         # optional: DP-FedAvg inside the enclave (also measured)
    noise_multiplier = 1.0
    clip_norm = 1.0
    delta = 1e-5
    seed = 0                         # the run seed; ignored with secure_noise = true

    [participants]                   # identity public keys (PEM) used to check update signatures
    p000 = "pki/p000.pub.pem"
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trustfed.core.strategy import DEFAULT_MAX_EXAMPLES
from trustfed.enclave.policy import AttestationPolicy, BackendName
from trustfed.errors import ConfigError, ConfigProblem


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CentralDPSettings(_Section):
    """Central DP-FedAvg that the enclave applies around its aggregator (the federation's ``[privacy]``
    with ``mode = "central"``). Part of the measured config: a participant that pins a measurement
    pins these values too."""

    noise_multiplier: float = Field(gt=0, description="noise std on the sum of clipped deltas / clip norm")
    clip_norm: float = Field(gt=0, description="(initial) L2 clip of each participant's model delta")
    delta: float = Field(1e-5, gt=0, lt=1)
    clipping: Literal["fixed", "adaptive"] = "fixed"
    target_quantile: float = Field(0.5, gt=0, lt=1)
    clip_learning_rate: float = Field(0.2, gt=0)
    clip_count_stddev: float | None = Field(None, gt=0)
    sampling_amplification: bool = Field(
        True, description="account with the sampling rate selected / available that the coordinator reports"
    )
    accountant: Literal["rdp", "pld", "prv"] = "rdp"
    seed: int = Field(0, ge=0, description="noise seed (the run seed); not used with secure_noise")
    secure_noise: bool = Field(False, description="draw the noise seed from the OS inside the enclave")


class AggregationSettings(_Section):
    """What the enclave computes. Its canonical JSON enters the measurement."""

    strategy: Literal["fedavg", "fedprox", "fedadagrad", "fedadam", "fedyogi"] = "fedavg"
    aggregator: str = "mean"
    aggregator_params: dict[str, float | int | bool | str] = Field(default_factory=dict)
    server_lr: float = Field(0.1, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    min_updates: int = Field(1, ge=1, description="fewest valid sealed updates a round needs")
    max_params: int = Field(100_000_000, ge=1, description="largest model (float32 values) accepted")
    max_examples: int = Field(
        DEFAULT_MAX_EXAMPLES, ge=1, le=2**40, description="most examples a sealed update may declare; more is refused"
    )
    central_dp: CentralDPSettings | None = Field(None, description="DP-FedAvg around the aggregator (off: none)")
    release_contributions: bool = Field(
        False,
        description="put each accepted update's contribution score (one number per participant) in the receipt, "
        "for reputation and rewards; never with central DP, whose guarantee covers the model only",
    )

    @model_validator(mode="after")
    def _contributions_without_dp(self) -> AggregationSettings:
        if self.release_contributions and self.central_dp is not None:
            raise ValueError("release_contributions cannot be combined with central_dp: the scores are not noised")
        return self

    def measured(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        if out["central_dp"] is None:  # configs without DP measure as they did before the field existed
            del out["central_dp"]
        if not out["release_contributions"]:  # likewise for configs that release no contributions
            del out["release_contributions"]
        return out


class TlsFiles(_Section):
    cert: Path
    key: Path
    ca: Path
    crl: Path | None = Field(None, description="revocation list (PEM, signed by the CA): revoked callers are refused")


class EnclaveServiceSection(_Section):
    backend: BackendName = "simulated"
    allow_simulated_tee: bool = False
    listen: str = "127.0.0.1:50070"
    report_data_hash: Literal["sha512", "sha256"] = "sha512"
    max_message_mb: int = Field(512, ge=1, le=2047, description="largest Aggregate request (coordinator or admin)")
    small_message_kb: int = Field(64, ge=1, le=65536, description="largest request of any other RPC or role")
    max_calls_per_peer: int = Field(2, ge=1, le=1024, description="calls one certificate may have in flight")
    calls_per_s: float = Field(20.0, gt=0, description="sustained calls per second one certificate may make")
    call_burst: int = Field(40, ge=1, description="calls one certificate may make at once above its rate")
    quote_device: Path | None = Field(None, description="override /dev/attestation or the configfs-tsm folder")


class EnclaveServiceConfig(_Section):
    """The whole ``enclave.toml``."""

    enclave: EnclaveServiceSection = EnclaveServiceSection()
    tls: TlsFiles | None = None
    aggregation: AggregationSettings = AggregationSettings()
    participants: dict[str, Path] = Field(default_factory=dict, description="participant id -> public key PEM")


class EnclaveSection(_Section):
    """The federation file's ``[enclave]``: aggregate through an attested enclave (off by default)."""

    enabled: bool = False
    backend: BackendName = "simulated"
    allow_simulated_tee: bool = Field(False, description="the federation accepts a SIMULATED enclave")
    address: str | None = Field(None, description="host:port of a separate enclave service; none = in-process")
    policy: AttestationPolicy = Field(
        default_factory=AttestationPolicy, description="participants' default attestation policy"
    )


def _problems(exc: ValidationError) -> list[ConfigProblem]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        out.append(ConfigProblem(loc, msg))
    return out


def load_enclave_config(path: str | Path, *, check_files: bool = True) -> EnclaveServiceConfig:
    """Load ``enclave.toml``; relative paths resolve against its folder. Every problem is reported.

    ``check_files=False`` skips the existence checks of TLS and key files (``trustfed enclave measure``).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(p), [ConfigProblem("(file)", "no such file")])
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(p), [ConfigProblem("(syntax)", f"invalid TOML: {exc}")]) from None
    base = p.parent
    for section, keys in (("tls", ("cert", "key", "ca", "crl")), ("participants", None)):
        sec = raw.get(section)
        if isinstance(sec, dict):
            for k in keys or tuple(sec):
                v = sec.get(k)
                if isinstance(v, str) and not Path(v).is_absolute():
                    sec[k] = str(base / v)
    try:
        cfg = EnclaveServiceConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(str(p), _problems(exc)) from None
    problems: list[ConfigProblem] = []
    tls_keys = ("cert", "key", "ca", "crl")
    files = [("tls." + k, getattr(cfg.tls, k)) for k in tls_keys if getattr(cfg.tls, k) is not None] if cfg.tls else []
    files += [(f"participants.{pid}", f) for pid, f in cfg.participants.items()]
    if check_files:
        problems += [ConfigProblem(where, "file does not exist", str(f)) for where, f in files if not f.is_file()]
    if cfg.enclave.backend == "simulated" and not cfg.enclave.allow_simulated_tee:
        problems.append(
            ConfigProblem(
                "enclave.allow_simulated_tee",
                "backend 'simulated' is software only (no hardware root of trust); set allow_simulated_tee = true "
                "to run it for development, or choose sgx-dcap / tdx-dcap",
            )
        )
    if problems:
        raise ConfigError(str(p), problems)
    return cfg
