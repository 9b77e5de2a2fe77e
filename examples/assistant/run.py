"""The assistant example end to end: ``python examples/assistant/run.py [--small] [--out DIR]``.

Pre-trains the tiny base model (``trustfed.apps.assistant.model.pretrain_base``: generic text and
small talk, no tool calls; saved with safetensors into ``[app.config] base``), writes each vendor's
chats (``trustfed.apps.assistant.corpus``), runs the federation through ``trustfed simulate``, then
scores the base model and the final adapters on every vendor's held-out chats: perplexity of the
replies, and the exact-match and schema-valid rates of generated tool calls. Needs trustfed[llm].
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

import math  # noqa: E402

import numpy as np  # noqa: E402
import scenario  # noqa: E402

from trustfed.apps.assistant.app import evaluate  # noqa: E402
from trustfed.apps.assistant.corpus import VENDORS, write_vendor_data  # noqa: E402
from trustfed.apps.assistant.model import pretrain_base  # noqa: E402

# The base model and the vendors' chats: full size (docs/llm.md) and test size.
SIZES = {
    False: {"steps": 300, "hidden": 128, "layers": 3, "train": 240, "held_out": 60},
    True: {"steps": 120, "hidden": 64, "layers": 2, "train": 96, "held_out": 32},
}


def pooled(m: object, held: dict[str, object], ctx: object) -> dict[str, float]:
    """Held-out figures over every vendor's chats: example-weighted over vendors, perplexity from
    the mean loss."""
    per = {pid: evaluate(m, d, ctx) for pid, d in held.items()}  # type: ignore[arg-type]
    total = sum(r["num_examples"] for r in per.values())
    out = {
        k: sum(r[k] * r["num_examples"] for r in per.values()) / total
        for k in per[next(iter(per))]
        if k != "num_examples"
    }
    out["perplexity"] = math.exp(out["loss"])
    return out


def main(argv: list[str] | None = None) -> None:
    plan = scenario.plan("assistant", HERE, argv)
    size = SIZES[plan.small]
    pretrain_base(
        HERE / str(plan.app_config["base"]),
        seed=plan.seed,
        steps=size["steps"],
        hidden=size["hidden"],
        layers=size["layers"],
    )
    rng = np.random.default_rng(plan.seed)
    for pid, vendor in zip(sorted(plan.sites), VENDORS, strict=True):
        write_vendor_data(plan.sites[pid], vendor, rng, train=size["train"], held_out=size["held_out"])
    seconds = scenario.simulate(plan)
    rt, model = scenario.final_model(plan)
    held = scenario.held_out(rt)
    ctx = rt.context()
    base = rt.model_factory()()  # the adapters' B starts at zero: the base model itself
    figures = {
        "vendors": dict(zip(sorted(plan.sites), VENDORS, strict=True)),
        "base": pooled(base, held, ctx),
        "final": pooled(model, held, ctx),
        "exchanged_values": rt.spec.size,
        "base_parameters": sum(v.numel() for k, v in base.state_dict().items() if "lora_" not in k),
    }
    scenario.report(plan, figures, seconds)


if __name__ == "__main__":
    main()
