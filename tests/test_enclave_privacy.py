"""Central DP-FedAvg inside the attested enclave.

What these tests establish, and what they do not:

* the in-process enclave with central DP produces bit-for-bit the parameters (and the privacy
  spend) of a plain run where the coordinator applies DP-FedAvg with the same seed;
* the DP parameters are part of the enclave's measurement, so a participant pinning a measurement
  pins the noise multiplier too, and refuses an enclave with another one before training;
* the signed receipt states the round's release and the coordinator refuses one that does not
  match the federation's DP config;
* on the coordinator side, the only objects that ever see model values are the sealed updates
  (ciphertext) and the enclave's *noised* output: the coordinator's strategy is a plain FedAvg whose
  ``aggregate`` is never called, and the output differs from the clear clipped mean by noise of the
  stated std. The in-process enclave shares the coordinator's address space, so this is a check of
  the data flow through the EnclaveClient interface, not of memory isolation (that is the TEE's job);
  and with ``secure_noise = false`` the noise is derived from the run seed, which the coordinator
  knows: only ``secure_noise = true`` keeps it from recomputing the noise.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from trustfed.config import FederationConfig, validate_federation_config
from trustfed.core.codec import ParamSpec, TensorSpec, to_bytes
from trustfed.core.strategy import FedAvg, RoundPlan, RoundResult, Update
from trustfed.enclave.core import AggregationRequest, AggregationResponse, Enclave
from trustfed.enclave.errors import AttestationRefused, EnclaveError
from trustfed.enclave.keys import EnclavePublicKey
from trustfed.enclave.measurement import measure
from trustfed.enclave.participant import CLEAR_METRICS, AttestedEnclave, SealingTrainer
from trustfed.enclave.receipts import Receipt, verify_receipt
from trustfed.enclave.sealing import KeySigner, SealedUpdate, StaticKeyring, seal_update
from trustfed.enclave.settings import AggregationSettings, CentralDPSettings
from trustfed.enclave.strategy import EnclaveStrategy
from trustfed.privacy.accounting import GaussianSteps, epsilon
from trustfed.privacy.budget import BudgetGuard
from trustfed.privacy.central import DPFedAvg, clip_rows
from trustfed.privacy.report import PrivacyRecorder, load_records, summarize
from trustfed.simulation.enclave import enclave_aggregation, run_federation, simulated_policy, wrap_for_enclave


def dp_cfg(*, clipping: str = "fixed", noise_multiplier: float = 1.0, **privacy: Any) -> FederationConfig:
    raw: dict[str, Any] = {
        "federation": {"name": "enclave-dp", "rounds": 3, "participants": 3, "seed": 3},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"local_epochs": 1, "batch_size": 64, "lr": 0.1, "momentum": 0.0},
        "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 2, "fraction_fit": 0.67},
        "privacy": {
            "mode": "central",
            "noise_multiplier": noise_multiplier,
            "max_grad_norm": 0.5,
            "clipping": clipping,
            "budget_epsilon": 1e6,
            **privacy,
        },
        "enclave": {
            "enabled": True,
            "backend": "simulated",
            "allow_simulated_tee": True,
            "policy": {"allow_simulated_tee": True},
        },
    }
    return validate_federation_config(raw)


# ------------------------------------------------------------------ end to end, in process
@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_enclave_central_dp_equals_plain_central_dp(tmp_path: Path, clipping: str) -> None:
    cfg = dp_cfg(clipping=clipping)
    plain_rec = PrivacyRecorder(tmp_path / "plain" / "privacy.jsonl", "central")
    enc_rec = PrivacyRecorder(tmp_path / "enclave" / "privacy.jsonl", "central")
    plain = run_federation(cfg, enclave_mode=False, observers=[plain_rec])
    enc = run_federation(cfg, enclave_mode=True, observers=[enc_rec])
    assert torch.equal(plain.params, enc.params)  # same clipping, same seeded noise, same server step
    assert [r.model_hash for r in plain.records] == [r.model_hash for r in enc.records]
    for p, e in zip(plain.records, enc.records, strict=True):
        for k in ("dp_epsilon", "dp_sample_rate", "dp_noise_multiplier", "dp_clip_norm", "dp_noise_std"):
            assert e.metrics[k] == pytest.approx(p.metrics[k], rel=1e-12), k
        assert e.metrics["dp_sample_rate"] == pytest.approx(2 / 3)
        # statistics of the clear updates that DP-FedAvg computes without noise stay in the enclave
        assert "dp_update_norm_median" in p.metrics and "dp_update_norm_median" not in e.metrics
        assert "dp_unclipped_fraction" not in e.metrics
    # the coordinator-side privacy record: the aggregator's spend, read from the signed receipts
    agg_plain = [r for r in load_records(tmp_path / "plain") if r["kind"] == "aggregator"]
    agg_enc = [r for r in load_records(tmp_path / "enclave") if r["kind"] == "aggregator"]
    assert [r["round"] for r in agg_enc] == [1, 2, 3]
    assert {r["released_in"] for r in agg_enc} == {"enclave"} and {r["released_in"] for r in agg_plain} == {
        "coordinator"
    }
    for p, e in zip(agg_plain, agg_enc, strict=True):
        assert {k: e[k] for k in ("epsilon", "noise_multiplier", "sample_rate", "clip_norm", "noise_std")} == {
            k: pytest.approx(p[k], rel=1e-12)
            for k in ("epsilon", "noise_multiplier", "sample_rate", "clip_norm", "noise_std")
        }
    for r, receipt in zip(agg_enc, enc.receipts, strict=True):
        assert (
            r["epsilon"] == receipt.body["privacy"]["epsilon"]
            and r["noise_std"] == receipt.body["privacy"]["noise_std_mean"]
        )
    # participants' own budget view travels in the clear next to the sealed update
    parts = [r for r in load_records(tmp_path / "enclave") if r["kind"] == "participant"]
    assert parts and {r["mode"] for r in parts} == {"central"}
    assert all(s.verified for s in summarize(load_records(tmp_path / "enclave")))
    if clipping == "adaptive":
        clips = [r.body["privacy"]["clip_norm"] for r in enc.receipts]
        assert clips[0] == 0.5 and clips[1] == enc.receipts[0].body["privacy"]["next_clip_norm"] != 0.5


def test_receipt_states_the_release_and_verifies() -> None:
    cfg = dp_cfg()
    run = run_federation(cfg, enclave_mode=True, rounds=2)
    z, c, delta = 1.0, 0.5, cfg.privacy.delta
    q = 2 / 3
    for i, receipt in enumerate(run.receipts, 1):
        p = receipt.body["privacy"]
        assert p["algorithm"] == "dp_fedavg" and p["mechanism"] == "gaussian" and p["clipping"] == "fixed"
        assert p["noise_multiplier"] == z and p["clip_norm"] == c and p["denominator"] == 2
        assert p["noise_std"] == pytest.approx(z * c) and p["noise_std_mean"] == pytest.approx(z * c / 2)
        assert p["sample_rate"] == pytest.approx(q) and p["delta"] == delta and p["accountant"] == "rdp"
        assert p["epsilon_round"] == pytest.approx(epsilon([GaussianSteps(z, q, 1)], delta))
        assert p["epsilon"] == pytest.approx(epsilon([GaussianSteps(z, q, i)], delta))
        assert p["rounds_accounted"] == i and p["secure_noise"] is False
        expected = {"noise_multiplier": z, "sample_rate": q, "delta": delta, "accountant": "rdp", "denominator": 2}
        v = verify_receipt(receipt, allow_simulated=True, rnd=i, privacy=expected)
        assert v.ok, v.reasons
        wrong = verify_receipt(receipt, allow_simulated=True, privacy={**expected, "noise_multiplier": 0.5})
        assert not wrong.ok and any("privacy.noise_multiplier is 1.0, expected 0.5" in r for r in wrong.reasons)
        # a receipt whose release was edited after signing does not verify
        body = {**receipt.body, "privacy": {**p, "noise_multiplier": 5.0}}
        forged = Receipt(body, receipt.signature, receipt.enclave_public_key)
        assert any("signature does not verify" in r for r in verify_receipt(forged, allow_simulated=True).reasons)
        assert Receipt.from_json(receipt.to_json()) == receipt
    plain_enclave = run_federation(dp_cfg(mode="none"), enclave_mode=True, rounds=1).receipts[0]
    assert "privacy" not in plain_enclave.body
    refused = verify_receipt(plain_enclave, allow_simulated=True, privacy={"noise_multiplier": z})
    assert not refused.ok and any("no privacy block" in r for r in refused.reasons)


# ------------------------------------------------------------------ measurement
def test_measurement_pins_the_dp_config() -> None:
    base = AggregationSettings()
    dp = AggregationSettings(central_dp=CentralDPSettings(noise_multiplier=1.0, clip_norm=1.0))
    assert "central_dp" not in base.measured()  # configs without DP measure as before the field existed
    m = {
        "none": measure(base.measured()),
        "z=1.0": measure(dp.measured()),
        "z=1.1": measure(
            AggregationSettings(central_dp=CentralDPSettings(noise_multiplier=1.1, clip_norm=1.0)).measured()
        ),
        "C=2": measure(
            AggregationSettings(central_dp=CentralDPSettings(noise_multiplier=1.0, clip_norm=2.0)).measured()
        ),
        "secure": measure(
            AggregationSettings(
                central_dp=CentralDPSettings(noise_multiplier=1.0, clip_norm=1.0, secure_noise=True)
            ).measured()
        ),
    }
    assert len(set(m.values())) == len(m)
    # every party derives the same settings from the federation file
    assert enclave_aggregation(dp_cfg(noise_multiplier=1.0)) == enclave_aggregation(dp_cfg(noise_multiplier=1.0))
    a, b = enclave_aggregation(dp_cfg(noise_multiplier=1.0)), enclave_aggregation(dp_cfg(noise_multiplier=1.1))
    assert a.central_dp is not None and a.central_dp.seed == 3 and a.central_dp.clip_norm == 0.5
    assert measure(a.measured()) != measure(b.measured())


class _CountingTrainer:
    def __init__(self, pid: str) -> None:
        self.participant_id = pid
        self.calls = 0

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        self.calls += 1
        return Update(self.participant_id, params + 1, 5)

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return {}


def test_participant_pinning_another_noise_multiplier_refuses_before_training() -> None:
    running = enclave_aggregation(dp_cfg(noise_multiplier=1.0))
    agreed = enclave_aggregation(dp_cfg(noise_multiplier=1.1))  # what this participant's federation file says
    inner = _CountingTrainer("p000")
    fed = wrap_for_enclave(
        FedAvg(),
        {"p000": inner},
        SPEC,
        running,
        policies=simulated_policy(agreed),
        allow_simulated_tee=True,
    )
    plan = fed.strategy.configure_round(1, torch.zeros(SPEC.size), ["p000"])
    assert plan.config["dp_central_noise_multiplier"] == 1.0
    with pytest.raises(AttestationRefused, match="not one this policy expects"):
        fed.trainers["p000"].fit(torch.zeros(SPEC.size), plan)
    assert inner.calls == 0


# ------------------------------------------------------------------ what the coordinator holds
D = 4000
SPEC = ParamSpec((TensorSpec("w", (D,), "float32"),))


class _NeverAggregates(FedAvg):
    """The coordinator's own strategy in enclave mode: it must never aggregate (or see) updates."""

    def aggregate(self, plan: RoundPlan, params: torch.Tensor, updates: Sequence[Update]) -> RoundResult:
        raise AssertionError("the coordinator-side strategy aggregated")


