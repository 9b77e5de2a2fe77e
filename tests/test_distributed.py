"""trustfed.distributed on 2 CPU processes (gloo), launched with torchrun.

Each torchrun launch costs several seconds on a 2-core machine, so the default run has three:
one ``trustfed train`` run that self-checks DDP / TP / PP against single-process results, anchors
its checkpoints on an embedded chain and survives a killed worker (then the chain catches a forged
log); one ``ddp+pp`` run on 4 processes (dp=2 x pp=2, also self-checked); and one demo federation
where participant p000 trains on 2 DDP workers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from trustfed.core.codec import ParamSpec, from_bytes
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
    from trustfed.distributed.provenance import ProvenanceLog, read_verified
    from trustfed.distributed.settings import validate_train_config
    from trustfed.distributed.verification import verify_run

    out = tmp_path / "run"
    raw = _train_cfg(out)
    raw["run"] = {**raw["run"], "ledger": "embedded"}  # type: ignore[dict-item]
    cfg = validate_train_config(raw)
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

    # 4. every checkpoint is anchored on the embedded chain in OUT/ledger, across the restart
    _check_ledger_anchors(out, entries, resume, ck)


def _check_ledger_anchors(out: Path, entries: list[dict[str, object]], resume: dict[str, object], ck12: object) -> None:
    import shutil

    from tests.distributed_helpers import edit_provenance, rechain_provenance
    from typer.testing import CliRunner

    from trustfed.distributed.anchor import open_run_ledger, read_anchors, resume_point
    from trustfed.distributed.cli import app
    from trustfed.distributed.provenance import Checkpoint, ProvenanceLog, write_checkpoint
    from trustfed.errors import CheckpointError

    assert isinstance(ck12, Checkpoint)
    starts = [e for e in entries if e["kind"] == "run_start"]
    assert starts[0]["ledger"] == starts[1]["ledger"]  # the restarted rank 0 replayed the same chain
    chain = open_run_ledger(out, "embedded", read_only=True)
    anchors = read_anchors(chain)
    cks = [e for e in entries if e["kind"] == "checkpoint"]
    assert [(a.index, a.step) for a in anchors] == [(0, 5), (1, 10), (2, 12)]
    assert [(a.model_hash, a.optim_hash, a.log_head) for a in anchors] == [
        (e["model_hash"], e["optim_hash"], e["hash"]) for e in cks
    ]
    assert resume["anchor_round"] == 0  # the restart resumed from the step-5 checkpoint the chain anchors
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 0 and "3 on-chain record(s) match (embedded chain" in res.output, res.output

    # A forger replaces the step-12 weights and rewrites the log to match (model hash, then the whole
    # chain after it): the log and the files agree with each other, but not with the chain.
    forged = out.parent / "forged"
    shutil.copytree(out, forged)
    spec = ParamSpec.from_json((ck12.path / "model.spec.json").read_text())
    ospec = ParamSpec.from_json((ck12.path / "optim.spec.json").read_text())
    vec = from_bytes((ck12.path / "model.f32").read_bytes(), spec) + 0.5
    ovec = from_bytes((ck12.path / "optim.f32").read_bytes(), ospec)
    fake = write_checkpoint(forged, 12, vec, spec, ovec, ospec)
    plog = ProvenanceLog(forged / "provenance.jsonl")
    line = next(n for n, e in plog.numbered() if e["kind"] == "checkpoint" and e["step"] == 12)
    edit_provenance(plog.path, line, model_hash=fake.model_hash)
    rechain_provenance(plog.path, line)
    assert plog.verify().ok
    res = CliRunner().invoke(app, ["verify", str(forged)])
    assert res.exit_code == 1, res.output
    assert f"provenance.jsonl:{line} step 12 [model_hash] the log records {fake.model_hash[:16]}" in res.output
    assert "on-chain round 2 anchored" in res.output
    assert "checkpoints/ckpt-00000012/model.f32 step 12 [model_hash] the file hashes to" in res.output
    # and rank 0 would refuse to resume from it
    cfg_h = str(cks[-1]["config_hash"])
    with pytest.raises(CheckpointError, match="no longer contains"):
        resume_point(forged, cfg_h, anchors)
    found = resume_point(out, cfg_h, anchors)
    assert found is not None and found[0].checkpoint.step == 12 and found[1].index == 2


def test_ddp_pp_on_four_processes_matches_single_process_training(tmp_path: Path) -> None:
    """strategy = "ddp+pp" on dp=2 x pp=2 gloo processes (GPipe) ends where one process training on
    the combined batches does; its selfcheck compares ddp+pp (1F1B) against one process too."""
    from trustfed.core.codec import flatten
    from trustfed.distributed.launch import launch_training
    from trustfed.distributed.parallel import optim_spec
    from trustfed.distributed.provenance import Checkpoint, ProvenanceLog, read_verified
    from trustfed.distributed.settings import validate_train_config
    from trustfed.distributed.verification import verify_run

    out = tmp_path / "dpp"
    shape = LMShape(d_model=16, n_heads=2, n_layers=2, d_ff=32, seq_len=8)
    raw: dict[str, object] = {
        "run": {"out": str(out), "seed": 3},
        "launch": {"nproc_per_node": 4, "max_restarts": 0},
        "parallel": {"strategy": "ddp+pp", "pp_stages": 2, "microbatches": 2, "pp_schedule": "gpipe"},
        "model": {"d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32, "seq_len": 8},
        "data": {"dialogues": 50},
        "train": {
            "steps": 4,
            "batch_size": 8,
            "optimizer": "sgd",
            "lr": 0.3,
            "momentum": 0.9,
            "checkpoint_every": 2,
            "log_every": 1,
        },
    }
    metrics = launch_training(validate_train_config(raw), selfcheck=True, timeout=540)
    assert metrics["strategy"] == "ddp+pp" and metrics["world_size"] == 4

    report = json.loads((out / "selfcheck.json").read_text())
    assert report["world_size"] == 4 and report["ok"], report
    dpp = report["ddp_pp"]
    assert (dpp["dp"], dpp["pp"]) == (2, 2) and dpp["params_covered"], dpp
    assert dpp["max_param_diff"] <= TOL and dpp["param_change"] > 1e-3, dpp

    ref = build_lm(shape, 3)
    opt = make_optimizer(ref.parameters(), "sgd", 0.3, 0.9, 0.0)
    tokens = encode(assistant_corpus(50, 3))
    for step in range(1, 5):
        x, y = lm_batch(tokens, 8, 8, 3, step)
        lm_loss(ref(x), y).backward()
        opt.step()
        opt.zero_grad()
    ref_vec, spec = flatten(ref.state_dict())
    entries = list(ProvenanceLog(out / "provenance.jsonl").entries())
    last = next(e for e in reversed(entries) if e["kind"] == "checkpoint")
    assert last["step"] == 4 and last["world_size"] == 4 and last["strategy"] == "ddp+pp"
    ck = Checkpoint(4, out / last["path"], last["model_hash"], last["optim_hash"])
    final, moms = read_verified(ck, spec, optim_spec(ref, "sgd"))
    assert float((final - ref_vec).abs().max()) <= TOL
    assert float((final - flatten(build_lm(shape, 3).state_dict())[0]).abs().max()) > 1e-2  # it trained
    # the momentum buffers, assembled from both stages, match the single process's too
    ref_moms = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in ref.parameters()])
    assert float((moms - ref_moms).abs().max()) <= TOL
    assert metrics["model_hash"] == last["model_hash"]
    assert verify_run(out) == ([], 2)


def test_demo_runs_one_participant_on_two_ddp_workers(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from trustfed.apps.builtin_parts import build_data, model_factory, train_config
    from trustfed.cli import app, demo_config
    from trustfed.config import validate_federation_config
    from trustfed.core.codec import from_bytes, model_hash
    from trustfed.core.strategy import RoundPlan
    from trustfed.models.trainer import LocalTrainer

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
    demo = demo_config(1, 2, 0)
    cfg = validate_federation_config({k: demo[k] for k in ("federation", "data", "model")})
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


def test_persistent_ddp_workers_serve_every_round_then_leave(tmp_path: Path) -> None:
    """One torchrun group serves all of a DDP participant's rounds (each equal to single-process
    training from the same start); a group that died is started again; close() stops it."""
    from trustfed.apps.builtin_parts import build_data, build_trainer, model_factory, train_config
    from trustfed.config import validate_federation_config
    from trustfed.core.codec import flatten
    from trustfed.core.strategy import RoundPlan
    from trustfed.distributed.participant import DDPTrainer
    from trustfed.models.trainer import LocalTrainer

    raw = {
        "federation": {"rounds": 3, "participants": 2, "seed": 4},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [32]},
        "participant_training": {"trainer": "ddp", "workers": 2, "participants": ["p000"], "workdir": str(tmp_path)},
    }
    cfg = validate_federation_config(raw)
    data = build_data(cfg)
    factory = model_factory(cfg, data.train.input_shape, data.train.num_classes)
    params, spec = flatten(factory().state_dict())
    ddp = build_trainer(cfg, data, "p000")
    assert isinstance(ddp, DDPTrainer) and ddp.persistent
    local = LocalTrainer("p000", factory, spec, data.shards["p000"], train_config(cfg), cfg.federation.seed)
    groups = []
    try:
        for rnd in (1, 2, 3):
            plan = RoundPlan(rnd, ("p000",), {})
            got, want = ddp.fit(params, plan), local.fit(params.clone(), plan)
            assert float((got.params - want.params).abs().max()) <= TOL, rnd
            groups.append(ddp._group)
            params = got.params
        assert groups[0] is not None and groups[0] is groups[1] is groups[2]  # started once
        groups[0].kill()
        groups[0].wait()
        again = ddp.fit(params, RoundPlan(4, ("p000",), {}))  # a dead group is started again
        assert ddp._group is not None and ddp._group is not groups[0] and again.num_examples > 0
        last = ddp._group
    finally:
        ddp.close()
    assert last.poll() == 0 and ddp._group is None  # left on the stop control
