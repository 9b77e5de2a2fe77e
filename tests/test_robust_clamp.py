"""Centered clipping's coordinate clamp: a coordinate only a minority moves keeps the majority's value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trustfed.apps.builtin_parts import build_data, model_factory
from trustfed.attacks import backdoor_success
from trustfed.config import validate_federation_config
from trustfed.core import get_aggregator
from trustfed.core.codec import flatten, load_vector
from trustfed.errors import AggregationError
from trustfed.simulation import run_simulation


def _round(seed: int = 0, n: int = 20, d: int = 300, bad: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=g) * 0.01 + 0.01 * torch.randn(n, d, generator=g)
    x[:, -16:] = 0.0  # a trigger's weights: honest data never moves them
    x[:bad, -16:] = 0.05  # the backdoor writes there, within the radius
    return x


def test_clamp_keeps_the_majority_value_where_only_a_minority_writes() -> None:
    x = _round()
    plain = get_aggregator("centered_clipping", reject=3.0, max_cosine=0.99)(x, torch.ones(20)).params
    clamped = get_aggregator("centered_clipping", reject=3.0, max_cosine=0.99, clamp=0.2)(x, torch.ones(20)).params
    assert float(plain[-16:].abs().min()) > 0.005  # centered clipping follows the minority there
    assert torch.equal(clamped[-16:], torch.zeros(16))


def test_clamp_is_the_trimmed_range_oracle_and_changes_nothing_inside_it() -> None:
    x = _round(seed=1)
    cc = get_aggregator("centered_clipping", clamp=0.2)
    out = cc(x, torch.ones(20)).params.double()
    ref = get_aggregator("centered_clipping")(x, torch.ones(20)).params.double()
    ordered = x.double().sort(dim=0).values
    lo, hi = ordered[4], ordered[15]
    assert torch.allclose(out, torch.minimum(torch.maximum(ref, lo), hi), atol=1e-7)  # the slow oracle
    inside = (ref >= lo) & (ref <= hi)
    assert torch.allclose(out[inside], ref[inside], atol=1e-7)
    assert cc.describe()["clamp"] == 0.2 and torch.allclose(cc.center, out)  # type: ignore[attr-defined]


def test_clamp_is_checked() -> None:
    with pytest.raises(AggregationError, match="clamp"):
        get_aggregator("centered_clipping", clamp=0.5)


def _backdoor_success(clamp: float) -> float:
    """Backdoor success of the unboosted scaling backdoor after a short non-IID MNIST-5k simulation."""
    raw = {
        "federation": {"rounds": 6, "participants": 10, "seed": 0},
        "data": {"dataset": "mnist5k", "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "model": {"name": "mlp", "hidden": [32]},
        "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "strategy": {
            "aggregator": "centered_clipping",
            "aggregator_params": {"reject": 3.0, "max_cosine": 0.99, "clamp": clamp},
        },
        "attack": {"kind": "scaling_backdoor", "fraction": 0.2, "params": {"boost": 1.0}},
    }
    cfg = validate_federation_config(raw)
    res = run_simulation(cfg, plot=False)
    data = build_data(cfg)
    model = model_factory(cfg, data.train.input_shape, data.train.num_classes)()
    load_vector(model, res.params, flatten(model.state_dict())[1])
    model.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out: np.ndarray = model(torch.from_numpy(x)).argmax(dim=1).numpy()
        return out

    return backdoor_success(predict, data.test, {"target": 0, "trigger_size": 4})


def test_the_clamp_stops_the_unboosted_backdoor_in_a_simulation() -> None:
    assert _backdoor_success(0.0) > 0.5  # centered clipping alone learns the trigger
    assert _backdoor_success(0.2) < 0.05