class _Spy:
    """An EnclaveClient in front of the enclave: keeps everything that crosses to the coordinator."""

    def __init__(self, enclave: Enclave) -> None:
        self.enclave = enclave
        self.requests: list[AggregationRequest] = []
        self.responses: list[AggregationResponse] = []

    def public_key(self) -> bytes:
        return self.enclave.public_key()

    def evidence(self, nonce: bytes) -> bytes:
        return self.enclave.evidence(nonce)

    def aggregate(self, request: AggregationRequest) -> AggregationResponse:
        self.requests.append(request)
        resp = self.enclave.aggregate(request)
        self.responses.append(resp)
        return resp


def _dp_enclave(n: int = 3, **dp: Any) -> tuple[Enclave, dict[str, KeySigner], CentralDPSettings]:
    settings = CentralDPSettings(**{"noise_multiplier": 1.0, "clip_norm": 1.0, "seed": 11, **dp})
    signers = {f"p{i:03d}": KeySigner.generate(f"p{i:03d}") for i in range(n)}
    keyring = StaticKeyring({p: s.public_key() for p, s in signers.items()})
    enclave = Enclave(AggregationSettings(central_dp=settings), keyring, allow_simulated_tee=True)
    return enclave, signers, settings


def _clear_updates(pids: Sequence[str]) -> list[Update]:
    g = torch.Generator().manual_seed(5)
    return [Update(p, torch.randn(D, generator=g) * (1 + i), 10 + i) for i, p in enumerate(pids)]


