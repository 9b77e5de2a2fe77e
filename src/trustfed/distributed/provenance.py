"""Trusted provenance for distributed training: verified checkpoints and an append-only log.

A checkpoint is a folder of raw little-endian float32 vectors plus their specs (JSON), written
atomically (temp folder, then rename). Its hashes (``trustfed.core.codec.model_hash``), the
step, the config hash and the world size are appended to the run's provenance log, a JSON-lines
file whose entries are hash-chained (each holds the SHA-256 of the previous entry).

Resuming trusts the log, not the checkpoint folder: a checkpoint is loaded only if the log
chain verifies and the bytes on disk hash to what the log recorded. Nothing is unpickled.

:class:`ProvenanceSink` is the small interface the signed audit log (``trustfed.ledger``) can
implement to receive the same entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from trustfed.core.codec import ParamSpec, from_bytes, model_hash, to_bytes
from trustfed.errors import CheckpointError

log = logging.getLogger("trustfed.distributed.provenance")

GENESIS = "0" * 64


class ProvenanceSink(Protocol):
    """Receives every provenance entry (e.g. the ledger's signed audit log)."""

    def append(self, entry: Mapping[str, Any]) -> str: ...


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def config_hash(config_json: Mapping[str, Any]) -> str:
    return hashlib.sha256(b"trustfed-config-v1\0" + canonical(config_json)).hexdigest()


def _entry_hash(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(b"trustfed-provenance-v1\0" + canonical(body)).hexdigest()


@dataclass(frozen=True)
class ChainVerdict:
    ok: bool
    entries: int
    reasons: tuple[str, ...] = ()


class ProvenanceLog:
    """Append-only, hash-chained JSON lines in ``path``. Only one process (rank 0) writes."""

    def __init__(self, path: Path, sinks: tuple[ProvenanceSink, ...] = ()) -> None:
        self.path = path
        self.sinks = sinks

    def entries(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open("r", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def verify(self) -> ChainVerdict:
        prev, n, reasons = GENESIS, 0, []
        try:
            for n, e in enumerate(self.entries(), start=1):
                body = {k: v for k, v in e.items() if k != "hash"}
                if e.get("prev") != prev:
                    reasons.append(f"entry {n}: prev does not match the previous entry's hash")
                if _entry_hash(body) != e.get("hash"):
                    reasons.append(f"entry {n}: hash does not match its content")
                prev = str(e.get("hash"))
        except (json.JSONDecodeError, AttributeError) as exc:
            reasons.append(f"entry {n + 1}: not a JSON object ({exc})")
        return ChainVerdict(not reasons, n, tuple(reasons))

    def head(self) -> str:
        last = GENESIS
        for e in self.entries():
            last = str(e["hash"])
        return last

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": kind, "time": time.time(), **fields, "prev": self.head()}
        entry = {**body, "hash": _entry_hash(body)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for sink in self.sinks:
            sink.append(entry)
        return entry


# --- checkpoints -------------------------------------------------------------------------------


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    model_hash: str
    optim_hash: str


def write_checkpoint(
    run_dir: Path, step: int, model: torch.Tensor, model_spec: ParamSpec, optim: torch.Tensor, optim_spec: ParamSpec
) -> Checkpoint:
    """Write ``ckpt-STEP/`` atomically and return its hashes (the caller logs them)."""
    final = run_dir / "checkpoints" / f"ckpt-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _atomic_bytes(tmp / "model.f32", to_bytes(model))
    _atomic_bytes(tmp / "model.spec.json", model_spec.to_json().encode())
    _atomic_bytes(tmp / "optim.f32", to_bytes(optim))
    _atomic_bytes(tmp / "optim.spec.json", optim_spec.to_json().encode())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return Checkpoint(step, final, model_hash(model, model_spec), model_hash(optim, optim_spec))


def read_verified(ckpt: Checkpoint, model_spec: ParamSpec, optim_spec: ParamSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a checkpoint's vectors, refusing them unless specs and hashes match the trusted record."""
    out = []
    for stem, spec, want in (("model", model_spec, ckpt.model_hash), ("optim", optim_spec, ckpt.optim_hash)):
        spec_path, vec_path = ckpt.path / f"{stem}.spec.json", ckpt.path / f"{stem}.f32"
        try:
            stored = ParamSpec.from_json(spec_path.read_text(encoding="utf-8"))
            data = vec_path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"checkpoint {ckpt.path}: cannot read {stem} files ({exc})") from None
        if stored != spec:
            raise CheckpointError(
                f"checkpoint {ckpt.path}: {stem} spec differs from this run's model; it belongs to another config"
            )
        vec = from_bytes(data, spec)
        got = model_hash(vec, spec)
        if got != want:
            raise CheckpointError(
                f"checkpoint {ckpt.path}: {stem} hash {got[:16]}… does not match the provenance log's "
                f"{want[:16]}…; the files were altered or corrupted. Delete the folder to resume from an earlier one."
            )
        out.append(vec)
    return out[0], out[1]


def latest_checkpoint(run_dir: Path, cfg_hash: str) -> Checkpoint | None:
    """The newest checkpoint the provenance log records for this config, after verifying the chain."""
    plog = ProvenanceLog(run_dir / "provenance.jsonl")
    verdict = plog.verify()
    if not verdict.ok:
        raise CheckpointError(
            f"provenance log {plog.path} fails verification: {'; '.join(verdict.reasons)}; refusing to resume"
        )
    best: Checkpoint | None = None
    for e in plog.entries():
        if e.get("kind") != "checkpoint" or e.get("config_hash") != cfg_hash:
            continue
        ck = Checkpoint(int(e["step"]), run_dir / str(e["path"]), str(e["model_hash"]), str(e["optim_hash"]))
        if not ck.path.is_dir():
            log.warning("checkpoint %s is in the log but missing on disk; skipping it", ck.path)
            continue
        if best is None or ck.step > best.step:
            best = ck
    return best


def verify_run(run_dir: Path) -> tuple[list[str], int]:
    """Verify a run folder: the log's chain, then every logged checkpoint still on disk.

    Returns (problems, checkpoints verified)."""
    plog = ProvenanceLog(run_dir / "provenance.jsonl")
    if not plog.path.exists():
        return [f"{plog.path}: no provenance log"], 0
    verdict = plog.verify()
    problems = list(verdict.reasons)
    checked = 0
    for e in plog.entries():
        if e.get("kind") != "checkpoint":
            continue
        ck = Checkpoint(int(e["step"]), run_dir / str(e["path"]), str(e["model_hash"]), str(e["optim_hash"]))
        if not ck.path.is_dir():
            continue
        try:
            mspec = ParamSpec.from_json((ck.path / "model.spec.json").read_text(encoding="utf-8"))
            ospec = ParamSpec.from_json((ck.path / "optim.spec.json").read_text(encoding="utf-8"))
            read_verified(ck, mspec, ospec)
            checked += 1
        except (CheckpointError, OSError) as exc:
            problems.append(str(exc))
    return problems, checked


class SignedAuditSink:
    """Mirrors provenance entries into the ledger's signed, hash-chained audit log
    (:mod:`trustfed.ledger.audit`), signed by the trainer's ECDSA P-256 key."""

    def __init__(self, path: Path, key_path: Path, key_id: str = "trainer") -> None:
        from trustfed.ledger.audit import EcdsaSigner

        self.path = path
        self.signer = EcdsaSigner.load(key_id, key_path)

    def append(self, entry: Mapping[str, Any]) -> str:
        from trustfed.ledger.audit import AuditLog

        body = json.loads(json.dumps(dict(entry), default=str))  # plain JSON values only
        with AuditLog(self.path) as audit:
            written = audit.append(f"train.{entry['kind']}", int(entry.get("step") or 0), body, self.signer)
            audit.sync()
        return written.hash
