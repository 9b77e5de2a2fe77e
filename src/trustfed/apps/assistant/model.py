"""The assistant's tokenizer and tiny causal LM: built from config, briefly pre-trained on generated
text, saved with ``save_pretrained`` (safetensors) and loaded back the way a real model is.

The tokenizer is character-level with chat markers: ``<user>`` the request, ``<assistant>`` the
reply, ``<eos>``. Its vocabulary is saved beside the model (``trustfed_tokenizer.json``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trustfed.apps.assistant.corpus import VENDORS, generic_text, vendor_records
from trustfed.errors import AppError

TOKENIZER_FILE = "trustfed_tokenizer.json"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<user>", "<assistant>")
PAD, BOS, EOS, USER, ASSISTANT = range(len(SPECIALS))


@dataclass(frozen=True)
class CharTokenizer:
    """Printable ASCII characters after the special tokens; anything else becomes ``?``."""

    chars: str = "".join(chr(c) for c in range(32, 127))

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        index = {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}
        fallback = index["?"]
        return [index.get(c, fallback) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - len(SPECIALS)] for i in ids if i >= len(SPECIALS))

    def chat(self, messages: Sequence[dict[str, str]], *, reply: bool = True) -> tuple[list[int], list[int]]:
        """The chat template: token ids and labels (-100 except on the assistant's reply and its
        ``<eos>``). ``reply=False``: the prompt only, ending in ``<assistant>`` (for generation)."""
        ids, labels = [BOS], [-100]
        for m in messages:
            if m["role"] == "user":
                part = [USER, *self.encode(m["content"])]
                ids += part
                labels += [-100] * len(part)
            elif m["role"] == "assistant":
                ids.append(ASSISTANT)
                labels.append(-100)
                if reply:
                    part = [*self.encode(m["content"]), EOS]
                    ids += part
                    labels += part
        if not reply:
            ids.append(ASSISTANT)
            labels.append(-100)
        return ids, labels

    def save(self, folder: Path) -> None:
        (folder / TOKENIZER_FILE).write_text(json.dumps({"specials": SPECIALS, "chars": self.chars}), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> CharTokenizer:
        try:
            raw = json.loads((folder / TOKENIZER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AppError(f"{folder / TOKENIZER_FILE}: not a trustfed tokenizer ({exc})") from None
        if list(raw.get("specials", [])) != list(SPECIALS) or not isinstance(raw.get("chars"), str):
            raise AppError(f"{folder / TOKENIZER_FILE}: unexpected tokenizer layout")
        return cls(raw["chars"])


def tiny_config(vocab_size: int, hidden: int = 128, layers: int = 3) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def batch_of(
    rows: Sequence[tuple[list[int], list[int]]], length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``labels`` and ``attention_mask`` of shape ``[n, length]``."""
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        n = min(len(x), length)
        ids[i, :n] = torch.tensor(x[:n])
        labels[i, :n] = torch.tensor(y[:n])
        mask[i, :n] = 1
    return ids, labels, mask


def pretrain_base(
    folder: Path, *, seed: int = 0, steps: int = 300, length: int = 64, hidden: int = 128, layers: int = 3
) -> Path:
    """Build the tiny LM from config, pre-train it on generic text and small talk (no tool calls),
    and save it with ``save_pretrained`` (safetensors) and the tokenizer into ``folder``."""
    from transformers import LlamaForCausalLM

    tok = CharTokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tok.vocab_size, hidden, layers))
    rng = np.random.default_rng(seed)
    rows = [([BOS, *tok.encode(t), EOS], [-100, *tok.encode(t), EOS]) for t in generic_text(rng, 400)]
    talk = [r for v in VENDORS for r in vendor_records(rng, v, 60, tool_share=0.0)]
    rows += [tok.chat(r["messages"]) for r in talk]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(rows), (16,), generator=gen).tolist()
        ids, labels, mask = batch_of([rows[i] for i in pick], length)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save(folder)
    return folder


def load_base(folder: Path) -> tuple[nn.Module, CharTokenizer]:
    """The base model and tokenizer from a ``save_pretrained`` folder: safetensors only, never pickle."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if not (folder / "model.safetensors").is_file():
        raise AppError(f"{folder}: no model.safetensors (a save_pretrained folder with safetensors weights is needed)")
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    return model, CharTokenizer.load(folder)
