"""A hostile participant cannot halt or skew a round by its update, on the real gRPC path.

A non-finite update and a declared example count over ``[strategy] max_examples`` are refused at upload
(INVALID_ARGUMENT, naming the participant and the reason), recorded in a coordinator-signed
``participant_behaviour`` entry and flagged, and the round closes with the others while the quorum
holds; through the enclave, the enclave refuses them. A certificate the federation CA issued to an id that
is not a participant of the federation is refused on every RPC (PERMISSION_DENIED, not_registered).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from tests.participant_threads import run_with_participants

from trustfed.config import load_federation_config
from trustfed.coordinator.local_federation import prepare, write_participant_configs
from trustfed.coordinator.network import GrpcTransport
from trustfed.coordinator.run import run_coordinator, spec_for
from trustfed.core.strategy import RoundPlan, Update
from trustfed.ledger.audit import parse_entry
from trustfed.ledger.verify import verify_run
from trustfed.participant.assembly import build_participant
from trustfed.participant.client import ParticipantClient
from trustfed.participant.settings import load_participant_config
from trustfed.pki.ca import init_ca, issue, load_private_key
from trustfed.transport import federation_pb2 as pb
from trustfed.transport import federation_pb2_grpc as pb_grpc
from trustfed.transport.envelope import Signer
from trustfed.transport.errors import TransportError
from trustfed.transport.tls import channel

IDS = ["p000", "p001", "p002", "p003"]
BEHAVIOUR_KIND = "participant_behaviour"  # the coordinator-signed record of a refused update


def raw(**extra: Any) -> dict[str, Any]:
    return {
        "federation": {"name": "hostile", "rounds": 1, "participants": len(IDS), "seed": 3},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"local_epochs": 1, "batch_size": 64, "lr": 0.05},
        "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 2},
        "transport": {"linger_s": 1.0},
        **extra,
    }


class Hostile:
    """Wraps an honest trainer: trains, then poisons its update (NaN values, or a huge example count)."""

    def __init__(self, inner: Any, poison: Callable[[Update], Update]) -> None:
        self.inner, self.poison = inner, poison
        self.participant_id = inner.participant_id

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        return self.poison(self.inner.fit(params, plan))

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return dict(self.inner.evaluate(params))


def nan_update(u: Update) -> Update:
    params = u.params.clone()
    params[::7] = float("nan")
    return Update(u.participant_id, params, u.num_examples, dict(u.metrics))


def billion_examples(u: Update) -> Update:
    return Update(u.participant_id, u.params, 10**9, dict(u.metrics))


def run_federation(
    tmp_path: Path,
    r: dict[str, Any],
    poisons: dict[str, Callable[[Update], Update]],
    *,
    enclave: bool = False,
    wrap: dict[str, Callable[[Any], Any]] | None = None,
) -> tuple[dict[str, BaseException], Any, Path]:
    """The coordinator here over gRPC (recorded in ``tmp_path``, where the participants read the chain), every participant a thread built from
    its own config as ``trustfed client`` builds it; the ``poisons`` participants turn hostile. Returns each
    participant's error, the metrics and the run folder."""
    from trustfed.coordinator.local_federation import start_enclave, write_federation_file

    fed = prepare(tmp_path, r, IDS, round_timeout_s=60)
    procs = []
    try:
        if enclave:
            proc, address = start_enclave(tmp_path, r, IDS)
            procs.append(proc)
            fed = write_federation_file(tmp_path, r, round_timeout_s=60, enclave_address=address)
        cfg = load_federation_config(fed.federation_file)
        transport = GrpcTransport(
            cfg.transport.resolved(tmp_path),
            spec_for(cfg),
            max_workers=24,
            require_commitment=cfg.ledger.enabled,
            sealed=cfg.enclave.enabled,
            secagg=cfg.secagg if cfg.secagg.enabled else None,
        )
        write_participant_configs(fed, transport.address, IDS, ledger_view=cfg.ledger.enabled)

        def client_of(pid: str) -> ParticipantClient:
            client = build_participant(load_participant_config(fed.participant_files[pid]))
            if pid in poisons:
                if enclave:  # poison under the seal: the coordinator never sees it, the enclave does
                    sealing: Any = client.trainer
                    sealing.inner = Hostile(sealing.inner, poisons[pid])
                else:
                    client.trainer = Hostile(client.trainer, poisons[pid])
            if wrap and pid in wrap:  # a trainer of the caller's own (sees the global model too)
                client.trainer = wrap[pid](client.trainer)
            return client

        errors, (_, metrics) = run_with_participants(cfg, transport, IDS, client_of, out_dir=tmp_path)
        return errors, metrics, tmp_path
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def entries(run: Path, kind: str) -> list[Any]:
    return [e for line in (run / "audit.jsonl").read_text().splitlines() if (e := parse_entry(line)).kind == kind]


