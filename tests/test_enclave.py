"""The enclave core: sealing, measurement, receipts, and enclave-mode rounds end to end."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from trustfed.config import FederationConfig, validate_federation_config
from trustfed.core.codec import ParamSpec, TensorSpec, to_bytes
from trustfed.core.strategy import FedAvg, RoundPlan, Update
from trustfed.enclave.core import AggregationRequest, Enclave
from trustfed.enclave.errors import AttestationRefused, EnclaveError, SealingError
from trustfed.enclave.keys import EnclaveKeyPair
from trustfed.enclave.measurement import code_files, measure
from trustfed.enclave.participant import AttestedEnclave, SealingTrainer
from trustfed.enclave.receipts import Receipt, receipt_hash, verify_receipt
from trustfed.enclave.sealing import (
    KeySigner,
    SealedUpdate,
    StaticKeyring,
    decode_update,
    encode_update,
    open_sealed,
    seal,
    seal_update,
)
from trustfed.enclave.settings import AggregationSettings
from trustfed.enclave.strategy import EnclaveStrategy
from trustfed.simulation.enclave import run_federation, simulated_policy, wrap_for_enclave

AGG = AggregationSettings()


# ---------------------------------------------------------------- sealing
def test_seal_roundtrip_and_binding() -> None:
    keys = EnclaveKeyPair()
    blob = seal(b"secret update", keys.public, rnd=3, participant_id="p001")
    assert b"secret update" not in blob
    assert open_sealed(blob, keys, rnd=3, participant_id="p001") == b"secret update"
    with pytest.raises(SealingError, match="does not open"):
        open_sealed(blob, keys, rnd=4, participant_id="p001")  # another round
    with pytest.raises(SealingError, match="does not open"):
        open_sealed(blob, keys, rnd=3, participant_id="p002")  # another participant
    with pytest.raises(SealingError, match="does not open"):
        open_sealed(blob, EnclaveKeyPair(), rnd=3, participant_id="p001")  # another enclave
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(SealingError, match="does not open"):
        open_sealed(bytes(bad), keys, rnd=3, participant_id="p001")
    with pytest.raises(SealingError, match="malformed"):
        open_sealed(b"TFS1short", keys, rnd=3, participant_id="p001")


def test_update_encoding_roundtrip_and_limits() -> None:
    u = Update("p000", torch.arange(5, dtype=torch.float32), 17, {"loss": 0.5})
    data = encode_update(u, 2)
    got, rnd = decode_update(data, expected_dim=5)
    assert rnd == 2 and got.participant_id == "p000" and got.num_examples == 17 and torch.equal(got.params, u.params)
    with pytest.raises(SealingError, match="has 5 values"):
        decode_update(data, expected_dim=6)
    with pytest.raises(SealingError, match="carries"):
        decode_update(data[:-4], expected_dim=5)
    with pytest.raises(SealingError):
        decode_update(b"TFU1\xff\xff\xff\xff", expected_dim=5)


# ---------------------------------------------------------------- measurement
def test_measurement_changes_with_config_and_code(tmp_path: Path) -> None:
    root = Path(__import__("trustfed").__file__).parent
    files = code_files(root)
    assert any(p.name == "sealing.py" for p in files) and any(p.name == "aggregator.py" for p in files)
    assert any(p.name == "merkle.py" and p.parent.name == "primitives" for p in files)
    copy = tmp_path / "trustfed"
    for d in ("enclave", "core", "primitives"):
        shutil.copytree(root / d, copy / d, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "privacy").mkdir()
    for f in ("central.py", "accounting.py"):  # central DP runs inside the enclave
        shutil.copy(root / "privacy" / f, copy / "privacy" / f)
    base = measure(AGG.measured(), copy)
    assert base == measure(AGG.measured(), copy)  # deterministic
    assert base == measure(AGG.measured())  # the copy measures like the installed package
    assert measure(AggregationSettings(aggregator="median").measured(), copy) != base
    with (copy / "enclave" / "core.py").open("a") as f:
        f.write("\n# changed\n")
    changed = measure(AGG.measured(), copy)
    assert changed != base
    with (copy / "privacy" / "central.py").open("a") as f:
        f.write("\n# changed\n")
    changed_dp = measure(AGG.measured(), copy)
    assert changed_dp != changed
    with (copy / "primitives" / "canonical.py").open("a") as f:
        f.write("\n# changed\n")
    assert measure(AGG.measured(), copy) != changed_dp


# ---------------------------------------------------------------- enclave + receipts
SPEC = ParamSpec((TensorSpec("w", (4,), "float32"),))


def _enclave_and_signers(n: int = 3, **kw: Any) -> tuple[Enclave, dict[str, KeySigner]]:
    signers = {f"p{i:03d}": KeySigner.generate(f"p{i:03d}") for i in range(n)}
    enc = Enclave(AGG, StaticKeyring({p: s.public_key() for p, s in signers.items()}), allow_simulated_tee=True, **kw)
    return enc, signers


def _sealed(enc: Enclave, signers: dict[str, KeySigner], rnd: int) -> tuple[list[SealedUpdate], list[Update]]:
    from trustfed.enclave.keys import EnclavePublicKey

    pk = EnclavePublicKey.from_bytes(enc.public_key())
    clear = [Update(p, torch.full((4,), float(i + 1)), 10 * (i + 1)) for i, p in enumerate(signers)]
    return [seal_update(u, rnd, pk, signers[u.participant_id]) for u in clear], clear


def test_enclave_aggregates_like_fedavg_and_signs_receipt() -> None:
    enc, signers = _enclave_and_signers()
    params = torch.zeros(4)
    sealed, clear = _sealed(enc, signers, 1)
    resp = enc.aggregate(AggregationRequest(1, params, SPEC, sealed))
    want = FedAvg().aggregate(RoundPlan(1, (), {}), params, clear).params
    assert torch.equal(resp.params, want)
    r = resp.receipt
    assert r.body["label"] == "SIMULATED" and r.body["backend"] == "simulated" and r.simulated
    assert r.body["measurement"] == enc.measurement and r.body["aggregator"] == {"name": "mean"}
    commitments = {u.participant_id: u.commitment for u in sealed}
    ok = verify_receipt(r, enclave_public_key=enc.public_key(), commitments=commitments, rnd=1, allow_simulated=True)
    assert ok.ok, ok.reasons
    assert not verify_receipt(r).ok  # simulated receipts are refused unless allowed
    assert Receipt.from_json(r.to_json()) == r and receipt_hash(Receipt.from_json(r.to_json())) == receipt_hash(r)


@pytest.mark.parametrize(
    ("field", "value"),
    [("output_model_hash", "00" * 32), ("round", 7), ("measurement", "ab" * 32), ("commitments_root", "11" * 32)],
)
def test_altered_receipt_fails_verification(field: str, value: object) -> None:
    enc, signers = _enclave_and_signers()
    sealed, _ = _sealed(enc, signers, 1)
    r = enc.aggregate(AggregationRequest(1, torch.zeros(4), SPEC, sealed)).receipt
    raw = json.loads(r.to_json())
    raw["body"][field] = value
    altered = Receipt.from_json(json.dumps(raw).encode())
    v = verify_receipt(altered, enclave_public_key=enc.public_key(), allow_simulated=True)
    assert not v.ok and any("signature does not verify" in x for x in v.reasons)
    assert receipt_hash(altered) != receipt_hash(r)
    assert not verify_receipt(r, allow_simulated=True, expected_hash=receipt_hash(altered)).ok


def test_receipt_from_another_enclave_refused() -> None:
    enc, signers = _enclave_and_signers()
    sealed, _ = _sealed(enc, signers, 1)
    r = enc.aggregate(AggregationRequest(1, torch.zeros(4), SPEC, sealed)).receipt
    v = verify_receipt(r, enclave_public_key=EnclaveKeyPair().public.to_bytes(), allow_simulated=True)
    assert not v.ok and any("different enclave key" in x for x in v.reasons)


def test_bad_signature_and_commitment_are_rejected_and_recorded() -> None:
    enc, signers = _enclave_and_signers()
    sealed, clear = _sealed(enc, signers, 1)
    forged = SealedUpdate(**{**sealed[0].__dict__, "signature": signers["p001"].sign(sealed[0].commitment)})
    swapped = SealedUpdate(**{**sealed[1].__dict__, "sealed": sealed[2].sealed})
    resp = enc.aggregate(AggregationRequest(1, torch.zeros(4), SPEC, [forged, swapped, sealed[2]]))
    assert set(resp.receipt.body["rejected"]) == {"p000", "p001"}
    assert "signature" in resp.receipt.body["rejected"]["p000"]
    assert "commitment" in resp.receipt.body["rejected"]["p001"]
    assert resp.receipt.body["participants"] == ["p002"]
    assert torch.equal(resp.params, clear[2].params)


def test_restarted_enclave_refuses_old_key_until_reattested() -> None:
    enc1, signers = _enclave_and_signers()
    sealed, _ = _sealed(enc1, signers, 1)
    keyring = StaticKeyring({p: s.public_key() for p, s in signers.items()})
    enc2 = Enclave(AGG, keyring, allow_simulated_tee=True)  # "restart": same code and config, new key
    assert enc2.key_id != enc1.key_id and enc2.measurement == enc1.measurement
    with pytest.raises(EnclaveError, match="re-attest"):
        enc2.aggregate(AggregationRequest(1, torch.zeros(4), SPEC, sealed))
    # the participant's attested view refuses to seal to a key it has not attested ...
    policy = simulated_policy(AGG)
    view = AttestedEnclave(enc1, policy)
    assert view.sealing_key().key_id == enc1.key_id
    with pytest.raises(AttestationRefused, match="unattested key"):
        view.sealing_key(enc2.key_id)  # enc1 still answers: the plan's key does not attest
    # ... and after re-attesting the restarted enclave, sealing to it works
    view.source = enc2
    assert view.sealing_key(enc2.key_id).key_id == enc2.key_id
    sealed2, _ = _sealed(enc2, signers, 1)
    assert enc2.aggregate(AggregationRequest(1, torch.zeros(4), SPEC, sealed2)).receipt.body["participants"]


def test_simulated_enclave_needs_explicit_allow() -> None:
    with pytest.raises(EnclaveError, match="allow_simulated_tee"):
        Enclave(AGG, StaticKeyring({}))


def test_enclave_refuses_replayed_round() -> None:
    enc, signers = _enclave_and_signers()
    sealed, _ = _sealed(enc, signers, 1)
    enc.aggregate(AggregationRequest(1, torch.zeros(4), SPEC, sealed))
    with pytest.raises(EnclaveError, match="not after"):
        enc.aggregate(AggregationRequest(1, torch.zeros(4), SPEC, sealed))


def test_enclave_strategy_refuses_clear_updates() -> None:
    enc, _ = _enclave_and_signers()
    strat = EnclaveStrategy(FedAvg(), enc, SPEC, allow_simulated=True)
    with pytest.raises(EnclaveError, match="not sealed"):
        strat.aggregate(RoundPlan(1, ("p000",), {}), torch.zeros(4), [Update("p000", torch.ones(4), 3)])


class _CountingTrainer:
    def __init__(self, pid: str) -> None:
        self.participant_id = pid
        self.calls = 0

    def fit(self, params: torch.Tensor, plan: RoundPlan) -> Update:
        self.calls += 1
        return Update(self.participant_id, params + 1, 5)

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return {}


def test_unexpected_measurement_participant_refuses_before_training() -> None:
    enc, signers = _enclave_and_signers(1)
    inner = _CountingTrainer("p000")
    policy = simulated_policy(AGG).model_copy(update={"expected_measurements": ["ee" * 32]})
    t = SealingTrainer(inner, AttestedEnclave(enc, policy, where="participant p000"), signers["p000"])
    with pytest.raises(AttestationRefused) as exc:
        t.fit(torch.zeros(4), RoundPlan(1, ("p000",), {"enclave_key_id": enc.key_id}))
    assert "participant p000" in str(exc.value) and "not one this policy expects" in str(exc.value)
    assert inner.calls == 0  # nothing trained, nothing sent


# ---------------------------------------------------------------- end to end through the Coordinator
def small_cfg(**enclave: Any) -> FederationConfig:
    raw: dict[str, Any] = {
        "federation": {"name": "t", "rounds": 2, "participants": 3, "seed": 0},
        "data": {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "strategy": {"name": "fedavg", "aggregator": "mean", "min_participants": 2},
        "enclave": {
            "enabled": True,
            "backend": "simulated",
            "allow_simulated_tee": True,
            "policy": {"allow_simulated_tee": True},
            **enclave,
        },
    }
    return validate_federation_config(raw)


class RecordingTransport:
    """Wraps the coordinator's transport and keeps everything the coordinator receives."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.received: list[Update] = []

    def available(self) -> Sequence[str]:
        return list(self.inner.available())

    def fit(self, plan: RoundPlan, params: torch.Tensor) -> list[Update]:
        out = list(self.inner.fit(plan, params))
        self.received += out
        return out

    def close(self) -> None:
        self.inner.close()


