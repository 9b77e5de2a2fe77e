"""The assistant template's own parts: its settings, each vendor's chats and the base model.

Nothing is downloaded: ``trustfed new`` pre-trains a tiny LLaMA-style base model on generated text
(:func:`trustfed.apps.assistant.model.pretrain_base`) and saves it with ``save_pretrained``
(safetensors only) and its tokenizer into the project's ``base/``, as ``[app.config] base`` names it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from trustfed.apps.assistant.corpus import VENDORS, write_vendor_data
from trustfed.errors import ConfigProblem

#: Pre-training steps of the base model ``trustfed new`` writes (hidden 64, 2 layers).
BASE_STEPS = 150
BASE_SIZE = {"hidden": 64, "layers": 2}

APP_CONFIG = """base = "base"                          # the base model (save_pretrained, safetensors), relative to this folder
rank = 8                               # LoRA rank and scaling
alpha = 16
targets = ["q_proj", "v_proj"]         # the attention projections that get adapters
frozen_a = true                        # FFA-LoRA: A stays at its seeded value, only B travels
length = 64                            # tokens per chat
generate = 8                           # tool calls generated per evaluation (0: perplexity only)"""

TRAINING = """[training]                             # the app's own train function: AdamW on the adapters
local_epochs = 3
batch_size = 8
lr = 0.05
optimizer = "adamw"                    # DP-SGD's optimiser when [privacy] mode = "local"
evaluate_every = 1                     # each vendor scores the global adapters on its held-out chats"""

PRIVACY = """
# DP-SGD on the adapters (uncomment): each chat's gradient clipped, Gaussian noise, and each vendor
# refuses a round that would take it past its own budget (trustfed privacy report RUN shows the spend).
# [privacy]
# mode = "local"
# noise_multiplier = 1.0
# max_grad_norm = 1.0
# ([training] batch_size / a vendor's training chats is the sampling rate: under DP a larger batch, such
# as 32, learns better, since the noise is divided by the expected batch size)
# budget_epsilon = 30.0
# [privacy.budgets.p001]
# epsilon = 20.0
"""

README = f"""- `base/`: the base language model, pre-trained by `trustfed new` on generated text ({BASE_STEPS} steps, hidden
  {BASE_SIZE["hidden"]}, {BASE_SIZE["layers"]} layers; seconds on a laptop) and saved with `save_pretrained`
  (safetensors) and trustfed's tokenizer file. It knows plain sentences and JSON records but has never seen a
  tool call: the vendors' LoRA adapters teach the calls. Every site needs the same `base/`. To pre-train a larger
  one in its place: `python -c "from pathlib import Path; from trustfed.apps.assistant.model import pretrain_base;
  pretrain_base(Path('base'), steps=400, hidden=128, layers=3)"`.
- Each vendor's `data/` holds `train.jsonl` and `eval.jsonl`: one chat a line, a tool call being the
  assistant's reply as JSON. Vendors serve travel, home and media requests, each calling its own tools most.
- Only the adapters (LoRA's B) travel. `federation.toml` shows how to turn on DP-SGD on the adapters with a
  budget per vendor (`[privacy] mode = "local"`).
"""


def missing_extras() -> list[ConfigProblem]:
    """The assistant template needs transformers and peft (the ``llm`` extra) to build its base model."""
    missing = [m for m in ("transformers", "peft", "safetensors") if importlib.util.find_spec(m) is None]
    if not missing:
        return []
    return [ConfigProblem("--template", "needs pip install 'trustfed[llm]'", f"assistant: no {', '.join(missing)}")]


def write_chats(folder: Path, rng: np.random.Generator, site: int, scale: int) -> None:
    """Site ``site``'s chats: the vendors take turns (travel, home, media, travel, …)."""
    vendor = list(VENDORS)[site % len(VENDORS)]
    write_vendor_data(folder, vendor, rng, train=120 * scale, held_out=40 * scale)


def write_base(folder: Path, seed: int, steps: int | None = None) -> Path:
    """Pre-train the tiny base model and save it (safetensors) with its tokenizer into ``folder``."""
    from transformers.utils import logging as hf_logging

    from trustfed.apps.assistant.model import pretrain_base

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    return pretrain_base(folder, seed=seed, steps=BASE_STEPS if steps is None else steps, **BASE_SIZE)
