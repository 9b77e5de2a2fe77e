"""Compression of an update for the wire: fp16 or int8 quantisation of its delta to the round's model.

What is quantised is ``delta = trained - global`` (the receiver holds the global model it served, so
it restores ``global + dequantised delta``); a delta is small next to the weights, so its
quantisation error is too. Two codecs:

* ``fp16``: every value as IEEE half precision (2 bytes). A delta value beyond float16's range
  (|x| > 65504) is refused (:class:`~trustfed.errors.CodecError`), never clipped: use ``int8``,
  whose per-block scale has no such limit.
* ``int8``: symmetric per-block quantisation. The vector is cut into blocks of ``block`` values; each
  block stores one float32 scale ``max|x| / 127`` and its values as ``round(x / scale)`` in
  ``[-127, 127]`` (int8; -128 is never written and is refused on reading).

Payload (little-endian): a 12-byte header ``b"TFQ1"``, the codec tag (1 = fp16, 2 = int8), three
zero bytes and the block size (uint32); then fp16: ``n`` float16 values; int8: ``ceil(n / block)``
float32 scales, then ``n`` int8 values. Its size is fixed by (codec, n, block), so a receiver checks
the declared size before reading; :func:`decode` refuses a wrong length, tag or block, a non-finite
or negative scale and a non-finite float16.

The sender measures what the receiver will aggregate (:func:`compress_update`): ``max_abs_error``,
the largest ``|restored - trained|`` over all parameters, and ``rel_l2_error``,
``||restored - trained|| / ||trained - global||`` (0 for an update equal to the global model). Both
travel in the signed commitment with the SHA-256 of the payload bytes. Pure: no I/O.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from trustfed.core.strategy import Update
from trustfed.errors import CodecError

Codec = Literal["none", "fp16", "int8"]
CODECS: tuple[str, ...] = ("none", "fp16", "int8")
DEFAULT_BLOCK = 4096
FP16_MAX = 65504.0

_MAGIC = b"TFQ1"
_TAGS = {"fp16": 1, "int8": 2}
_HEADER = struct.Struct("<4sB3xI")  # magic, codec tag, three zero bytes, block size


def payload_size(codec: str, n: int, block: int = DEFAULT_BLOCK) -> int:
    """Bytes of the payload of ``n`` values (``none``: raw float32)."""
    if codec == "none":
        return 4 * n
    if codec == "fp16":
        return _HEADER.size + 2 * n
    if codec == "int8":
        return _HEADER.size + 4 * _blocks(n, block) + n
    raise CodecError(f"unknown compression {codec!r}; expected one of {', '.join(CODECS)}")


def _blocks(n: int, block: int) -> int:
    if block < 1:
        raise CodecError(f"compression block must be >= 1 value, got {block}")
    return -(-n // block)


def encode(values: torch.Tensor, codec: str, block: int = DEFAULT_BLOCK) -> bytes:
    """The payload of a finite 1-D float32 vector (``fp16`` or ``int8``)."""
    if codec not in _TAGS:
        raise CodecError(f"cannot encode with compression {codec!r}; expected fp16 or int8")
    x = values.detach().cpu().contiguous().numpy().astype(np.float32, copy=False).reshape(-1)
    if not np.isfinite(x).all():
        raise CodecError("the update holds NaN or infinite values; it cannot be compressed (nor aggregated)")
    head = _HEADER.pack(_MAGIC, _TAGS[codec], block)
    if codec == "fp16":
        big = np.flatnonzero(np.abs(x) > FP16_MAX)
        if big.size:
            i = int(big[0])
            raise CodecError(
                f"update value {float(x[i]):.6g} at index {i} (delta to the global model) is beyond float16's range "
                f"(±{FP16_MAX:g}); compression = 'fp16' refuses it: use 'int8' (per-block scales) or 'none'"
            )
        return head + bytes(x.astype("<f2").tobytes())
    nb = _blocks(x.size, block)
    padded = np.zeros(nb * block, dtype=np.float32)
    padded[: x.size] = x
    blocks = padded.reshape(nb, block)
    scales = (np.abs(blocks).max(axis=1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))[:, None]
    q = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int8).reshape(-1)[: x.size]
    return head + bytes(scales.astype("<f4").tobytes()) + bytes(q.tobytes())


def decode(payload: bytes | bytearray | memoryview, codec: str, n: int, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """The float32 vector a payload holds; refuses any payload :func:`encode` would not have written."""
    if codec not in _TAGS:
        raise CodecError(f"cannot decode compression {codec!r}; expected fp16 or int8")
    data = memoryview(payload).cast("B")
    want = payload_size(codec, n, block)
    if len(data) != want:
        raise CodecError(f"{codec} payload of {len(data)} bytes; {n} values in blocks of {block} need {want}")
    magic, tag, got_block = _HEADER.unpack_from(data)
    if magic != _MAGIC or bytes(data[5:8]) != b"\0\0\0":
        raise CodecError("compressed payload does not start with the TFQ1 header")
    if tag != _TAGS[codec]:
        raise CodecError(f"compressed payload has codec tag {tag}; expected {_TAGS[codec]} ({codec})")
    if got_block != block:
        raise CodecError(f"compressed payload uses blocks of {got_block} values; expected {block}")
    body = data[_HEADER.size :]
    if codec == "fp16":
        half = np.frombuffer(body, dtype="<f2")
        if not np.isfinite(half).all():
            raise CodecError("fp16 payload holds NaN or infinite values")
        return torch.from_numpy(half.astype(np.float32))
    nb = _blocks(n, block)
    scales = np.frombuffer(body[: 4 * nb], dtype="<f4").astype(np.float32)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise CodecError("int8 payload has a NaN, infinite or negative block scale")
    q = np.frombuffer(body[4 * nb :], dtype=np.int8)
    if (q == -128).any():
        raise CodecError("int8 payload holds -128, outside the symmetric range [-127, 127]")
    out = q.astype(np.float32) * np.repeat(scales, block)[:n]
    if not np.isfinite(out).all():
        raise CodecError("int8 payload dequantises to values beyond float32's range")
    return torch.from_numpy(out.astype(np.float32, copy=False))


@dataclass(frozen=True)
class CompressionPolicy:
    """A federation's ``[transport] compression``, ``compression_block`` and ``compression_max_error``."""

    codec: str = "none"
    block: int = DEFAULT_BLOCK
    max_error: float | None = None

    @property
    def enabled(self) -> bool:
        return self.codec != "none"

    def payload_size(self, n: int) -> int:
        """Bytes an upload of ``n`` values takes under this policy."""
        return payload_size(self.codec, n, self.block)

    def declaration(self) -> dict[str, Any]:
        """What the coordinator signs in each aggregation entry (``audit verify`` checks commitments by it)."""
        return {"codec": self.codec, "block": self.block, "max_error": self.max_error}


