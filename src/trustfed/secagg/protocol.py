"""Secure aggregation (Bonawitz et al., CCS 2017) as sans-I/O state machines.

The server learns only the sum of the participants' vectors, even when some of them drop out
after sending their masked input. Each step of :class:`SecAggClient` takes the message the
server relayed and returns the next message to send; :class:`SecAggServer` collects and routes.
Nothing here opens a socket: any transport can carry the messages.

Clients check what the server hands them (the roster, the sets of participants still in the
round) instead of trusting it: a client refuses to go on with fewer than ``threshold``
participants, with sets that grew between steps, or when asked to unmask twice, since either
could make it reveal both secrets protecting one participant's input.

Vectors are clipped to [-clip, clip] and quantised to ``bits`` bits; sums are computed modulo
2**32, so ``n_participants * (2**bits - 1)`` must stay below 2**32.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustfed.errors import TrustFedError
from trustfed.secagg import shamir

MOD_BITS = 32


class SecAggError(TrustFedError):
    """A secure-aggregation step was refused: the message or the server's request is unsafe."""


@dataclass(frozen=True)
class SecAggParams:
    threshold: int
    clip: float = 1.0
    bits: int = 20
    round: int = 0

    def check(self, n: int) -> None:
        if not 2 <= self.threshold <= n:
            raise SecAggError(f"threshold {self.threshold} must be in 2..{n} for {n} participants")
        if self.clip <= 0 or not 1 <= self.bits <= 31:
            raise SecAggError("need clip > 0 and 1 <= bits <= 31")
        if n * (2**self.bits - 1) >= 2**MOD_BITS:
            raise SecAggError(f"{n} participants x {self.bits}-bit values overflow the 32-bit sum; lower bits")


@dataclass(frozen=True)
class PublicKeys:
    cipher_pk: bytes  # X25519, encrypts the key shares sent through the server
    mask_pk: bytes  # X25519, agrees the pairwise mask seeds


@dataclass(frozen=True)
class UnmaskShares:
    self_mask_shares: dict[int, bytes]  # for survivors: shares of their self-mask seed
    key_shares: dict[int, bytes]  # for dropped participants: shares of their mask key


