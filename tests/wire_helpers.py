"""A coordinator and an enclave on 127.0.0.1 with the real mutual TLS, and hostile messages for every
RPC of both: the harness of the wire fuzz test and of ``benchmarks/fuzz.py``.

Messages come in families: ``garbage`` (bytes that need not parse), ``truncated`` (a valid message
cut short), ``oversized`` (a valid message padded past the per-role limit), ``missigned`` (a signed
envelope with a broken signature, type, hash or sender) and ``mutated`` (a valid message with a few
bytes flipped). Each is sent from an identity: a valid participant, the coordinator (to the enclave)
or a revoked participant.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from trustfed.coordinator.network import GrpcTransport
from trustfed.core.codec import ParamSpec, TensorSpec
from trustfed.enclave import enclave_pb2 as epb
from trustfed.enclave.core import Enclave
from trustfed.enclave.sealing import StaticKeyring
from trustfed.enclave.service import ENCLAVE_TLS_NAME, TlsMaterial, serve
from trustfed.enclave.settings import AggregationSettings, EnclaveServiceConfig
from trustfed.pki import COORDINATOR_TLS_NAME, RevocationList, init_ca, issue, load_certificate, load_private_key
from trustfed.pki import revoke as revoke_cert
from trustfed.transport import federation_pb2 as pb
from trustfed.transport.envelope import Signer
from trustfed.transport.settings import Limits, TransportSettings

SPEC = ParamSpec((TensorSpec("w", (4000,), "float32"),))  # 16,000 bytes
LIMITS = Limits(chunk_bytes=4096, max_model_bytes=64 * 1024, max_message_bytes=64 * 1024)
FAMILIES = ("garbage", "truncated", "oversized", "missigned", "mutated")
IDENTITIES = ("p000", "coordinator", "p002")  # valid participant, coordinator (enclave only), revoked
FED = "/trustfed.transport.v1.Federation/"
ENC = "/trustfed.enclave.v1.Enclave/"
# method path -> (request streaming, response streaming)
RPCS: dict[str, tuple[bool, bool]] = {
    FED + "GetRoundPlan": (False, False),
    FED + "DownloadModel": (False, True),
    FED + "UploadUpdate": (True, False),
    FED + "GetReceipt": (False, False),
    FED + "SecAgg": (False, False),
    ENC + "GetEvidence": (False, False),
    ENC + "GetPublicKey": (False, False),
    ENC + "Aggregate": (False, False),
    ENC + "GetState": (False, False),
}


def make_pki(d: Path) -> Path:
    init_ca(d)
    issue(d, "coordinator", "coordinator")
    issue(d, "enclave", "enclave", hosts=(ENCLAVE_TLS_NAME,))
    for pid in ("p000", "p001", "p002"):
        issue(d, "participant", pid)
    revoke_cert(d, name="p002")
    return d


def rss_bytes() -> int:
    """This process's resident memory (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@dataclass
