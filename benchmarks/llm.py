"""Federated LoRA on the assistant app: what it learns, what it sends, and what the federation costs.

Workload: the tiny LLaMA-style model of ``trustfed.apps.assistant.model`` (built from config,
pre-trained on generated text without tool calls), three vendors (travel, home, media: non-IID),
LoRA rank 8 with A frozen (FFA-LoRA), AdamW.

* **Quality**: held-out perplexity of the replies and tool-call exact-match / schema-valid rates of
  the base model, of federated LoRA (FedAvg over the adapters) and of centralised LoRA trained on the
  union of the vendors' data for as many epochs (the same train function, one process), all scored by
  the app's own evaluation on the union of the held-out chats.
* **Bytes**: one upload (the adapters' trainable tensors) against full fine-tuning (every parameter),
  and one vendor's real adapter update as ``[transport] compression`` sends it (none / fp16 / int8):
  payload bytes and the error bound its sender measures and signs.
* **Overhead**: seconds per federated round (federated evaluation off, so the rounds do the same
  work as the loop) against the same PEFT training loop alone (the app's train function on each
  vendor's data in turn), plain and through the in-process SIMULATED enclave (sealing, attestation,
  receipts), interleaved per repeat so machine load hits them alike. Goal: <= 1.05x plain, <= 1.15x
  with the enclave.

No GPU figure: tokens/s of a >= 100M-parameter model needs a lent GPU, and none was.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/llm.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustfed.app.api import LocalData, TrainContext
from trustfed.app.trainer import load_exchanged
from trustfed.apps.assistant import app as assistant
from trustfed.apps.assistant.corpus import VENDORS, write_vendor_data
from trustfed.apps.assistant.model import pretrain_base
from trustfed.apps.runtime import Runtime
from trustfed.config import FederationConfig, participant_ids, validate_federation_config
from trustfed.core.compression import CompressionPolicy, compress_update
from trustfed.simulation.enclave import run_federation

ENCLAVE = {
    "enabled": True,
    "backend": "simulated",
    "allow_simulated_tee": True,
    "policy": {"allow_simulated_tee": True},
}


def federation(root: Path, rounds: int, epochs: int, *, evaluate: bool, enclave: bool = False) -> FederationConfig:
    raw: dict[str, Any] = {
        "federation": {"name": "assistant-bench", "rounds": rounds, "participants": len(VENDORS), "seed": 0},
        "app": {
            "target": "trustfed.apps.assistant.app:app",
            "config": {"base": str(root / "base"), "generate": 16, "targets": ["q_proj", "v_proj"], "length": 48},
        },
        "training": {
            "local_epochs": epochs,
            "batch_size": 8,
            "lr": 0.05,
            "evaluate_every": 1 if evaluate else 0,
        },
        "strategy": {"min_participants": len(VENDORS)},
        "simulation": {"data": {f"p{i:03d}": {"path": str(root / f"v{i}")} for i in range(len(VENDORS))}},
    }
    if enclave:
        raw["enclave"] = ENCLAVE
    return validate_federation_config(raw)


def union(parts: list[LocalData], root: Path, rt: Runtime) -> tuple[assistant.Chats, assistant.Chats]:
    tok = assistant.ChatTokenizer.load(root / "base")
    length = int(rt.cfg.app.config["length"]) if rt.cfg.app is not None else 48
    train = [r for p in parts for r in p.train.records]  # type: ignore[union-attr]
    held = [r for p in parts for r in p.eval.records]  # type: ignore[union-attr]
    return assistant.Chats(train, tok, length), assistant.Chats(held, tok, length)


def score(rt: Runtime, model: torch.nn.Module, held: assistant.Chats) -> dict[str, float]:
    got = dict(assistant.evaluate(model, held, rt.context()))
    return {k: round(v, 4) for k, v in got.items() if k != "num_examples"}


def quality(root: Path, rounds: int, epochs: int) -> dict[str, Any]:
    cfg = federation(root, rounds, epochs, evaluate=False)
    rt = Runtime(cfg)
    parts = [rt.simulated_local_data(pid) for pid in participant_ids(len(VENDORS))]
    train, held = union(parts, root, rt)
    base = rt.model_factory()()
    out: dict[str, Any] = {"base": score(rt, base, held)}
    t0 = time.perf_counter()
    run = run_federation(cfg, enclave_mode=False)
    fed_s = time.perf_counter() - t0
    fed = rt.model_factory()()
    load_exchanged(rt.app, fed, run.params, rt.spec)
    out["federated"] = {**score(rt, fed, held), "train_s": round(fed_s, 2)}
    central = rt.model_factory()()
    t0 = time.perf_counter()
    for r in range(rounds):  # as many passes over the union as each vendor made over its own data
        ctx = TrainContext(r + 1, r, epochs, 8, 0.05, "central", rt.context())
        assistant.train(central, train, ctx)
    out["centralised"] = {**score(rt, central, held), "train_s": round(time.perf_counter() - t0, 2)}
    out["rounds"], out["local_epochs"], out["held_out_chats"] = rounds, epochs, len(held)
    return out


def plain_loop(rt: Runtime, epochs: int) -> float:
    """The same PEFT training as one federated round, without the federation: each vendor in turn
    (models built before the clock starts, as a participant builds its model once)."""
    models = [rt.model_factory()() for _ in VENDORS]
    t0 = time.perf_counter()
    for i, pid in enumerate(participant_ids(len(VENDORS))):
        ctx = TrainContext(1, i, epochs, 8, 0.05, pid, rt.context(pid))
        assistant.train(models[i], rt.simulated_local_data(pid).train, ctx)
    return time.perf_counter() - t0


def overhead(root: Path, rounds: int, epochs: int, reps: int) -> dict[str, Any]:
    cfgs = {
        mode: federation(root, rounds, epochs, evaluate=False, enclave=mode == "enclave")
        for mode in ("plain", "enclave")
    }
    rt = Runtime(cfgs["plain"])
    for pid in participant_ids(len(VENDORS)):
        rt.simulated_local_data(pid)
    times: dict[str, list[float]] = {"loop": [], "plain": [], "enclave": []}
    for _ in range(reps):
        times["loop"].append(plain_loop(rt, epochs))
        for mode, cfg in cfgs.items():
            run = run_federation(cfg, enclave_mode=mode == "enclave")
            times[mode].append(statistics.median(r.seconds for r in run.records))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "seconds_per_round": {k: round(v, 3) for k, v in med.items()},
        "ratio_plain": round(med["plain"] / med["loop"], 3),
        "ratio_enclave": round(med["enclave"] / med["loop"], 3),
        "repeats": reps,
        "rounds_per_repeat": rounds,
    }


def upload_bytes(root: Path) -> dict[str, Any]:
    rt = Runtime(federation(root, 1, 1, evaluate=False))
    model = rt.model_factory()()
    full = sum(v.numel() for k, v in model.state_dict().items() if "lora_" not in k)
    return {
        "adapter_values": rt.spec.size,
        "adapter_bytes": 4 * rt.spec.size,
        "full_fine_tuning_bytes": 4 * full,
        "fraction": round(rt.spec.size / full, 5),
    }


def compressed_uploads(root: Path) -> dict[str, Any]:
    """One vendor's adapter update after a round of local training, as each codec sends it: the payload's
    bytes and the error its sender measures (``max_abs_error``, ``rel_l2_error``: what the commitment signs)."""
    rt = Runtime(federation(root, 1, 1, evaluate=False))
    params, _ = rt.initial
    plan = rt.strategy(None).configure_round(1, params, participant_ids(len(VENDORS)))
    pid = plan.participants[0]
    update = rt.simulated_trainer(pid).fit(params.clone(), plan)
    out: dict[str, Any] = {"none": {"bytes": 4 * params.numel(), "ratio": 1.0}}
    for codec in ("fp16", "int8"):
        sent = compress_update(update, params, CompressionPolicy(codec))
        assert sent.compression is not None
        out[codec] = {
            "bytes": len(sent.payload),
            "ratio": round(len(sent.payload) / (4 * params.numel()), 4),
            "max_abs_error": sent.compression.max_abs_error,
            "rel_l2_error": sent.compression.rel_l2_error,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="hidden 64, 2 layers, fewer repeats")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llm.json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    hidden, layers, reps = (64, 2, 2) if args.quick else (128, 3, 3)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        pretrain_base(root / "base", hidden=hidden, layers=layers)
        pretrain_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        for i, vendor in enumerate(VENDORS):
            write_vendor_data(root / f"v{i}", vendor, rng, train=96, held_out=32)
        result: dict[str, Any] = {
            "model": {"hidden": hidden, "layers": layers, "pretrain_s": round(pretrain_s, 1)},
            "bytes": upload_bytes(root),
            "compression": compressed_uploads(root),
            "quality": quality(root, rounds=6, epochs=3),
            "overhead": overhead(root, rounds=3, epochs=3, reps=reps),
            "gpu": "not measured: no GPU was lent to this run",
            "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__},
        }
    q, o, b = result["quality"], result["overhead"], result["bytes"]
    print(
        f"model: hidden {hidden}, {layers} layers; upload {b['adapter_bytes']:,} B vs full {b['full_fine_tuning_bytes']:,} B ({100 * b['fraction']:.2f}%)"
    )
    for codec, c in result["compression"].items():
        bound = f"  max_abs_error {c['max_abs_error']:.3g}  rel_l2 {c['rel_l2_error']:.3g}" if codec != "none" else ""
        print(f"upload {codec:<5} {c['bytes']:>10,} B ({c['ratio']:.3f}x){bound}")
    print(f"{'model':<12} {'perplexity':>10} {'exact':>6} {'schema':>7}")
    for name in ("base", "federated", "centralised"):
        s = q[name]
        print(
            f"{name:<12} {s['perplexity']:>10.3f} {s.get('tool_exact_match', math.nan):>6.3f} {s.get('tool_schema_valid', math.nan):>7.3f}"
        )
    sec = o["seconds_per_round"]
    print(
        f"round: loop {sec['loop']:.3f}s  plain {sec['plain']:.3f}s ({o['ratio_plain']}x)  enclave {sec['enclave']:.3f}s ({o['ratio_enclave']}x)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
