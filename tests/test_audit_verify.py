"""End to end on the embedded chain: a recorded run verifies, and each kind of tampering fails
``verify_run`` with a precise location (file and line, round, field)."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.ledger_helpers import find, has, read_lines, rechain, record_run, resign, write_lines
from typer.testing import CliRunner

from trustfed.core.codec import ParamSpec, from_bytes
from trustfed.ledger.audit import EcdsaSigner, entry_digest, parse_entry
from trustfed.ledger.backends import EmbeddedLedger
from trustfed.ledger.checkpoint import checkpoint_paths
from trustfed.ledger.participant import (
    ChainCheckedTrainer,
    InclusionError,
    ModelMismatchError,
    check_inclusion,
    check_model,
    commitment_body,
    inclusion_proof,
)
from trustfed.ledger.records import LedgerError, RoundCommitment, Status
from trustfed.ledger.verify import verify_run

AUDIT = "audit.jsonl"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    record_run(out)
    return out


@pytest.fixture
def run(recorded: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(recorded, dst)
    return dst


def test_recorded_run_verifies(recorded: Path) -> None:
    v = verify_run(recorded)
    assert v.ok, [str(f) for f in v.failures]
    # 2 rounds x 3 participants; rounds 0..2 on chain; 4 identities (coordinator + 3).
    assert v.checked["commitments"] == 6 and v.checked["chain_rounds"] == 3 and v.checked["checkpoints"] == 3
    kinds = [parse_entry(line).kind for line in read_lines(recorded)]
    assert kinds.count("identity") == 4 and kinds.count("aggregation") == 2


def test_cli_verify_and_show(recorded: Path) -> None:
    from trustfed.cli import app

    r = CliRunner().invoke(app, ["audit", "verify", str(recorded)])
    assert r.exit_code == 0, r.output
    assert "VERIFIED" in r.output
    r = CliRunner().invoke(app, ["ledger", "show", str(recorded)])
    assert r.exit_code == 0, r.output
    assert "p002" in r.output and "coordinator" in r.output


def test_edited_line(run: Path) -> None:
    lines = read_lines(run)
    i = find(lines, "aggregation", 2)
    raw = json.loads(lines[i])
    raw["body"]["metrics"]["accuracy"] = 0.999
    lines[i] = json.dumps(raw)
    write_lines(run, lines)
    v = verify_run(run)
    assert not v.ok
    assert has(v.failures, file=AUDIT, line=i + 1, rnd=2, field="hash")
    assert has(v.failures, file=AUDIT, line=i + 1, rnd=2, field="sig")


def test_deleted_line(run: Path) -> None:
    lines = read_lines(run)
    i = find(lines, "commitment", 1, nth=1)
    del lines[i]
    write_lines(run, lines)
    v = verify_run(run)
    assert not v.ok
    assert has(v.failures, file=AUDIT, line=i + 1, rnd=1, field="seq")
    assert has(v.failures, file=AUDIT, line=i + 1, rnd=1, field="prev")
    assert has(v.failures, file="chain", rnd=1, field="merkle_root")  # the chain still holds all 3 commitments


def test_deleted_line_rechained_is_caught_by_the_anchor(run: Path) -> None:
    lines = read_lines(run)
    i = find(lines, "commitment", 2, nth=0)
    del lines[i]
    write_lines(run, rechain(lines, i))  # a forger recomputes every hash after the deletion
    v = verify_run(run)
    assert not v.ok
    assert has(v.failures, file="chain", rnd=2, field="log_head")
    assert has(v.failures, file="chain", rnd=2, field="num_updates")


def test_swapped_checkpoint(run: Path) -> None:
    f1, _ = checkpoint_paths(run, 1)
    f2, _ = checkpoint_paths(run, 2)
    shutil.copyfile(f1, f2)
    v = verify_run(run)
    assert not v.ok
    assert has(v.failures, file="checkpoints/round_0002.f32", rnd=2, field="model_hash")
    assert len(v.failures) == 1, [str(f) for f in v.failures]


def forge(run: Path, kind: str, rnd: int, nth: int, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Replace an entry's body with ``edit(body)``, signed by a fresh key (not the author's
    registered one) and re-chained, as a forger covering their tracks would; returns its index."""
    lines = read_lines(run)
    i = find(lines, kind, rnd, nth=nth)
    e = parse_entry(lines[i])
    body = edit(dict(e.body))
    raw = json.loads(lines[i])
    raw["body"] = body
    raw["sig"] = base64.b64encode(EcdsaSigner.generate(e.author).sign(entry_digest(kind, rnd, e.author, body))).decode()
    lines[i] = json.dumps(raw)
    write_lines(run, rechain(lines, i))
    return i


