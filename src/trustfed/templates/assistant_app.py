"""An assistant federation app: each vendor fine-tunes LoRA adapters of one base language model on
its own chats and tool calls; only the adapters travel.

The model, data loader, training, evaluation and per-example loss are trustfed's built-in assistant
app (``trustfed.apps.assistant.app``, extra ``trustfed[llm]``: transformers, peft, safetensors);
replace any of them here. Each vendor's ``[data] path`` holds ``train.jsonl`` and ``eval.jsonl``, one
chat a line: ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``, a tool call being
the assistant's content as JSON (``{"tool": ..., "arguments": {...}}``). ``[app.config] base`` is a
``save_pretrained`` folder (safetensors weights and trustfed's tokenizer file), relative to the
project folder; ``trustfed new`` pre-trained a tiny one there.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from trustfed.app import App, AppContext, DataSpec, LocalData, TrainData
from trustfed.apps.assistant import app as assistant

PROJECT = Path(__file__).resolve().parents[1]


def _here(ctx: AppContext) -> AppContext:
    """``[app.config] base`` resolved against the project folder, whatever folder the process runs in."""
    base = Path(str(ctx.config.get("base", "base")))
    return replace(ctx, config={**ctx.config, "base": str(base if base.is_absolute() else PROJECT / base)})


def model(ctx: AppContext) -> nn.Module:
    """The base model with LoRA adapters (``rank``, ``alpha``, ``targets``; ``frozen_a``: only B travels)."""
    return assistant.model(_here(ctx))


def data(spec: DataSpec, ctx: AppContext) -> LocalData:
    """This vendor's ``train.jsonl`` and held-out ``eval.jsonl``, tokenized with the base model's tokenizer."""
    return assistant.data(spec, _here(ctx))


def evaluate(m: nn.Module, d: TrainData, ctx: AppContext) -> dict[str, float]:
    """Reply loss and perplexity; exact-match and schema-valid rates of ``generate`` generated tool calls."""
    return assistant.evaluate(m, d, _here(ctx))


app = App(
    model=model,
    data=data,
    train=assistant.train,  # AdamW on the adapters (DP-SGD replaces it under [privacy] mode = "local")
    evaluate=evaluate,
    exchange=assistant.exchange,  # what travels: the adapters' trainable tensors
    example_loss=assistant.example_loss,  # one loss per chat: what DP-SGD clips
)
