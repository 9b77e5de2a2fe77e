from __future__ import annotations

import subprocess
import sys

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from trustfed.core.codec import ParamSpec, flatten, from_bytes, model_hash, to_bytes, unflatten
from trustfed.errors import CodecError
from trustfed.models import build_model

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    n = draw(st.integers(1, 6))
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        numel = 1
        for s in shape:
            numel *= s
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        if dtype == torch.float32:
            # arbitrary bit patterns, NaN payloads and infinities included
            bits = torch.randint(-(2**31), 2**31 - 1, (numel,), generator=g, dtype=torch.int64).to(torch.int32)
            t = bits.view(torch.float32).reshape(shape)
        elif dtype in (torch.float16, torch.bfloat16):
            t = (torch.randn(numel, generator=g) * 100).to(dtype).reshape(shape)
        elif dtype == torch.bool:
            t = (torch.randint(0, 2, (numel,), generator=g) == 1).reshape(shape)
        elif dtype == torch.uint8:
            t = torch.randint(0, 256, (numel,), generator=g).to(dtype).reshape(shape)
        else:
            t = torch.randint(-(2**24), 2**24 + 1, (numel,), generator=g).to(dtype).reshape(shape)
        out[f"layer{i}.w"] = t
    return out


def _bits(t: torch.Tensor) -> bytes:
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


@settings(max_examples=60, deadline=None)
@given(state_dicts())
def test_codec_round_trip_is_bit_exact(state: dict[str, torch.Tensor]) -> None:
    vec, spec = flatten(state)
    assert vec.dtype == torch.float32 and vec.numel() == spec.size
    # through the wire form and the spec's JSON, too
    back = unflatten(
        from_bytes(to_bytes(vec), ParamSpec.from_json(spec.to_json())), ParamSpec.from_json(spec.to_json())
    )
    assert list(back) == list(state)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert _bits(back[k]) == _bits(t), k


def test_real_models_round_trip_and_load() -> None:
    for name, shape in (("mlp", (64,)), ("cnn", (1, 28, 28))):
        model = build_model(name, shape, 10, seed=3)
        vec, spec = flatten(model.state_dict())
        other = build_model(name, shape, 10, seed=4)
        other.load_state_dict(unflatten(vec, spec))
        for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
            assert torch.equal(a, b), k


def test_codec_rejects_what_float32_cannot_hold() -> None:
    with pytest.raises(CodecError, match="float64"):
        flatten({"w": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(CodecError, match="2\\*\\*24"):
        flatten({"n": torch.tensor([2**25], dtype=torch.int64)})


def test_wire_checks_lengths_before_use() -> None:
    _, spec = flatten({"w": torch.zeros(4)})
    with pytest.raises(CodecError, match="whole number"):
        from_bytes(b"\x00" * 7)
    with pytest.raises(CodecError, match="spec needs 4"):
        from_bytes(b"\x00" * 12, spec)
    with pytest.raises(CodecError, match="spec needs 4"):
        unflatten(torch.zeros(5), spec)
    with pytest.raises(CodecError, match="unsupported dtype"):
        ParamSpec.from_json('[{"name": "w", "shape": [2], "dtype": "float64"}]')
    with pytest.raises(CodecError, match="not valid JSON"):
        ParamSpec.from_json("[{")


def test_model_hash_changes_with_any_bit_and_with_the_spec() -> None:
    vec, spec = flatten({"a": torch.ones(2, 3), "b": torch.zeros(4)})
    h = model_hash(vec, spec)
    v2 = vec.clone()
    v2.view(torch.int32)[5] ^= 1
    assert model_hash(v2, spec) != h
    _, spec2 = flatten({"a": torch.ones(3, 2), "b": torch.zeros(4)})
    assert model_hash(vec, spec2) != h


_HASH_SNIPPET = """
import torch
from trustfed.core.codec import flatten, model_hash
from trustfed.models import build_model
torch.set_num_threads(1)
vec, spec = flatten(build_model("cnn", (1, 28, 28), 10, seed=7).state_dict())
print(model_hash(vec, spec))
"""


def test_model_hash_is_identical_across_processes() -> None:
    vec, spec = flatten(build_model("cnn", (1, 28, 28), 10, seed=7).state_dict())
    here = model_hash(vec, spec)
    hashes = {
        subprocess.run([sys.executable, "-c", _HASH_SNIPPET], check=True, capture_output=True, text=True).stdout.strip()
        for _ in range(2)
    }
    assert hashes == {here}
