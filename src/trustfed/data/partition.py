"""Partitioners: split sample indices among participants. Seeded; every sample goes to
exactly one participant."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from trustfed.errors import DataError


def iid(labels: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    _check(labels, n)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, n)]


def dirichlet(
    labels: np.ndarray, n: int, seed: int, alpha: float = 0.5, min_size: int = 2, max_tries: int = 100
) -> list[np.ndarray]:
    """Label-skewed split: for each class, shares drawn from Dirichlet(alpha) over participants.

    Redraws (deterministically) until every participant has at least ``min_size`` samples.
    """
    _check(labels, n)
    if alpha <= 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
    if n * min_size > len(labels):
        raise DataError(f"cannot give {n} participants {min_size} samples each from {len(labels)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            shares = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise DataError(
        f"dirichlet(alpha={alpha}) could not give every one of {n} participants {min_size} samples "
        f"in {max_tries} draws; raise alpha or lower the number of participants"
    )


def shards(labels: np.ndarray, n: int, seed: int, shards_per_participant: int = 2) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, cut into equal shards, deal them out."""
    _check(labels, n)
    total = n * shards_per_participant
    if total > len(labels):
        raise DataError(f"{total} shards requested from {len(labels)} samples")
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, total)
    deal = rng.permutation(total)
    return [np.sort(np.concatenate([pieces[j] for j in deal[i::n]])) for i in range(n)]


def _check(labels: np.ndarray, n: int) -> None:
    if n < 1:
        raise DataError(f"number of participants must be >= 1, got {n}")
    if n > len(labels):
        raise DataError(f"{n} participants but only {len(labels)} samples")


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "shards": shards,
}


def partition(kind: str, labels: np.ndarray, n: int, seed: int, **params: float) -> list[np.ndarray]:
    try:
        fn = PARTITIONERS[kind]
    except KeyError:
        raise DataError(f"unknown partitioner {kind!r}; available: {', '.join(PARTITIONERS)}") from None
    return fn(labels, n, seed, **params)