def test_coordinator_sees_sealed_updates_and_the_noised_aggregate_only() -> None:
    enclave, signers, dp = _dp_enclave()
    spy = _Spy(enclave)
    inner = _NeverAggregates(min_participants=3)
    strategy = EnclaveStrategy(inner, spy, SPEC, allow_simulated=True, central_dp=dp)
    params = torch.zeros(D)
    plan = strategy.configure_round(1, params, sorted(signers))
    assert plan.config["dp_central_noise_multiplier"] == 1.0 and plan.config["dp_central_sample_rate"] == 1.0
    clear = _clear_updates(plan.participants)
    key = EnclavePublicKey.from_bytes(enclave.public_key())
    sealed = [seal_update(u, 1, key, signers[u.participant_id]) for u in clear]
    result = strategy.aggregate(plan, params, sealed)

    # the coordinator-side strategy chain has no DP-FedAvg and never aggregated (it would have raised)
    assert not isinstance(strategy.inner, DPFedAvg) and type(strategy.inner) is _NeverAggregates
    # what went in: ciphertext only
    (req,) = spy.requests
    assert req.selected == plan.participants and req.available == 3
    for u, c in zip(req.updates, clear, strict=True):
        assert isinstance(u, SealedUpdate) and u.params.numel() == 0 and to_bytes(c.params)[:64] not in u.sealed
    # what came out: the clear clipped mean plus Gaussian noise of the std the receipt states
    clipped, norms = clip_rows(torch.stack([u.params for u in clear]).double() - params.double(), dp.clip_norm)
    assert bool((norms > dp.clip_norm).all())  # every update was clipped
    clear_mean = clipped.mean(0)
    (resp,) = spy.responses
    assert torch.equal(resp.params, result.params)
    noise = result.params.double() - clear_mean
    release = resp.receipt.body["privacy"]
    assert release["noise_std_mean"] == pytest.approx(dp.noise_multiplier * dp.clip_norm / 3)
    assert noise.std().item() == pytest.approx(release["noise_std_mean"], rel=0.05)
    assert noise.abs().min().item() > 0  # no coordinate equals the clear aggregate
    assert float(clear_mean.norm()) < 0.5 * float(noise.norm())  # the noise dominates what is released
    # no un-noised statistic of the updates is released to the coordinator
    assert not {"dp_update_norm_median", "dp_unclipped_fraction"} & set(resp.metrics)
    assert result.metrics["dp_epsilon"] == release["epsilon"]


