"""Per-example clipped gradient sums for DP-SGD, without per-example backward passes.

Fast path ("book-keeping", after Bu et al. 2022): one forward pass records every layer's input,
one backward pass gives the gradients with respect to every layer's *output* (no weight
gradients), and each layer's per-example gradient norm and clipped gradient sum are computed
from those two tensors directly:

- ``nn.Linear`` on ``[B, in]``: ``||grad_W_i||^2 = ||a_i||^2 * ||g_i||^2`` (no per-example
  gradient is ever materialised) and ``sum_i c_i grad_W_i = (c * g)^T a``;
- ``nn.Linear`` on ``[B, ..., in]`` and ``nn.Conv2d`` (via ``unfold``): the per-example gradients
  are small and are materialised per layer.

Any other module that owns parameters falls back to ``torch.func`` (``vmap`` over ``grad``),
which is exact but slower. The oracle these are tested against is one backward pass per example.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trustfed.privacy.accounting import PrivacyError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sum_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


@dataclass(frozen=True)
class ClippedGrads:
    """``grads[k]``: sum over the batch of the clipped per-example gradients of parameter ``k``
    (``model.parameters()`` order); ``norms``: per-example gradient norms before clipping."""

    grads: list[torch.Tensor]
    norms: torch.Tensor
    loss: float


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, C / ||g_i||)``: scales every per-example gradient to norm at most ``C``."""
    return (max_norm / (norms + 1e-12)).clamp(max=1.0)


def fast_path_supported(model: nn.Module) -> bool:
    """True when every module that owns trainable parameters is a Linear or a (groups=1, int-padded) Conv2d."""
    seen: set[int] = set()
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros":
                return False
        elif not isinstance(m, nn.Linear):
            return False
        for p in own:
            if id(p) in seen:
                return False  # tied weights
            seen.add(id(p))
    return True


def clipped_grad_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    max_norm: float,
    loss_fn: LossFn = sum_cross_entropy,
) -> ClippedGrads:
    """Clip every example's gradient to ``max_norm`` and sum them. ``loss_fn`` must sum over the batch."""
    if len(x) == 0:
        params = list(model.parameters())
        return ClippedGrads([torch.zeros_like(p) for p in params], torch.zeros(0), 0.0)
    if fast_path_supported(model):
        return _bookkeeping(model, x, y, max_norm, loss_fn)
    return _vmap(model, x, y, max_norm, loss_fn)


def _bookkeeping(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_norm: float, loss_fn: LossFn) -> ClippedGrads:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d) and any(True for _ in m.parameters())]
    inputs: dict[nn.Module, torch.Tensor] = {}
    outputs: dict[nn.Module, torch.Tensor] = {}

    def hook(m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if m in inputs:
            raise PrivacyError(
                f"module {type(m).__name__} runs twice in one forward pass; per-example clipping needs each layer once"
            )
        inputs[m] = args[0].detach()
        outputs[m] = out

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        loss = loss_fn(model(x), y)
    finally:
        for h in handles:
            h.remove()
    used = [m for m in layers if m in outputs]
    out_grads = torch.autograd.grad(loss, [outputs[m] for m in used])
    b = len(x)
    norms2 = torch.zeros(b, dtype=torch.float32)
    # Per layer: either the factors (a, g) of a rank-1 per-example gradient, or materialised ones.
    factored: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    material: dict[nn.Module, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for m, g in zip(used, out_grads, strict=True):
        a = inputs[m]
        bias = getattr(m, "bias", None)
        if isinstance(m, nn.Linear) and a.dim() == 2:
            norms2 += (a * a).sum(1) * (g * g).sum(1)
            if bias is not None:
                norms2 += (g * g).sum(1)
            factored[m] = (a, g)
            continue
        if isinstance(m, nn.Linear):
            a3 = a.reshape(b, -1, a.shape[-1])
            g3 = g.reshape(b, -1, g.shape[-1])
            gw = torch.einsum("bto,bti->boi", g3, a3)
            gb = g3.sum(1) if bias is not None else None
        else:
            assert isinstance(m, nn.Conv2d)
            a3 = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # type: ignore[arg-type]
            g3 = g.reshape(b, g.shape[1], -1)
            gw = torch.bmm(g3, a3.transpose(1, 2))
            gb = g3.sum(2) if bias is not None else None
        norms2 += (gw * gw).reshape(b, -1).sum(1)
        if gb is not None:
            norms2 += (gb * gb).sum(1)
        material[m] = (gw, gb)
    norms = norms2.sqrt()
    c = clip_factors(norms, max_norm)
    grad_of: dict[int, torch.Tensor] = {}
    for m in used:
        w = m.weight
        bias = getattr(m, "bias", None)
        if m in factored:
            a, g = factored[m]
            gc = g * c[:, None]
            grad_of[id(w)] = gc.t() @ a
            if bias is not None:
                grad_of[id(bias)] = gc.sum(0)
        else:
            gw, gb = material[m]
            grad_of[id(w)] = torch.einsum("b,bo...->o...", c, gw).reshape(w.shape)
            if bias is not None and gb is not None:
                grad_of[id(bias)] = c @ gb
    grads = [grad_of.get(id(p), torch.zeros_like(p)) for p in model.parameters()]
    return ClippedGrads(grads, norms.detach(), float(loss.detach()))


def _vmap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_norm: float, loss_fn: LossFn) -> ClippedGrads:
    from torch.func import functional_call, grad, vmap

    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: t.detach() for n, t in model.named_buffers()}

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    b = len(x)
    norms = torch.sqrt(sum(((per[n].reshape(b, -1) ** 2).sum(1) for n in names), torch.zeros(b)))
    c = clip_factors(norms, max_norm)
    grads = [torch.einsum("b,b...->...", c, per[n]) for n in names]
    with torch.no_grad():
        loss = float(loss_fn(model(x), y))
    return ClippedGrads(grads, norms, loss)
