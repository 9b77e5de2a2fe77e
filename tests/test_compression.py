"""Update compression (``[transport] compression``): the fp16 / int8 codec against a float64 oracle, the
payloads it refuses, the configuration rules, a simulated run's accuracy and wire bytes, and the audit
verifier's checks of the recorded error bound."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.ledger_helpers import find, has, read_lines, rechain, resign, write_lines

from trustfed.config import validate_federation_config
from trustfed.core.compression import (
    CompressedUpdate,
    CompressionPolicy,
    compress_update,
    decode,
    encode,
    payload_size,
    restore,
)
from trustfed.core.strategy import Update
from trustfed.errors import CodecError, ConfigError
from trustfed.ledger.audit import EcdsaSigner, make_entry, parse_entry
from trustfed.ledger.verify import verify_run
from trustfed.simulation import run_simulation

FINITE = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def oracle_int8(x: np.ndarray, block: int) -> np.ndarray:
    """The slow, obvious int8 round trip: per block, scale = max|x| / 127, value = round(x / scale) * scale."""
    out = np.zeros_like(x, dtype=np.float64)
    for start in range(0, x.size, block):
        part = x[start : start + block].astype(np.float64)
        scale = np.float32(np.abs(part).max() / 127.0) if part.size else 0.0
        if scale > 0:
            out[start : start + block] = np.clip(np.rint(part / float(scale)), -127, 127) * float(scale)
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(FINITE, min_size=0, max_size=300), st.sampled_from([64, 100, 4096]))
def test_int8_round_trip_matches_the_oracle_and_its_bound(values: list[float], block: int) -> None:
    x = np.array(values, dtype=np.float32)
    payload = encode(torch.from_numpy(x), "int8", block)
    assert len(payload) == payload_size("int8", x.size, block) == 12 + 4 * -(-x.size // block) + x.size
    got = decode(payload, "int8", x.size, block).numpy().astype(np.float64)
    np.testing.assert_allclose(got, oracle_int8(x, block), rtol=1e-6, atol=1e-30)
    for start in range(0, x.size, block):  # each value within half a step of its block's scale
        part = x[start : start + block].astype(np.float64)
        step = np.abs(part).max() / 127.0
        assert np.all(np.abs(got[start : start + block] - part) <= step / 2 * (1 + 1e-5) + 1e-30)


@settings(max_examples=60, deadline=None)
@given(st.lists(FINITE, min_size=0, max_size=300))
def test_fp16_round_trip_is_numpy_half_precision(values: list[float]) -> None:
    x = np.array(values, dtype=np.float32)
    payload = encode(torch.from_numpy(x), "fp16")
    assert len(payload) == payload_size("fp16", x.size) == 12 + 2 * x.size
    np.testing.assert_array_equal(decode(payload, "fp16", x.size).numpy(), x.astype(np.float16).astype(np.float32))


def test_compress_update_measures_what_the_receiver_restores() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10_000, generator=g)
    trained = base + 0.01 * torch.randn(10_000, generator=g)
    for codec, ratio in (("fp16", 0.5), ("int8", 0.25)):
        sent = compress_update(Update("p000", trained, 7, {"loss": 1.0}), base, CompressionPolicy(codec, 1024))
        assert isinstance(sent, CompressedUpdate) and sent.num_examples == 7 and sent.metrics == {"loss": 1.0}
        assert abs(len(sent.payload) / (4 * trained.numel()) - ratio) < 0.01
        restored = restore(base, sent.payload, codec, 1024)  # from the bytes alone, as the coordinator does
        assert torch.equal(restored, sent.params)
        err = (restored.double() - trained.double()).abs()
        assert sent.compression is not None and sent.compression.max_abs_error == float(err.max()) > 0
        rel = float(err.norm() / (trained - base).double().norm())
        assert sent.compression.rel_l2_error == pytest.approx(rel, rel=1e-12) and rel < 0.02
    # a bound the codec cannot keep is refused before anything is sent
    with pytest.raises(CodecError, match="max_error"):
        compress_update(Update("p000", trained, 7), base, CompressionPolicy("int8", 4096, max_error=1e-9))


def test_fp16_refuses_a_delta_beyond_its_range_and_int8_carries_it() -> None:
    base = torch.zeros(5)
    trained = torch.tensor([0.0, 1.0, 70_000.0, -2.0, 3.0])
    with pytest.raises(CodecError, match=r"70000 at index 2 .*beyond float16's range.*'int8'"):
        compress_update(Update("p000", trained, 1), base, CompressionPolicy("fp16"))
    sent = compress_update(Update("p000", trained, 1), base, CompressionPolicy("int8", 64))
    assert sent.params[2] == pytest.approx(70_000.0, rel=1e-2)
    with pytest.raises(CodecError, match="NaN or infinite"):
        encode(torch.tensor([1.0, float("nan")]), "int8")


def _int8(n: int = 10, block: int = 64) -> bytearray:
    return bytearray(encode(torch.linspace(-1, 1, n), "int8", block))


@pytest.mark.parametrize(
    ("payload", "codec", "match"),
    [
        (_int8()[:-1], "int8", "payload of 25 bytes"),  # wrong length
        (_int8() + b"\0", "int8", "payload of 27 bytes"),
        (bytearray(b"XXXX") + _int8()[4:], "int8", "TFQ1 header"),  # no magic
        (_int8()[:4] + b"\x07" + _int8()[5:], "int8", "codec tag 7"),  # bad dtype tag
        (_int8()[:4] + b"\x01" + _int8()[5:], "int8", "codec tag 1; expected 2"),  # an fp16 tag on int8 bytes
        (_int8()[:8] + struct.pack("<I", 128) + _int8()[12:], "int8", "blocks of 128"),
        (_int8()[:12] + struct.pack("<f", math.nan) + _int8()[16:], "int8", "NaN, infinite or negative block scale"),
        (_int8()[:12] + struct.pack("<f", math.inf) + _int8()[16:], "int8", "NaN, infinite or negative block scale"),
        (_int8()[:12] + struct.pack("<f", -1.0) + _int8()[16:], "int8", "negative block scale"),
        (_int8()[:16] + b"\x80" + _int8()[17:], "int8", "-128"),
        (
            bytearray(encode(torch.ones(10), "fp16", 64))[:12] + np.full(10, np.inf, np.float16).tobytes(),
            "fp16",
            "NaN or infinite",
        ),
    ],
)
def test_decode_refuses_a_malformed_payload(payload: bytearray, codec: str, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode(payload, codec, 10, 64)


def small(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "federation": {"rounds": 4, "participants": 4, "seed": 1},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [32]},
        "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05},
        "strategy": {"min_participants": 2},
    }
    raw.update(over)
    return raw


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        validate_federation_config(raw, "fed.toml")
    return [str(p) for p in ei.value.problems]


def test_config_names_the_key_of_a_bad_or_clashing_compression() -> None:
    (bad,) = problems(small(transport={"compression": "int4"}))
    assert bad.startswith("transport.compression:") and "'none', 'fp16' or 'int8'" in bad and "int4" in bad
    (clash,) = problems(small(transport={"compression": "int8"}, secagg={"enabled": True}))
    assert clash.startswith("transport.compression:") and "secagg.enabled" in clash
    (clash,) = problems(
        small(transport={"compression": "fp16"}, enclave={"enabled": True, "allow_simulated_tee": True})
    )
    assert clash.startswith("transport.compression:") and "enclave.enabled" in clash
    (orphan,) = problems(small(transport={"compression_max_error": 0.1}))
    assert orphan.startswith("transport.compression_max_error:")
    (tiny,) = problems(small(transport={"compression": "int8", "compression_block": 8}))
    assert tiny.startswith("transport.compression_block:")
    cfg = validate_federation_config(small(transport={"compression": "int8", "compression_max_error": 0.5}))
    assert cfg.transport.compression_policy == CompressionPolicy("int8", 4096, 0.5)


def test_int8_simulation_reaches_the_accuracy_of_float32_with_a_quarter_of_the_bytes(tmp_path: Path) -> None:
    plain = run_simulation(validate_federation_config(small()), plot=False)
    runs = {}
    for codec in ("fp16", "int8"):
        raw = small(transport={"compression": codec, "compression_max_error": 0.05}, ledger={"enabled": True})
        runs[codec] = run_simulation(validate_federation_config(raw), tmp_path / codec, plot=False)
    base_acc = plain.metrics["final_accuracy"]
    assert base_acc > 0.8
    for codec, res in runs.items():
        assert abs(res.metrics["final_accuracy"] - base_acc) <= 0.02, (codec, res.metrics["final_accuracy"], base_acc)
        assert float((res.params - plain.params).abs().max()) < 0.05
    # what each participant sent: the payload its commitment hashes, a half / a quarter of float32's bytes
    n = plain.params.numel()
    for codec, want in (("fp16", 12 + 2 * n), ("int8", 12 + 4 * -(-n // 4096) + n)):
        assert want / (4 * n) == pytest.approx(0.5 if codec == "fp16" else 0.25, abs=0.01)
        commitments = [parse_entry(x) for x in read_lines(tmp_path / codec) if '"kind":"commitment"' in x]
        assert len(commitments) == 16
        for e in commitments:
            rec = e.body["compression"]
            assert rec["codec"] == codec and rec["block"] == 4096
            assert 0 < rec["max_abs_error"] <= 0.05 and 0 < rec["rel_l2_error"] < 0.05
        verdict = verify_run(tmp_path / codec)
        assert verdict.ok, [str(f) for f in verdict.failures]
        assert verdict.checked["compression_records"] == 16
    int8 = [
        parse_entry(x).body["compression"]["max_abs_error"] for x in read_lines(tmp_path / "int8") if "commitment" in x
    ]
    fp16 = [
        parse_entry(x).body["compression"]["max_abs_error"] for x in read_lines(tmp_path / "fp16") if "commitment" in x
    ]
    assert max(fp16) < max(int8)  # half precision keeps more than 8 bits


def test_audit_verify_fails_a_bound_over_max_error_and_a_missing_record(tmp_path: Path) -> None:
    raw = small(
        federation={"rounds": 1, "participants": 3, "seed": 1},
        transport={"compression": "int8", "compression_max_error": 0.05},
        ledger={"enabled": True},
    )
    run = tmp_path / "run"
    run_simulation(validate_federation_config(raw), run, plot=False)
    assert verify_run(run).ok
    (agg,) = [parse_entry(x) for x in read_lines(run) if '"kind":"aggregation"' in x and parse_entry(x).round == 1]
    assert agg.body["compression"] == {"codec": "int8", "block": 4096, "max_error": 0.05}

    def participant_edit(nth: int, edit: Any) -> int:
        """p00<nth> re-signs its own commitment (its key, its update) with ``edit`` applied."""
        lines = read_lines(run)
        i = find(lines, "commitment", 1, nth=nth)
        e = parse_entry(lines[i])
        body = json.loads(json.dumps(e.body))
        edit(body)
        signer = EcdsaSigner.load(e.author, run / "keys" / "participants" / f"{e.author}.pem")
        lines[i] = make_entry(e.seq, e.prev, e.kind, e.round, body, signer)[1].rstrip("\n")
        write_lines(run, rechain(lines, i))
        return i

    participant_edit(0, lambda b: b["compression"].update(max_abs_error=0.5))  # over the declared 0.05
    participant_edit(1, lambda b: b.pop("compression"))  # states none in an int8 round
    bad = verify_run(run)
    assert not bad.ok
    msgs = [f.message for f in bad.failures if f.field == "body.compression"]
    assert any("'p000'" in m and "over the federation's max_error" in m for m in msgs), msgs
    assert any("'p001'" in m and "states no compression record" in m for m in msgs), msgs
    # a coordinator that declares no compression for a round whose commitments state one is caught too
    i = resign(run, run / "keys" / "coordinator.pem", "aggregation", 1, lambda b: b.pop("compression"))
    again = verify_run(run)
    assert has(again.failures, file="audit.jsonl", line=i + 1, rnd=1, field="body.compression"), again.failures
