"""Chunked model streams: a signed header, then raw little-endian float32 chunks.

The header's body names the spec, the total size, the chunk size and count, and the model
hash (:func:`trustfed.core.codec.model_hash`) of the payload. The receiver checks every
declared size and count against its limits *before* allocating the buffer, checks each chunk's
index and length as it arrives, stops at the first byte beyond what was declared, and compares
the hash it computed over the chunks with the signed one at the end.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from trustfed.core.codec import ParamSpec, from_bytes
from trustfed.transport import federation_pb2 as pb
from trustfed.transport.errors import MessageRejected
from trustfed.transport.settings import Limits


def model_hasher(spec_json: str) -> hashlib._Hash:
    """A SHA-256 primed exactly as :func:`trustfed.core.codec.model_hash`; feed it the payload."""
    h = hashlib.sha256()
    h.update(b"trustfed-model-v1\0")
    h.update(spec_json.encode())
    h.update(b"\0")
    return h


def payload_hash(spec_json: str, payload: bytes) -> str:
    """model_hash over the wire bytes, whatever they encode (one pass, no float32 conversion)."""
    h = model_hasher(spec_json)
    h.update(payload)
    return h.hexdigest()


def num_chunks(total_bytes: int, chunk_bytes: int) -> int:
    return -(-total_bytes // chunk_bytes)


def iter_chunks(payload: bytes | bytearray | memoryview, chunk_bytes: int) -> Iterator[pb.StreamPart]:
    view = memoryview(payload)
    for i, off in enumerate(range(0, len(view), chunk_bytes)):
        yield pb.StreamPart(chunk=pb.Chunk(index=i, data=bytes(view[off : off + chunk_bytes])))


@dataclass(frozen=True)
class StreamDeclaration:
    """What a stream's signed header says is coming."""

    total_bytes: int
    chunk_bytes: int
    num_chunks: int
    model_hash: str


# A sealed update (enclave mode) is the float32 payload plus a header of at most 64 KiB and the seal's
# framing (magic, lengths, ephemeral key, nonce, tag); see trustfed.enclave.sealing.
SEALED_OVERHEAD_MAX = 64 * 1024 + 256


def check_declaration(
    decl: StreamDeclaration,
    spec: ParamSpec,
    limits: Limits,
    where: str,
    *,
    sealed: bool = False,
    payload_bytes: int | None = None,
) -> None:
    """Refuse a stream whose declared sizes break a limit or do not match the spec (before allocation).

    ``sealed``: the payload is an update sealed to the enclave, a little larger than the spec's size;
    ``payload_bytes``: the size the payload must have instead of float32's (a compressed update)."""
    expected = 4 * spec.size if payload_bytes is None else payload_bytes
    if sealed and expected < decl.total_bytes <= expected + SEALED_OVERHEAD_MAX:
        expected = decl.total_bytes
    if decl.total_bytes > limits.max_model_bytes:
        raise MessageRejected(
            "too_large",
            f"{where}: declares {decl.total_bytes} bytes, over the limit of {limits.max_model_bytes} bytes",
        )
    if decl.total_bytes != expected:
        raise MessageRejected(
            "size_mismatch", f"{where}: declares {decl.total_bytes} bytes but the spec needs {expected}"
        )
    if not 0 < decl.chunk_bytes <= limits.chunk_bytes:
        raise MessageRejected(
            "bad_chunk_size", f"{where}: chunk size {decl.chunk_bytes} outside (0, {limits.chunk_bytes}]"
        )
    want = num_chunks(decl.total_bytes, decl.chunk_bytes)
    if decl.num_chunks != want or decl.num_chunks > limits.max_chunks:
        raise MessageRejected("bad_chunk_count", f"{where}: declares {decl.num_chunks} chunks, expected {want}")


def receive_payload(parts: Iterable[pb.StreamPart], decl: StreamDeclaration, spec_json: str, where: str) -> bytearray:
    """Read exactly the declared chunks into one preallocated buffer and check the model hash.

    ``decl`` must already have passed :func:`check_declaration`. Reading stops at the first
    chunk that is out of order, of the wrong length or beyond the declared count.
    """
    buf = bytearray(decl.total_bytes)
    view = memoryview(buf)
    hasher = model_hasher(spec_json)
    expected_index = 0
    offset = 0
    it = iter(parts)
    while expected_index < decl.num_chunks:
        try:
            part = next(it)
        except StopIteration:
            raise MessageRejected(
                "truncated", f"{where}: stream ended after {expected_index} of {decl.num_chunks} chunks"
            ) from None
        if part.WhichOneof("part") != "chunk":
            raise MessageRejected("unexpected_part", f"{where}: expected chunk {expected_index}, got a header")
        chunk = part.chunk
        want = min(decl.chunk_bytes, decl.total_bytes - offset)
        if chunk.index != expected_index or len(chunk.data) != want:
            raise MessageRejected(
                "bad_chunk",
                f"{where}: chunk {chunk.index} of {len(chunk.data)} bytes; expected chunk {expected_index} of {want} bytes",
            )
        view[offset : offset + want] = chunk.data
        hasher.update(chunk.data)
        offset += want
        expected_index += 1
    if hasher.hexdigest() != decl.model_hash:
        raise MessageRejected("hash_mismatch", f"{where}: payload does not match its signed model hash")
    return buf


def as_vector(buf: bytearray, spec: ParamSpec) -> torch.Tensor:
    """The received float32 vector, sharing ``buf``'s memory (no copy on little-endian hosts)."""
    if len(buf) != 4 * spec.size:
        raise MessageRejected("size_mismatch", f"payload has {len(buf)} bytes but the spec needs {4 * spec.size}")
    if sys.byteorder != "little":
        return from_bytes(buf, spec)
    return torch.frombuffer(buf, dtype=torch.float32) if buf else torch.zeros(0, dtype=torch.float32)


def expect_end(parts: Iterator[pb.StreamPart], where: str) -> None:
    """Refuse anything sent after the declared chunks (without reading more than one part)."""
    for _ in parts:
        raise MessageRejected("too_many_chunks", f"{where}: data beyond the declared chunks")