def test_forged_participant_signature(run: Path) -> None:
    i = forge(
        run,
        "commitment",
        2,
        1,
        lambda b: commitment_body(2, str(b["participant"]), b"\x00" * 64, int(b["num_examples"])),
    )
    v = verify_run(run)
    assert not v.ok
    assert has(v.failures, file=AUDIT, line=i + 1, rnd=2, field="sig")
    assert not has(v.failures, file=AUDIT, line=i + 1, field="hash")  # the forger re-chained: only the key betrays it


def test_reordered_pair(run: Path) -> None:
    lines = read_lines(run)
    i = find(lines, "commitment", 1, nth=0)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    write_lines(run, lines)
    v = verify_run(run)
    assert not v.ok
    for ln in (i + 1, i + 2):
        assert has(v.failures, file=AUDIT, line=ln, rnd=1, field="seq")
        assert has(v.failures, file=AUDIT, line=ln, rnd=1, field="prev")


def test_altered_journal_transaction(run: Path) -> None:
    j = run / "ledger" / "transactions.jsonl"
    lines = j.read_text().splitlines()
    rec = json.loads(lines[-1])
    flipped = int(rec["raw"][-4:-2], 16) ^ 0x01  # always a different byte (the old edit kept a 00 as it was)
    rec["raw"] = rec["raw"][:-4] + f"{flipped:02x}" + rec["raw"][-2:]
    lines[-1] = json.dumps(rec)
    j.write_text("\n".join(lines) + "\n")
    v = verify_run(run)
    assert not v.ok
    assert any(f.field == "chain" and "transactions.jsonl:" in f.message for f in v.failures)


def test_restarted_embedded_ledger_continues_the_chain(run: Path) -> None:
    led = EmbeddedLedger(run / "ledger")
    assert led.replayed > 0 and led.next_round() == 3
    before = led.read_round(2)
    assert before is not None
    led.commit_round(RoundCommitment(3, "ab" * 32, "cd" * 32, "", "ef" * 32, 3))
    with pytest.raises(LedgerError, match="OutOfOrder"):
        led.commit_round(RoundCommitment(3, "ab" * 32))
    again = EmbeddedLedger(run / "ledger")
    assert again.next_round() == 4 and again.read_round(2) == before
    r3 = again.read_round(3)
    assert r3 is not None and r3.model_hash == "ab" * 32 and r3.receipt_hash == "00" * 32
    # The registry: status changes, final states, and only the admin may write.
    again.set_status("p001", Status.SUSPENDED)
    again.set_status("p001", Status.ACTIVE)
    again.set_status("p002", Status.REVOKED)
    with pytest.raises(LedgerError, match="FinalStatus"):
        again.set_status("p002", Status.ACTIVE)
    with pytest.raises(LedgerError, match="UnknownParticipant"):
        again.set_status("nobody", Status.ACTIVE)
    status = {i.id: i.status for i in EmbeddedLedger(run / "ledger").participants()}
    assert status["p001"] == Status.ACTIVE and status["p002"] == Status.REVOKED
    stranger = again.w3.eth.accounts[3]
    fn = again.c["RoundLog"].functions.commitRound(4, b"\x01" * 32, b"\x00" * 32, b"\x00" * 32, b"\x00" * 32, 0)
    with pytest.raises(Exception, match="execution reverted"):
        fn.transact({"from": stranger})
    # Verify now sees the extra on-chain round the log does not know.
    v = verify_run(run)
    assert has(v.failures, file="chain", rnd=3, field="round")


