"""Parallel layouts of :class:`~trustfed.distributed.lm.TinyLM` on torch.distributed.

- ``ddp``: DistributedDataParallel, the global batch split across ranks.
- ``tp``: tensor parallel with DTensor: per block, q/k/v and fc1 are ``ColwiseParallel``,
  o and fc2 ``RowwiseParallel`` (Megatron style), over a 1-D DeviceMesh.
- ``pp``: pipeline parallel with ``torch.distributed.pipelining``: each rank keeps one stage
  (a TinyLM holding only its layers under their original names) in a ``PipelineStage``, run
  by ``ScheduleGPipe`` or ``Schedule1F1B`` over micro-batches.
- ``ddp+pp``: a 2-D mesh (dp, pp): each dp replica runs the pipeline on its shard of the batch,
  then every stage averages its gradients over its dp group with one all-reduce
  (:func:`average_gradients`). The stage is not wrapped in DDP: the pipeline's shape inference
  runs the stage's forward once outside ``no_sync``, which arms DDP's gradient hooks, so DDP
  all-reduced the first micro-batch early, counted every parameter twice when rebuilding its
  buckets and failed an internal assert on the second step (torch 2.13).

Full states are assembled with one all-reduce: every tensor is owned by exactly one rank,
which writes it into a zero vector; the sum is the whole model on every rank (exact, since
x + 0 = x), and a coverage count checks that each tensor had exactly one owner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trustfed.core.codec import ParamSpec, TensorSpec, flatten
from trustfed.distributed.lm import TinyLM, lm_loss
from trustfed.errors import TrustFedError


class DistributedError(TrustFedError):
    """A distributed run could not be laid out, launched or completed."""


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: data-parallel and pipeline coordinates, tensor-parallel size."""

    strategy: str
    world: int
    rank: int
    dp: int
    pp: int
    tp: int

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.pp * self.tp) if self.strategy == "ddp+pp" else (self.rank if self.dp > 1 else 0)

    @property
    def pp_rank(self) -> int:
        return self.rank % self.pp if self.pp > 1 else 0

    @classmethod
    def of(cls, strategy: str, world: int, rank: int, pp_stages: int = 2) -> Layout:
        if strategy == "ddp":
            return cls(strategy, world, rank, world, 1, 1)
        if strategy == "tp":
            return cls(strategy, world, rank, 1, 1, world)
        if strategy == "pp":
            return cls(strategy, world, rank, 1, world, 1)
        if strategy == "ddp+pp":
            if world % pp_stages:
                raise DistributedError(f"ddp+pp: world size {world} is not a multiple of pp_stages {pp_stages}")
            return cls(strategy, world, rank, world // pp_stages, pp_stages, 1)
        raise DistributedError(f"unknown strategy {strategy!r}; expected ddp, tp, pp or ddp+pp")


def stage_layers(n_layers: int, stages: int, stage: int) -> range:
    """Contiguous, as-even-as-possible split of ``n_layers`` blocks over ``stages``."""
    base, extra = divmod(n_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def keep_stage(model: TinyLM, stage: int, stages: int) -> TinyLM:
    """Cut ``model`` down (in place) to pipeline stage ``stage``: its blocks, plus embeddings on the
    first stage and norm + head on the last. Parameter names stay those of the full model."""
    keep = {str(i) for i in stage_layers(len(model.layers), stages, stage)}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if stage != 0:
        model.tok_emb = None
        model.pos_emb = None
    if stage != stages - 1:
        model.norm = None
        model.head = None
    return model


def dp_pp_groups(device_type: str, dp: int, pp: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """The (dp, pp) process groups of this rank on a 2-D mesh: rank = dp_rank * pp + pp_rank."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (dp, pp), mesh_dim_names=("dp", "pp"))
    return mesh["dp"].get_group(), mesh["pp"].get_group()


def average_gradients(params: Iterable[nn.Parameter], group: dist.ProcessGroup, size: int) -> None:
    """Average the gradients of ``params`` over ``group`` (``size`` ranks) with one all-reduce.

    Collective over ``group``: its ranks hold the same stage, so the parameters line up. A missing
    gradient counts as zero (and every rank still takes part)."""
    ps = list(params)
    if not ps:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
    flat = torch.cat([g.detach().reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= size
    off = 0
    for p, g in zip(ps, grads, strict=True):
        n = g.numel()
        avg = flat[off : off + n].view_as(g)
        if p.grad is None:
            p.grad = avg.clone()
        else:
            p.grad.copy_(avg)
        off += n


def tp_plan(model: TinyLM) -> dict[str, Any]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {}
    for i in model.layers:
        for col in ("attn.q", "attn.k", "attn.v", "mlp.fc1"):
            plan[f"layers.{i}.{col}"] = ColwiseParallel()
        for row in ("attn.o", "mlp.fc2"):
            plan[f"layers.{i}.{row}"] = RowwiseParallel()
    return plan


def apply_tp(model: TinyLM, world: int) -> TinyLM:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu" if not torch.cuda.is_available() else "cuda", (world,), mesh_dim_names=("tp",))
    parallelize_module(model, mesh, tp_plan(model))
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_full(local: dict[str, torch.Tensor], spec: ParamSpec, owner: bool, device: torch.device) -> torch.Tensor:
    """The full flat vector of ``spec`` on every rank, from the tensors each owner holds.

    Collective: every rank calls it with the same spec. DTensors are gathered first (also a
    collective, in the same order on every rank)."""
    offsets: dict[str, tuple[int, int, int]] = {}
    off = 0
    for i, ts in enumerate(spec.tensors):
        offsets[ts.name] = (i, off, ts.numel)
        off += ts.numel
    vec = torch.zeros(spec.size, dtype=torch.float32, device=device)
    count = torch.zeros(len(spec.tensors), dtype=torch.float32, device=device)
    for name, t in local.items():
        full = _full(t)
        if not owner:
            continue
        if name not in offsets:
            raise DistributedError(f"tensor {name!r} is not in the full model's spec")
        i, o, n = offsets[name]
        if full.numel() != n:
            raise DistributedError(f"tensor {name!r} has {full.numel()} values, the spec says {n}")
        vec[o : o + n] = full.detach().reshape(-1).to(torch.float32)
        count[i] = 1.0
    dist.all_reduce(vec)
    dist.all_reduce(count)
    bad = [spec.tensors[i].name for i in range(len(spec.tensors)) if count[i].item() != 1.0]
    if bad:
        raise DistributedError(f"tensors without exactly one owner while assembling the full state: {bad[:5]}")
    return vec.cpu()


def full_model_spec(model: nn.Module) -> ParamSpec:
    return flatten(model.state_dict())[1]


OPT_KEYS: dict[str, tuple[str, ...]] = {"adamw": ("step", "exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


def optim_spec(model: nn.Module, optimizer: str) -> ParamSpec:
    """Names ``<param>#<key>`` for every optimizer state tensor of the full model."""
    out = []
    for name, p in model.named_parameters():
        for key in OPT_KEYS[optimizer]:
            shape = () if key == "step" else tuple(p.shape)
            out.append(TensorSpec(f"{name}#{key}", shape, "float32"))
    return ParamSpec(tuple(out))


def optim_state(
    named: Iterator[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer, optimizer: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, p in named:
        st = opt.state.get(p, {})
        for key in OPT_KEYS[optimizer]:
            v = st.get(key)
            if v is None:
                v = torch.zeros(()) if key == "step" else torch.zeros_like(_full(p.detach()))
            out[f"{name}#{key}"] = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
    return out


def load_optim_state(
    named: Iterator[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer, optimizer: str, full: dict[str, torch.Tensor]
) -> None:
    """Set ``opt``'s state from full tensors, re-sharding for DTensor parameters."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in named:
        st: dict[str, torch.Tensor] = {}
        for key in OPT_KEYS[optimizer]:
            v = full[f"{name}#{key}"].to(p.device)
            if key != "step" and isinstance(p, DTensor):
                v = distribute_tensor(v, p.device_mesh, p.placements)
            st[key] = v
        opt.state[p] = st


def make_optimizer(
    params: Iterator[nn.Parameter], optimizer: str, lr: float, momentum: float, wd: float
) -> torch.optim.Optimizer:
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=False)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd, foreach=False)


@dataclass
class PipelineRunner:
    """One rank's pipeline stage and its schedule."""

    stage_module: nn.Module
    schedule: Any
    stage_index: int
    stages: int

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.stages - 1

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Forward + backward of one batch through the pipeline; the mean loss on the last stage."""
        if self.is_first:
            self.schedule.step(x)
            return None
        losses: list[torch.Tensor] = []
        if self.is_last:
            self.schedule.step(target=y, losses=losses)
            return torch.stack([loss.detach() for loss in losses]).mean()
        self.schedule.step()
        return None


def build_pipeline(
    module: nn.Module,
    stage_index: int,
    stages: int,
    microbatches: int,
    schedule: str,
    group: dist.ProcessGroup | None,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss,
) -> PipelineRunner:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage = PipelineStage(module, stage_index, stages, device, group=group)
    cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
    return PipelineRunner(module, cls(stage, n_microbatches=microbatches, loss_fn=loss_fn), stage_index, stages)
