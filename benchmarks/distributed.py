"""Distributed training throughput: single process vs DDP(2) vs PP(2), the pipeline bubble, and
trustfed's overhead vs the same plain torch code.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed.py [--quick] [--out FILE]

The parent process measures the single-process baseline, then launches torchrun twice (2 gloo
processes on CPU): a DDP launch (plain torch DDP loop, then ``trustfed.distributed.worker.run`` on
the same model, data and steps, then the plain loop again) and a PP launch (plain pipelined loop with
1F1B for several micro-batch counts, and each stage's compute time alone, from which the bubble is
measured and set against the (K-1)/(M+K-1) bound). All rows are in this run, on this machine.
Single-process and DDP loops are timed from their first step, as ``worker.run`` times itself (its
two checkpoints, with hashes and provenance entries, are inside its time); the PP loop excludes 3
warm-up steps, as its stage-alone timings do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from trustfed.distributed.lm import LMShape, assistant_corpus, build_lm, encode, lm_batch, lm_loss  # noqa: E402
from trustfed.distributed.parallel import make_optimizer  # noqa: E402

SHAPE = LMShape(d_model=128, n_heads=4, n_layers=4, d_ff=512, seq_len=64)
BATCH = 16


def _plain_loop(model: torch.nn.Module, params: Any, steps: int, world: int, rank: int, warm: int = 3) -> float:
    """Seconds per step of a plain loop (AdamW), after ``warm`` steps."""
    import torch.distributed as dist

    opt = make_optimizer(params, "adamw", 1e-3, 0.0, 0.0)
    tokens = encode(assistant_corpus(2000, 0))
    t0 = 0.0
    for step in range(1, steps + warm + 1):
        if step == warm + 1:
            t0 = time.perf_counter()
        x, y = lm_batch(tokens, BATCH, SHAPE.seq_len, 0, step)
        if world > 1:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        loss = lm_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1 and dist.is_initialized():
            pass
    return (time.perf_counter() - t0) / steps


def worker_ddp(steps: int, out: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trustfed.distributed.settings import validate_train_config
    from trustfed.distributed.worker import run

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    plain = []
    trust = []
    for rep in range(2):
        model = build_lm(SHAPE, 0)
        ddp = DDP(model)
        # timed like worker.run: from the first step, no warm-up excluded (its checkpoints are included)
        plain.append(_plain_loop(ddp, ddp.parameters(), steps, world, rank, warm=0))
        run_dir = out.parent / f"tf-run-{rep}"
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        m = SHAPE
        cfg = validate_train_config(
            {
                "run": {"out": str(run_dir)},
                "model": {
                    "d_model": m.d_model,
                    "n_heads": m.n_heads,
                    "n_layers": m.n_layers,
                    "d_ff": m.d_ff,
                    "seq_len": m.seq_len,
                },
                "train": {
                    "steps": steps,
                    "batch_size": BATCH,
                    "optimizer": "adamw",
                    "lr": 1e-3,
                    "checkpoint_every": max(steps // 2, 1),
                    "log_every": steps,
                },
            }
        )
        metrics = run(cfg, run_dir)
        trust.append(metrics["seconds"] / steps)
    if rank == 0:
        out.write_text(json.dumps({"plain_s_per_step": plain, "trustfed_s_per_step": trust}))
    dist.destroy_process_group()


def _stage_compute(stage: torch.nn.Module, first: bool, last: bool, mb: int, reps: int) -> float:
    """Seconds of forward + backward of one micro-batch through this stage alone (no communication)."""
    tokens = encode(assistant_corpus(2000, 0))
    x, y = lm_batch(tokens, mb, SHAPE.seq_len, 0, 0)
    times = []
    for _ in range(reps + 1):
        h = x if first else torch.randn(mb, SHAPE.seq_len, SHAPE.d_model, requires_grad=True)
        t0 = time.perf_counter()
        out = stage(h)
        if last:
            lm_loss(out, y).backward()  # type: ignore[no-untyped-call]
        else:
            out.backward(torch.ones_like(out))  # type: ignore[no-untyped-call]
        times.append(time.perf_counter() - t0)
        stage.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def worker_pp(steps: int, microbatches: list[int], out: Path) -> None:
    import torch.distributed as dist

    from trustfed.distributed.parallel import build_pipeline, keep_stage

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens = encode(assistant_corpus(2000, 0))
    rows = []
    for m in microbatches:
        stage = keep_stage(build_lm(SHAPE, 0), rank, world)
        runner = build_pipeline(stage, rank, world, m, "1f1b", None, torch.device("cpu"))
        opt = make_optimizer(stage.parameters(), "adamw", 1e-3, 0.0, 0.0)
        warm = 2
        t0 = 0.0
        for step in range(1, steps + warm + 1):
            if step == warm + 1:
                dist.barrier()
                t0 = time.perf_counter()
            x, y = lm_batch(tokens, BATCH, SHAPE.seq_len, 0, step)
            runner.step(x, y)
            opt.step()
            opt.zero_grad(set_to_none=True)
        dist.barrier()
        step_s = (time.perf_counter() - t0) / steps
        compute = _stage_compute(stage, rank == 0, rank == world - 1, BATCH // m, reps=5) * m
        t = torch.tensor([compute])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rows.append({"microbatches": m, "s_per_step": step_s, "busy_s_per_step": float(t.item())})
    if rank == 0:
        out.write_text(json.dumps(rows))
    dist.destroy_process_group()


def _launch(args: list[str]) -> None:
    from trustfed.distributed.launch import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env["PYTHONPATH"] = str(ROOT / "src")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        __file__,
        *args,
    ]
    proc = subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"torchrun failed ({proc.returncode}):\n" + "\n".join(proc.stderr.splitlines()[-30:]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distributed.json")
    ap.add_argument("--worker", choices=["ddp", "pp"])
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--result", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    steps = a.steps or (8 if a.quick else 30)
    if a.worker == "ddp":
        worker_ddp(steps, a.result)
        return
    if a.worker == "pp":
        worker_pp(steps, [2, 4, 8], a.result)  # 1F1B needs M >= K
        return
    with tempfile.TemporaryDirectory() as tmp:
        single = statistics.median(
            _plain_loop(m, m.parameters(), steps, 1, 0, warm=0) for m in (build_lm(SHAPE, 0), build_lm(SHAPE, 0))
        )
        ddp_file, pp_file = Path(tmp) / "ddp.json", Path(tmp) / "pp.json"
        _launch(["--worker", "ddp", "--steps", str(steps), "--result", str(ddp_file)])
        _launch(["--worker", "pp", "--steps", str(steps), "--result", str(pp_file)])
        ddp = json.loads(ddp_file.read_text())
        pp = json.loads(pp_file.read_text())
    tok = BATCH * SHAPE.seq_len
    plain_ddp = min(ddp["plain_s_per_step"])
    trust_ddp = min(ddp["trustfed_s_per_step"])
    pp4 = next(r for r in pp if r["microbatches"] == 4)
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "backend": "gloo (CPU)",
            "loadavg_1min": os.getloadavg()[0],
        },
        "model": {**SHAPE.__dict__, "params": sum(p.numel() for p in build_lm(SHAPE, 0).parameters())},
        "global_batch": BATCH,
        "steps": steps,
        "throughput_tokens_per_s": {
            "single": tok / single,
            "ddp2_plain": tok / plain_ddp,
            "ddp2_trustfed": tok / trust_ddp,
            "pp2_1f1b_m4": tok / pp4["s_per_step"],
        },
        "ratio_vs_single": {"ddp2": single / plain_ddp, "pp2_m4": single / pp4["s_per_step"]},
        "trustfed_overhead_vs_plain_ddp": trust_ddp / plain_ddp - 1.0,
        "bubble": [
            {
                "microbatches": r["microbatches"],
                "measured": max(0.0, 1.0 - r["busy_s_per_step"] / r["s_per_step"]),
                "bound": 1 / (r["microbatches"] + 1),  # (K-1)/(M+K-1) with K=2
                "s_per_step": r["s_per_step"],
            }
            for r in pp
        ],
        "raw": {"single_s_per_step": single, "ddp": ddp, "pp": pp},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    t = result["throughput_tokens_per_s"]
    print(
        f"model {result['model']['params']} params, global batch {BATCH}x{SHAPE.seq_len} tokens, {steps} steps, "
        f"load avg {result['machine']['loadavg_1min']:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'run':<22}{'tokens/s':>12}{'vs single':>12}")
    print(f"{'single process':<22}{t['single']:>12.0f}{1.0:>12.2f}")
    print(f"{'DDP(2) plain torch':<22}{t['ddp2_plain']:>12.0f}{t['ddp2_plain'] / t['single']:>12.2f}")
    print(f"{'DDP(2) trustfed':<22}{t['ddp2_trustfed']:>12.0f}{t['ddp2_trustfed'] / t['single']:>12.2f}")
    print(f"{'PP(2) 1F1B M=4':<22}{t['pp2_1f1b_m4']:>12.0f}{t['pp2_1f1b_m4'] / t['single']:>12.2f}")
    print(
        f"trustfed overhead vs the same plain DDP loop: {100 * result['trustfed_overhead_vs_plain_ddp']:+.1f}% "
        "(goal <= 5%)"
    )
    print(f"{'M':>4}{'bubble measured':>18}{'bound (K-1)/(M+K-1)':>22}{'s/step':>10}")
    for b in result["bubble"]:
        print(f"{b['microbatches']:>4}{b['measured']:>18.3f}{b['bound']:>22.3f}{b['s_per_step']:>10.3f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
