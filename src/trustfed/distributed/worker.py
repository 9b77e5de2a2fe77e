"""The torchrun worker of ``trustfed train``: one process of a DDP / TP / PP / DDP+PP run.

Run by the launcher as ``python -m torch.distributed.run ... -m trustfed.distributed.worker
--run-dir DIR``; it reads ``DIR/config.json`` (written by the launcher). Every worker rebuilds
the same model and data from the config and its seed. Rank 0 alone writes the run folder:
``provenance.jsonl`` (hash-chained), ``checkpoints/ckpt-STEP/`` and ``metrics.json``.

On start (and after every elastic restart) the workers resume from the newest checkpoint the
provenance log records, after rank 0 has checked the log's chain and the checkpoint's hashes;
the verified vectors are then broadcast, so nodes need no shared file system. With ``[run]
ledger`` set, rank 0 also anchors every checkpoint on the chain (:mod:`trustfed.distributed.anchor`)
and resumes only from a checkpoint the chain anchors with the same hashes.

Fault injection for tests: ``TRUSTFED_FAULT_KILL_AT=RANK:STEP`` makes that rank SIGKILL itself
at that step, on the first attempt only (``TORCHELASTIC_RESTART_COUNT == 0``).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trustfed.core.codec import load_vector, model_hash, unflatten
from trustfed.distributed.anchor import (
    LedgerAnchorSink,
    RoundLedger,
    describe,
    open_run_ledger,
    read_anchors,
    resume_point,
)
from trustfed.distributed.lm import LMShape, assistant_corpus, build_lm, encode, lm_batch, lm_loss
from trustfed.distributed.parallel import (
    DistributedError,
    Layout,
    PipelineRunner,
    apply_tp,
    average_gradients,
    build_pipeline,
    dp_pp_groups,
    full_model_spec,
    gather_full,
    keep_stage,
    load_optim_state,
    make_optimizer,
    optim_spec,
    optim_state,
)
from trustfed.distributed.provenance import (
    Checkpoint,
    ProvenanceLog,
    ProvenanceSink,
    SignedAuditSink,
    config_hash,
    latest_checkpoint,
    log_checkpoint,
    read_verified,
    write_checkpoint,
)
from trustfed.distributed.selfcheck import run_selfcheck
from trustfed.distributed.settings import TrainRunConfig
from trustfed.errors import CheckpointError, TrustFedError
from trustfed.ledger.backends import Web3Ledger

log = logging.getLogger("trustfed.distributed.worker")

FAULT_ENV = "TRUSTFED_FAULT_KILL_AT"


def pick_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def lm_shape(cfg: TrainRunConfig) -> LMShape:
    m = cfg.model
    return LMShape(d_model=m.d_model, n_heads=m.n_heads, n_layers=m.n_layers, d_ff=m.d_ff, seq_len=m.seq_len)


@dataclass
class Parallel:
    """This rank's part of the model, however it is parallelised."""

    layout: Layout
    local: nn.Module  # unwrapped: full model (ddp, tp) or this rank's stage (pp)
    wrapped: nn.Module  # what runs forward (DDP wrapper, TP module); unused for pp
    pipeline: PipelineRunner | None
    owner: bool  # contributes its tensors when assembling the full state
    dp_group: dist.ProcessGroup | None = None  # ddp+pp: the ranks holding the same stage


def parallelize(cfg: TrainRunConfig, model: nn.Module, layout: Layout, device: torch.device) -> Parallel:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    if layout.strategy == "ddp":
        return Parallel(layout, model, DDP(model.to(device), device_ids=ids), None, layout.rank == 0)
    if layout.strategy == "tp":
        model = apply_tp(model.to(device), layout.world)  # type: ignore[arg-type]
        return Parallel(layout, model, model, None, layout.rank == 0)
    stage = keep_stage(model, layout.pp_rank, layout.pp).to(device)  # type: ignore[arg-type]
    pp_group = dp_group = None
    if layout.strategy == "ddp+pp":
        # Not DDP around the stage: see parallel.py. Gradients are averaged after each pipeline step.
        dp_group, pp_group = dp_pp_groups(device.type, layout.dp, layout.pp)
    p = cfg.parallel
    runner = build_pipeline(stage, layout.pp_rank, layout.pp, p.microbatches, p.pp_schedule, pp_group, device)
    return Parallel(layout, stage, stage, runner, layout.dp_rank == 0, dp_group)