def test_a_nan_update_and_a_billion_examples_are_refused_and_the_round_goes_on(tmp_path: Path) -> None:
    r = raw(ledger={"enabled": True}, incentives={"enabled": True, "stake": 100, "slash_fraction": 0.5})
    errors, metrics, run = run_federation(tmp_path, r, {"p001": nan_update, "p002": billion_examples})
    # each hostile participant is told why, by name and reason; the honest ones are not touched
    assert set(errors) == {"p001", "p002"}
    assert "INVALID_ARGUMENT" in str(errors["p001"]) and "non_finite" in str(errors["p001"])
    assert "INVALID_ARGUMENT" in str(errors["p002"]) and "too_many_examples" in str(errors["p002"])
    # the round closed with the two honest updates
    assert metrics["rounds"][0]["updated_by"] == ["p000", "p003"]
    behaviour = {e.body["participant"]: e for e in entries(run, BEHAVIOUR_KIND)}
    assert set(behaviour) == {"p001", "p002"}
    assert behaviour["p001"].round == 1 and behaviour["p001"].author == "coordinator"
    assert behaviour["p001"].body["reason"] == "non_finite" and behaviour["p002"].body["reason"] == "too_many_examples"
    # flagged: slashed and penalised in the round's incentives entry
    (inc,) = entries(run, "incentives")
    assert set(inc.body["flagged"]) == {"p001", "p002"} and set(inc.body["slashed"]) == {"p001", "p002"}
    # every accepted participant's declared count is signed in its commitment, under the recorded bound
    (agg,) = entries(run, "aggregation")
    assert agg.body["max_examples"] == 1_000_000
    assert all(0 < e.body["num_examples"] <= 1_000_000 for e in entries(run, "commitment"))
    v = verify_run(run)
    assert v.ok, [str(f) for f in v.failures]
    assert v.checked["behaviour_records"] == 2 and v.checked["declared_counts"] == 2
    assert any("p001" in n and "non_finite" in n for n in v.notes)
    # a coordinator that records a bound its participants' signed counts exceed is caught
    from tests.ledger_helpers import has, resign

    i = resign(run, tmp_path / "pki" / "coordinator.key", "aggregation", 1, lambda b: b.update(max_examples=10))
    bad = verify_run(run)
    assert has(bad.failures, file="audit.jsonl", line=i + 1, field="body.max_examples"), bad.failures


def test_an_id_outside_the_federation_is_refused_on_every_rpc(tmp_path: Path) -> None:
    """The CA issued p999 a participant certificate, but p999 is not one of the federation's participants."""
    fed = prepare(tmp_path, raw(), IDS)
    issue(tmp_path / "pki", "participant", "p999")
    cfg = load_federation_config(fed.federation_file)
    transport = GrpcTransport(cfg.transport.resolved(tmp_path), spec_for(cfg), participants=IDS)
    pki = tmp_path / "pki"
    try:
        stub = pb_grpc.FederationStub(
            channel(transport.address, pki / "ca.pem", pki / "p999.pem", pki / "p999.key", 1 << 20)
        )
        signer = Signer("p999", load_private_key(pki / "p999.key"))
        calls = {
            "GetRoundPlan": lambda: stub.GetRoundPlan(
                signer.sign("plan_request", 0, pb.PlanRequest(participant_id="p999").SerializeToString()), timeout=10
            ),
            "DownloadModel": lambda: list(
                stub.DownloadModel(signer.sign("model_request", 1, pb.ModelRequest(round=1).SerializeToString()))
            ),
            "UploadUpdate": lambda: stub.UploadUpdate(
                iter(
                    [
                        pb.StreamPart(
                            header=signer.sign(
                                "update_header", 1, pb.UpdateHeader(round=1, participant_id="p999").SerializeToString()
                            )
                        )
                    ]
                ),
                timeout=10,
            ),
            "SecAgg": lambda: stub.SecAgg(
                signer.sign("secagg_request", 1, pb.SecAggRequest(round=1).SerializeToString()), timeout=10
            ),
            "GetReceipt": lambda: stub.GetReceipt(
                signer.sign("receipt_request", 1, pb.ReceiptRequest(round=1).SerializeToString()), timeout=10
            ),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as ei:
                call()
            assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
            assert "not_registered" in (ei.value.details() or "") and "p999" in (ei.value.details() or ""), name
        assert "p999" not in transport.available()
    finally:
        transport.close()


def test_run_coordinator_admits_only_the_federation_s_participants(tmp_path: Path) -> None:
    """A transport built without a roster gets the federation's from ``run_coordinator``: an intruder with a
    CA-issued certificate never checks in, the federation runs without it."""
    r = raw()
    fed = prepare(tmp_path, r, IDS[:2], round_timeout_s=60)
    r["federation"]["participants"] = 2
    issue(tmp_path / "pki", "participant", "p999")
    cfg = load_federation_config(fed.federation_file)
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"participants": 2})})
    transport = GrpcTransport(cfg.transport.resolved(tmp_path), spec_for(cfg), max_workers=16)
    write_participant_configs(fed, transport.address, [*IDS[:2], "p999"])
    refused: list[BaseException] = []
    started = threading.Event()

    def intruder() -> None:
        client: ParticipantClient | None = None
        try:
            started.wait(30)
            c = load_participant_config(fed.participant_files["p999"])
            client = ParticipantClient(c, Hostile(_NoTrainer(), lambda u: u), transport.spec)
            client.fetch_plan(0)
        except TransportError as exc:
            refused.append(exc)
        finally:
            if client is not None:
                client.close()

    def participant(pid: str) -> None:
        client = build_participant(load_participant_config(fed.participant_files[pid]))
        try:
            client.run()
        finally:
            client.close()

    threads = [threading.Thread(target=participant, args=(p,)) for p in IDS[:2]]
    threads.append(threading.Thread(target=intruder))
    for th in threads:
        th.start()

    class Started:
        def on_round_start(self, plan: Any, params: Any) -> None:
            started.set()

        def on_round_end(self, *args: Any) -> None:
            pass

    try:
        _, metrics = run_coordinator(cfg, transport, write=False, observers=[Started()])
    finally:
        transport.close()
        for th in threads:
            th.join(60)
    assert metrics["rounds"][0]["updated_by"] == ["p000", "p001"]
    assert refused and "PERMISSION_DENIED" in str(refused[0]) and "not_registered" in str(refused[0])


