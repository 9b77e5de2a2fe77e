"""Per-example clipped gradient sums for DP-SGD, without per-example backward passes.

Fast path ("book-keeping", after Bu et al. 2022): one forward pass records every layer's input,
one backward pass gives the gradients with respect to every layer's *output* (no weight
gradients), and each layer's per-example gradient norm and clipped gradient sum are computed
from those two tensors directly:

- ``nn.Linear`` on ``[B, in]``: ``||grad_W_i||^2 = ||a_i||^2 * ||g_i||^2`` (no per-example
  gradient is ever materialised) and ``sum_i c_i grad_W_i = (c * g)^T a``;
- ``nn.Linear`` on ``[B, ..., in]`` and ``nn.Conv2d``: the per-example gradients are small and are
  materialised per layer (for a convolution, as the weight gradient of one grouped convolution
  with the batch folded into its channels).

Any other module that owns parameters falls back to ``torch.func`` (``vmap`` over ``grad``),
which is exact but slower. The oracle these are tested against is one backward pass per example.

Only *trainable* parameters (``requires_grad``) are clipped, noised and stepped: a frozen base model
(and LoRA's frozen A) takes no part, and its layers are not even hooked. Models whose batches are not
one ``(x, y)`` pair (a language model's ``input_ids`` / ``labels`` / ``attention_mask``) use
:func:`clipped_example_grad_sum` with a function that returns one loss per example.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from trustfed.privacy.accounting import PrivacyError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: One loss per example of a batch: ``batch -> tensor [B]`` (the batch as the data yields it).
ExampleLossFn = Callable[[Any], torch.Tensor]


def sum_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


@dataclass(frozen=True)
class ClippedGrads:
    """``grads[k]``: sum over the batch of the clipped per-example gradients of trainable parameter
    ``k`` (:func:`trainable_parameters` order); ``norms``: per-example gradient norms before clipping."""

    grads: list[torch.Tensor]
    norms: torch.Tensor
    loss: float


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters DP-SGD clips, noises and steps: those that require a gradient."""
    return [p for p in model.parameters() if p.requires_grad]


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
    *,
    scale: float = 1.0,
    into: list[torch.Tensor] | None = None,
) -> ClippedGrads:
    """Clip every example's gradient to ``max_norm`` and sum them. ``loss_fn`` must sum over the batch.

    The sums are multiplied by ``scale``. With ``into`` (one tensor per trainable parameter, e.g. freshly
    drawn noise) they are added to those tensors in place, and ``grads`` are those tensors: on the
    fast path the addition happens inside the same matrix product that forms the sum."""
    grads = _slots(model, into)
    if len(x) == 0:
        return ClippedGrads(grads, torch.zeros(0), 0.0)
    if fast_path_supported(model):
        return _bookkeeping(model, lambda: loss_fn(model(x), y), len(x), max_norm, scale, grads)
    cg = _vmap(model, x, y, max_norm, loss_fn)
    for t, g in zip(grads, cg.grads, strict=True):
        t.add_(g, alpha=scale)
    return ClippedGrads(grads, cg.norms, cg.loss)


def clipped_example_grad_sum(
    model: nn.Module,
    example_loss: ExampleLossFn,
    batch: Any,
    size: int,
    max_norm: float,
    *,
    scale: float = 1.0,
    into: list[torch.Tensor] | None = None,
) -> ClippedGrads:
    """:func:`clipped_grad_sum` for any batch: ``example_loss(batch)`` returns one loss per example
    (``[size]``), and each example's gradient is that loss's. ``batch``: tensors whose first dimension
    is the example, alone or in tuples, lists and dicts. Without the fast path each example gets its
    own backward pass (exact, slower)."""
    grads = _slots(model, into)
    if size == 0:
        return ClippedGrads(grads, torch.zeros(0), 0.0)

    def total() -> torch.Tensor:
        losses = example_loss(batch)
        if losses.shape != (size,):
            raise PrivacyError(f"the per-example loss returned shape {tuple(losses.shape)} for {size} examples")
        return losses.sum()

    if fast_path_supported(model):
        return _bookkeeping(model, total, size, max_norm, scale, grads)
    params = trainable_parameters(model)
    per, losses = [], 0.0
    for i in range(size):
        loss = example_loss(example_of(batch, i)).sum()
        per.append(torch.autograd.grad(loss, params))
        losses += float(loss.detach())
    norms = torch.stack([torch.sqrt(sum(((g.float() ** 2).sum() for g in gs), torch.zeros(()))) for gs in per])
    c = clip_factors(norms, max_norm) * scale
    with torch.no_grad():
        for k, t in enumerate(grads):
            t.add_(sum((c[i] * per[i][k] for i in range(size)), torch.zeros_like(t)))
    return ClippedGrads(grads, norms, losses)


def example_of(batch: Any, i: int) -> Any:
    """Example ``i`` of a batch, as a batch of one."""
    if isinstance(batch, torch.Tensor):
        return batch[i : i + 1]
    if isinstance(batch, tuple | list):
        return type(batch)(example_of(t, i) for t in batch)
    if isinstance(batch, Mapping):
        return {k: example_of(v, i) for k, v in batch.items()}
    raise PrivacyError(f"cannot take one example of a {type(batch).__name__} batch: use tensors, tuples or dicts")