def test_seeded_noise_is_reproducible_and_secure_noise_is_not() -> None:
    def release(**dp: Any) -> tuple[torch.Tensor, Receipt]:
        enclave, signers, settings = _dp_enclave(**dp)
        strategy = EnclaveStrategy(FedAvg(), enclave, SPEC, allow_simulated=True, central_dp=settings)
        plan = strategy.configure_round(1, torch.zeros(D), sorted(signers))
        key = EnclavePublicKey.from_bytes(enclave.public_key())
        sealed = [seal_update(u, 1, key, signers[u.participant_id]) for u in _clear_updates(plan.participants)]
        res = strategy.aggregate(plan, torch.zeros(D), sealed)
        assert strategy.last_receipt is not None
        return res.params, strategy.last_receipt

    a, _ = release()
    b, _ = release()
    assert torch.equal(a, b)  # from the run seed: anyone who knows the seed can recompute the noise
    c, rc = release(secure_noise=True)
    d, _ = release(secure_noise=True)
    assert not torch.equal(c, d) and rc.body["privacy"]["secure_noise"] is True


def test_enclave_checks_the_selection_it_is_told() -> None:
    enclave, signers, _ = _dp_enclave()
    key = EnclavePublicKey.from_bytes(enclave.public_key())
    sealed = [seal_update(u, 1, key, signers[u.participant_id]) for u in _clear_updates(sorted(signers))]
    params = torch.zeros(D)
    with pytest.raises(EnclaveError, match="more than the 3 registered"):
        enclave.aggregate(AggregationRequest(1, params, SPEC, sealed, ("p000", "p001", "p002"), 30))
    with pytest.raises(EnclaveError, match="selected 3"):
        enclave.aggregate(AggregationRequest(1, params, SPEC, sealed, ("p000", "p001", "p002"), 2))
    resp = enclave.aggregate(AggregationRequest(1, params, SPEC, sealed, ("p000", "p001"), 3))
    assert "not among the participants selected" in resp.receipt.body["rejected"]["p002"]
    p = resp.receipt.body["privacy"]
    assert p["denominator"] == 2 and p["sample_rate"] == pytest.approx(2 / 3)
    # nothing reported: no sampling amplification (q = 1), the conservative choice
    resp = enclave.aggregate(
        AggregationRequest(
            2,
            params,
            SPEC,
            [seal_update(u, 2, key, signers[u.participant_id]) for u in _clear_updates(sorted(signers))],
        )
    )
    assert resp.receipt.body["privacy"]["sample_rate"] == 1.0


