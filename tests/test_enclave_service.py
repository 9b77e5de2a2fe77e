"""The enclave as its own gRPC service over mutual TLS, and the ``trustfed enclave`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from trustfed.core.codec import ParamSpec, TensorSpec
from trustfed.core.strategy import FedAvg, RoundPlan, Update
from trustfed.enclave.attestation import verify_evidence
from trustfed.enclave.core import Enclave
from trustfed.enclave.errors import EnclaveError
from trustfed.enclave.measurement import measure
from trustfed.enclave.participant import AttestedEnclave, SealingTrainer
from trustfed.enclave.receipts import Receipt
from trustfed.enclave.sealing import KeySigner, StaticKeyring
from trustfed.enclave.service import ENCLAVE_TLS_NAME, GrpcEnclaveClient, TlsMaterial, serve
from trustfed.enclave.settings import AggregationSettings, EnclaveServiceConfig
from trustfed.enclave.strategy import EnclaveStrategy
from trustfed.simulation.enclave import simulated_policy

pki = pytest.importorskip("trustfed.pki.ca", reason="the PKI module (trustfed.pki.ca) is not available")

SPEC = ParamSpec((TensorSpec("w", (3,), "float32"),))
AGG = AggregationSettings()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    pki.issue(d, "enclave", "enclave", hosts=(ENCLAVE_TLS_NAME,))
    pki.issue(d, "coordinator", "coord")
    pki.issue(d, "participant", "p000")
    other = d / "other"
    pki.init_ca(other)
    pki.issue(other, "coordinator", "intruder")
    return d


def tls(ca: Path, name: str, ca_dir: Path | None = None) -> TlsMaterial:
    base = ca_dir or ca
    return TlsMaterial.from_files(base / "ca.pem", base / f"{name}.pem", base / f"{name}.key")


@pytest.fixture()
def running(ca: Path) -> Iterator[tuple[int, Enclave, dict[str, KeySigner]]]:
    signers = {p: KeySigner.generate(p) for p in ("p000", "p001")}
    enclave = Enclave(AGG, StaticKeyring({p: s.public_key() for p, s in signers.items()}), allow_simulated_tee=True)
    cfg = EnclaveServiceConfig.model_validate({"enclave": {"allow_simulated_tee": True}})
    server, port, _ = serve(cfg, enclave=enclave, tls=tls(ca, "enclave"), listen="127.0.0.1:0")
    try:
        yield port, enclave, signers
    finally:
        server.stop(grace=None)


class _Trainer:
    def __init__(self, pid: str, delta: float) -> None:
        self.participant_id, self.delta = pid, delta

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        return Update(self.participant_id, params + self.delta, 10)

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return {}


def test_round_through_grpc_enclave_matches_plain(ca: Path, running: tuple[int, Enclave, dict[str, KeySigner]]) -> None:
    port, enclave, signers = running
    coord = GrpcEnclaveClient(f"127.0.0.1:{port}", tls(ca, "coord"), timeout_s=20)
    part = GrpcEnclaveClient(f"127.0.0.1:{port}", tls(ca, "p000"), timeout_s=20)
    try:
        nonce = os.urandom(32)
        v = verify_evidence(part.evidence(nonce), simulated_policy(AGG), nonce, time.time())
        assert v.ok and v.claims["key_id"] == enclave.key_id
        strategy = EnclaveStrategy(FedAvg(), coord, SPEC, allow_simulated=True)
        trainers = {
            p: SealingTrainer(_Trainer(p, d), AttestedEnclave(part, simulated_policy(AGG)), signers[p])
            for p, d in (("p000", 1.0), ("p001", 3.0))
        }
        params = torch.zeros(3)
        plan = strategy.configure_round(1, params, sorted(trainers))
        updates = [trainers[p].fit(params, plan) for p in plan.participants]
        result = strategy.aggregate(plan, params, updates)
        assert torch.equal(result.params, torch.full((3,), 2.0))
        assert strategy.last_receipt is not None and strategy.last_receipt.body["label"] == "SIMULATED"
        # a participant certificate may attest but not aggregate
        with pytest.raises(EnclaveError, match="coordinator certificate"):
            EnclaveStrategy(FedAvg(), part, SPEC, allow_simulated=True).aggregate(plan, params, updates)
    finally:
        coord.close()
        part.close()


def test_client_from_another_ca_cannot_connect(ca: Path, running: tuple[int, Enclave, dict[str, KeySigner]]) -> None:
    port, _, _ = running
    intruder = GrpcEnclaveClient(f"127.0.0.1:{port}", tls(ca, "intruder", ca / "other"), timeout_s=5)
    try:
        with pytest.raises(EnclaveError, match="cannot reach the enclave"):
            intruder.public_key()
    finally:
        intruder.close()


# ---------------------------------------------------------------- CLI
def _write_cfg(tmp_path: Path, allow: bool, ca: Path | None = None) -> Path:
    text = f'[enclave]\nbackend = "simulated"\nallow_simulated_tee = {str(allow).lower()}\n'
    if ca is not None:
        text += f'[tls]\ncert = "{ca / "enclave.pem"}"\nkey = "{ca / "enclave.key"}"\nca = "{ca / "ca.pem"}"\n'
    text += '[aggregation]\nstrategy = "fedavg"\naggregator = "mean"\n'
    p = tmp_path / "enclave.toml"
    p.write_text(text)
    return p


def test_cli_measure_and_config_errors(tmp_path: Path) -> None:
    from trustfed.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["enclave", "measure", "--config", str(_write_cfg(tmp_path, True))])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == measure(AGG.measured())
    res = runner.invoke(app, ["enclave", "measure", "--config", str(_write_cfg(tmp_path, False))])
    assert res.exit_code != 0
    assert "allow_simulated_tee" in str(res.exception)


def test_cli_verify_receipt(tmp_path: Path, running: tuple[int, Enclave, dict[str, KeySigner]]) -> None:
    from trustfed.cli import app
    from trustfed.enclave.core import AggregationRequest
    from trustfed.enclave.keys import EnclavePublicKey
    from trustfed.enclave.sealing import seal_update

    _, enclave, signers = running
    pk = EnclavePublicKey.from_bytes(enclave.public_key())
    sealed = [seal_update(Update(p, torch.ones(3), 4), 1, pk, s) for p, s in signers.items()]
    receipt = enclave.aggregate(AggregationRequest(1, torch.zeros(3), SPEC, sealed)).receipt
    good = tmp_path / "r.json"
    good.write_bytes(receipt.to_json())
    raw = json.loads(receipt.to_json())
    raw["body"]["output_model_hash"] = "00" * 32
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    runner = CliRunner()
    ok = runner.invoke(app, ["enclave", "verify-receipt", str(good), "--allow-simulated"])
    assert ok.exit_code == 0 and "OK [SIMULATED]" in ok.output
    refused = runner.invoke(app, ["enclave", "verify-receipt", str(bad), "--allow-simulated"])
    assert refused.exit_code == 1
    plain = runner.invoke(app, ["enclave", "verify-receipt", str(good)])  # simulated not allowed by default
    assert plain.exit_code == 1
    assert Receipt.from_json(good.read_bytes()).round == 1


def test_enclave_process_serves_evidence(tmp_path: Path, ca: Path) -> None:
    """`trustfed enclave --config enclave.toml` as a separate process, reached over mutual TLS."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _write_cfg(tmp_path, True, ca)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustfed.cli", "enclave", "--config", str(cfg), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    client = GrpcEnclaveClient(f"127.0.0.1:{port}", tls(ca, "p000"), timeout_s=5)
    try:
        deadline = time.time() + 60
        while True:
            try:
                pk = client.public_key()
                break
            except EnclaveError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)
        nonce = os.urandom(32)
        v = verify_evidence(client.evidence(nonce), simulated_policy(AGG), nonce, time.time())
        assert v.ok, v.reasons
        assert bytes.fromhex(str(v.claims["public_key"])) == pk
        assert v.claims["measurement"] == measure(AGG.measured())
    finally:
        client.close()
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert b"SIMULATED" in out