def test_e2e_enclave_matches_plain_and_coordinator_sees_no_clear_update() -> None:
    cfg = small_cfg()
    plain = run_federation(cfg, enclave_mode=False)
    rec: list[RecordingTransport] = []

    def wrap(t: Any) -> Any:
        rec.append(RecordingTransport(t))
        return rec[0]

    enc = run_federation(cfg, enclave_mode=True, transport_wrapper=wrap)
    assert torch.equal(plain.params, enc.params)
    assert [r.model_hash for r in plain.records] == [r.model_hash for r in enc.records]
    assert len(enc.receipts) == 2
    for r, receipt in zip(enc.records, enc.receipts, strict=True):
        assert receipt.body["output_model_hash"] == r.model_hash and receipt.body["label"] == "SIMULATED"
    # what the coordinator held: sealed updates only, with no parameter bytes in the clear
    from trustfed.apps.builtin_parts import build_data, build_trainer

    data = build_data(cfg)
    clear = build_trainer(cfg, data, "p000").fit(_initial_params(cfg), RoundPlan(1, ("p000",), {}))
    needle = to_bytes(clear.params)[:64]
    received = rec[0].received
    assert len(received) == 6
    for u in received:
        assert isinstance(u, SealedUpdate) and u.params.numel() == 0 and u.num_examples == 0
        assert needle not in u.sealed and len(u.sealed) >= 4 * clear.params.numel()


