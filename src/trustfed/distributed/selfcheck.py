"""Checks that this machine's DDP, tensor- and pipeline-parallel runs give single-process results.

Run inside an initialised process group (``trustfed train --selfcheck`` runs it before training;
the tests run it on 2 CPU processes with gloo, and on 4 for ``ddp+pp``). Pipeline checks run
when the world fits the 2-layer check model (2 processes); ``ddp+pp`` (2 stages x world/2
replicas) when the world is even and at least 4. Each check computes the same thing twice: once
with the full model in one process (the oracle, on every rank) and once distributed; it reports
the largest absolute difference. Collective: every rank must call :func:`run_selfcheck`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from trustfed.distributed.lm import LMShape, assistant_corpus, build_lm, encode, lm_batch, lm_loss
from trustfed.distributed.parallel import (
    Layout,
    _full,
    apply_tp,
    average_gradients,
    build_pipeline,
    dp_pp_groups,
    keep_stage,
    make_optimizer,
)

TOLERANCE = 1e-5
SHAPE = LMShape(d_model=32, n_heads=4, n_layers=2, d_ff=64, seq_len=16)


def _batch(step: int, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = encode(assistant_corpus(50, seed=1))
    return lm_batch(tokens, batch, SHAPE.seq_len, seed=1, step=step)


def _max_diff(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return max(float((a.detach().cpu() - b.detach().cpu()).abs().max()) for a, b in pairs)


def check_ddp(device: torch.device, steps: int = 3) -> dict[str, Any]:
    """DDP on per-rank shards vs one process on the combined batch: parameters after ``steps``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    world, rank = dist.get_world_size(), dist.get_rank()
    ref = build_lm(SHAPE, seed=3).to(device)
    mine = build_lm(SHAPE, seed=3).to(device)
    ddp = DDP(mine, device_ids=[device.index] if device.type == "cuda" else None)
    # SGD with momentum: Adam would amplify float reassociation noise in near-zero gradients.
    ropt = make_optimizer(ref.parameters(), "sgd", 0.5, 0.9, 0.01)
    dopt = make_optimizer(ddp.parameters(), "sgd", 0.5, 0.9, 0.01)
    for step in range(steps):
        x, y = _batch(step, 4 * world)
        x, y = x.to(device), y.to(device)
        lm_loss(ref(x), y).backward()  # type: ignore[no-untyped-call]
        ropt.step()
        ropt.zero_grad()
        lm_loss(ddp(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()  # type: ignore[no-untyped-call]
        dopt.step()
        dopt.zero_grad()
    diff = _max_diff(list(zip(ref.parameters(), mine.parameters(), strict=True)))
    moved = _max_diff(list(zip(build_lm(SHAPE, seed=3).parameters(), mine.cpu().parameters(), strict=True)))
    return {"max_param_diff": diff, "steps": steps, "param_change": moved, "ok": diff <= TOLERANCE and moved > 1e-3}


def check_tp(device: torch.device) -> dict[str, Any]:
    """Tensor-parallel forward and backward vs the unsharded model on the same batch."""
    world = dist.get_world_size()
    ref = build_lm(SHAPE, seed=4).to(device)
    tp = apply_tp(build_lm(SHAPE, seed=4).to(device), world)
    x, y = _batch(0)
    x, y = x.to(device), y.to(device)
    out_ref, out_tp = ref(x), tp(x)
    fwd = _max_diff([(out_ref, _full(out_tp))])
    lm_loss(out_ref, y).backward()  # type: ignore[no-untyped-call]
    lm_loss(out_tp, y).backward()  # type: ignore[no-untyped-call]
    pairs = []
    sharded = 0
    for (name, p), (rname, r) in zip(tp.named_parameters(), ref.named_parameters(), strict=True):
        assert name == rname and p.grad is not None and r.grad is not None
        if _full(p) is not p:
            sharded += 1
        pairs.append((_full(p.grad), r.grad))
    bwd = _max_diff(pairs)
    return {
        "forward_max_diff": fwd,
        "grad_max_diff": bwd,
        "sharded_params": sharded,
        "ok": fwd <= TOLERANCE and bwd <= TOLERANCE and sharded > 0,
    }


def check_pp(device: torch.device, schedule: str, microbatches: int = 4) -> dict[str, Any]:
    """Pipeline gradients (one rank per stage) vs the unpipelined model's on the whole batch."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ref = build_lm(SHAPE, seed=5).to(device)
    stage = keep_stage(build_lm(SHAPE, seed=5), rank, world).to(device)
    runner = build_pipeline(stage, rank, world, microbatches, schedule, None, device)
    x, y = _batch(0)
    x, y = x.to(device), y.to(device)
    lm_loss(ref(x), y).backward()  # type: ignore[no-untyped-call]
    loss = runner.step(x, y)
    refp = dict(ref.named_parameters())
    pairs = []
    for name, p in stage.named_parameters():
        r = refp[name].grad
        assert p.grad is not None and r is not None, name
        pairs.append((p.grad, r))
    # Every parameter must be held by exactly one stage.
    count = torch.tensor([float(len(pairs))])
    dist.all_reduce(count)
    diff = torch.tensor([_max_diff(pairs)])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    covered = int(count.item()) == len(refp)
    out: dict[str, Any] = {"schedule": schedule, "microbatches": microbatches, "grad_max_diff": float(diff.item())}
    out["params_covered"] = covered
    # the loss lives on the last stage: share it so rank 0's report has it
    ldiff = torch.zeros(1) if loss is None else (loss.cpu() - lm_loss(ref(x), y).detach().cpu()).abs().reshape(1)
    dist.all_reduce(ldiff, op=dist.ReduceOp.MAX)
    out["loss_diff"] = float(ldiff.item())
    out["ok"] = covered and out["grad_max_diff"] <= TOLERANCE and out["loss_diff"] <= TOLERANCE
    return out


def check_ddp_pp(device: torch.device, schedule: str = "1f1b", steps: int = 3, microbatches: int = 2) -> dict[str, Any]:
    """ddp+pp (2 pipeline stages x world/2 data-parallel replicas, as ``trustfed train`` lays it out)
    vs one process on the combined batch: every parameter after ``steps`` SGD-momentum steps."""
    world, rank = dist.get_world_size(), dist.get_rank()
    lay = Layout.of("ddp+pp", world, rank, 2)
    dp_group, pp_group = dp_pp_groups(device.type, lay.dp, lay.pp)
    ref = build_lm(SHAPE, seed=6).to(device)
    stage = keep_stage(build_lm(SHAPE, seed=6), lay.pp_rank, lay.pp).to(device)
    runner = build_pipeline(stage, lay.pp_rank, lay.pp, microbatches, schedule, pp_group, device)
    ropt = make_optimizer(ref.parameters(), "sgd", 0.5, 0.9, 0.01)
    sopt = make_optimizer(stage.parameters(), "sgd", 0.5, 0.9, 0.01)
    for step in range(steps):
        x, y = _batch(step, 2 * microbatches * lay.dp)
        x, y = x.to(device), y.to(device)
        lm_loss(ref(x), y).backward()  # type: ignore[no-untyped-call]
        ropt.step()
        ropt.zero_grad()
        runner.step(x.chunk(lay.dp)[lay.dp_rank], y.chunk(lay.dp)[lay.dp_rank])
        average_gradients(stage.parameters(), dp_group, lay.dp)
        sopt.step()
        sopt.zero_grad()
    refp, init = dict(ref.named_parameters()), dict(build_lm(SHAPE, seed=6).named_parameters())
    mine = list(stage.named_parameters())
    stats = torch.tensor(
        [
            _max_diff([(p, refp[n]) for n, p in mine]),
            _max_diff([(p, init[n]) for n, p in mine]),
        ]
    )
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    count = torch.tensor([float(len(mine))])
    dist.all_reduce(count)  # each stage's parameters are counted once per dp replica
    covered = int(count.item()) == lay.dp * len(refp)
    diff, moved = float(stats[0]), float(stats[1])
    return {
        "dp": lay.dp,
        "pp": lay.pp,
        "schedule": schedule,
        "microbatches": microbatches,
        "steps": steps,
        "max_param_diff": diff,
        "param_change": moved,
        "params_covered": covered,
        "ok": covered and diff <= TOLERANCE and moved > 1e-3,
    }


def run_selfcheck(device: torch.device) -> dict[str, Any]:
    world = dist.get_world_size()
    torch.manual_seed(0)
    report: dict[str, Any] = {"world_size": world, "backend": dist.get_backend(), "tolerance": TOLERANCE}
    report["ddp"] = check_ddp(device)
    report["tp"] = check_tp(device)
    if world >= 2 and SHAPE.n_layers >= world:
        report["pp_1f1b"] = check_pp(device, "1f1b")
        report["pp_gpipe"] = check_pp(device, "gpipe")
    if world >= 4 and world % 2 == 0:
        report["ddp_pp"] = check_ddp_pp(device)
    report["ok"] = all(v["ok"] for v in report.values() if isinstance(v, dict))
    return report
