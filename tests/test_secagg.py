from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustfed.secagg import (
    PublicKeys,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    dequantize_sum,
    quantize,
    secure_sum,
    shamir,
)


def run(n: int, t: int, dim: int, drop_after_masking: set[int], drop_before_sharing: set[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    params = SecAggParams(threshold=t, clip=1.0, bits=16, round=3)
    xs = {i: rng.uniform(-1, 1, size=dim).astype(np.float32) for i in range(1, n + 1)}
    r = secure_sum(params, xs, drop_before_sharing=drop_before_sharing, drop_after_masking=drop_after_masking)
    return r.total, r.survivors, xs, r.masked


def test_sum_is_exact_up_to_quantisation_and_inputs_stay_hidden() -> None:
    total, who, xs, masked = run(5, 3, 200, set(), set())
    assert who == [1, 2, 3, 4, 5]
    expected = np.sum([xs[i] for i in who], axis=0)
    np.testing.assert_allclose(total, expected, atol=5 * 2 / (2**16 - 1))
    # a single masked input looks nothing like its quantised input
    q = quantize(xs[1], 1.0, 16)
    assert np.mean(masked[1] == q) < 0.01
    assert abs(np.corrcoef(masked[1].astype(np.float64), q.astype(np.float64))[0, 1]) < 0.2


def test_participants_dropping_out_after_masking_are_removed_from_the_sum() -> None:
    total, who, xs, _ = run(6, 3, 50, drop_after_masking={2, 5}, drop_before_sharing={6})
    assert who == [1, 3, 4]
    expected = np.sum([xs[i] for i in who], axis=0)
    np.testing.assert_allclose(total, expected, atol=3 * 2 / (2**16 - 1))


def test_too_many_dropouts_refused() -> None:
    with pytest.raises(SecAggError, match="fewer than threshold"):
        run(4, 3, 10, drop_after_masking={1, 2}, drop_before_sharing=set())


def _keyed(params: SecAggParams, n: int) -> tuple[dict[int, SecAggClient], SecAggServer, dict[int, PublicKeys]]:
    """Clients 1..n with their keys at the server, and the closed roster."""
    clients = {i: SecAggClient(i, params) for i in range(1, n + 1)}
    server = SecAggServer(params, 8)
    for i, c in clients.items():
        server.receive_keys(i, c.advertise_keys())
    return clients, server, server.roster_for_clients()


def _setup(n: int = 4, t: int = 3) -> tuple[dict[int, SecAggClient], SecAggServer]:
    clients, server, roster = _keyed(SecAggParams(threshold=t, bits=16), n)
    for i, c in clients.items():
        server.receive_shares(i, c.share_keys(roster))
    for i, c in clients.items():
        server.receive_masked(i, c.masked_input(np.zeros(8, dtype=np.float32), server.inbox_for(i)))
    return clients, server


def test_clients_refuse_unsafe_server_requests() -> None:
    clients, _ = _setup()
    c = clients[1]
    with pytest.raises(SecAggError, match="not in the roster"):
        c.unmask([1, 2, 3, 99])
    with pytest.raises(SecAggError, match="fewer than threshold"):
        c.unmask([1, 2])
    with pytest.raises(SecAggError, match="include me"):
        c.unmask([2, 3, 4])
    c.unmask([1, 2, 3, 4])
    with pytest.raises(SecAggError, match="twice"):
        c.unmask([1, 2, 3])  # would reveal the key of 4 after revealing its self-mask seed


def test_a_survivor_set_naming_one_that_never_shared_is_refused() -> None:
    clients, server, roster = _keyed(SecAggParams(threshold=3, bits=16), 4)
    for i in (1, 2, 3):  # 4 stops before sharing
        server.receive_shares(i, clients[i].share_keys(roster))
    for i in (1, 2, 3):
        clients[i].masked_input(np.zeros(8, dtype=np.float32), server.inbox_for(i))
    with pytest.raises(SecAggError, match="never shared"):
        clients[1].unmask([1, 2, 3, 4])


def test_roster_checks() -> None:
    params = SecAggParams(threshold=3)
    a, b, c = (SecAggClient(i, params) for i in (1, 2, 3))
    with pytest.raises(SecAggError, match="my own keys"):
        a.share_keys({2: b.keys, 3: c.keys, 4: b.keys})
    with pytest.raises(SecAggError, match="fewer than threshold"):
        a.share_keys({1: a.keys, 2: b.keys})
    with pytest.raises(SecAggError, match="repeats a public key"):
        a.share_keys({1: a.keys, 2: b.keys, 3: b.keys})


def test_tampered_share_is_detected() -> None:
    params = SecAggParams(threshold=2)
    a, b = SecAggClient(1, params), SecAggClient(2, params)
    roster = {1: a.keys, 2: b.keys}
    cts = a.share_keys(roster)
    b.share_keys(roster)
    bad = bytearray(cts[2])
    bad[20] ^= 1
    with pytest.raises(SecAggError, match="does not authenticate"):
        b.masked_input(np.zeros(4, dtype=np.float32), {1: bytes(bad)})


def test_overflow_is_refused() -> None:
    with pytest.raises(SecAggError, match="overflow"):
        SecAggParams(threshold=2, bits=31).check(4)


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(1, 6), st.integers(0, 5))
def test_shamir_round_trip(secret: bytes, t: int, extra: int) -> None:
    xs = list(range(1, t + extra + 1))
    shares = shamir.split(secret, t, xs)
    assert shamir.combine(dict(list(shares.items())[-t:]), t) == secret
    if t > 1:
        with pytest.raises(shamir.SecretSharingError):
            shamir.combine(dict(list(shares.items())[: t - 1]), t)


def test_quantisation_round_trip() -> None:
    x = np.linspace(-2, 2, 101).astype(np.float32)
    back = dequantize_sum(quantize(x, 1.0, 16), 1, 1.0, 16)
    np.testing.assert_allclose(back, np.clip(x, -1, 1), atol=2 / (2**16 - 1))


# -- SecAgg+: neighbourhoods instead of everyone


def test_neighbour_graphs_are_regular_symmetric_and_shared() -> None:
    from trustfed.secagg.protocol import neighbourhoods

    ids = list(range(1, 21))
    g = neighbourhoods(ids, 6, b"seed")
    assert all(len(nb) == 6 and i not in nb for i, nb in g.items())
    assert all(i in g[j] for i, nb in g.items() for j in nb)  # symmetric
    assert g == neighbourhoods(list(reversed(ids)), 6, b"seed")  # the order ids come in does not matter
    assert g != neighbourhoods(ids, 6, b"other seed")
    assert neighbourhoods(ids, 19, b"seed") == {i: frozenset(set(ids) - {i}) for i in ids}


def test_secagg_plus_sums_exactly_with_dropouts_and_shares_only_with_neighbours() -> None:
    rng = np.random.default_rng(1)
    n, k, dim = 16, 4, 64
    params = SecAggParams(threshold=3, clip=1.0, bits=16, round=2, neighbours=k)
    xs = {i: rng.uniform(-1, 1, size=dim).astype(np.float32) for i in range(1, n + 1)}
    r = secure_sum(params, xs, drop_after_masking={3, 11})
    assert r.survivors == sorted(set(xs) - {3, 11})
    np.testing.assert_allclose(r.total, np.sum([xs[i] for i in r.survivors], axis=0), atol=n * 2 / (2**16 - 1))
    # each client encrypts shares for its k neighbours only, so its cost grows with k, not n
    clients = {i: SecAggClient(i, params) for i in xs}
    roster = {i: c.advertise_keys() for i, c in clients.items()}
    assert all(len(c.share_keys(roster)) == k for c in clients.values())


def test_secagg_plus_refuses_a_thin_neighbourhood_and_bad_parameters() -> None:
    from trustfed.secagg.protocol import TooFewParticipants

    clients, server, roster = _keyed(SecAggParams(threshold=4, bits=16, neighbours=4), 10)
    for i, c in clients.items():
        server.receive_shares(i, c.share_keys(roster))
    lost = set(sorted(server.graph[1])[:2])  # two of participant 1's four neighbours vanish after masking
    for i, c in clients.items():
        y = c.masked_input(np.zeros(8, dtype=np.float32), server.inbox_for(i))
        if i not in lost:
            server.receive_masked(i, y)
    assert len(server.survivors()) == 8  # plenty overall, but 1's neighbourhood keeps 3 of 5, threshold 4
    with pytest.raises(TooFewParticipants, match="survivors in my neighbourhood, fewer than threshold 4"):
        clients[1].unmask(server.survivors())
    with pytest.raises(SecAggError, match="even"):
        SecAggParams(threshold=2, neighbours=3).check(10)
    with pytest.raises(SecAggError, match="neighbourhoods of 5"):
        SecAggParams(threshold=6, neighbours=4).check(10)


def test_a_sum_no_honest_inputs_could_give_is_refused() -> None:
    """A participant adding an offset to its masked input (to push the mean far off) makes the unmasked
    sum leave the range of n quantised inputs: the server refuses it instead of dequantising garbage."""
    clients, server, roster = _keyed(SecAggParams(threshold=3, bits=16), 4)
    for i, c in clients.items():
        server.receive_shares(i, c.share_keys(roster))
    for i, c in clients.items():
        y = c.masked_input(np.full(8, 0.9, dtype=np.float32), server.inbox_for(i))
        if i == 2:
            y = y + np.uint32(2**20)  # far beyond 4 x (2**16 - 1)
        server.receive_masked(i, y)
    for i in server.survivors():
        server.receive_unmask(i, clients[i].unmask(server.survivors()))
    with pytest.raises(SecAggError, match="outside what 4 honest inputs can give at 8 coordinate"):
        server.aggregate()
