"""Secure aggregation (Bonawitz et al., CCS 2017) and SecAgg+ (Bell et al., CCS 2020) as sans-I/O
state machines.

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

With ``neighbours = k`` (SecAgg+), each participant agrees masks with, and secret-shares its seeds
among, only its k neighbours in a k-regular graph (a Harary graph over a permutation that every
party derives from the roster's public keys and the round), so its cost grows with k, not with the
number of participants; ``threshold`` then counts within a participant's neighbourhood (itself and
its k neighbours). ``neighbours = 0`` is the complete graph: the original protocol.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
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


class TooFewParticipants(SecAggError):
    """Fewer than ``threshold`` are left (in the roster or a neighbourhood): the round cannot go on
    safely, but nobody misbehaved (participants dropped out)."""


@dataclass(frozen=True)
class SecAggParams:
    threshold: int
    clip: float = 1.0
    bits: int = 20
    round: int = 0
    neighbours: int = 0  # SecAgg+: each participant's neighbours (even; 0: everyone, the original protocol)

    @property
    def step(self) -> float:
        """One level of the fixed-point encoding of a coordinate."""
        return float(2 * self.clip / (2**self.bits - 1))

    def degree(self, n: int) -> int:
        """The neighbours each of ``n`` participants has: ``neighbours``, or everyone else."""
        return n - 1 if self.neighbours == 0 or self.neighbours >= n - 1 else self.neighbours

    def check(self, n: int) -> None:
        if self.neighbours < 0 or self.neighbours % 2:
            raise SecAggError(f"neighbours must be 0 or a positive even number, got {self.neighbours}")
        size = self.degree(n) + 1
        if not 2 <= self.threshold <= size:
            what = f"{n} participants" if size == n else f"neighbourhoods of {size} (itself and {size - 1} neighbours)"
            raise SecAggError(f"threshold {self.threshold} must be in 2..{size} for {what}")
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


def share_points(names: Iterable[str]) -> dict[str, int]:
    """Each participant's share point (protocol id): 1 + its position among the sorted names."""
    return {name: i + 1 for i, name in enumerate(sorted(names))}


def graph_seed(roster: Mapping[int, PublicKeys], rnd: int) -> bytes:
    """The public seed of a round's neighbour graph: the round and every roster key."""
    h = hashlib.sha256(f"trustfed-secagg-graph:{rnd}".encode())
    for cid in sorted(roster):
        h.update(cid.to_bytes(8, "big") + roster[cid].cipher_pk + roster[cid].mask_pk)
    return h.digest()


