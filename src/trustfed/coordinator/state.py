"""Coordinator checkpoints: everything needed to resume a run after a crash or a failover.

A checkpoint is a folder ``round_NNNN/`` with raw tensors (``model.f32`` and one raw file per
strategy-state tensor) and a ``manifest.json`` giving each file's SHA-256, dtype and shape. It
is written to a temporary folder and renamed into place, so a crash leaves either the whole
checkpoint or none. Loading checks every hash and size before parsing a byte; nothing is
unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustfed.coordinator.engine import Coordinator
from trustfed.core.codec import ParamSpec, from_bytes, model_hash, to_bytes
from trustfed.core.rounds import RoundRecord
from trustfed.core.strategy import RoundPlan, RoundResult, Strategy, Update
from trustfed.errors import CheckpointError
from trustfed.primitives.atomic import publish_folder

FORMAT = "trustfed-coordinator-checkpoint-v1"
_DTYPES = {"float32": "<f4", "float64": "<f8", "int64": "<i8"}
_ROUND_DIR = re.compile(r"^round_(\d{4,})$")
_KEY = r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*"  # strategy state keys: wrappers nest theirs as "inner.x", "dp.history"


@dataclass(frozen=True)
class CoordinatorState:
    round: int
    params: torch.Tensor
    spec: ParamSpec
    strategy_name: str
    strategy_state: dict[str, torch.Tensor]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_state(root: Path, state: CoordinatorState, keep: int = 3) -> Path:
    """Write ``root/round_NNNN`` atomically; keep the newest ``keep`` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round_{state.round:04d}"
    tmp = root / f".tmp-round_{state.round:04d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files: dict[str, dict[str, Any]] = {}

    def put(name: str, data: bytes, dtype: str, shape: Sequence[int]) -> None:
        (tmp / name).write_bytes(data)
        files[name] = {"sha256": _sha(data), "bytes": len(data), "dtype": dtype, "shape": list(shape)}

    put("model.f32", to_bytes(state.params), "float32", [state.params.numel()])
    for key, t in sorted(state.strategy_state.items()):
        if not re.fullmatch(_KEY, key):
            raise CheckpointError(f"strategy state key {key!r} is not a dotted identifier")
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise CheckpointError(f"strategy state {key!r} has unsupported dtype {dtype}")
        arr = t.detach().cpu().contiguous().numpy().astype(_DTYPES[dtype])
        put(f"strategy.{key}.bin", arr.tobytes(), dtype, list(t.shape))
    manifest = {
        "format": FORMAT,
        "round": state.round,
        "model_hash": model_hash(state.params, state.spec),
        "spec": json.loads(state.spec.to_json()),
        "strategy": state.strategy_name,
        "files": files,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    publish_folder(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _ROUND_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def load_state(folder: Path) -> CoordinatorState:
    """Load and verify one checkpoint folder; every failure names the file and what is wrong."""
    mpath = folder / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{mpath}: cannot read the manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: not a {FORMAT} manifest")
    try:
        rnd = int(manifest["round"])
        spec = ParamSpec.from_json(json.dumps(manifest["spec"]))
        files: dict[str, dict[str, Any]] = manifest["files"]
        strategy_name = str(manifest["strategy"])
        expected_hash = str(manifest["model_hash"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{mpath}: malformed manifest ({exc})") from None
    blobs: dict[str, bytes] = {}
    for name, meta in files.items():
        if "/" in name or name.startswith("."):
            raise CheckpointError(f"{mpath}: file name {name!r} is not allowed")
        p = folder / name
        try:
            size = p.stat().st_size
        except OSError:
            raise CheckpointError(f"{p}: missing") from None
        if size != meta.get("bytes"):
            raise CheckpointError(f"{p}: {size} bytes, manifest says {meta.get('bytes')}")
        data = p.read_bytes()
        if _sha(data) != meta.get("sha256"):
            raise CheckpointError(f"{p}: SHA-256 does not match the manifest (file altered or corrupt)")
        blobs[name] = data
    if "model.f32" not in blobs:
        raise CheckpointError(f"{mpath}: lists no model.f32")
    params = from_bytes(blobs.pop("model.f32"), spec)
    if model_hash(params, spec) != expected_hash:
        raise CheckpointError(f"{folder}: model hash does not match the manifest's model_hash")
    strategy_state: dict[str, torch.Tensor] = {}
    for name, data in blobs.items():
        m = re.fullmatch(rf"strategy\.({_KEY})\.bin", name)
        meta = files[name]
        if not m or meta.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{folder / name}: unexpected file or dtype in manifest")
        shape = tuple(int(s) for s in meta["shape"])
        arr = np.frombuffer(data, dtype=_DTYPES[meta["dtype"]])
        if arr.size != int(np.prod(shape)):
            raise CheckpointError(f"{folder / name}: {arr.size} values do not fill shape {shape}")
        strategy_state[m.group(1)] = torch.from_numpy(arr.copy().reshape(shape))
    return CoordinatorState(rnd, params, spec, strategy_name, strategy_state)


def latest_state(root: Path) -> CoordinatorState | None:
    """The newest checkpoint that verifies; a damaged newest one is reported, not skipped."""
    found = list_checkpoints(root)
    return load_state(found[-1]) if found else None


def resume(coordinator: Coordinator, state: CoordinatorState) -> None:
    """Continue ``coordinator`` from ``state`` (same strategy and model spec required)."""
    if state.spec != coordinator.spec:
        raise CheckpointError("checkpoint's model spec differs from this federation's model")
    if state.strategy_name != coordinator.strategy.name:
        raise CheckpointError(
            f"checkpoint was written by strategy {state.strategy_name!r}, this run uses {coordinator.strategy.name!r}"
        )
    coordinator.strategy.load_state_dict(state.strategy_state)
    coordinator.params = state.params
    coordinator.round = state.round


class CheckpointObserver:
    """A RoundObserver that checkpoints the coordinator after every round."""

    def __init__(self, root: Path, strategy: Strategy, spec: ParamSpec, keep: int = 3) -> None:
        self.root, self.strategy, self.spec, self.keep = root, strategy, spec, keep

    def on_round_start(self, plan: RoundPlan, params: torch.Tensor) -> None:
        pass

    def on_round_end(
        self, plan: RoundPlan, updates: Sequence[Update], result: RoundResult, record: RoundRecord
    ) -> None:
        state = CoordinatorState(plan.round, result.params, self.spec, self.strategy.name, self.strategy.state_dict())
        save_state(self.root, state, self.keep)


def state_summary(state: CoordinatorState) -> Mapping[str, Any]:
    return {"round": state.round, "model_hash": model_hash(state.params, state.spec), "strategy": state.strategy_name}
