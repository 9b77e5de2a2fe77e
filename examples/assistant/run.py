"""The assistant example end to end: ``python examples/assistant/run.py [--small] [--out DIR]``.

Pre-trains the tiny base model (``trustfed.apps.assistant.model.pretrain_base``: generic text and
small talk, no tool calls; saved with safetensors into ``[app.config] base``), writes each vendor's
chats (``trustfed.apps.assistant.corpus``), runs the federation through ``trustfed simulate`` (DP-SGD
on the adapters in every vendor, the embedded ledger), then reports: the base model and the final
adapters scored on every vendor's held-out chats (perplexity of the replies, the exact-match and
schema-valid rates of generated tool calls), the vendors' federated evaluation round by round, each
vendor's privacy spend (epsilon at the federation's delta, recomputed from the recorded mechanisms)
and the audit verdict (``trustfed audit verify`` on the run folder). Needs trustfed[llm].
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

import json  # noqa: E402
import math  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scenario  # noqa: E402

from trustfed.apps.assistant.app import evaluate  # noqa: E402
from trustfed.apps.assistant.corpus import VENDORS, write_vendor_data  # noqa: E402
from trustfed.apps.assistant.model import pretrain_base  # noqa: E402
from trustfed.ledger.verify import verify_run  # noqa: E402
from trustfed.privacy.report import load_records, summarize  # noqa: E402

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


def per_round(metrics: dict[str, Any]) -> list[dict[str, float]]:
    """The vendors' federated evaluation of each round's model (example-weighted over the vendors)."""
    keys = ("perplexity", "tool_exact_match", "tool_schema_valid")
    rows = []
    for r in metrics["rounds"]:
        fed = r.get("federated_evaluation")
        if fed:
            rows.append({"model_round": fed["model_round"], **{k: round(fed[k], 4) for k in keys if k in fed}})
    return rows


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
    audit = verify_run(plan.out)
    figures = {
        "vendors": dict(zip(sorted(plan.sites), VENDORS, strict=True)),
        "base": pooled(base, held, ctx),
        "final": pooled(model, held, ctx),
        "per_round": per_round(json.loads((plan.out / "metrics.json").read_text(encoding="utf-8"))),
        "privacy": {
            s.party: {"epsilon": round(s.epsilon, 3), "delta": s.delta, "rounds": len(s.rounds), "verified": s.verified}
            for s in summarize(load_records(plan.out))
        },
        "audit": {"verdict": "VERIFIED" if audit.ok else "FAILED", "checks": sum(audit.checked.values())},
        "exchanged_values": rt.spec.size,
        "base_parameters": sum(v.numel() for k, v in base.state_dict().items() if "lora_" not in k),
    }
    scenario.report(plan, figures, seconds)


if __name__ == "__main__":
    main()
