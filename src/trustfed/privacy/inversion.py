"""Gradient inversion (DLG, Zhu et al. 2019; iDLG, Zhao et al. 2020), used to test that DP protects.

The attacker knows the model and one participant's gradient on a single example (for FedSGD with
one example, ``(global - update) / lr``). It infers the label from the last layer's bias gradient
(iDLG: the only negative entry under cross-entropy), then optimises a dummy input with L-BFGS so
that its gradient points the same way as the observed one (cosine distance, as in Geiping et al.
2020: scale-invariant, so clipping alone does not stop it; only noise does). Reconstruction
quality is scored with PSNR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Inversion:
    x: torch.Tensor
    label: int
    match_loss: float  # 1 - cosine similarity of the dummy's gradient and the observed one


def example_gradient(model: nn.Module, x: torch.Tensor, y: int) -> list[torch.Tensor]:
    """The gradient a participant would reveal for one example."""
    loss = F.cross_entropy(model(x.unsqueeze(0)), torch.tensor([y]))
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def infer_label(grads: Sequence[torch.Tensor]) -> int:
    """iDLG: with cross-entropy, the last bias gradient is p - onehot(y): negative only at y."""
    return int(torch.argmin(grads[-1]).item())


def invert(
    model: nn.Module,
    grads: Sequence[torch.Tensor],
    input_shape: tuple[int, ...],
    *,
    steps: int = 200,
    seed: int = 0,
) -> Inversion:
    """Reconstruct the example behind ``grads`` (iDLG label, then L-BFGS gradient matching)."""
    label = infer_label(grads)
    gen = torch.Generator().manual_seed(seed)
    dummy = (torch.rand((1, *input_shape), generator=gen)).requires_grad_(True)
    target = torch.tensor([label])
    params = list(model.parameters())
    opt = torch.optim.LBFGS(
        [dummy],
        lr=1.0,
        max_iter=steps,
        history_size=50,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
    )

    target_flat = torch.cat([g.reshape(-1) for g in grads])

    def mismatch() -> torch.Tensor:
        loss = F.cross_entropy(model(dummy), target)
        dg = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in dg])
        return 1 - F.cosine_similarity(flat, target_flat, dim=0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        match = mismatch()
        (dummy.grad,) = torch.autograd.grad(match, [dummy])
        return match.detach()

    opt.step(closure)  # type: ignore[no-untyped-call]
    return Inversion(dummy.detach().squeeze(0), label, float(mismatch().detach()))


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (inputs clipped to [0, data_range])."""
    mse = float(((x.clamp(0, data_range) - ref) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)