def train_step(par: Parallel, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Forward + backward of one global batch; returns the batch's mean loss (same on every rank)."""
    lay = par.layout
    if lay.dp > 1:
        x, y = x.chunk(lay.dp)[lay.dp_rank], y.chunk(lay.dp)[lay.dp_rank]
    x, y = x.to(device), y.to(device)
    if par.pipeline is None:
        loss = lm_loss(par.wrapped(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        out = loss.detach().clone()
        if lay.dp > 1:
            dist.all_reduce(out)
            out /= lay.dp
        return out
    last = par.pipeline.step(x, y)
    if par.dp_group is not None:
        average_gradients(par.local.parameters(), par.dp_group, lay.dp)
    out = last.clone() if last is not None else torch.zeros((), device=device)
    dist.all_reduce(out)
    return out / lay.dp


def _maybe_fault(rank: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    r, s = (int(v) for v in spec.split(":"))
    if r == rank and s == step:
        log.warning("fault injection: rank %d kills itself at step %d", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)


def _resume(
    rank: int,
    run_dir: Path,
    cfg_h: str,
    mspec: Any,
    ospec: Any,
    plog: ProvenanceLog | None,
    ledger: RoundLedger | None = None,
) -> tuple[int, torch.Tensor | None, torch.Tensor | None, Checkpoint | None]:
    """Rank 0 finds and verifies the newest checkpoint (against the chain too, with a ledger), then
    broadcasts it to every rank."""
    status = torch.tensor([0], dtype=torch.long)  # >0: step, 0: fresh start, -1: refused
    ck: Checkpoint | None = None
    vecs: tuple[torch.Tensor, torch.Tensor] | None = None
    err: TrustFedError | None = None
    anchored: dict[str, Any] = {}
    if rank == 0:
        try:
            if ledger is None:
                ck = latest_checkpoint(run_dir, cfg_h)
            else:
                found = resume_point(run_dir, cfg_h, read_anchors(ledger))
                if found is not None:
                    ck, anchored = found[0].checkpoint, {"anchor_round": found[1].index}
            if ck is not None:
                vecs = read_verified(ck, mspec, ospec)
                status[0] = ck.step
        except TrustFedError as exc:
            err, status[0] = exc, -1
    dist.broadcast(status, 0)
    if status.item() < 0:
        raise err or CheckpointError("rank 0 refused to resume from the newest checkpoint; see its log")
    if status.item() == 0:
        return 0, None, None, None
    mvec = vecs[0] if vecs else torch.zeros(mspec.size)
    ovec = vecs[1] if vecs else torch.zeros(ospec.size)
    dist.broadcast(mvec, 0)
    dist.broadcast(ovec, 0)
    if plog is not None and ck is not None:
        plog.append(
            "resume",
            step=ck.step,
            path=str(ck.path.relative_to(run_dir)),
            model_hash=ck.model_hash,
            optim_hash=ck.optim_hash,
            verified=True,
            config_hash=cfg_h,
            restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            **anchored,
        )
    return int(status.item()), mvec, ovec, ck


def _open_provenance(cfg: TrainRunConfig, run_dir: Path) -> tuple[ProvenanceLog, Web3Ledger | None, dict[str, Any]]:
    """Rank 0's provenance log with its sinks (signed audit mirror, on-chain anchors), the ledger
    it anchors on, and what ``run_start`` records about that chain."""
    sinks: tuple[ProvenanceSink, ...] = ()
    if cfg.run.audit_key is not None:
        sinks = (SignedAuditSink(run_dir / "audit.jsonl", cfg.run.audit_key),)
    ledger, chain = None, {}
    if cfg.run.ledger != "none":
        r = cfg.run
        ledger = open_run_ledger(run_dir, r.ledger, r.rpc_url, r.ledger_key_file, allow_dev_keys=r.allow_dev_keys)
        sinks += (LedgerAnchorSink(ledger),)
        chain = {"ledger": describe(ledger)}
    return ProvenanceLog(run_dir / "provenance.jsonl", sinks), ledger, chain


def run(cfg: TrainRunConfig, run_dir: Path, selfcheck: bool = False) -> dict[str, Any]:
    """One worker's whole run (the process group must already be initialised)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    problems = cfg.problems_for_world(world)
    if problems:
        raise DistributedError(f"config does not fit world size {world}: " + "; ".join(map(str, problems)))
    device = (
        torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if selfcheck and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        report = run_selfcheck(device)
        if rank == 0:
            (run_dir / "selfcheck.json").write_text(json.dumps(report, indent=2))
    layout = Layout.of(cfg.parallel.strategy, world, rank, cfg.parallel.pp_stages)
    seed = cfg.run.seed
    shape = lm_shape(cfg)
    model = build_lm(shape, seed)
    mspec, ospec = full_model_spec(model), optim_spec(model, cfg.train.optimizer)
    cfg_json = cfg.model_dump(mode="json")
    cfg_h = config_hash(cfg_json)
    plog, ledger, chain = _open_provenance(cfg, run_dir) if rank == 0 else (None, None, {})
    try:
        if plog is not None:
            plog.append(
                "run_start",
                config_hash=cfg_h,
                config=cfg_json,
                world_size=world,
                strategy=layout.strategy,
                restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                torch=torch.__version__,
                backend=dist.get_backend(),
                **chain,
            )
        start, mvec, ovec, _ = _resume(rank, run_dir, cfg_h, mspec, ospec, plog, ledger)
        if mvec is not None:
            load_vector(model, mvec, mspec)
        par = parallelize(cfg, model, layout, device)
        t = cfg.train
        opt = make_optimizer(par.local.parameters(), t.optimizer, t.lr, t.momentum, t.weight_decay)
        if ovec is not None:
            load_optim_state(par.local.named_parameters(), opt, t.optimizer, unflatten(ovec, ospec))
        tokens = encode(assistant_corpus(cfg.data.dialogues, seed))
        losses: list[tuple[int, float]] = []
        t0, steps_run = time.perf_counter(), 0
        for step in range(start + 1, t.steps + 1):
            _maybe_fault(rank, step)
            x, y = lm_batch(tokens, t.batch_size, shape.seq_len, seed, step)
            loss = train_step(par, x, y, device)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps_run += 1
            if step % t.log_every == 0 or step == t.steps:
                losses.append((step, float(loss)))
                if rank == 0:
                    log.info("step %d loss %.4f", step, float(loss))
            if step % t.checkpoint_every == 0 or step == t.steps:
                save_checkpoint(par, opt, cfg, run_dir, step, mspec, ospec, cfg_h, plog, float(loss))
        seconds = time.perf_counter() - t0
        final = gather_full(par.local.state_dict(), mspec, par.owner, device)
        metrics = {
            "strategy": layout.strategy,
            "world_size": world,
            "start_step": start,
            "steps": t.steps,
            "losses": losses,
            "seconds": seconds,
            "tokens_per_s": steps_run * t.batch_size * shape.seq_len / max(seconds, 1e-9),
            "model_hash": model_hash(final, mspec),
        }
        if plog is not None:
            plog.append(
                "run_end",
                step=t.steps,
                model_hash=metrics["model_hash"],
                config_hash=cfg_h,
                world_size=world,
                seconds=seconds,
            )
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
    finally:
        if ledger is not None:
            ledger.close()


def save_checkpoint(
    par: Parallel,
    opt: torch.optim.Optimizer,
    cfg: TrainRunConfig,
    run_dir: Path,
    step: int,
    mspec: Any,
    ospec: Any,
    cfg_h: str,
    plog: ProvenanceLog | None,
    loss: float,
) -> None:
    """Assemble the full model and optimizer state (collective); rank 0 writes and logs it."""
    device = next(par.local.parameters()).device
    mvec = gather_full(par.local.state_dict(), mspec, par.owner, device)
    ovec = gather_full(optim_state(par.local.named_parameters(), opt, cfg.train.optimizer), ospec, par.owner, device)
    if plog is None:
        return
    ck = write_checkpoint(run_dir, step, mvec, mspec, ovec, ospec)
    log_checkpoint(
        plog,
        run_dir,
        ck,
        config_hash=cfg_h,
        world_size=par.layout.world,
        strategy=par.layout.strategy,
        loss=loss,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trustfed.distributed.worker")
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--selfcheck", action="store_true")
    args = ap.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a hung worker is
    logging.basicConfig(level=logging.INFO, format="%(levelname)s rank%(rank)s %(name)s: %(message)s")
    old_factory = logging.getLogRecordFactory()
    rank_env = os.environ.get("RANK", "?")

    def factory(*a: Any, **k: Any) -> logging.LogRecord:
        rec = old_factory(*a, **k)
        rec.rank = rank_env
        return rec

    logging.setLogRecordFactory(factory)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = TrainRunConfig.model_validate_json((args.run_dir / "config.json").read_text(encoding="utf-8"))
    dist.init_process_group(pick_backend(cfg.launch.backend))
    try:
        run(cfg, args.run_dir, args.selfcheck)
        dist.barrier()  # tear down together (see participant_worker.main)
    except TrustFedError as exc:
        log.error("%s", exc)
        return 3
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
