"""torchrun worker of :class:`~trustfed.distributed.participant.DDPTrainer`: local DDP rounds.

A round: read ``JOB/job.json`` and the parameters (checking their hash first), train exactly like
``LocalTrainer`` with each mini-batch split across ranks, and on rank 0 write ``JOB/update.f32``
and ``JOB/update.json`` (hashes and metrics) atomically.

``--job JOB`` runs one round and exits. ``--serve DIR`` keeps the process group across rounds: every
rank polls ``DIR/control.json`` (``{"seq": n, "job": "round-00001"}`` or ``{"seq": n, "stop": true}``,
written atomically by the trainer) and runs each new job in turn, so a round costs no process start
or rendezvous. The workers leave on ``stop``, or when the process named in ``DIR/serve.json``
(``owner_pid``, the trainer's) is gone, so they never outlive the participant.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trustfed.core.codec import ParamSpec, flatten, from_bytes, load_vector, model_hash, to_bytes
from trustfed.distributed.parallel import DistributedError
from trustfed.models.reference import build_model
from trustfed.primitives.atomic import atomic_write_bytes


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
        atomic_write_bytes(job_dir / "update.f32", to_bytes(vec))
        result = {
            "params_hash": job["params_hash"],
            "update_hash": model_hash(vec, spec),
            "world_size": world,
            "metrics": {"train_loss": float(total[0] / max(float(total[1]), 1.0))},
        }
        atomic_write_bytes(job_dir / "update.json", json.dumps(result, sort_keys=True).encode())


CONTROL = "control.json"
SERVE = "serve.json"
POLL_S = 0.01


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _control(folder: Path) -> dict[str, object] | None:
    try:
        ctl = json.loads((folder / CONTROL).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    if not isinstance(ctl, dict) or not isinstance(ctl.get("seq"), int):
        raise DistributedError(f"{folder / CONTROL}: expected an object with an integer seq")
    return ctl


def serve(folder: Path) -> None:
    """Run the jobs ``DIR/control.json`` names, one after another, until ``stop`` or the owner is gone."""
    owner = int(json.loads((folder / SERVE).read_text(encoding="utf-8"))["owner_pid"])
    done = 0
    while True:
        ctl = _control(folder)
        if ctl is None or int(ctl["seq"]) <= done:  # type: ignore[call-overload]
            if not _owner_alive(owner):
                return
            time.sleep(POLL_S)
            continue
        done = int(ctl["seq"])  # type: ignore[call-overload]
        if ctl.get("stop"):
            return
        job = folder / str(ctl["job"])
        if job.parent != folder:
            raise DistributedError(f"{folder / CONTROL}: job {ctl['job']!r} is not a folder of {folder}")
        train_round(job)
        dist.barrier()  # the next job starts together


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trustfed.distributed.participant_worker")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--job", type=Path, help="run this one job and exit")
    mode.add_argument("--serve", type=Path, help="run the jobs this folder's control file names")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    settings = json.loads(((args.job / "job.json") if args.job else (args.serve / SERVE)).read_text(encoding="utf-8"))
    backend = settings.get("backend", "auto")
    if backend == "auto":
        backend = "gloo"  # the reference models are small; keep them on CPU
    dist.init_process_group(backend)
    try:
        if args.job:
            train_round(args.job)
        else:
            serve(args.serve)
        # Tear down together: a rank that destroys its gloo group while rank 0 still writes the update
        # can abort in gloo's threads ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