@dataclass(frozen=True)
class CompressionRecord:
    """What a sender signs about its compressed update (the payload's hash travels beside it)."""

    codec: str
    block: int
    max_abs_error: float
    rel_l2_error: float

    def to_body(self) -> dict[str, Any]:
        """The commitment's ``compression`` entry (the block is the int8 one; fp16 records it too)."""
        return {
            "codec": self.codec,
            "block": int(self.block),
            "max_abs_error": float(self.max_abs_error),
            "rel_l2_error": float(self.rel_l2_error),
        }

    def problems(self, max_error: float | None = None) -> list[str]:
        """Why this record cannot stand (empty: it can): bounds finite, >= 0, within ``max_error``."""
        out = []
        if self.codec not in _TAGS:
            out.append(f"codec {self.codec!r} is not fp16 or int8")
        if self.block < 1:
            out.append(f"block {self.block} is not >= 1")
        for name in ("max_abs_error", "rel_l2_error"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                out.append(f"{name} {v!r} is not a finite number >= 0")
        if max_error is not None and math.isfinite(self.max_abs_error) and self.max_abs_error > max_error:
            out.append(f"max_abs_error {self.max_abs_error:.6g} is over the federation's max_error {max_error:g}")
        return out


@dataclass(frozen=True)
class CompressedUpdate(Update):
    """An update as it crossed the wire compressed: ``params`` are the restored values (what is
    aggregated), ``payload`` the exact bytes sent (what the commitment hashes)."""

    payload: bytes = b""
    compression: CompressionRecord | None = None


def compression_body(update: Update) -> dict[str, Any] | None:
    """The commitment's ``compression`` entry of an update that travelled compressed (None otherwise)."""
    if isinstance(update, CompressedUpdate) and update.compression is not None:
        return update.compression.to_body()
    return None


def restore(base: torch.Tensor, payload: bytes | bytearray | memoryview, codec: str, block: int) -> torch.Tensor:
    """The receiver's side: ``base + decode(payload)`` as float32 (``base``: the round's global model)."""
    delta = decode(payload, codec, base.numel(), block)
    return (base.detach().reshape(-1).to(torch.float32) + delta).contiguous()


def compress_update(update: Update, base: torch.Tensor, policy: CompressionPolicy) -> CompressedUpdate:
    """The sender's side: quantise ``update.params - base``, restore it as the receiver will, and measure
    the error of what will be aggregated against what was trained. An error over ``policy.max_error`` is
    refused here, before anything is sent (the receiver would refuse it)."""
    codec, block = policy.codec, policy.block
    trained = update.params.detach().reshape(-1).to(torch.float32)
    if trained.numel() != base.numel():
        raise CodecError(f"update of {trained.numel()} values against a global model of {base.numel()}")
    delta = trained - base.reshape(-1).to(torch.float32)
    payload = encode(delta, codec, block)
    restored = restore(base, payload, codec, block)
    err = (restored.double() - trained.double()).abs()
    norm = float(delta.double().norm())
    record = CompressionRecord(
        codec,
        block,
        float(err.max()) if err.numel() else 0.0,
        float(err.norm()) / norm if norm > 0 else 0.0,
    )
    over = record.problems(policy.max_error)
    if over:
        raise CodecError(
            f"the {codec} update of {update.participant_id}: {'; '.join(over)}; raise "
            "[transport] compression_max_error, use a smaller compression_block, or 'fp16' / 'none'"
        )
    return CompressedUpdate(
        update.participant_id, restored, update.num_examples, dict(update.metrics), payload=payload, compression=record
    )
