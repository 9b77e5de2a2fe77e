"""``[transport]`` section of the federation file: where the coordinator listens, its TLS
identity, round deadlines and every size/count limit of the wire protocol.

Defaults keep the in-process simulation unchanged (it never reads this section).
This module must not import :mod:`trustfed.config` (it is imported by it).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

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