def test_the_signed_state_statement_and_a_redone_round_count_every_release() -> None:
    """What a resumed coordinator asks the enclave: a statement signed by its key over a fresh nonce
    (last round, releases accounted, epsilon, the last release). A round is aggregated again only as
    a redo of the last one, and both releases are counted."""
    from trustfed.enclave.errors import ReceiptError
    from trustfed.enclave.receipts import verify_state

    enclave, signers, settings = _dp_enclave()
    pk, key = enclave.public_key(), EnclavePublicKey.from_bytes(enclave.public_key())
    nonce = os.urandom(32)
    st = verify_state(enclave.state(nonce), enclave_public_key=pk, nonce=nonce)
    assert st["last_round"] == 0 and st["privacy"]["rounds_accounted"] == 0 and st["label"] == "SIMULATED"

    def sealed(rnd: int) -> list[SealedUpdate]:
        return [seal_update(u, rnd, key, signers[u.participant_id]) for u in _clear_updates(sorted(signers))]

    params, who = torch.zeros(D), tuple(sorted(signers))
    first = enclave.aggregate(AggregationRequest(1, params, SPEC, sealed(1), who, 3))
    with pytest.raises(EnclaveError, match="not after the last aggregated round 1"):
        enclave.aggregate(AggregationRequest(1, params, SPEC, sealed(1), who, 3))
    with pytest.raises(EnclaveError, match="redo is for the last aggregated round"):
        enclave.aggregate(AggregationRequest(2, params, SPEC, sealed(2), who, 3, redo=True))
    st = verify_state(enclave.state(nonce := os.urandom(32)), enclave_public_key=pk, nonce=nonce)
    assert st["last_round"] == 1 and st["privacy"]["last_release"]["round"] == 1
    assert st["privacy"]["last_release"]["epsilon"] == first.receipt.body["privacy"]["epsilon"]
    again = enclave.aggregate(AggregationRequest(1, params, SPEC, sealed(1), who, 3, redo=True))
    assert again.receipt.body["redo"] is True and again.receipt.body["privacy"]["rounds_accounted"] == 2
    two = epsilon([GaussianSteps(settings.noise_multiplier, 1.0, 1)] * 2, settings.delta, settings.accountant)
    assert again.receipt.body["privacy"]["epsilon"] == pytest.approx(two)
    assert torch.equal(again.params, first.params)  # same updates, seeded noise: the same release again
    # the statement is bound to its key and to the caller's nonce
    statement = enclave.state(nonce := os.urandom(32))
    with pytest.raises(ReceiptError, match="nonce"):
        verify_state(statement, enclave_public_key=pk, nonce=os.urandom(32))
    other, _, _ = _dp_enclave()
    with pytest.raises(ReceiptError, match="different enclave key"):
        verify_state(statement, enclave_public_key=other.public_key(), nonce=nonce)
    forged = Receipt({**statement.body, "last_round": 7}, statement.signature, statement.enclave_public_key)
    with pytest.raises(ReceiptError, match="signature does not verify"):
        verify_state(forged, enclave_public_key=pk, nonce=nonce)