def test_participant_checks(run: Path) -> None:
    led = EmbeddedLedger(run / "ledger", read_only=True)
    f32, spec_path = checkpoint_paths(run, 1)
    spec = ParamSpec.from_json(spec_path.read_text())
    params = from_bytes(f32.read_bytes(), spec)
    assert check_model(led, 2, params, spec)  # round 2 trains from round 1's model
    bad = params.clone()
    bad[0] += 1e-3
    with pytest.raises(ModelMismatchError, match="round 2"):
        check_model(led, 2, bad, spec)

    class _Echo:
        participant_id = "p000"

        def fit(self, params: torch.Tensor, plan: object) -> object:
            return "trained"

        def evaluate(self, params: torch.Tensor) -> dict[str, float]:
            return {}

    from trustfed.core.strategy import RoundPlan

    wrapped = ChainCheckedTrainer(_Echo(), led, spec)  # type: ignore[arg-type]
    assert wrapped.fit(params, RoundPlan(2, ("p000",), {})) == "trained"
    with pytest.raises(ModelMismatchError):
        wrapped.fit(bad, RoundPlan(2, ("p000",), {}))

    commitment, proof = inclusion_proof(run / AUDIT, 2, "p001")
    check_inclusion(led, 2, commitment, proof)
    with pytest.raises(InclusionError):
        check_inclusion(led, 1, commitment, proof)  # not in round 1's root
    with pytest.raises(InclusionError):
        check_inclusion(led, 2, bytes(32), proof)
    with pytest.raises(InclusionError, match="no commitment"):
        inclusion_proof(run / AUDIT, 2, "p999")


def test_rerun_into_the_same_folder_archives_the_old_record(run: Path) -> None:
    from trustfed.ledger.recorder import simulated_recorder
    from trustfed.ledger.settings import LedgerSettings

    spec = ParamSpec.from_json(checkpoint_paths(run, 0)[1].read_text())
    old_head = read_lines(run)[-1]
    rec = simulated_recorder(LedgerSettings(enabled=True), run, spec, ["p000"])
    archived = list((run / "archive").iterdir())
    assert len(archived) == 1 and (archived[0] / "audit.jsonl").read_text().splitlines()[-1] == old_head
    assert not (run / "audit.jsonl").exists() and rec.ledger.next_round() == 0


def test_cli_verify_lists_failures_and_exits_1(run: Path) -> None:
    from trustfed.cli import app

    lines = read_lines(run)
    i = find(lines, "checkpoint", 1)
    lines[i] = lines[i].replace('"size":', '"size":1')
    write_lines(run, lines)
    r = CliRunner().invoke(app, ["audit", "verify", str(run)])
    assert r.exit_code == 1
    assert f"audit.jsonl:{i + 1} round 1 [hash]" in r.output.replace("\n", " ")


