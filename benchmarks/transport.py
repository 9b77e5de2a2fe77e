"""Model round trip over trustfed's secure transport vs a plain insecure gRPC channel.

Secure: the real coordinator service and participant client (mutual TLS 1.3, a signed header per
stream, SHA-256 model hash over every chunk, all checks). Plain: the same protobuf messages and
chunk size over an insecure channel with no signing, hashing or checks. Both include the same
float32 <-> bytes conversions. One round trip = download the model + upload an update of the
same size. Reported: MB/s (payload bytes both ways / seconds, median of the repeats) and the
secure/plain ratio (goal >= 0.8).

    .venv/bin/python benchmarks/transport.py            # 100 MB model
    .venv/bin/python benchmarks/transport.py --quick    # 10 MB model
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import torch

from trustfed.coordinator.network import GrpcTransport
from trustfed.core.codec import ParamSpec, TensorSpec, from_bytes, model_hash, to_bytes
from trustfed.core.strategy import RoundPlan, Update
from trustfed.participant.client import ParticipantClient
from trustfed.participant.settings import ParticipantConfig
from trustfed.pki import init_ca, issue
from trustfed.transport import federation_pb2 as pb
from trustfed.transport import federation_pb2_grpc as pb_grpc
from trustfed.transport.settings import Limits, TransportSettings
from trustfed.transport.streaming import iter_chunks
from trustfed.transport.tls import grpc_options

MB = 1_000_000


class Identity:
    participant_id = "p000"

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        return Update("p000", params, 1, {})

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return {}


def secure_round_trips(spec: ParamSpec, repeats: int, limits: Limits, pki: Path) -> list[float]:
    settings = TransportSettings(
        listen="127.0.0.1:0",
        ca=pki / "ca.pem",
        cert=pki / "coordinator.pem",
        key=pki / "coordinator.key",
        linger_s=0,
        limits=limits,
    )
    transport = GrpcTransport(settings, spec, max_workers=4)
    cfg = ParticipantConfig.model_validate(
        {
            "participant": {"id": "p000", "coordinator": transport.address, "federation_config": str(pki / "x")},
            "tls": {"ca": str(pki / "ca.pem"), "cert": str(pki / "p000.pem"), "key": str(pki / "p000.key")},
            "limits": limits.model_dump(),
        }
    )
    client = ParticipantClient(cfg, Identity(), spec)
    params = torch.randn(spec.size, generator=torch.Generator().manual_seed(0))
    times = []
    try:
        for r in range(1, repeats + 1):
            plan = RoundPlan(r, ("p000",), {}, model_hash(params, spec))
            fitter = threading.Thread(target=transport.fit, args=(plan, params))
            fitter.start()
            raw = client.fetch_plan(r - 1)
            rp = client.verify_plan(raw, r - 1)
            t0 = time.perf_counter()
            got = client.download_model(rp)
            client.upload(rp, Update("p000", got, 1, {}), client.seal(rp, Update("p000", got, 1, {})))
            times.append(time.perf_counter() - t0)
            fitter.join()
            assert torch.equal(got, params)
    finally:
        client.close()
        transport.close()
    return times


class PlainServicer(pb_grpc.FederationServicer):  # type: ignore[misc]
    def __init__(self, payload: bytes, chunk: int) -> None:
        self.payload = payload
        self.chunk = chunk
        self.received = 0

    def DownloadModel(self, request: pb.SignedMessage, context: Any) -> Iterator[pb.StreamPart]:
        yield from iter_chunks(self.payload, self.chunk)

    def UploadUpdate(self, request_iterator: Iterator[pb.StreamPart], context: Any) -> pb.SignedMessage:
        buf = bytearray(len(self.payload))
        off = 0
        for part in request_iterator:
            n = len(part.chunk.data)
            buf[off : off + n] = part.chunk.data
            off += n
        self.received = off
        return pb.SignedMessage()


def plain_round_trips(spec: ParamSpec, repeats: int, limits: Limits) -> list[float]:
    params = torch.randn(spec.size, generator=torch.Generator().manual_seed(0))
    servicer = PlainServicer(to_bytes(params), limits.chunk_bytes)
    opts = grpc_options(limits.max_message_bytes + 64 * 1024)
    server = grpc.server(futures.ThreadPoolExecutor(4), options=opts)
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
    stub = pb_grpc.FederationStub(ch)
    times = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            buf = bytearray(4 * spec.size)
            off = 0
            for part in stub.DownloadModel(pb.SignedMessage(), timeout=600):
                n = len(part.chunk.data)
                buf[off : off + n] = part.chunk.data
                off += n
            got = from_bytes(buf, spec)
            stub.UploadUpdate(iter_chunks(to_bytes(got), limits.chunk_bytes), timeout=600)
            times.append(time.perf_counter() - t0)
            assert servicer.received == 4 * spec.size
    finally:
        ch.close()
        server.stop(0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=100.0, help="model size in MB (10^6 bytes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-kib", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="10 MB, 2 repeats")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transport.json")
    args = ap.parse_args()
    if args.quick:
        args.mb, args.repeats = 10.0, 2
    torch.set_num_threads(1)
    n = int(args.mb * MB) // 4
    spec = ParamSpec((TensorSpec("w", (n,), "float32"),))
    limits = Limits(chunk_bytes=args.chunk_kib * 1024, max_model_bytes=max(4 * n, 4096))
    with tempfile.TemporaryDirectory() as d:
        pki = Path(d)
        init_ca(pki)
        issue(pki, "coordinator", "coordinator")
        issue(pki, "participant", "p000")
        # interleave so background load hits both alike
        plain: list[float] = []
        secure: list[float] = []
        for _ in range(args.repeats):
            plain += plain_round_trips(spec, 1, limits)
            secure += secure_round_trips(spec, 1, limits, pki)
    moved = 2 * 4 * n / MB  # download + upload
    rows = {
        "plain gRPC (insecure)": statistics.median(plain),
        "trustfed (mTLS 1.3 + signatures + hashes)": statistics.median(secure),
    }
    ratio = rows["plain gRPC (insecure)"] / rows["trustfed (mTLS 1.3 + signatures + hashes)"]
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"model round trip: {4 * n / MB:.0f} MB down + up, chunk {args.chunk_kib} KiB, median of {args.repeats}"
    )
    t.add_column("transport")
    t.add_column("seconds", justify="right")
    t.add_column("MB/s", justify="right")
    for name, sec in rows.items():
        t.add_row(name, f"{sec:.3f}", f"{moved / sec:.1f}")
    Console().print(t)
    Console().print(f"secure / plain throughput: [bold]{ratio:.2f}x[/bold] (goal >= 0.8)")
    result = {
        "model_mb": 4 * n / MB,
        "chunk_kib": args.chunk_kib,
        "repeats": args.repeats,
        "plain_seconds": plain,
        "secure_seconds": secure,
        "plain_mb_per_s": moved / rows["plain gRPC (insecure)"],
        "secure_mb_per_s": moved / rows["trustfed (mTLS 1.3 + signatures + hashes)"],
        "ratio_secure_over_plain": ratio,
        "goal": 0.8,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
