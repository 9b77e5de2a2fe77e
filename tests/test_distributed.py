"""trustfed.distributed on 2 CPU processes (gloo), launched with torchrun.

Each torchrun launch costs several seconds on a 2-core machine, so the default run has two:
one ``trustfed train`` run that self-checks DDP / TP / PP against single-process results and then
survives a killed worker, and one demo federation where participant p000 trains on 2 DDP workers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from trustfed.distributed.lm import LMShape, assistant_corpus, build_lm, encode, lm_batch, lm_loss
from trustfed.distributed.parallel import make_optimizer

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this torch build",
)
os.environ.setdefault("OMP_NUM_THREADS", "1")

TOL = 1e-5


def _train_cfg(out: Path, **train: object) -> dict[str, object]:
    return {
        "run": {"out": str(out), "seed": 3},
        "launch": {"nproc_per_node": 2, "max_restarts": 1},
        "parallel": {"strategy": "ddp"},
        "model": {"d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64, "seq_len": 16},
        "data": {"dialogues": 200},
        "train": {
            "steps": 12,
            "batch_size": 8,
            "optimizer": "sgd",
            "lr": 0.3,
            "momentum": 0.9,
            "checkpoint_every": 5,
            "log_every": 2,
            **train,
        },
    }


def test_selfcheck_then_elastic_restart_resumes_from_verified_checkpoint(tmp_path: Path) -> None:
    from trustfed.core.codec import flatten
    from trustfed.distributed.launch import launch_training
    from trustfed.distributed.provenance import ProvenanceLog, read_verified, verify_run
    from trustfed.distributed.settings import validate_train_config

    out = tmp_path / "run"
    cfg = validate_train_config(_train_cfg(out))
    # rank 1 SIGKILLs itself at step 7 of the first attempt; torchrun restarts the group once.
    metrics = launch_training(cfg, selfcheck=True, env={"TRUSTFED_FAULT_KILL_AT": "1:7"}, timeout=540)

    # 1. the parallel engines agree with single-process computation (2 processes, gloo)
    report = json.loads((out / "selfcheck.json").read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert report["ddp"]["max_param_diff"] <= TOL and report["ddp"]["param_change"] > 1e-3
    assert report["tp"]["forward_max_diff"] <= TOL and report["tp"]["grad_max_diff"] <= TOL
    assert report["tp"]["sharded_params"] > 0
    for sched in ("pp_1f1b", "pp_gpipe"):
        assert report[sched]["params_covered"] and report[sched]["grad_max_diff"] <= TOL, report[sched]
        assert report[sched]["loss_diff"] <= TOL
    assert report["ok"]

    # 2. the kill happened and the restart resumed from the step-5 checkpoint after verifying it
    plog = ProvenanceLog(out / "provenance.jsonl")
    assert plog.verify().ok
    entries = list(plog.entries())
    kinds = [e["kind"] for e in entries]
    assert kinds.count("run_start") == 2 and kinds.count("resume") == 1, kinds
    resume = next(e for e in entries if e["kind"] == "resume")
    ck5 = next(e for e in entries if e["kind"] == "checkpoint" and e["step"] == 5)
    assert resume["step"] == 5 and resume["verified"] and resume["restart_count"] == 1
    assert resume["model_hash"] == ck5["model_hash"] and resume["optim_hash"] == ck5["optim_hash"]
    assert all(e["world_size"] == 2 for e in entries if e["kind"] == "checkpoint")
    assert metrics["start_step"] == 5 and metrics["steps"] == 12
    assert verify_run(out)[0] == []

    # 3. the interrupted DDP run ends where one process training on the combined batches does
    shape = LMShape(d_model=32, n_heads=4, n_layers=2, d_ff=64, seq_len=16)
    ref = build_lm(shape, 3)
    opt = make_optimizer(ref.parameters(), "sgd", 0.3, 0.9, 0.0)
    tokens = encode(assistant_corpus(200, 3))
    for step in range(1, 13):
        x, y = lm_batch(tokens, 8, 16, 3, step)
        lm_loss(ref(x), y).backward()
        opt.step()
        opt.zero_grad()
    ref_vec, spec = flatten(ref.state_dict())
    last = next(e for e in reversed(entries) if e["kind"] == "checkpoint")
    from trustfed.distributed.parallel import optim_spec
    from trustfed.distributed.provenance import Checkpoint

    ck = Checkpoint(12, out / last["path"], last["model_hash"], last["optim_hash"])
    final, _ = read_verified(ck, spec, optim_spec(ref, "sgd"))
    assert float((final - ref_vec).abs().max()) <= TOL
    assert float((final - flatten(build_lm(shape, 3).state_dict())[0]).abs().max()) > 1e-2  # it trained


def test_demo_runs_one_participant_on_two_ddp_workers(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from trustfed.cli import app
    from trustfed.config import validate_federation_config
    from trustfed.core.codec import from_bytes, model_hash
    from trustfed.core.strategy import RoundPlan
    from trustfed.participant.trainer import LocalTrainer
    from trustfed.simulation.federation import build_data, model_factory, train_config

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--rounds", "1", "--participants", "2", "--transport", "inprocess"]
    res = CliRunner().invoke(app, [*args, "--ddp-workers", "2"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    job_dir = out / "ddp" / "p000" / "round-00001"
    job = json.loads((job_dir / "job.json").read_text())
    upd = json.loads((job_dir / "update.json").read_text())
    assert upd["world_size"] == 2
    assert not (out / "ddp" / "p001").exists()  # only p000 was asked to use DDP

    # p000's DDP update equals what the single-process LocalTrainer computes from the same start
    cfg = validate_federation_config(
        {
            "federation": {"name": "digits-demo", "rounds": 1, "participants": 2, "seed": 0},
            "data": {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}},
            "model": {"name": "mlp", "hidden": [128]},
        }
    )
    data = build_data(cfg)
    factory = model_factory(cfg, data.train.input_shape, data.train.num_classes)
    from trustfed.core.codec import ParamSpec

    spec = ParamSpec.from_json((job_dir / "params.spec.json").read_text())
    start = from_bytes((job_dir / "params.f32").read_bytes(), spec)
    assert model_hash(start, spec) == job["params_hash"]
    t = job["train"]
    plan_cfg = {
        "local_epochs": t["epochs"],
        "batch_size": t["batch_size"],
        "lr": t["lr"],
        "momentum": t["momentum"],
        "weight_decay": t["weight_decay"],
        "proximal_mu": t["proximal_mu"],
    }
    local = LocalTrainer("p000", factory, spec, data.shards["p000"], train_config(cfg), 0)
    want = local.fit(start, RoundPlan(1, ("p000",), plan_cfg)).params
    got = from_bytes((job_dir / "update.f32").read_bytes(), spec)
    assert model_hash(got, spec) == upd["update_hash"]
    assert float((got - want).abs().max()) <= TOL
    assert float((got - start).abs().max()) > 1e-3
