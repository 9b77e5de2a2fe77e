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


def apply_trigger_part(x: np.ndarray, size: int, part: int, parts: int, value: float = 1.0) -> np.ndarray:
    """Stamp part ``part`` of ``parts`` of the trigger of :func:`apply_trigger` (DBA, Xie et al. 2020): the
    trigger's positions in memory order, cut into ``parts`` consecutive pieces (strips of the square).
    The ``parts`` pieces together are the whole trigger."""
    if not 0 <= part < parts:
        raise ValueError(f"trigger part {part} is not one of 0..{parts - 1}")
    where = np.flatnonzero(apply_trigger(np.zeros_like(x[:1]), size, 1.0).reshape(-1))
    piece = np.array_split(where, parts)[part]
    out = np.array(x, copy=True)
    flat = out.reshape(len(out), -1)
    flat[:, piece] = value
    return flat.reshape(out.shape)


def backdoor(
    data: Dataset, params: Mapping[str, float | int | bool | str], seed: int, part: tuple[int, int] | None = None
) -> Dataset:
    """Add triggered copies of a ``poison_fraction`` of the samples, labelled ``target``; with ``part =
    (i, k)`` only piece ``i`` of ``k`` of the trigger (:func:`apply_trigger_part`)."""
    frac = float(params.get("poison_fraction", 0.5))
    target = int(params.get("target", 0))
    size = int(params.get("trigger_size", 4))
    rng = np.random.default_rng(seed)
    k = max(1, round(frac * len(data)))
    idx = rng.choice(len(data), size=k, replace=False)
    stamped = apply_trigger(data.x[idx], size) if part is None else apply_trigger_part(data.x[idx], size, *part)
    x = np.concatenate([data.x, stamped])
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