@pytest.fixture(scope="module")
def dp_recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dp") / "run"
    record_run(out, privacy={"mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "budget_epsilon": 8.0})
    return out


def test_privacy_spend_totals_are_recomputed_and_checked_against_budgets(dp_recorded: Path, tmp_path: Path) -> None:
    v = verify_run(dp_recorded)
    assert v.ok, [str(f) for f in v.failures]
    assert v.checked["privacy_parties"] == 3 and v.checked["privacy_entries"] == 6
    out = shutil.copytree(dp_recorded, tmp_path / "run")
    i = forge(out, "privacy_spend", 2, 1, lambda b: {**b, "epsilon": float(b["epsilon"]) / 2})  # half the spend
    v = verify_run(out)
    assert has(v.failures, file=AUDIT, line=i + 1, rnd=2, field="body.epsilon")
    assert has(v.failures, file=AUDIT, line=i + 1, rnd=2, field="sig")


def test_privacy_spend_over_the_declared_budget_fails(dp_recorded: Path, tmp_path: Path) -> None:
    out = shutil.copytree(dp_recorded, tmp_path / "run")
    i = forge(out, "privacy_spend", 2, 0, lambda b: {**b, "budget_epsilon": float(b["epsilon"]) / 2})
    v = verify_run(out)
    assert any(f.field == "body.epsilon" and "over its budget" in f.message and f.line == i + 1 for f in v.failures)


def test_a_participant_counting_more_spend_than_the_log_is_noted_not_failed(dp_recorded: Path, tmp_path: Path) -> None:
    """Over-counting is conservative (say, a round dropped in a coordinator failover still counts for
    the participant); under-counting hides a release and fails (test above)."""
    out = Path(shutil.copytree(dp_recorded, tmp_path / "run"))
    party: list[str] = []

    def double(body: dict[str, Any]) -> None:
        body["epsilon"] = float(body["epsilon"]) * 2
        party.append(str(body["party"]))

    resign(out, out / "keys" / "coordinator.pem", "privacy_spend", 2, double)
    v = verify_run(out)
    assert not [f for f in v.failures if f.field == "body.epsilon"]  # (the rewritten log no longer matches its anchor)
    assert any(party[0] in n and "more than" in n for n in v.notes)


def test_aggregation_naming_other_participants_than_the_commitments_is_caught(run: Path) -> None:
    """A coordinator re-signing the aggregation to drop a committed participant (or to select one that
    never committed) is caught, though every signature and hash in the log checks out."""

    def drop_last(body: dict[str, Any]) -> None:
        body["participants"] = body["participants"][:-1]

    def select_stranger(body: dict[str, Any]) -> None:
        body["selected"] = [*body["selected"], "p999"]

    i = resign(run, run / "keys" / "coordinator.pem", "aggregation", 1, drop_last)
    j = resign(run, run / "keys" / "coordinator.pem", "aggregation", 2, select_stranger)
    v = verify_run(run)
    assert has(v.failures, file=AUDIT, line=i + 1, rnd=1, field="body.participants")
    assert has(v.failures, file=AUDIT, line=j + 1, rnd=2, field="body.selected")
    assert not any(f.field == "signature" for f in v.failures), [str(f) for f in v.failures]


def test_a_participant_that_leaves_is_exited_on_chain_and_the_audit_holds_the_registry_to_it(tmp_path: Path) -> None:
    """p002's budget is too small for every round: it withdraws, the round's signed
    participant_status entry says so, the registry marks it exited, and audit verify checks the
    registry's statuses against the log (and that nobody who left is selected again)."""
    out = tmp_path / "run"
    budgets = {"p002": {"epsilon": 3.5}}
    record_run(
        out, rounds=3, privacy={"mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "budgets": budgets}
    )
    v = verify_run(out)
    assert v.ok, [str(f) for f in v.failures]
    assert v.checked["departures"] == 1
    (entry,) = [e for e in map(parse_entry, read_lines(out)) if e.kind == "participant_status"]
    assert entry.body["participant"] == "p002" and entry.body["status"] == "exited"
    assert str(entry.body["reason"]).startswith("withdrew: ") and "budget" in str(entry.body["reason"])
    status = {i.id: i.status for i in EmbeddedLedger(out / "ledger", read_only=True).participants()}
    assert status["p002"] == Status.EXITED and status["p000"] == status["p001"] == Status.ACTIVE
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    left = entry.round
    assert "p002" in rounds[left - 1]["participants"] and "p002" not in rounds[left - 1]["updated_by"]
    assert all("p002" not in r["participants"] for r in rounds[left:]) and left < 3
    # a registry that disagrees with the log is caught
    EmbeddedLedger(out / "ledger").set_status("p001", Status.SUSPENDED)
    v = verify_run(out)
    assert any(f.field == "registry.p001.status" and "suspended" in f.message for f in v.failures)