def test_coordinator_refuses_a_release_other_than_configured() -> None:
    enclave, signers, dp = _dp_enclave()
    key = EnclavePublicKey.from_bytes(enclave.public_key())
    expecting_more_noise = dp.model_copy(update={"noise_multiplier": 2.0})
    strategy = EnclaveStrategy(FedAvg(), enclave, SPEC, allow_simulated=True, central_dp=expecting_more_noise)
    plan = strategy.configure_round(1, torch.zeros(D), sorted(signers))
    sealed = [seal_update(u, 1, key, signers[u.participant_id]) for u in _clear_updates(plan.participants)]
    with pytest.raises(EnclaveError, match=re.escape("privacy.noise_multiplier is 1.0, expected 2.0")):
        strategy.aggregate(plan, torch.zeros(D), sealed)
    # an enclave without DP, for a federation that runs central DP: refused too
    plain = Enclave(
        AggregationSettings(), StaticKeyring({p: s.public_key() for p, s in signers.items()}), allow_simulated_tee=True
    )
    strategy = EnclaveStrategy(FedAvg(), plain, SPEC, allow_simulated=True, central_dp=dp)
    plan = strategy.configure_round(1, torch.zeros(D), sorted(signers))
    pk = EnclavePublicKey.from_bytes(plain.public_key())
    sealed = [seal_update(u, 1, pk, signers[u.participant_id]) for u in _clear_updates(plan.participants)]
    with pytest.raises(EnclaveError, match="no privacy block"):
        strategy.aggregate(plan, torch.zeros(D), sealed)


def test_dp_strategy_on_the_coordinator_is_refused_in_enclave_mode() -> None:
    enclave, _, _ = _dp_enclave()
    with pytest.raises(EnclaveError, match="central DP runs inside the enclave"):
        EnclaveStrategy(DPFedAvg(FedAvg(), noise_multiplier=1.0, clip_norm=1.0), enclave, SPEC, allow_simulated=True)


def test_only_privacy_accounting_travels_in_the_clear() -> None:
    guard = BudgetGuard("p000", 10.0, 1e-5)
    event = GaussianSteps(1.0, 0.5, 3)
    assert set(guard.metrics(event, 1.0)) == CLEAR_METRICS

    class _WithMetrics(_CountingTrainer):
        def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
            return Update("p000", params + 1, 5, {"train_loss": 0.25, **guard.metrics(event, 1.0)})

    enclave, signers, _ = _dp_enclave(1)
    t = SealingTrainer(
        _WithMetrics("p000"), AttestedEnclave(enclave, simulated_policy(enclave.aggregation)), signers["p000"]
    )
    upd = t.fit(torch.zeros(D), RoundPlan(1, ("p000",), {"enclave_key_id": enclave.key_id}))
    assert isinstance(upd, SealedUpdate) and set(upd.metrics) == CLEAR_METRICS and "train_loss" not in upd.metrics


# ------------------------------------------------------------------ over gRPC (the enclave service)
pki = pytest.importorskip("trustfed.pki.ca", reason="the PKI module (trustfed.pki.ca) is not available")


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, Path, Enclave, dict[str, KeySigner], CentralDPSettings]]:
    from trustfed.enclave.service import ENCLAVE_TLS_NAME, TlsMaterial, serve
    from trustfed.enclave.settings import EnclaveServiceConfig

    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "enclave", "enclave", hosts=(ENCLAVE_TLS_NAME,))
    pki.issue(tmp_path, "coordinator", "coord")
    enclave, signers, dp = _dp_enclave()
    cfg = EnclaveServiceConfig.model_validate({"enclave": {"allow_simulated_tee": True}})
    tls = TlsMaterial.from_files(tmp_path / "ca.pem", tmp_path / "enclave.pem", tmp_path / "enclave.key")
    server, port, _ = serve(cfg, enclave=enclave, tls=tls, listen="127.0.0.1:0")
    try:
        yield f"127.0.0.1:{port}", tmp_path, enclave, signers, dp
    finally:
        server.stop(grace=None)


def test_dp_round_through_the_grpc_enclave(
    served: tuple[str, Path, Enclave, dict[str, KeySigner], CentralDPSettings],
) -> None:
    from trustfed.enclave.service import GrpcEnclaveClient, TlsMaterial

    address, d, enclave, signers, dp = served
    client = GrpcEnclaveClient(address, TlsMaterial.from_files(d / "ca.pem", d / "coord.pem", d / "coord.key"))
    try:
        nonce = os.urandom(32)
        from trustfed.enclave.attestation import verify_evidence

        policy = simulated_policy(enclave.aggregation)
        assert verify_evidence(client.evidence(nonce), policy, nonce, time.time()).ok
        strategy = EnclaveStrategy(
            FedAvg(fraction_fit=0.67, min_participants=2), client, SPEC, allow_simulated=True, central_dp=dp
        )
        plan = strategy.configure_round(1, torch.zeros(D), sorted(signers))
        assert len(plan.participants) == 2 and plan.config["dp_central_sample_rate"] == pytest.approx(2 / 3)
        key = EnclavePublicKey.from_bytes(client.public_key())
        sealed = [seal_update(u, 1, key, signers[u.participant_id]) for u in _clear_updates(plan.participants)]
        result = strategy.aggregate(plan, torch.zeros(D), sealed)
        assert strategy.last_receipt is not None
        p = strategy.last_receipt.body["privacy"]  # selected / available crossed the wire
        assert p["sample_rate"] == pytest.approx(2 / 3) and p["denominator"] == 2
        assert result.metrics["dp_epsilon"] == pytest.approx(epsilon([GaussianSteps(1.0, 2 / 3, 1)], dp.delta))
    finally:
        client.close()


