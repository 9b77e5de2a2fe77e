"""Trusted provenance for distributed training: verified checkpoints and an append-only log.

A checkpoint is a folder of raw little-endian float32 vectors plus their specs (JSON), written
atomically (temp folder, then rename). Its hashes (``trustfed.core.codec.model_hash``), the
step, the config hash and the world size are appended to the run's provenance log, a JSON-lines
file whose entries are hash-chained (each holds the SHA-256 of the previous entry).

Resuming trusts the log, not the checkpoint folder: a checkpoint is loaded only if the log
chain verifies and the bytes on disk hash to what the log recorded. Nothing is unpickled.

:class:`ProvenanceSink` is the small interface that receives the same entries: the signed audit
log (:class:`SignedAuditSink`) and the on-chain anchor of every checkpoint
(:class:`trustfed.distributed.anchor.LedgerAnchorSink`, with ``[run] ledger``). When a run anchors
on a ledger, :func:`trustfed.distributed.verification.verify_run` also checks every on-chain record against this log and the files.
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
from trustfed.errors import CheckpointError, CodecError
from trustfed.ledger.audit import AuditLog, EcdsaSigner
from trustfed.primitives.atomic import publish_folder
from trustfed.primitives.canonical import canonical_json
from trustfed.primitives.verdict import Verdict

log = logging.getLogger("trustfed.distributed.provenance")

GENESIS = "0" * 64


class ProvenanceSink(Protocol):
    """Receives every provenance entry (e.g. the ledger's signed audit log)."""

    def append(self, entry: Mapping[str, Any]) -> str: ...


def _canonical(value: Mapping[str, Any]) -> bytes:
    """Canonical JSON as this log has always hashed it: non-ASCII escaped, NaN admitted."""
    return canonical_json(value, ensure_ascii=True, allow_nan=True)


def config_hash(config_json: Mapping[str, Any]) -> str:
    return hashlib.sha256(b"trustfed-config-v1\0" + _canonical(config_json)).hexdigest()


def entry_hash(body: Mapping[str, Any]) -> str:
    """The chain hash of a provenance entry's body (every field but ``hash``)."""
    return hashlib.sha256(b"trustfed-provenance-v1\0" + _canonical(body)).hexdigest()


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

    def numbered(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(1-based line number, entry) for every line that is a JSON object; :meth:`verify`
        reports the others."""
        if not self.path.exists():
            return
        with self.path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    yield lineno, obj

    def verify(self) -> Verdict:
        """The chain's verdict; its claims hold how many ``entries`` were read."""
        prev, n, reasons = GENESIS, 0, []
        try:
            for n, e in enumerate(self.entries(), start=1):
                body = {k: v for k, v in e.items() if k != "hash"}
                if e.get("prev") != prev:
                    reasons.append(f"entry {n}: prev does not match the previous entry's hash")
                if entry_hash(body) != e.get("hash"):
                    reasons.append(f"entry {n}: hash does not match its content")
                prev = str(e.get("hash"))
        except (json.JSONDecodeError, AttributeError) as exc:
            reasons.append(f"entry {n + 1}: not a JSON object ({exc})")
        return Verdict.of(reasons, {"entries": n})

    def head(self) -> str:
        last = GENESIS
        for e in self.entries():
            last = str(e["hash"])
        return last

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": kind, "time": time.time(), **fields, "prev": self.head()}
        entry = {**body, "hash": entry_hash(body)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for sink in self.sinks:
            sink.append(entry)
        return entry


# --- checkpoints -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    model_hash: str
    optim_hash: str


def log_checkpoint(log: ProvenanceLog, run_dir: Path, ck: Checkpoint, **fields: Any) -> dict[str, Any]:
    """Append the entry of a written checkpoint: its step, path (relative to ``run_dir``) and hashes."""
    return log.append(
        "checkpoint",
        step=ck.step,
        path=str(ck.path.relative_to(run_dir)),
        model_hash=ck.model_hash,
        optim_hash=ck.optim_hash,
        **fields,
    )


def write_checkpoint(
    run_dir: Path, step: int, model: torch.Tensor, model_spec: ParamSpec, optim: torch.Tensor, optim_spec: ParamSpec
) -> Checkpoint:
    """Write ``ckpt-STEP/`` atomically and return its hashes (the caller logs them)."""
    final = run_dir / "checkpoints" / f"ckpt-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "model.f32").write_bytes(to_bytes(model))
    (tmp / "model.spec.json").write_bytes(model_spec.to_json().encode())
    (tmp / "optim.f32").write_bytes(to_bytes(optim))
    (tmp / "optim.spec.json").write_bytes(optim_spec.to_json().encode())
    publish_folder(tmp, final)  # every file fsynced, then the move
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


LOG_FILE = "provenance.jsonl"


@dataclass(frozen=True)
class LoggedCheckpoint:
    """A checkpoint as the provenance log records it: where (line) and the whole entry."""

    line: int
    entry: dict[str, Any]
    checkpoint: Checkpoint


def logged_checkpoint(run_dir: Path, line: int, e: Mapping[str, Any]) -> LoggedCheckpoint:
    ck = Checkpoint(int(e["step"]), run_dir / str(e["path"]), str(e["model_hash"]), str(e["optim_hash"]))
    return LoggedCheckpoint(line, dict(e), ck)


def checkpoint_candidates(run_dir: Path, cfg_hash: str) -> list[LoggedCheckpoint]:
    """The checkpoints the provenance log records for this config and that are still on disk,
    newest first (by step, then by line), after verifying the log's chain."""
    plog = ProvenanceLog(run_dir / LOG_FILE)
    verdict = plog.verify()
    if not verdict.ok:
        raise CheckpointError(
            f"provenance log {plog.path} fails verification: {'; '.join(verdict.reasons)}; refusing to resume"
        )
    out = []
    for line, e in plog.numbered():
        if e.get("kind") != "checkpoint" or e.get("config_hash") != cfg_hash:
            continue
        try:
            lc = logged_checkpoint(run_dir, line, e)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{plog.path}:{line}: malformed checkpoint entry ({exc!r}); refusing to resume"
            ) from None
        if not lc.checkpoint.path.is_dir():
            log.warning("checkpoint %s is in the log but missing on disk; skipping it", lc.checkpoint.path)
            continue
        out.append(lc)
    out.sort(key=lambda lc: (lc.checkpoint.step, lc.line), reverse=True)
    return out


def latest_checkpoint(run_dir: Path, cfg_hash: str) -> Checkpoint | None:
    """The newest checkpoint the provenance log records for this config, after verifying the chain."""
    found = checkpoint_candidates(run_dir, cfg_hash)
    return found[0].checkpoint if found else None


def checkpoint_hashes(path: Path) -> tuple[str, str]:
    """(model hash, optimizer-state hash) of the files in a checkpoint folder, under their own specs."""
    out = []
    for stem in ("model", "optim"):
        try:
            spec = ParamSpec.from_json((path / f"{stem}.spec.json").read_text(encoding="utf-8"))
            out.append(model_hash(from_bytes((path / f"{stem}.f32").read_bytes(), spec), spec))
        except (OSError, CodecError) as exc:
            raise CheckpointError(f"checkpoint {path}: cannot read {stem} files ({exc})") from None
    return out[0], out[1]


class SignedAuditSink:
    """Mirrors provenance entries into the ledger's signed, hash-chained audit log
    (:mod:`trustfed.ledger.audit`), signed by the trainer's ECDSA P-256 key."""

    def __init__(self, path: Path, key_path: Path, key_id: str = "trainer") -> None:
        self.path = path
        self.signer = EcdsaSigner.load(key_id, key_path)

    def append(self, entry: Mapping[str, Any]) -> str:
        body = json.loads(json.dumps(dict(entry), default=str))  # plain JSON values only
        with AuditLog(self.path) as audit:
            written = audit.append(f"train.{entry['kind']}", int(entry.get("step") or 0), body, self.signer)
            audit.sync()
        return written.hash