def _initial_params(cfg: FederationConfig) -> torch.Tensor:
    from trustfed.apps.builtin_parts import build_data, model_factory
    from trustfed.core.codec import flatten

    data = build_data(cfg)
    return flatten(model_factory(cfg, data.train.input_shape, data.train.num_classes)().state_dict())[0]


def test_e2e_participants_refuse_unexpected_measurement() -> None:
    cfg = small_cfg(policy={"allow_simulated_tee": True, "expected_measurements": ["ab" * 32]})
    # the participants' policy pins a measurement that is not this enclave's; simulated_policy adds the
    # local one only when the policy itself lists none, so build the federation directly:
    from trustfed.simulation.enclave import aggregation_settings_for

    policy = cfg.enclave.policy.model_copy(update={"allowed_backends": ["simulated"]})
    inner = _CountingTrainer("p000")
    fed = wrap_for_enclave(
        FedAvg(),
        {"p000": inner},
        SPEC,
        aggregation_settings_for(cfg.strategy),
        policies=policy,
        allow_simulated_tee=True,
    )
    with pytest.raises(AttestationRefused, match="not one this policy expects"):
        fed.trainers["p000"].fit(torch.zeros(4), fed.strategy.configure_round(1, torch.zeros(4), ["p000"]))
    assert inner.calls == 0


def test_e2e_simulated_refused_when_participants_disallow() -> None:
    cfg = small_cfg(policy={"allow_simulated_tee": False})
    with pytest.raises(AttestationRefused, match="allow_simulated_tee = false"):
        run_federation(cfg, enclave_mode=True, rounds=1)


def test_e2e_federation_must_allow_simulated() -> None:
    cfg = small_cfg(allow_simulated_tee=False)
    with pytest.raises(EnclaveError, match="allow_simulated_tee = false"):
        run_federation(cfg, enclave_mode=True, rounds=1)