def _slots(model: nn.Module, into: list[torch.Tensor] | None) -> list[torch.Tensor]:
    params = trainable_parameters(model)
    if into is not None and [t.shape for t in into] != [p.shape for p in params]:
        raise PrivacyError("clipped_grad_sum: `into` needs one tensor shaped like each trainable parameter")
    return into if into is not None else [torch.zeros_like(p) for p in params]


def _bookkeeping(
    model: nn.Module,
    batch_loss: Callable[[], torch.Tensor],
    b: int,
    max_norm: float,
    scale: float,
    grads: list[torch.Tensor],
) -> ClippedGrads:
    """Adds ``scale`` times the clipped sums onto ``grads`` (one tensor per trainable parameter).
    ``batch_loss()`` runs the forward pass over ``b`` examples and returns the sum of their losses."""
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d) and any(p.requires_grad for p in m.parameters(recurse=False))
    ]
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
        loss = batch_loss()
    finally:
        for h in handles:
            h.remove()
    used = [m for m in layers if m in outputs]
    for m in used:
        if inputs[m].shape[0] != b:
            raise PrivacyError(
                f"module {type(m).__name__} sees {inputs[m].shape[0]} rows for {b} examples; per-example "
                "clipping needs the example as the first dimension of every layer's input"
            )
    out_grads = torch.autograd.grad(loss, [outputs[m] for m in used])
    norms2 = torch.zeros(b, dtype=torch.float32)
    # Per layer: either the factors (a, g) of a rank-1 per-example gradient, or materialised ones.
    factored: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    material: dict[nn.Module, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    for m, g in zip(used, out_grads, strict=True):
        a = inputs[m]
        w_on = m.weight.requires_grad
        bias = m.bias if m.bias is not None and m.bias.requires_grad else None
        if isinstance(m, nn.Linear) and a.dim() == 2:
            gg = torch.linalg.vector_norm(g, dim=1).square_()
            if w_on:
                norms2 += torch.linalg.vector_norm(a, dim=1).square_().mul_(gg)
            if bias is not None:
                norms2 += gg
            factored[m] = (a, g)
            continue
        gw: torch.Tensor | None
        if isinstance(m, nn.Linear):
            a3 = a.reshape(b, -1, a.shape[-1])
            g3 = g.reshape(b, -1, g.shape[-1])
            gw = torch.einsum("bto,bti->boi", g3, a3) if w_on else None
            gb = g3.sum(1) if bias is not None else None
        else:
            assert isinstance(m, nn.Conv2d)
            gw = _conv2d_per_example_weight_grads(m, a, g) if w_on else None
            gb = g.sum((2, 3)) if bias is not None else None
        if gw is not None:
            norms2 += (gw * gw).reshape(b, -1).sum(1).float()
        if gb is not None:
            norms2 += (gb * gb).sum(1).float()
        material[m] = (gw, gb)
    norms = norms2.sqrt()
    c = clip_factors(norms, max_norm)
    cs = c * scale if scale != 1.0 else c
    slot = {id(p): t for p, t in zip(trainable_parameters(model), grads, strict=True)}
    for m in used:
        w = m.weight
        bias = m.bias if m.bias is not None and m.bias.requires_grad else None
        if m in factored:
            a, g = factored[m]
            gc = g * cs[:, None].to(g.dtype)
            if w.requires_grad:
                slot[id(w)].addmm_(gc.t(), a)  # the accumulation rides on the GEMM
            if bias is not None:
                slot[id(bias)].add_(gc.sum(0))
        else:
            gw, gb = material[m]
            if gw is not None:
                slot[id(w)].add_(torch.einsum("b,bo...->o...", cs.to(gw.dtype), gw).reshape(w.shape))
            if bias is not None and gb is not None:
                slot[id(bias)].add_(cs.to(gb.dtype) @ gb)
    return ClippedGrads(grads, norms.detach(), float(loss.detach()))


def _conv2d_per_example_weight_grads(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B, out, in, kh, kw]``: the batch folded into the channels of one grouped convolution
    (``groups = B``) whose weight gradient is exactly the per-example gradients, computed by
    torch's own convolution backward kernel (no ``unfold`` copy of the input)."""
    b, cin = a.shape[0], a.shape[1]
    cout = g.shape[1]
    gw: torch.Tensor = conv2d_weight(  # type: ignore[no-untyped-call]
        a.reshape(1, b * cin, *a.shape[2:]),
        (b * cout, cin, *m.kernel_size),
        g.reshape(1, b * cout, *g.shape[2:]),
        stride=m.stride,
        padding=m.padding,  # type: ignore[arg-type]
        dilation=m.dilation,
        groups=b,
    )
    return gw.reshape(b, cout, cin, *m.kernel_size)


def _vmap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_norm: float, loss_fn: LossFn) -> ClippedGrads:
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: t.detach() for n, t in model.named_buffers()}

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, frozen, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    b = len(x)
    norms = torch.sqrt(sum(((per[n].reshape(b, -1) ** 2).sum(1) for n in names), torch.zeros(b)))
    c = clip_factors(norms, max_norm)
    grads = [torch.einsum("b,b...->...", c, per[n]) for n in names]
    with torch.no_grad():
        loss = float(loss_fn(model(x), y))
    return ClippedGrads(grads, norms, loss)
