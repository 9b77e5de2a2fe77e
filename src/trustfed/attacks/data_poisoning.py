"""Data-poisoning attacks: what a malicious participant trains on instead of its real data."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from trustfed.data.datasets import Dataset


def flip_labels(data: Dataset) -> Dataset:
    """Label flip: class ``c`` becomes ``C - 1 - c``."""
    return Dataset(data.name, data.x, (data.num_classes - 1 - data.y).astype(data.y.dtype), data.num_classes)


def apply_trigger(x: np.ndarray, size: int = 4, value: float = 1.0) -> np.ndarray:
    """Stamp a backdoor trigger: a ``size x size`` bright square in the bottom-right corner of images
    ``[n, C, H, W]``, or the last ``size * size`` features of flat inputs ``[n, f]``."""
    out = np.array(x, copy=True)
    if out.ndim == 4:
        out[:, :, -size:, -size:] = value
    else:
        flat = out.reshape(len(out), -1)
        flat[:, -size * size :] = value
        out = flat.reshape(out.shape)
    return out


def backdoor(data: Dataset, params: Mapping[str, float | int | bool | str], seed: int) -> Dataset:
    """Add triggered copies of a ``poison_fraction`` of the samples, labelled ``target``."""
    frac = float(params.get("poison_fraction", 0.5))
    target = int(params.get("target", 0))
    size = int(params.get("trigger_size", 4))
    rng = np.random.default_rng(seed)
    k = max(1, round(frac * len(data)))
    idx = rng.choice(len(data), size=k, replace=False)
    x = np.concatenate([data.x, apply_trigger(data.x[idx], size)])
    y = np.concatenate([data.y, np.full(k, target, dtype=data.y.dtype)])
    return Dataset(data.name, x.astype(data.x.dtype), y, data.num_classes)


def backdoor_success(predict: object, data: Dataset, params: Mapping[str, float | int | bool | str]) -> float:
    """Share of non-target test samples that the trigger turns into the target class.

    ``predict`` maps inputs ``[n, ...]`` (numpy) to predicted labels (numpy).
    """
    assert callable(predict)
    target = int(params.get("target", 0))
    keep = data.y != target
    if not keep.any():
        return 0.0
    pred = np.asarray(predict(apply_trigger(data.x[keep], int(params.get("trigger_size", 4)))))
    return float((pred == target).mean())
