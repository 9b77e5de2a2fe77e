"""``[transport]`` section of the federation file: where the coordinator listens, its TLS
identity, round deadlines, every size/count limit of the wire protocol, and how participants
compress their updates (``compression``: :mod:`trustfed.core.compression`).

The simulation reads ``compression`` only (its updates cross the same codec); defaults change nothing.
This module must not import :mod:`trustfed.config` (it is imported by it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from trustfed.core.compression import DEFAULT_BLOCK, CompressionPolicy
from trustfed.errors import ConfigProblem

MiB = 1 << 20


class Limits(BaseModel):
    """Every size and count the receiver checks before it allocates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_bytes: int = Field(1 * MiB, ge=4096, le=16 * MiB, description="bytes per streamed model chunk")
    max_model_bytes: int = Field(1024 * MiB, ge=4, description="largest model payload accepted")
    max_message_bytes: int = Field(4 * MiB, ge=64 * 1024, le=64 * MiB, description="largest single gRPC message")
    timestamp_window_s: float = Field(120.0, gt=0, le=3600, description="accepted clock difference")
    nonce_cache_size: int = Field(100_000, ge=16, le=10_000_000, description="nonces remembered against replay")
    max_calls_per_peer: int = Field(
        4, ge=1, le=1024, description="calls one certificate may have in flight at once (long polls included)"
    )
    calls_per_s: float = Field(20.0, gt=0, description="sustained calls per second one certificate may make")
    call_burst: int = Field(40, ge=1, description="calls one certificate may make at once above its rate")

    @property
    def max_chunks(self) -> int:
        return -(-self.max_model_bytes // self.chunk_bytes)


class TransportSettings(BaseModel):
    """How the coordinator serves participants over gRPC with mutual TLS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = Field("127.0.0.1:50051", description="host:port the coordinator binds (port 0: any free port)")
    ca: Path | None = Field(None, description="CA certificate (PEM) that issued every identity")
    cert: Path | None = Field(None, description="coordinator certificate (PEM), role coordinator")
    key: Path | None = Field(None, description="coordinator private key (PEM, 0600)")
    crl: Path | None = Field(None, description="revocation list (PEM, signed by the CA); re-read when it changes")
    round_timeout_s: float = Field(300.0, gt=0, description="deadline for updates after a round opens")
    join_timeout_s: float = Field(120.0, gt=0, description="how long the server waits for participants to check in")
    linger_s: float = Field(3.0, ge=0, description="after the last round, keep serving DONE this long")
    limits: Limits = Limits()
    compression: Literal["none", "fp16", "int8"] = Field(
        "none",
        description="participants' uploads: the update's delta to the round's model as float32 ('none'), float16 "
        "(half the bytes; a value beyond ±65504 is refused) or int8 with a float32 scale per block (about a quarter)",
    )
    compression_block: int = Field(DEFAULT_BLOCK, ge=64, le=1 << 20, description="int8: values per scaled block")
    compression_max_error: float | None = Field(
        None,
        gt=0,
        description="largest max_abs_error a compressed update may declare; the coordinator refuses more and "
        "audit verify fails it",
    )

    @property
    def compression_policy(self) -> CompressionPolicy:
        return CompressionPolicy(self.compression, self.compression_block, self.compression_max_error)

    def compression_problems(self, *, secagg: bool, enclave: bool) -> list[ConfigProblem]:
        """Compression needs the coordinator to see each update: not under secure aggregation (it sees
        masked field elements) nor the enclave (it sees sealed bytes)."""
        out = []
        if self.compression != "none":
            for on, what in (
                (secagg, "secagg.enabled: masked inputs are uniform field elements, which do not compress"),
                (enclave, "enclave.enabled: the enclave opens float32 updates only"),
            ):
                if on:
                    out.append(ConfigProblem("transport.compression", f"cannot be used with {what}; set 'none'"))
        elif self.compression_max_error is not None:
            out.append(ConfigProblem("transport.compression_max_error", "needs compression = 'fp16' or 'int8'"))
        return out

    def resolved(self, base: Path) -> TransportSettings:
        """Relative paths resolve against ``base`` (the folder of the federation file)."""

        def fix(p: Path | None) -> Path | None:
            if p is None:
                return None
            p = p.expanduser()
            return p if p.is_absolute() else base / p

        return self.model_copy(
            update={"ca": fix(self.ca), "cert": fix(self.cert), "key": fix(self.key), "crl": fix(self.crl)}
        )
