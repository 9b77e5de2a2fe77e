"""trustfed.distributed without launching processes: data, model split, settings, provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.distributed_helpers import MemoryRoundLog, edit_provenance, rechain_provenance

from trustfed.core.codec import flatten, model_hash
from trustfed.distributed.lm import LMShape, assistant_corpus, build_lm, decode, encode, lm_batch, lm_loss
from trustfed.distributed.parallel import (
    Layout,
    keep_stage,
    load_optim_state,
    make_optimizer,
    optim_spec,
    optim_state,
    stage_layers,
)
from trustfed.distributed.provenance import (
    ProvenanceLog,
    config_hash,
    entry_hash,
    latest_checkpoint,
    log_checkpoint,
    read_verified,
    write_checkpoint,
)
from trustfed.distributed.settings import ParticipantTrainingSettings, load_train_config, validate_train_config
from trustfed.distributed.verification import verify_run
from trustfed.errors import CheckpointError, ConfigError

SHAPE = LMShape(d_model=16, n_heads=2, n_layers=3, d_ff=32, seq_len=8)


def test_corpus_is_deterministic_and_encodable() -> None:
    a, b = assistant_corpus(40, seed=7), assistant_corpus(40, seed=7)
    assert a == b and a != assistant_corpus(40, seed=8)
    assert a.count("User: ") == 40 and a.count("Assistant: ") == 40
    assert decode(encode(a)) == a
    with pytest.raises(Exception, match="not in the model's vocabulary"):
        encode("naïve")


def test_batches_are_a_function_of_the_step() -> None:
    tokens = encode(assistant_corpus(30, seed=0))
    x1, y1 = lm_batch(tokens, 4, 8, seed=1, step=5)
    x2, y2 = lm_batch(tokens, 4, 8, seed=1, step=5)
    x3, _ = lm_batch(tokens, 4, 8, seed=1, step=6)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next tokens


def test_pipeline_stages_partition_the_model() -> None:
    assert [list(stage_layers(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    full = dict(build_lm(SHAPE, 0).named_parameters())
    names: list[str] = []
    for s in range(3):
        names += [n for n, _ in keep_stage(build_lm(SHAPE, 0), s, 3).named_parameters()]
    assert sorted(names) == sorted(full) and len(names) == len(set(names))


def test_stages_chained_equal_the_full_model() -> None:
    x = encode(assistant_corpus(5, 0))[: 2 * 8].reshape(2, 8)
    full = build_lm(SHAPE, 1)
    h = x
    for s in range(3):
        h = keep_stage(build_lm(SHAPE, 1), s, 3)(h)
    assert torch.allclose(h, full(x), atol=1e-6)


def test_layouts() -> None:
    assert Layout.of("ddp", 4, 3, 2).dp_rank == 3
    lay = Layout.of("ddp+pp", 4, 3, 2)
    assert (lay.dp, lay.pp, lay.dp_rank, lay.pp_rank) == (2, 2, 1, 1)
    assert Layout.of("pp", 2, 1).pp_rank == 1
    with pytest.raises(Exception, match="not a multiple"):
        Layout.of("ddp+pp", 3, 0, 2)


def test_train_config_reports_every_problem(tmp_path: Path) -> None:
    f = tmp_path / "train.toml"
    f.write_text('[parallel]\nstrategy = "tp"\n[model]\nn_heads = 3\nd_model = 48\nd_ff = 33\n[train]\nbogus = 1\n')
    with pytest.raises(ConfigError) as err:
        load_train_config(f)
    assert "train.bogus" in str(err.value)
    f.write_text('[parallel]\nstrategy = "tp"\n[model]\nn_heads = 3\nd_model = 48\nd_ff = 33\n')
    with pytest.raises(ConfigError) as err:
        load_train_config(f)
    assert "model.n_heads" in str(err.value) and "model.d_ff" in str(err.value)
    f.write_text('[run]\nout = "r"\n[parallel]\nstrategy = "pp"\nmicrobatches = 4\n[train]\nbatch_size = 8\n')
    assert load_train_config(f).run.out == tmp_path / "r"


def test_participant_training_settings() -> None:
    assert not ParticipantTrainingSettings().applies_to("p000")
    s = ParticipantTrainingSettings(trainer="ddp", workers=2, participants=["p000"])
    assert s.applies_to("p000") and not s.applies_to("p001")
    from trustfed.config import validate_federation_config

    cfg = validate_federation_config({"participant_training": {"trainer": "ddp", "workers": 2}})
    assert cfg.participant_training.applies_to("p003")
    with pytest.raises(ConfigError, match=r"participant_training\.workers"):
        validate_federation_config({"participant_training": {"trainer": "ddp", "workers": 0}})


def test_ddp_participant_refuses_local_dp() -> None:
    from trustfed.apps.builtin_parts import build_data, build_trainer
    from trustfed.config import validate_federation_config

    raw = {
        "federation": {"participants": 2},
        "participant_training": {"trainer": "ddp"},
        "privacy": {"mode": "local"},
    }
    try:
        cfg = validate_federation_config(raw)
    except ConfigError:
        return  # the privacy settings may already refuse this combination
    with pytest.raises(ConfigError, match=r"privacy\.mode"):
        build_trainer(cfg, build_data(cfg), "p000")


def test_optimizer_state_round_trip() -> None:
    torch.manual_seed(0)
    model = build_lm(SHAPE, 2)
    opt = make_optimizer(model.parameters(), "adamw", 1e-2, 0.0, 0.0)
    x = encode(assistant_corpus(5, 0))[:16].reshape(2, 8)
    lm_loss(model(x), x).backward()
    opt.step()
    spec = optim_spec(model, "adamw")
    vec, got_spec = flatten(optim_state(iter(model.named_parameters()), opt, "adamw"))
    assert got_spec == spec
    model2 = build_lm(SHAPE, 2)
    opt2 = make_optimizer(model2.parameters(), "adamw", 1e-2, 0.0, 0.0)
    from trustfed.core.codec import unflatten

    load_optim_state(iter(model2.named_parameters()), opt2, "adamw", unflatten(vec, spec))
    vec2, _ = flatten(optim_state(iter(model2.named_parameters()), opt2, "adamw"))
    assert torch.equal(vec, vec2) and vec.abs().sum() > 0


def test_provenance_chain_detects_tampering(tmp_path: Path) -> None:
    log = ProvenanceLog(tmp_path / "provenance.jsonl")
    log.append("run_start", world_size=2)
    log.append("checkpoint", step=1, model_hash="a" * 64)
    assert log.verify().ok and log.verify().claims["entries"] == 2
    lines = log.path.read_text().splitlines()
    e = json.loads(lines[1])
    e["step"] = 2
    log.path.write_text(lines[0] + "\n" + json.dumps(e) + "\n")
    v = log.verify()
    assert not v.ok and "hash does not match" in v.reasons[0]


def test_provenance_hashes_keep_their_encoding() -> None:
    # Logs on disk were hashed with non-ASCII escaped and NaN admitted: these bytes must not change.
    body = {"kind": "note", "path": "Zürich", "loss": float("nan"), "prev": "0" * 64}
    assert entry_hash(body) == "0a0f6d03301c8a89a481c1b960835e8c52a70d93f2046f5239ab795235318023"
    assert config_hash({"run": {"name": "café"}}) == "cf871b2cd9a59399de5264c2d286e701dadc70b2c83e4a356212e4fb931a82ef"


def test_checkpoint_resume_verifies_hashes(tmp_path: Path) -> None:
    model = build_lm(SHAPE, 3)
    mvec, mspec = flatten(model.state_dict())
    ospec = optim_spec(model, "sgd")
    ovec = torch.arange(ospec.size, dtype=torch.float32)
    cfg_h = config_hash({"x": 1})
    log = ProvenanceLog(tmp_path / "provenance.jsonl")
    for step in (5, 10):
        ck = write_checkpoint(tmp_path, step, mvec + step, mspec, ovec, ospec)
        log_checkpoint(log, tmp_path, ck, config_hash=cfg_h)
    assert latest_checkpoint(tmp_path, config_hash({"x": 2})) is None  # another config's checkpoints
    latest = latest_checkpoint(tmp_path, cfg_h)
    assert latest is not None and latest.step == 10
    m, _ = read_verified(latest, mspec, ospec)
    assert model_hash(m, mspec) == latest.model_hash and torch.equal(m, mvec + 10)
    assert verify_run(tmp_path) == ([], 2)
    # flip one float in the newest checkpoint: resuming from it is refused
    raw = bytearray((latest.path / "model.f32").read_bytes())
    raw[100] ^= 0x01
    (latest.path / "model.f32").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match the provenance log"):
        read_verified(latest, mspec, ospec)
    problems, checked = verify_run(tmp_path)
    assert checked == 1 and len(problems) == 1
    # a rewritten log is refused outright
    log.path.write_text(log.path.read_text().replace('"step": 5', '"step": 6'))
    with pytest.raises(CheckpointError, match="fails verification"):
        latest_checkpoint(tmp_path, cfg_h)


def test_torchrun_command_is_elastic() -> None:
    from trustfed.distributed.launch import torchrun_argv

    argv = torchrun_argv("m", ["--a"], nproc_per_node=2, nnodes="1:2", max_restarts=3)
    joined = " ".join(argv)
    assert "-m torch.distributed.run" in joined and "--nnodes 1:2" in joined and "--max-restarts 3" in joined
    assert "--rdzv-backend c10d" in joined and "--rdzv-endpoint 127.0.0.1:" in joined
    assert argv[-3:] == ["-m", "m", "--a"]


def test_train_cli_requires_config() -> None:
    validate_train_config({})  # defaults are valid
    from typer.testing import CliRunner

    from trustfed.distributed.cli import app

    res = CliRunner().invoke(app, [])
    assert res.exit_code != 0 and isinstance(res.exception, ConfigError)


def test_provenance_is_mirrored_into_the_signed_audit_log(tmp_path: Path) -> None:
    from trustfed.distributed.provenance import SignedAuditSink
    from trustfed.ledger.audit import EcdsaSigner, parse_entry, verify_signature

    signer = EcdsaSigner.generate("trainer")
    signer.save(tmp_path / "trainer.pem")
    sink = SignedAuditSink(tmp_path / "audit.jsonl", tmp_path / "trainer.pem")
    log = ProvenanceLog(tmp_path / "provenance.jsonl", (sink,))
    log.append("run_start", world_size=2, config={"a": 1})
    log.append("checkpoint", step=5, model_hash="b" * 64)
    entries = [parse_entry(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e.kind for e in entries] == ["train.run_start", "train.checkpoint"]
    assert entries[1].body["model_hash"] == "b" * 64 and entries[1].prev == entries[0].hash
    assert all(verify_signature(signer.public_key_pem(), e.digest, e.sig) for e in entries)


def test_train_config_ledger_settings(tmp_path: Path) -> None:
    f = tmp_path / "train.toml"
    f.write_text('[run]\nledger = "jsonrpc"\n')
    with pytest.raises(ConfigError, match="needs rpc_url"):
        load_train_config(f)
    f.write_text('[run]\nrpc_url = "http://127.0.0.1:8545"\n')
    with pytest.raises(ConfigError, match="are for ledger = 'jsonrpc'"):
        load_train_config(f)
    f.write_text('[run]\nledger = "jsonrpc"\nrpc_url = "127.0.0.1:8545"\n')
    with pytest.raises(ConfigError, match="must start with http"):
        load_train_config(f)
    f.write_text('[run]\nledger = "bitcoin"\n')
    with pytest.raises(ConfigError, match=r"run\.ledger"):
        load_train_config(f)
    f.write_text('[run]\nledger = "jsonrpc"\nrpc_url = "http://127.0.0.1:8545"\nledger_key_file = "k.hex"\n')
    assert load_train_config(f).run.ledger_key_file == tmp_path / "k.hex"
    f.write_text('[run]\nledger = "embedded"\n')
    assert load_train_config(f).run.ledger == "embedded"
    assert validate_train_config({}).run.ledger == "none"


def test_checkpoints_are_anchored_and_checked_against_the_chain(tmp_path: Path) -> None:
    from trustfed.distributed.anchor import (
        Anchor,
        LedgerAnchorSink,
        anchor_for,
        check_anchors,
        read_anchors,
        resume_point,
    )
    from trustfed.distributed.provenance import checkpoint_hashes

    chain = MemoryRoundLog()
    model = build_lm(SHAPE, 3)
    mvec, mspec = flatten(model.state_dict())
    ospec = optim_spec(model, "sgd")
    cfg_h = config_hash({"x": 1})
    log = ProvenanceLog(tmp_path / "provenance.jsonl", (LedgerAnchorSink(chain),))
    log.append("run_start", config_hash=cfg_h)
    for step in (5, 10):
        ck = write_checkpoint(tmp_path, step, mvec + step, mspec, torch.full((ospec.size,), float(step)), ospec)
        log_checkpoint(log, tmp_path, ck, config_hash=cfg_h)
    log.append("run_end", step=10)
    # the mapping onto RoundLog: consecutive rounds, step in numUpdates, optimizer hash in receiptHash
    entries = list(log.numbered())
    anchors = read_anchors(chain)
    ck10 = entries[2][1]
    assert anchors[1] == anchor_for(1, ck10) == Anchor(1, 10, ck10["model_hash"], ck10["optim_hash"], ck10["hash"])
    rc = anchors[1].to_commitment()
    assert (rc.round, rc.num_updates, rc.receipt_hash, rc.log_head, rc.merkle_root) == (
        1,
        10,
        ck10["optim_hash"],
        ck10["hash"],
        "00" * 32,
    )
    files = {line: checkpoint_hashes(tmp_path / e["path"]) for line, e in entries if e["kind"] == "checkpoint"}
    assert check_anchors(entries, anchors, files) == []
    found = resume_point(tmp_path, cfg_h, anchors)
    assert found is not None and found[0].checkpoint.step == 10 and found[1].index == 1

    # a forger swaps in other weights for step 10 and makes log and files agree: only the chain knows
    forged = mvec + 99
    ck = write_checkpoint(tmp_path, 10, forged, mspec, torch.full((ospec.size,), 10.0), ospec)
    edit_provenance(log.path, 3, model_hash=ck.model_hash)
    rechain_provenance(log.path, 3)
    assert log.verify().ok and verify_run(tmp_path) == ([], 2)  # self-consistent without the chain
    entries = list(log.numbered())
    files = {line: checkpoint_hashes(tmp_path / e["path"]) for line, e in entries if e["kind"] == "checkpoint"}
    problems = check_anchors(entries, anchors, files)
    by_field = {(p.file, p.line, p.step, p.field) for p in problems}
    assert ("provenance.jsonl", 3, 10, "model_hash") in by_field, problems
    assert ("provenance.jsonl", 3, 10, "hash") in by_field
    assert ("checkpoints/ckpt-00000010/model.f32", None, 10, "model_hash") in by_field
    assert "on-chain round 1 anchored" in str(problems[0])
    with pytest.raises(CheckpointError, match="no longer contains"):
        resume_point(tmp_path, cfg_h, anchors)

    # a checkpoint entry the chain never saw: verify flags it, resume skips it for the anchored one
    sub = tmp_path / "b"
    chain2 = MemoryRoundLog()
    log2 = ProvenanceLog(sub / "provenance.jsonl", (LedgerAnchorSink(chain2),))
    for step, sink in ((5, True), (10, False)):
        ck = write_checkpoint(sub, step, mvec + step, mspec, torch.zeros(ospec.size), ospec)
        log2.sinks = log2.sinks if sink else ()
        log_checkpoint(log2, sub, ck, config_hash=cfg_h)
    anchors2 = read_anchors(chain2)
    problems = check_anchors(list(log2.numbered()), anchors2, {})
    assert [(p.line, p.step, p.field) for p in problems] == [(2, 10, "anchor")]
    found = resume_point(sub, cfg_h, anchors2)
    assert found is not None and found[0].checkpoint.step == 5
    # an anchor whose hashes disagree with the entry it points at is refused outright
    bad = [Anchor(0, 5, "ab" * 32, anchors2[0].optim_hash, anchors2[0].log_head)]
    with pytest.raises(CheckpointError, match="disagrees with on-chain round 0"):
        resume_point(sub, cfg_h, bad)


def test_anchors_on_a_jsonrpc_node_are_verified(tmp_path: Path) -> None:
    """The ``jsonrpc`` ledger end to end without torchrun: anchors committed to anvil through the
    sink, then ``verify_run`` reads them back (read-only, URL from the deployment) and catches a
    rewritten log."""
    from trustfed.ledger.anvil import Anvil, find_anvil

    anvil = find_anvil(Path(__file__).parent)
    if anvil is None:
        pytest.skip("anvil not installed: run `npm ci` in the repository root")
    from trustfed.distributed.anchor import LedgerAnchorSink, describe, open_run_ledger
    from trustfed.distributed.verification import verify_run_report

    model = build_lm(SHAPE, 3)
    mvec, mspec = flatten(model.state_dict())
    ospec = optim_spec(model, "sgd")
    with Anvil(anvil) as node:
        ledger = open_run_ledger(tmp_path, "jsonrpc", node.url, allow_dev_keys=True)  # anvil: a test chain
        log = ProvenanceLog(tmp_path / "provenance.jsonl", (LedgerAnchorSink(ledger),))
        run = {"ledger": "jsonrpc", "rpc_url": node.url}
        log.append("run_start", config={"run": run}, ledger=describe(ledger))
        for step in (4, 8):
            ck = write_checkpoint(tmp_path, step, mvec * step, mspec, torch.zeros(ospec.size), ospec)
            log_checkpoint(log, tmp_path, ck)
        ledger.close()
        v = verify_run_report(tmp_path)
        assert v.problems == [] and (v.checkpoints, v.anchors) == (2, 2), v
        assert v.chain.startswith("jsonrpc chain ")
        edit_provenance(log.path, 3, step=9)
        rechain_provenance(log.path, 3)
        problems = verify_run_report(tmp_path).problems
        assert any(p.startswith("provenance.jsonl:3 step 8 [step]") for p in problems), problems
