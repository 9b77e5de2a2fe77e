"""Parameter codec: a model state <-> one flat float32 vector plus a spec.

The vector is what travels (raw little-endian float32) and what aggregators see. The spec
records each tensor's name, shape and dtype so the state can be rebuilt exactly. The model
hash is SHA-256 over a canonical encoding of the spec and the vector's bytes, so the same
parameters hash the same in every process and on every machine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from trustfed.errors import CodecError

# dtypes whose every value a float32 represents exactly.
_EXACT_IN_F32: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.bool: "bool",
}
# Integer dtypes that are exact only while |value| <= 2**24 (checked at encode time).
_INT_CHECKED: dict[torch.dtype, str] = {torch.int32: "int32", torch.int64: "int64"}
_NAME_TO_DTYPE = {v: k for k, v in {**_EXACT_IN_F32, **_INT_CHECKED}.items()}
_F32_INT_LIMIT = 2**24


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and dtypes of a model's tensors, in state-dict order."""

    tensors: tuple[TensorSpec, ...]

    @property
    def size(self) -> int:
        return sum(t.numel for t in self.tensors)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): the bytes that enter the model hash."""
        items = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.tensors]
        return json.dumps(items, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ParamSpec:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CodecError(f"parameter spec is not valid JSON: {exc}") from exc
        if not isinstance(raw, list):
            raise CodecError("parameter spec must be a JSON list of tensors")
        out: list[TensorSpec] = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or set(item) != {"name", "shape", "dtype"}:
                raise CodecError(f"parameter spec entry {i} must have exactly name, shape and dtype")
            name, shape, dtype = item["name"], item["shape"], item["dtype"]
            if not isinstance(name, str) or not name:
                raise CodecError(f"parameter spec entry {i}: name must be a non-empty string")
            if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
                raise CodecError(f"parameter spec entry {i} ({name}): shape must be a list of ints >= 0")
            if dtype not in _NAME_TO_DTYPE:
                raise CodecError(f"parameter spec entry {i} ({name}): unsupported dtype {dtype!r}")
            out.append(TensorSpec(name, tuple(shape), dtype))
        return cls(tuple(out))


def spec_of(state: Mapping[str, torch.Tensor]) -> ParamSpec:
    specs = []
    for name, t in state.items():
        dtype = _EXACT_IN_F32.get(t.dtype) or _INT_CHECKED.get(t.dtype)
        if dtype is None:
            raise CodecError(
                f"tensor {name!r} has dtype {t.dtype}, which float32 cannot hold exactly; "
                "convert the model first (for example model.float())"
            )
        specs.append(TensorSpec(name, tuple(t.shape), dtype))
    return ParamSpec(tuple(specs))


def flatten(state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ParamSpec]:
    """Encode a state dict as one contiguous float32 vector and its spec."""
    spec = spec_of(state)
    parts: list[torch.Tensor] = []
    for ts, t in zip(spec.tensors, state.values(), strict=True):
        flat = t.detach().reshape(-1).cpu()
        if ts.dtype in ("int32", "int64") and flat.numel() and int(flat.abs().max()) > _F32_INT_LIMIT:
            raise CodecError(f"integer tensor {ts.name!r} holds values beyond 2**24, which float32 cannot hold exactly")
        parts.append(flat.to(torch.float32))
    vec = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32)
    return vec.contiguous(), spec


def unflatten(vector: torch.Tensor, spec: ParamSpec) -> dict[str, torch.Tensor]:
    """Rebuild a state dict from a flat float32 vector. Checks the length before slicing."""
    if vector.dtype != torch.float32 or vector.dim() != 1:
        raise CodecError(f"expected a 1-D float32 vector, got {vector.dtype} with shape {tuple(vector.shape)}")
    if vector.numel() != spec.size:
        raise CodecError(f"vector has {vector.numel()} values but the spec needs {spec.size}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for ts in spec.tensors:
        n = ts.numel
        out[ts.name] = vector[offset : offset + n].reshape(ts.shape).to(_NAME_TO_DTYPE[ts.dtype]).clone()
        offset += n
    return out


def to_bytes(vector: torch.Tensor) -> bytes:
    """Raw little-endian float32 bytes: the wire form of a parameter vector."""
    arr = vector.detach().cpu().contiguous().numpy()
    return arr.astype("<f4", copy=False).tobytes()


def from_bytes(data: bytes | bytearray | memoryview, spec: ParamSpec | None = None) -> torch.Tensor:
    """Parse raw little-endian float32 bytes, checking the length against the spec first."""
    if len(data) % 4:
        raise CodecError(f"payload of {len(data)} bytes is not a whole number of float32 values")
    if spec is not None and len(data) != 4 * spec.size:
        raise CodecError(f"payload has {len(data) // 4} values but the spec needs {spec.size}")
    arr = np.frombuffer(data, dtype="<f4").astype(np.float32, copy=True)
    return torch.from_numpy(arr)


def model_hash(vector: torch.Tensor, spec: ParamSpec) -> str:
    """Deterministic SHA-256 (hex) of the spec and the parameter bytes."""
    if vector.numel() != spec.size:
        raise CodecError(f"vector has {vector.numel()} values but the spec needs {spec.size}")
    h = hashlib.sha256()
    h.update(b"trustfed-model-v1\0")
    h.update(spec.to_json().encode())
    h.update(b"\0")
    h.update(to_bytes(vector))
    return h.hexdigest()


def flatten_module(module: torch.nn.Module) -> tuple[torch.Tensor, ParamSpec]:
    return flatten(module.state_dict())


def load_vector(module: torch.nn.Module, vector: torch.Tensor, spec: ParamSpec) -> None:
    module.load_state_dict(unflatten(vector, spec), strict=True)
