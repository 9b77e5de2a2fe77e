"""torchrun worker of :class:`~trustfed.distributed.participant.DDPTrainer`: one round of local DDP.

Reads ``JOB/job.json`` and the parameters (checking their hash first), trains exactly like
``LocalTrainer`` with each mini-batch split across ranks, and on rank 0 writes
``JOB/update.f32`` and ``JOB/update.json`` (hashes and metrics) atomically.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trustfed.core.codec import ParamSpec, flatten, from_bytes, load_vector, model_hash, to_bytes
from trustfed.distributed.parallel import DistributedError
from trustfed.models.reference import build_model


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def train_round(job_dir: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    job = json.loads((job_dir / "job.json").read_text(encoding="utf-8"))
    spec = ParamSpec.from_json((job_dir / "params.spec.json").read_text(encoding="utf-8"))
    params = from_bytes((job_dir / "params.f32").read_bytes(), spec)
    if model_hash(params, spec) != job["params_hash"]:
        raise DistributedError(f"{job_dir}: the global parameters do not match their hash; refusing to train")
    desc = job["model"]
    model = build_model(**desc)
    load_vector(model, params, spec)
    x = torch.from_numpy(np.load(Path(job["data_dir"]) / "x.npy", allow_pickle=False))
    y = torch.from_numpy(np.load(Path(job["data_dir"]) / "y.npy", allow_pickle=False))
    t = job["train"]
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
    mu = float(t["proximal_mu"])
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    gen = torch.Generator().manual_seed(int(job["seed"]))
    total = torch.zeros(2, dtype=torch.float64)  # summed loss, examples
    model.train()
    for _ in range(int(t["epochs"])):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), int(t["batch_size"])):
            idx = perm[start : start + int(t["batch_size"])]
            mine = torch.tensor_split(idx, world)[rank]
            opt.zero_grad(set_to_none=True)
            summed = F.cross_entropy(ddp(x[mine]), y[mine], reduction="sum")
            loss = summed * (world / len(idx))  # DDP averages over ranks: mean over the whole batch
            if anchor is not None:
                prox = torch.stack(
                    [((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)]
                ).sum()
                loss = loss + 0.5 * mu * prox
                summed = summed + 0.5 * mu * prox.detach() * len(mine)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += torch.tensor([float(summed.detach()), float(len(mine))], dtype=torch.float64)
    dist.all_reduce(total)
    vec, out_spec = flatten(model.state_dict())
    if rank == 0:
        if out_spec != spec:
            raise DistributedError(f"{job_dir}: trained model's spec differs from the job's")
        _atomic(job_dir / "update.f32", to_bytes(vec))
        result = {
            "params_hash": job["params_hash"],
            "update_hash": model_hash(vec, spec),
            "world_size": world,
            "metrics": {"train_loss": float(total[0] / max(float(total[1]), 1.0))},
        }
        _atomic(job_dir / "update.json", json.dumps(result, sort_keys=True).encode())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trustfed.distributed.participant_worker")
    ap.add_argument("--job", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    job = json.loads((args.job / "job.json").read_text(encoding="utf-8"))
    backend = job.get("backend", "auto")
    if backend == "auto":
        backend = "gloo"  # the reference models are small; keep them on CPU
    dist.init_process_group(backend)
    try:
        train_round(args.job)
        # Tear down together: a rank that destroys its gloo group while rank 0 still writes the update
        # can abort in gloo's threads ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