def neighbourhoods(ids: Sequence[int], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Each id's neighbours: the complete graph when ``degree >= len(ids) - 1``, else a Harary graph
    (each node joined to the ``degree / 2`` nearest on either side of a ring) over a permutation of
    ``ids`` drawn from ``seed``: k-regular and k-connected."""
    ids = sorted(ids)
    if degree >= len(ids) - 1:
        return {i: frozenset(j for j in ids if j != i) for i in ids}
    ring = sorted(ids, key=lambda i: hashlib.sha256(seed + i.to_bytes(8, "big")).digest())
    n, half = len(ring), degree // 2
    return {ring[a]: frozenset(ring[(a + d) % n] for d in range(-half, half + 1) if d != 0) for a in range(n)}


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
        self._nbrs: frozenset[int] = frozenset()
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
            raise TooFewParticipants(f"roster has {len(roster)} participants, fewer than threshold {self.p.threshold}")
        pks = [k.cipher_pk for k in roster.values()] + [k.mask_pk for k in roster.values()]
        if len(set(pks)) != len(pks):
            raise SecAggError("roster repeats a public key")
        self.p.check(len(roster))
        self._roster = dict(roster)
        graph = neighbourhoods(list(roster), self.p.degree(len(roster)), graph_seed(roster, self.p.round))
        self._nbrs = graph[self.cid]
        xs = sorted(self._nbrs | {self.cid})  # my secrets are shared within my neighbourhood only
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
        if not u2 <= self._nbrs | {self.cid}:
            raise SecAggError("shares arrived from participants that are not my neighbours in the roster")
        if len(u2) < self.p.threshold:
            raise TooFewParticipants(
                f"only {len(u2)} of my neighbourhood shared keys, fewer than threshold {self.p.threshold}"
            )
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
        everyone = frozenset(survivors)
        u3 = everyone & self._u2  # the survivors in my neighbourhood (those I hold shares of)
        if self._unmasked:
            raise SecAggError("asked to unmask twice; refusing (it could reveal both secrets of a participant)")
        if not everyone <= set(self._roster):
            raise SecAggError("the survivor set names participants that are not in the roster")
        if not everyone & (self._nbrs | {self.cid}) <= self._u2:
            raise SecAggError("the survivor set names neighbours that never shared keys with me")
        if self.cid not in u3:
            raise SecAggError("the survivor set does not include me")
        if len(u3) < self.p.threshold:
            raise TooFewParticipants(
                f"only {len(u3)} survivors in my neighbourhood, fewer than threshold {self.p.threshold}"
            )
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
        self.graph: dict[int, frozenset[int]] = {}

    def receive_keys(self, cid: int, keys: PublicKeys) -> None:
        self.roster[cid] = keys

    def roster_for_clients(self) -> dict[int, PublicKeys]:
        """Close the roster: the neighbour graph follows from it (every client derives the same one)."""
        self.p.check(len(self.roster))
        self.graph = neighbourhoods(
            list(self.roster), self.p.degree(len(self.roster)), graph_seed(self.roster, self.p.round)
        )
        return dict(self.roster)

    def receive_shares(self, cid: int, ciphertexts: Mapping[int, bytes]) -> None:
        if cid not in self.graph or set(ciphertexts) != self.graph[cid]:
            raise SecAggError(f"participant {cid} sent shares for the wrong set of recipients")
        self.shared[cid] = dict(ciphertexts)

    def expected_unmask(self, cid: int) -> tuple[set[int], set[int]]:
        """Whose self-mask shares and whose mask-key shares survivor ``cid`` must send: the survivors and
        the participants that dropped after sharing, among its neighbourhood (itself included)."""
        u2 = {u for u in self.graph.get(cid, frozenset()) if u in self.shared} | {cid}
        u3 = {u for u in u2 if u in self.masked}
        return u3, u2 - u3

    def inbox_for(self, cid: int) -> dict[int, bytes]:
        return {u: cts[cid] for u, cts in self.shared.items() if cid in cts}

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
            shares = self._shares_of(u, "self_mask_shares")
            total -= prg(shamir.combine(shares, self.p.threshold), self.dim)
        for u in sorted(set(self.shared) - set(u3)):
            shares = self._shares_of(u, "key_shares")
            sk = X25519PrivateKey.from_private_bytes(shamir.combine(shares, self.p.threshold))
            for v in sorted(self.graph[u] & set(u3)):  # the survivors that masked with u
                seed = _agree(sk, self.roster[v].mask_pk, _pair_info(self.p.round, u, v))
                if v < u:
                    total -= prg(seed, self.dim)
                else:
                    total += prg(seed, self.dim)
        honest_max = len(u3) * (2**self.p.bits - 1)  # every input quantised to [0, 2**bits - 1]
        if int(total.max(initial=0)) > honest_max:
            bad = int(np.count_nonzero(total > honest_max))
            raise SecAggError(
                f"the unmasked sum is outside what {len(u3)} honest inputs can give at {bad} coordinate(s): a "
                "participant sent a malformed masked input; the round's sum is refused"
            )
        return dequantize_sum(total, len(u3), self.p.clip, self.p.bits), u3

    def _shares_of(self, u: int, kind: str) -> dict[int, int]:
        shares = {
            v: shamir.share_from_bytes(getattr(a, kind)[u])
            for v, a in self.unmask_answers.items()
            if u in getattr(a, kind)
        }
        if len(shares) < self.p.threshold:
            what = "self-mask seed" if kind == "self_mask_shares" else "mask key"
            raise SecAggError(
                f"only {len(shares)} shares of participant {u}'s {what} arrived, threshold {self.p.threshold}"
            )
        return shares


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
