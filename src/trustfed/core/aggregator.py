"""The Aggregator seam and its registry.

An aggregator maps a stack of updates ``Tensor[n, d]`` and their weights ``Tensor[n]`` to one
vector, and says which updates it used and how it scored them. Aggregators are pure functions
of their inputs (plus constructor parameters), registered by name so that a TOML file can pick
one: ``aggregator = "multi_krum"``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from trustfed.errors import AggregationError


@dataclass(frozen=True)
class AggregateResult:
    """The aggregate, the indices of the updates it used, and per-update scores (by name)."""

    params: torch.Tensor
    selected: tuple[int, ...]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Aggregator(Protocol):
    name: str

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult: ...

    def describe(self) -> dict[str, Any]:
        """Name and parameters, as recorded in receipts and the audit log."""
        ...


def check_inputs(updates: torch.Tensor, weights: torch.Tensor, min_updates: int = 1, finite: bool = True) -> None:
    """Check shapes and weights, and (``finite``) that every update value is finite.

    Aggregators that compute the updates' Gram matrix anyway pass ``finite=False`` and check its
    diagonal instead (see :func:`check_finite`), saving a pass over the updates."""
    if updates.dim() != 2:
        raise AggregationError(f"updates must be a 2-D tensor [n, d], got shape {tuple(updates.shape)}")
    n = updates.shape[0]
    if weights.shape != (n,):
        raise AggregationError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    if n < min_updates:
        raise AggregationError(f"need at least {min_updates} update(s), got {n}")
    if finite:
        # One fast pass: a row sum is NaN or infinite iff the row holds a NaN or an infinity (or its
        # values are so large that they overflow float32 when added); the exact check runs only then.
        row_sums = updates.sum(dim=1)
        if not bool(torch.isfinite(row_sums).all()):
            check_finite(updates, row_sums, "sums")
    if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise AggregationError("weights must be finite and non-negative")
    if float(weights.sum()) <= 0:
        raise AggregationError("weights sum to zero")


def check_finite(updates: torch.Tensor, per_row: torch.Tensor, what: str) -> None:
    """Raise if any update holds a NaN or an infinity, or if ``per_row`` (a statistic of each row
    computed in float32, e.g. its sum or its squared norm, named by ``what``) overflowed."""
    if bool(torch.isfinite(per_row).all()):
        return
    bad = (~torch.isfinite(updates)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise AggregationError(f"updates {bad} contain NaN or infinite values")
    big = (~torch.isfinite(per_row)).nonzero().flatten().tolist()
    raise AggregationError(f"updates {big} are too large to aggregate: their {what} overflow float32")


def unusable_rows(updates: torch.Tensor) -> torch.Tensor:
    """Which updates no aggregator can use: a row holding a NaN or an infinity, or whose squared norm
    overflows float32 (values so large that distances and sums are infinite). A bool mask ``[n]``.

    Strategies leave these rows out before they aggregate (and report them) instead of failing the
    round: one hostile or diverged participant must not stop a federation."""
    if updates.dim() != 2:
        raise AggregationError(f"updates must be a 2-D tensor [n, d], got shape {tuple(updates.shape)}")
    sq = torch.linalg.vector_norm(updates, dim=1, dtype=torch.float32).square()
    bad = ~torch.isfinite(sq)
    if bool(bad.any()):  # the norm is NaN / inf iff a value is, or it overflowed: name the rows exactly
        bad = bad | (~torch.isfinite(updates)).any(dim=1)
    return bad


_MEAN_BLOCK = 16_384  # columns converted to float64 at a time: no [n, d] float64 copy of the updates


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean accumulated in float64 and rounded once to float32 (a zero weight drops a row)."""
    w = weights.to(torch.float64)
    w = w / w.sum()
    d = updates.shape[1]
    if d <= _MEAN_BLOCK:
        return (w @ updates.to(torch.float64)).to(torch.float32)
    out = torch.empty(d, dtype=torch.float32, device=updates.device)
    for j in range(0, d, _MEAN_BLOCK):
        out[j : j + _MEAN_BLOCK] = w @ updates[:, j : j + _MEAN_BLOCK].to(torch.float64)
    return out


class WeightedMean:
    """FedAvg's aggregator: the example-weighted mean of the updates."""

    name = "mean"

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights)
        return AggregateResult(weighted_mean(updates, weights), tuple(range(updates.shape[0])))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


_REGISTRY: dict[str, Callable[..., Aggregator]] = {}
F = TypeVar("F", bound=Callable[..., Aggregator])


def register_aggregator(name: str) -> Callable[[F], F]:
    """Register an aggregator factory (a class or function taking keyword parameters)."""

    def deco(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"aggregator {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def _load_builtin() -> None:
    # Robust aggregators live in their own module; import lazily to register them.
    for mod in ("trustfed.core.robust", "trustfed.core.robust_wrappers"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def registered_factory(name: str) -> Callable[..., Aggregator] | None:
    """The factory registered under ``name``, or None."""
    _load_builtin()
    return _REGISTRY.get(name)


def available_aggregators() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_aggregator(name: str, **params: Any) -> Aggregator:
    _load_builtin()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise AggregationError(f"unknown aggregator {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None
    try:
        return factory(**params)
    except TypeError as exc:
        raise AggregationError(f"bad parameters for aggregator {name!r}: {exc}") from exc


register_aggregator("mean")(WeightedMean)