def test_enclave_toml_written_for_a_dp_federation_measures_like_the_participants(tmp_path: Path) -> None:
    from trustfed.coordinator.local_federation import to_toml
    from trustfed.enclave.settings import load_enclave_config

    cfg = dp_cfg(clipping="adaptive")
    agg = enclave_aggregation(cfg)
    doc = {"enclave": {"allow_simulated_tee": True}, "aggregation": agg.model_dump(mode="json")}
    (tmp_path / "enclave.toml").write_text(to_toml(doc), encoding="utf-8")
    loaded = load_enclave_config(tmp_path / "enclave.toml", check_files=False)
    assert loaded.aggregation == agg and measure(loaded.aggregation.measured()) == measure(agg.measured())
    assert math.isclose(loaded.aggregation.central_dp.noise_multiplier, 1.0)  # type: ignore[union-attr]


# ------------------------------------------------------------------ the enclave as its own process (slow)
@pytest.mark.slow
def test_central_dp_in_the_enclave_process_over_grpc_with_the_audit_log(tmp_path: Path) -> None:
    """Coordinator, enclave service and three participants as processes (``run_local_federation``, as
    ``trustfed demo``), central DP in the enclave, the ledger on: the same parameters as the plain
    in-process central-DP run, the spend in privacy.jsonl from the receipts, and ``audit verify`` ok."""
    from trustfed.coordinator.local_federation import run_local_federation
    from trustfed.ledger.verify import verify_run

    cfg = dp_cfg()
    raw = {**cfg.model_dump(mode="json", exclude={"transport", "participant_training"}), "ledger": {"enabled": True}}
    raw["federation"] = {**raw["federation"], "rounds": 2}
    out = tmp_path / "run"
    params, metrics = run_local_federation(raw, out, round_timeout_s=120)
    plain = run_federation(validate_federation_config(raw), enclave_mode=False)
    assert torch.max(torch.abs(params - plain.params)).item() <= 1e-6
    assert metrics["strategy"]["central_dp"]["applied_in"] == "enclave" and metrics["enclave"]["label"] == "SIMULATED"
    agg = [r for r in load_records(out) if r["kind"] == "aggregator"]
    assert [r["released_in"] for r in agg] == ["enclave", "enclave"]
    assert [r["epsilon"] for r in agg] == pytest.approx([r.metrics["dp_epsilon"] for r in plain.records], rel=1e-12)
    assert {r["party"] for r in load_records(out) if r["kind"] == "participant"} == {"p000", "p001", "p002"}
    receipts = [json.loads(line)["body"] for line in (out / "audit.jsonl").read_text().splitlines()]
    released = [b["receipt"]["body"]["privacy"] for b in receipts if "receipt" in b]
    assert len(released) == 2 and all(p["noise_multiplier"] == 1.0 for p in released)
    verdict = verify_run(out)
    assert verdict.ok, verdict.failures
    assert verdict.checked["privacy_receipts"] == 2
    # An aggregator spend that disagrees with the enclave's signed receipt is reported at its line.
    from tests.ledger_helpers import read_lines, rechain, write_lines

    from trustfed.ledger.audit import parse_entry

    lines = read_lines(out)
    i = next(
        k
        for k, line in enumerate(lines)
        if (e := parse_entry(line)).kind == "privacy_spend" and e.body.get("kind") == "aggregator" and e.round == 2
    )
    raw = json.loads(lines[i])
    raw["body"]["noise_multiplier"] = 2.0
    lines[i] = json.dumps(raw)
    write_lines(out, rechain(lines, i))
    bad = verify_run(out)
    assert any(f.line == i + 1 and f.field == "body.noise_multiplier" for f in bad.failures), bad.failures