def _raw_pk(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_sk(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _agree(sk: X25519PrivateKey, pk: bytes, info: bytes) -> bytes:
    shared = sk.exchange(X25519PublicKey.from_public_bytes(pk))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def prg(seed: bytes, n: int) -> np.ndarray:
    """ChaCha20 key stream as ``n`` uint32 values."""
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\0" * (4 * n)), dtype="<u4").astype(np.uint32)


def quantize(x: np.ndarray, clip: float, bits: int) -> np.ndarray:
    levels = 2**bits - 1
    q = np.rint((np.clip(x.astype(np.float64), -clip, clip) + clip) / (2 * clip) * levels)
    out: np.ndarray = q.astype(np.uint32)
    return out


def dequantize_sum(s: np.ndarray, n: int, clip: float, bits: int) -> np.ndarray:
    levels = 2**bits - 1
    out: np.ndarray = (s.astype(np.float64) / levels * (2 * clip) - n * clip).astype(np.float32)
    return out


def _pair_info(rnd: int, a: int, b: int) -> bytes:
    lo, hi = sorted((a, b))
    return f"trustfed-secagg-mask:{rnd}:{lo}:{hi}".encode()


def _share_aad(rnd: int, sender: int, recipient: int) -> bytes:
    return f"trustfed-secagg-share:{rnd}:{sender}:{recipient}".encode()


class SecAggClient:
    """One participant's side. Call the steps in order; each refuses unsafe requests."""

    def __init__(self, cid: int, params: SecAggParams) -> None:
        if cid <= 0:
            raise SecAggError("participant numbers must be >= 1 (0 is not a valid share point)")
        self.cid = cid
        self.p = params
        self._cipher_sk = X25519PrivateKey.generate()
        self._mask_sk = X25519PrivateKey.generate()
        self._self_seed = os.urandom(32)
        self.keys = PublicKeys(_raw_pk(self._cipher_sk), _raw_pk(self._mask_sk))
        self._roster: dict[int, PublicKeys] = {}
        self._u2: frozenset[int] = frozenset()
        self._held: dict[int, tuple[int, int]] = {}  # sender -> (self-mask share, key share) for me
        self._unmasked = False

    # step 0
    def advertise_keys(self) -> PublicKeys:
        return self.keys

    # step 1
    def share_keys(self, roster: Mapping[int, PublicKeys]) -> dict[int, bytes]:
        if roster.get(self.cid) != self.keys:
            raise SecAggError(f"participant {self.cid}: the roster does not carry my own keys")
        if len(roster) < self.p.threshold:
            raise SecAggError(f"roster has {len(roster)} participants, fewer than threshold {self.p.threshold}")
        pks = [k.cipher_pk for k in roster.values()] + [k.mask_pk for k in roster.values()]
        if len(set(pks)) != len(pks):
            raise SecAggError("roster repeats a public key")
        self.p.check(len(roster))
        self._roster = dict(roster)
        xs = sorted(roster)
        b_shares = shamir.split(self._self_seed, self.p.threshold, xs)
        k_shares = shamir.split(_raw_sk(self._mask_sk), self.p.threshold, xs)
        out = {}
        for v in xs:
            if v == self.cid:
                self._held[v] = (b_shares[v], k_shares[v])
                continue
            key = _agree(self._cipher_sk, roster[v].cipher_pk, b"trustfed-secagg-enc")
            body = shamir.share_to_bytes(b_shares[v]) + shamir.share_to_bytes(k_shares[v])
            nonce = os.urandom(12)
            out[v] = nonce + AESGCM(key).encrypt(nonce, body, _share_aad(self.p.round, self.cid, v))
        return out

    # step 2
    def masked_input(self, x: np.ndarray, inbox: Mapping[int, bytes]) -> np.ndarray:
        """``inbox``: the encrypted shares other participants sent me (sender -> ciphertext)."""
        u2 = frozenset(inbox) | {self.cid}
        if not u2 <= set(self._roster):
            raise SecAggError("shares arrived from participants not in the roster")
        if len(u2) < self.p.threshold:
            raise SecAggError(f"only {len(u2)} participants shared keys, fewer than threshold {self.p.threshold}")
        for u, ct in inbox.items():
            key = _agree(self._cipher_sk, self._roster[u].cipher_pk, b"trustfed-secagg-enc")
            try:
                body = AESGCM(key).decrypt(ct[:12], ct[12:], _share_aad(self.p.round, u, self.cid))
            except Exception as exc:
                raise SecAggError(f"share from participant {u} does not authenticate") from exc
            n = shamir.SHARE_BYTES
            self._held[u] = (shamir.share_from_bytes(body[:n]), shamir.share_from_bytes(body[n:]))
        self._u2 = u2
        y = quantize(x, self.p.clip, self.p.bits)
        y += prg(self._self_seed, y.size)
        for v in sorted(u2 - {self.cid}):
            seed = _agree(self._mask_sk, self._roster[v].mask_pk, _pair_info(self.p.round, self.cid, v))
            if self.cid < v:
                y += prg(seed, y.size)
            else:
                y -= prg(seed, y.size)
        return y

    # step 3
    def unmask(self, survivors: Iterable[int]) -> UnmaskShares:
        u3 = frozenset(survivors)
        if self._unmasked:
            raise SecAggError("asked to unmask twice; refusing (it could reveal both secrets of a participant)")
        if not u3 <= self._u2:
            raise SecAggError("the survivor set names participants that never shared keys")
        if self.cid not in u3:
            raise SecAggError("the survivor set does not include me")
        if len(u3) < self.p.threshold:
            raise SecAggError(f"only {len(u3)} survivors, fewer than threshold {self.p.threshold}")
        self._unmasked = True
        b = {u: shamir.share_to_bytes(self._held[u][0]) for u in sorted(u3)}
        k = {u: shamir.share_to_bytes(self._held[u][1]) for u in sorted(self._u2 - u3)}
        return UnmaskShares(b, k)


class SecAggServer:
    """The aggregator's side: routes messages and recovers the sum, never a single input."""

    def __init__(self, params: SecAggParams, dim: int) -> None:
        self.p = params
        self.dim = dim
        self.roster: dict[int, PublicKeys] = {}
        self.shared: dict[int, dict[int, bytes]] = {}
        self.masked: dict[int, np.ndarray] = {}
        self.unmask_answers: dict[int, UnmaskShares] = {}

    def receive_keys(self, cid: int, keys: PublicKeys) -> None:
        self.roster[cid] = keys

    def roster_for_clients(self) -> dict[int, PublicKeys]:
        self.p.check(len(self.roster))
        return dict(self.roster)

    def receive_shares(self, cid: int, ciphertexts: Mapping[int, bytes]) -> None:
        if cid not in self.roster or set(ciphertexts) != set(self.roster) - {cid}:
            raise SecAggError(f"participant {cid} sent shares for the wrong set of recipients")
        self.shared[cid] = dict(ciphertexts)

    def inbox_for(self, cid: int) -> dict[int, bytes]:
        return {u: cts[cid] for u, cts in self.shared.items() if u != cid}

    def receive_masked(self, cid: int, y: np.ndarray) -> None:
        if cid not in self.shared:
            raise SecAggError(f"participant {cid} sent a masked input without sharing keys")
        if y.shape != (self.dim,) or y.dtype != np.uint32:
            raise SecAggError(f"masked input from {cid} must be uint32[{self.dim}]")
        self.masked[cid] = y

    def survivors(self) -> list[int]:
        return sorted(self.masked)

    def receive_unmask(self, cid: int, answer: UnmaskShares) -> None:
        self.unmask_answers[cid] = answer

    def aggregate(self) -> tuple[np.ndarray, list[int]]:
        """The float32 sum of the survivors' clipped inputs, and who they are."""
        u3 = self.survivors()
        if len(self.unmask_answers) < self.p.threshold:
            raise SecAggError(f"{len(self.unmask_answers)} unmask answers, {self.p.threshold} needed")
        total = np.zeros(self.dim, dtype=np.uint32)
        for cid in u3:
            total += self.masked[cid]
        for u in u3:
            shares = {v: shamir.share_from_bytes(a.self_mask_shares[u]) for v, a in self.unmask_answers.items()}
            total -= prg(shamir.combine(shares, self.p.threshold), self.dim)
        for u in sorted(set(self.shared) - set(u3)):
            shares = {v: shamir.share_from_bytes(a.key_shares[u]) for v, a in self.unmask_answers.items()}
            sk = X25519PrivateKey.from_private_bytes(shamir.combine(shares, self.p.threshold))
            for v in u3:
                seed = _agree(sk, self.roster[v].mask_pk, _pair_info(self.p.round, u, v))
                if v < u:
                    total -= prg(seed, self.dim)
                else:
                    total += prg(seed, self.dim)
        return dequantize_sum(total, len(u3), self.p.clip, self.p.bits), u3


@dataclass(frozen=True)
class SecureSum:
    total: np.ndarray  # float32 sum of the survivors' clipped inputs
    survivors: list[int]
    masked: dict[int, np.ndarray]  # every masked input computed (delivered or not): what the server could see


def secure_sum(
    params: SecAggParams,
    inputs: Mapping[int, np.ndarray],
    *,
    drop_before_sharing: Iterable[int] = (),
    drop_after_masking: Iterable[int] = (),
) -> SecureSum:
    """One whole protocol run between in-process clients (ids = keys of ``inputs``) and a server, the
    messages handed over directly; the given clients stop before sharing keys or after masking."""
    before, after = set(drop_before_sharing), set(drop_after_masking)
    dims = {x.shape for x in inputs.values()}
    if len(dims) != 1:
        raise SecAggError(f"inputs must share one shape, got {sorted(dims)}")
    clients = {cid: SecAggClient(cid, params) for cid in inputs}
    server = SecAggServer(params, int(next(iter(dims))[0]))
    for cid, c in clients.items():
        server.receive_keys(cid, c.advertise_keys())
    roster = server.roster_for_clients()
    for cid, c in clients.items():
        if cid not in before:
            server.receive_shares(cid, c.share_keys(roster))
    masked: dict[int, np.ndarray] = {}
    for cid in list(server.shared):
        masked[cid] = clients[cid].masked_input(inputs[cid], server.inbox_for(cid))
        if cid not in after:
            server.receive_masked(cid, masked[cid])
    survivors = server.survivors()
    for cid in survivors:
        server.receive_unmask(cid, clients[cid].unmask(survivors))
    total, who = server.aggregate()
    return SecureSum(total, who, masked)
