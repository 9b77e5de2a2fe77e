"""Checkpoints of the global model: raw little-endian float32 plus the spec JSON, written atomically.

Their hash is :func:`trustfed.core.codec.model_hash`, the value committed on chain. The hash is
recomputed from the file bytes (no torch needed to check one).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from trustfed.core.codec import ParamSpec
from trustfed.errors import CheckpointError
from trustfed.primitives.atomic import atomic_write_bytes

CHECKPOINT_DIR = "checkpoints"


def checkpoint_paths(run_dir: Path, rnd: int) -> tuple[Path, Path]:
    base = run_dir / CHECKPOINT_DIR / f"round_{rnd:04d}"
    return base.with_suffix(".f32"), base.with_suffix(".spec.json")


def save_checkpoint(run_dir: Path, rnd: int, params_bytes: bytes, spec: ParamSpec) -> tuple[Path, Path]:
    f32, spec_path = checkpoint_paths(run_dir, rnd)
    f32.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(spec_path, spec.to_json().encode())
    atomic_write_bytes(f32, params_bytes)
    return f32, spec_path


def hash_model_bytes(params_bytes: bytes, spec_json: str) -> str:
    """Same value as codec.model_hash for the vector these bytes encode."""
    spec = ParamSpec.from_json(spec_json)
    if len(params_bytes) != 4 * spec.size:
        raise CheckpointError(f"checkpoint holds {len(params_bytes) // 4} values, its spec needs {spec.size}")
    h = hashlib.sha256()
    h.update(b"trustfed-model-v1\0")
    h.update(spec.to_json().encode())
    h.update(b"\0")
    h.update(params_bytes)
    return h.hexdigest()


def checkpoint_hash(run_dir: Path, rnd: int) -> str:
    f32, spec_path = checkpoint_paths(run_dir, rnd)
    try:
        return hash_model_bytes(f32.read_bytes(), spec_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"checkpoint of round {rnd} cannot be read: {exc}") from None