class Wire:
    """Both servers and one channel per (identity, server)."""

    pki: Path
    transport: GrpcTransport
    enclave_server: grpc.Server
    enclave_port: int
    channels: dict[tuple[str, str], grpc.Channel] = field(default_factory=dict)

    @classmethod
    def start(cls, pki: Path, *, limits: Limits = LIMITS, max_workers: int = 8) -> Wire:
        s = TransportSettings(
            listen="127.0.0.1:0",
            ca=pki / "ca.pem",
            cert=pki / "coordinator.pem",
            key=pki / "coordinator.key",
            crl=pki / "crl.pem",
            linger_s=0,
            limits=limits,
        )
        transport = GrpcTransport(s, SPEC, max_workers=max_workers)
        enclave = Enclave(AggregationSettings(), StaticKeyring({}), allow_simulated_tee=True)
        cfg = EnclaveServiceConfig.model_validate(
            {"enclave": {"allow_simulated_tee": True, "max_message_mb": 1, "calls_per_s": 1000, "call_burst": 1000}}
        )
        tls = TlsMaterial.from_files(pki / "ca.pem", pki / "enclave.pem", pki / "enclave.key")
        crl = RevocationList.load(pki / "crl.pem", load_certificate(pki / "ca.pem"))
        server, port, _ = serve(cfg, enclave=enclave, tls=tls, listen="127.0.0.1:0", revocations=crl)
        return cls(pki, transport, server, port)

    def channel(self, who: str, to_enclave: bool) -> grpc.Channel:
        key = (who, "enclave" if to_enclave else "coordinator")
        if key not in self.channels:
            creds = grpc.ssl_channel_credentials(
                root_certificates=(self.pki / "ca.pem").read_bytes(),
                private_key=(self.pki / f"{who}.key").read_bytes(),
                certificate_chain=(self.pki / f"{who}.pem").read_bytes(),
            )
            name = ENCLAVE_TLS_NAME if to_enclave else COORDINATOR_TLS_NAME
            address = f"127.0.0.1:{self.enclave_port}" if to_enclave else self.transport.address
            opts = [
                ("grpc.max_send_message_length", 8 << 20),
                ("grpc.max_receive_message_length", 8 << 20),
                ("grpc.ssl_target_name_override", name),
            ]
            self.channels[key] = grpc.secure_channel(address, creds, options=opts)
        return self.channels[key]

    def send(self, method: str, who: str, messages: list[bytes], timeout: float = 20.0) -> grpc.StatusCode:
        """Send raw request messages to ``method`` as ``who``; the status the server answered."""
        stream_in, stream_out = RPCS[method]
        ch = self.channel(who, method.startswith(ENC))
        try:
            if stream_in:
                ch.stream_unary(method)(iter(messages), timeout=timeout)
            elif stream_out:
                for _ in ch.unary_stream(method)(messages[0], timeout=timeout):
                    pass
            else:
                ch.unary_unary(method)(messages[0], timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()
        self.transport.close()
        self.enclave_server.stop(grace=None)


class Messages:
    """Valid and hostile request messages for each RPC, signed as a given participant."""

    def __init__(self, pki: Path) -> None:
        self.signers = {p: Signer(p, load_private_key(pki / f"{p}.key")) for p in ("p000", "p001", "p002")}
        self.signers["coordinator"] = Signer("coordinator", load_private_key(pki / "coordinator.key"))

    def valid(self, method: str, who: str, rng: random.Random) -> list[bytes]:
        """A well-formed request (never a long poll), as a list of stream messages."""
        name = method.rpartition("/")[2]
        s = self.signers[who]
        nonce = rng.randbytes(32)
        enclave: dict[str, Callable[[], bytes]] = {
            "GetEvidence": lambda: epb.EvidenceRequest(nonce=nonce).SerializeToString(),
            "GetPublicKey": lambda: epb.PublicKeyRequest().SerializeToString(),
            "GetState": lambda: epb.StateRequest(nonce=nonce).SerializeToString(),
            "Aggregate": lambda: epb.AggregateRequest(
                round=rng.randrange(4), params=bytes(16), spec_json=SPEC.to_json(), selected=[who]
            ).SerializeToString(),
        }
        if name in enclave:
            return [enclave[name]()]
        if name == "UploadUpdate":
            h = pb.UpdateHeader(
                round=1, participant_id=who, num_examples=1, total_bytes=4 * SPEC.size, chunk_bytes=4096, num_chunks=4
            )
            header = pb.StreamPart(header=s.sign("update_header", 1, h.SerializeToString()))
            chunk = pb.StreamPart(chunk=pb.Chunk(index=0, data=bytes(4096)))
            return [header.SerializeToString(), chunk.SerializeToString()]
        bodies = {
            "GetRoundPlan": ("plan_request", pb.PlanRequest(participant_id=who, wait_ms=0)),
            "DownloadModel": ("model_request", pb.ModelRequest(round=1, model_hash="0" * 64)),
            "GetReceipt": ("receipt_request", pb.ReceiptRequest(round=rng.randrange(3), wait_ms=0)),
            "SecAgg": ("secagg_request", pb.SecAggRequest(round=1, step=pb.SECAGG_KEYS, wait_ms=0)),
        }
        msg_type, body = bodies[name]
        return [s.sign(msg_type, 1, body.SerializeToString()).SerializeToString()]

    def hostile(self, family: str, method: str, who: str, rng: random.Random, garbage: bytes = b"") -> list[bytes]:
        msgs = self.valid(method, who, rng)
        i = rng.randrange(len(msgs))
        m = msgs[i]
        if family == "garbage":
            msgs[i] = garbage or rng.randbytes(rng.randrange(1, 512))
        elif family == "truncated":
            msgs[i] = m[: rng.randrange(len(m))] if len(m) > 1 else b""
        elif family == "oversized":
            pad = 66_000 + rng.randrange(70_000)  # past the 64 KiB of a small request; sometimes past gRPC's limit
            msgs[i] = m + b"\x7a" + _varint(pad) + bytes(pad)  # an unknown field 15 (length-delimited)
        elif family == "missigned":
            msgs[i] = self._missigned(m, method, rng)
        else:  # mutated
            b = bytearray(m or b"\0")  # an empty message (GetPublicKey) mutates into one byte
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            msgs[i] = bytes(b)
        return msgs

    def _missigned(self, m: bytes, method: str, rng: random.Random) -> bytes:
        if method.startswith(ENC):
            return m  # the enclave's requests are not signed envelopes: send the valid one
        signed = pb.SignedMessage()
        part = pb.StreamPart()
        if method.endswith("UploadUpdate") and part.ParseFromString(m) and part.HasField("header"):
            signed = part.header
        elif not signed.ParseFromString(m) or not signed.HasField("envelope"):
            return m
        env = signed.envelope
        how = rng.randrange(5)
        if how == 0:
            env.signature = bytes(len(env.signature))
        elif how == 1:
            env.msg_type = "plan_request\naccepted update from p001 " + "A" * rng.randrange(2000)
        elif how == 2:
            signed.body = signed.body + b"\x00"
        elif how == 3:
            env.sender_id = "p001"
        else:
            env.nonce = b"\x01" * 3
        if method.endswith("UploadUpdate"):
            return pb.StreamPart(header=signed).SerializeToString()
        return signed.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)
