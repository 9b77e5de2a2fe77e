"""Reference models: an MLP for tabular/flattened inputs and a small CNN for images."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from trustfed.errors import TrustFedError


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (128,)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; works for 1x28x28 and 3x32x32 inputs (and 1x8x8 digits)."""

    def __init__(self, in_channels: int, num_classes: int, side: int, channels: Sequence[int] = (16, 32)) -> None:
        super().__init__()
        c1, c2 = channels
        pool = 2 if side >= 16 else 1
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(pool),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(pool),
        )
        out_side = side // (pool * pool)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * out_side * out_side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _mlp(input_shape: Sequence[int], num_classes: int, **kw: Any) -> nn.Module:
    return MLP(_numel(input_shape), num_classes, hidden=tuple(kw.get("hidden", (128,))))


def _cnn(input_shape: Sequence[int], num_classes: int, **kw: Any) -> nn.Module:
    shape = tuple(input_shape)
    if len(shape) == 1:  # flattened square images, e.g. digits (64 = 8x8)
        side = round(shape[0] ** 0.5)
        if side * side != shape[0]:
            raise TrustFedError(f"cnn needs image inputs; got features of shape {shape}")
        shape = (1, side, side)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise TrustFedError(f"cnn needs square images [C, H, W]; got {shape}")
    model = _Reshape(shape, SmallCNN(shape[0], num_classes, shape[1], tuple(kw.get("channels", (16, 32)))))
    # Channels-last weights: oneDNN's convolutions for them are about twice as fast on CPU for this
    # small CNN (evaluation and training alike). The parameters' values, their order in the state dict
    # and every flattened vector are unchanged; only their strides in memory differ.
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # in place; torch's stub omits the keyword
    return model


class _Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...], inner: nn.Module) -> None:
        super().__init__()
        self.shape = shape
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x.reshape(x.shape[0], *self.shape))
        return out


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "cnn": _cnn}
_BUILD_LOCK = threading.Lock()


def build_model(name: str, input_shape: Sequence[int], num_classes: int, seed: int = 0, **kw: Any) -> nn.Module:
    """Build a reference model with deterministic initial weights."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise TrustFedError(f"unknown model {name!r}; available: {', '.join(MODELS)}") from None
    # torch's global generator is shared by threads: one build at a time keeps the weights deterministic.
    # Only the CPU generator, which initialises the weights, is seeded (and restored after):
    # torch.manual_seed would also queue a reseed of every accelerator's generators, recording a stack
    # trace each time, and leave them reseeded.
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return factory(input_shape, num_classes, **kw)