class _NoTrainer:
    participant_id = "p999"

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        return Update("p999", params, 1)

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return {}


def test_secure_aggregation_bounds_the_declared_count(tmp_path: Path) -> None:
    """Masked inputs hide their values from the coordinator, not their declared counts: 10^9 is refused."""
    r = raw(secagg={"enabled": True, "clip": 0.5, "bits": 24, "step_timeout_s": 3.0, "weighted": True})
    errors, metrics, _ = run_federation(tmp_path, r, {"p002": billion_examples})
    assert set(errors) == {"p002"}
    assert "INVALID_ARGUMENT" in str(errors["p002"]) and "too_many_examples" in str(errors["p002"])
    assert metrics["rounds"][0]["updated_by"] == ["p000", "p001", "p003"]


def test_the_enclave_refuses_a_nan_update_and_a_billion_examples(tmp_path: Path) -> None:
    r = raw(
        ledger={"enabled": True},
        enclave={"enabled": True, "allow_simulated_tee": True, "policy": {"allow_simulated_tee": True}},
    )
    errors, _, run = run_federation(tmp_path, r, {"p001": nan_update, "p002": billion_examples}, enclave=True)
    assert not errors, errors  # sealed: the coordinator cannot tell; the enclave refuses, the round goes on
    (receipt,) = entries(run, "enclave_receipt")
    rejected = receipt.body["receipt"]["body"]["rejected"]
    assert set(rejected) == {"p001", "p002"}
    assert rejected["p001"].startswith("non_finite") and rejected["p002"].startswith("too_many_examples")
    assert receipt.body["receipt"]["body"]["num_examples"].keys() == {"p000", "p003"}
    behaviour = {e.body["participant"]: e.body for e in entries(run, BEHAVIOUR_KIND)}
    assert behaviour["p001"]["reason"] == "non_finite" and behaviour["p001"]["source"] == "enclave"
    assert behaviour["p002"]["reason"] == "too_many_examples"
    v = verify_run(run)
    assert v.ok, [str(f) for f in v.failures]
    assert v.checked["behaviour_records"] == 2
    (agg,) = entries(run, "aggregation")
    assert agg.body["selected"] == ["p000", "p003"] and agg.body["metrics"]["enclave_rejected"] == 2.0
    assert json.loads((run / "metrics.json").read_text())["rounds"][0]["round"] == 1


def test_the_registry_on_chain_decides_once_the_federation_is_registered(tmp_path: Path) -> None:
    """After round 0 the registry on chain says who is served: active, under the certificate it registered."""
    from cryptography import x509

    from trustfed.coordinator.admission import Admission
    from trustfed.ledger.audit import certificate_fingerprint
    from trustfed.ledger.records import Identity, Status
    from trustfed.transport.errors import MessageRejected

    pki = tmp_path / "pki"
    init_ca(pki)
    for pid in ("p000", "p001"):
        issue(pki, "participant", pid)
    certs = {p: (pki / f"{p}.pem").read_bytes() for p in ("p000", "p001")}
    a = Admission(["p000", "p001"])
    a.check("p001", x509.load_pem_x509_certificate(certs["p001"]))  # roster only: admitted
    a.set_registry(
        [
            Identity("p000", certificate_fingerprint(certs["p000"])[0]),
            Identity("p001", certificate_fingerprint(certs["p001"])[0], status=Status.SUSPENDED),
        ]
    )
    a.check("p000", x509.load_pem_x509_certificate(certs["p000"]))
    with pytest.raises(MessageRejected, match="p001 is suspended") as ei:
        a.check("p001", x509.load_pem_x509_certificate(certs["p001"]))
    assert ei.value.reason == "not_active"
    issue(pki, "participant", "p000")  # the CA issues p000 a second certificate
    with pytest.raises(MessageRejected, match="other than the one registered") as ei:
        a.check("p000", x509.load_pem_x509_certificate((pki / "p000.pem").read_bytes()))
    assert ei.value.reason == "not_registered"
