"""Robust aggregators that wrap another: bucketing, the Krum filter and server momentum."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from trustfed.core.aggregator import (
    AggregateResult,
    Aggregator,
    check_inputs,
    get_aggregator,
    register_aggregator,
)
from trustfed.core.robust_kernels import RobustBase, check_f, krum_scores, pairwise_sq_distances
from trustfed.errors import AggregationError


def _inner(inner: str | Aggregator, params: Mapping[str, Any]) -> Aggregator:
    if not isinstance(inner, str):
        return inner
    sub = {k[len("inner_") :]: v for k, v in params.items() if k.startswith("inner_")}
    bad = [k for k in params if not k.startswith("inner_")]
    if bad:
        raise AggregationError(f"unknown parameters {bad}; parameters of the inner aggregator start with 'inner_'")
    return get_aggregator(inner, **sub)


def _inner_state(inner: Aggregator) -> dict[str, torch.Tensor]:
    """A wrapper's checkpoint entries for its inner aggregator's state, under ``inner.``."""
    state: dict[str, torch.Tensor] = getattr(inner, "state_dict", dict)()
    return {f"inner.{k}": v for k, v in state.items()}


def _load_inner_state(name: str, inner: Aggregator, state: Mapping[str, torch.Tensor]) -> None:
    sub = {k[len("inner.") :]: v for k, v in state.items() if k.startswith("inner.")}
    if hasattr(inner, "load_state_dict"):
        inner.load_state_dict(sub)
    elif sub:
        raise AggregationError(f"{name}: inner aggregator keeps no state but got {sorted(sub)}")


@register_aggregator("bucketing")
class Bucketing(RobustBase):
    """Bucketing (Karimireddy et al. 2022): shuffle, average buckets of ``bucket_size``, then apply
    the ``inner`` aggregator to the bucket means. Inner parameters are passed as ``inner_<name>``."""

    name = "bucketing"

    def __init__(self, bucket_size: int = 2, inner: str | Aggregator = "median", seed: int = 0, **inner_params: Any):
        if bucket_size < 1:
            raise AggregationError(f"bucketing: bucket_size must be >= 1, got {bucket_size}")
        self.bucket_size, self.seed = int(bucket_size), int(seed)
        self.inner = _inner(inner, inner_params)
        self.operates_on = getattr(self.inner, "operates_on", "models")
        self.calls = 0

    def _params(self) -> dict[str, Any]:
        return {"bucket_size": self.bucket_size, "seed": self.seed, "inner": self.inner.describe()}

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights)
        n = updates.shape[0]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        perm = torch.randperm(n, generator=gen)
        groups = [perm[i : i + self.bucket_size] for i in range(0, n, self.bucket_size)]
        means = torch.stack([updates[g].to(torch.float64).mean(dim=0) for g in groups]).to(torch.float32)
        bw = torch.stack([weights[g].sum() for g in groups])
        res = self.inner(means, bw)
        sel = tuple(sorted(int(i) for b in res.selected for i in groups[b]))
        scores = {
            **res.scores,
            "bucket": torch.tensor([next(b for b, g in enumerate(groups) if i in g) for i in range(n)]),
        }
        return AggregateResult(res.params, sel, scores)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"calls": torch.tensor(self.calls), **_inner_state(self.inner)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.calls = int(state["calls"]) if "calls" in state else 0
        _load_inner_state(self.name, self.inner, state)


@register_aggregator("krum_filter")
class KrumFilter(RobustBase):
    """A selection stage before any aggregator: drop the updates with the highest Krum scores, then
    apply ``inner`` to the rest (Multi-Krum's selection; El Mhamdi et al. 2018 use it the same way
    in front of a coordinate-wise rule).

    ``num_malicious`` (f) is the number dropped; with ``num_malicious = 0`` it is
    ``int(fraction * n)`` of the updates received in that round. The Krum scores use the same f.
    Far-away updates (sign flips, IPM with a large factor, boosted backdoors) are removed outright;
    the inner rule (default centered clipping) handles what stays close to the benign updates.
    Inner parameters are passed as ``inner_<name>``; scores of dropped updates are NaN.
    """

    name = "krum_filter"

    def __init__(
        self,
        num_malicious: int = 0,
        fraction: float = 0.2,
        inner: str | Aggregator = "centered_clipping",
        **inner_params: Any,
    ):
        if num_malicious < 0 or not 0.0 <= fraction < 0.5:
            raise AggregationError("krum_filter: need num_malicious >= 0 and 0 <= fraction < 0.5")
        self.num_malicious, self.fraction = int(num_malicious), float(fraction)
        self.inner = _inner(inner, inner_params)
        self.operates_on = getattr(self.inner, "operates_on", "models")

    def _params(self) -> dict[str, Any]:
        return {"num_malicious": self.num_malicious, "fraction": self.fraction, "inner": self.inner.describe()}

    def dropped_count(self, n: int) -> int:
        return self.num_malicious if self.num_malicious > 0 else int(self.fraction * n)

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        check_inputs(updates, weights)
        n = updates.shape[0]
        f = self.dropped_count(n)
        check_f(self.name, f, n, f + 1)
        if f == 0:
            return self.inner(updates, weights)
        scores = krum_scores(pairwise_sq_distances(updates), f)
        keep = torch.sort(torch.argsort(scores, stable=True)[: n - f]).values
        res = self.inner(updates[keep], weights[keep])
        out_scores = {"krum": scores}
        for k, v in res.scores.items():
            if v.shape[:1] == (n - f,):
                full = torch.full((n, *v.shape[1:]), math.nan, dtype=torch.float64)
                full[keep] = v.to(torch.float64)
                out_scores[k] = full
        return AggregateResult(res.params, tuple(int(keep[i]) for i in res.selected), out_scores)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _inner_state(self.inner)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_inner_state(self.name, self.inner, state)


@register_aggregator("server_momentum")
class ServerMomentum(RobustBase):
    """Server momentum around any aggregator, on deltas: ``m = beta * m + (1 - dampening) * agg``.

    ``inner`` names the aggregator (its parameters as ``inner_<name>``); the returned delta is ``m``.
    """

    name = "server_momentum"
    operates_on = "deltas"

    def __init__(
        self, beta: float = 0.9, dampening: float = 0.9, inner: str | Aggregator = "mean", **inner_params: Any
    ):
        if not 0.0 <= beta < 1.0 or not 0.0 <= dampening < 1.0:
            raise AggregationError("server_momentum: need 0 <= beta < 1 and 0 <= dampening < 1")
        self.beta, self.dampening = float(beta), float(dampening)
        self.inner = _inner(inner, inner_params)
        self.buffer: torch.Tensor | None = None

    def _params(self) -> dict[str, Any]:
        return {"beta": self.beta, "dampening": self.dampening, "inner": self.inner.describe()}

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregateResult:
        res = self.inner(updates, weights)
        g = res.params.to(torch.float64)
        m = self.buffer if self.buffer is not None and self.buffer.shape == g.shape else torch.zeros_like(g)
        self.buffer = self.beta * m + (1.0 - self.dampening) * g
        return AggregateResult(self.buffer.to(torch.float32), res.selected, res.scores)

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = _inner_state(self.inner)
        if self.buffer is not None:
            s["momentum_buffer"] = self.buffer
        return s

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        b = state.get("momentum_buffer")
        self.buffer = b.to(torch.float64).clone() if b is not None else None
        inner = {k[len("inner.") :]: v for k, v in state.items() if k.startswith("inner.")}
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(inner)
