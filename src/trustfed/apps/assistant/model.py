"""The assistant's tokenizer and tiny causal LM: built from config, briefly pre-trained on generated
text, saved with ``save_pretrained`` (safetensors) and loaded back the way a real model is.

The tokenizer has chat markers (``<user>`` the request, ``<assistant>`` the reply, ``<eos>``),
every printable ASCII character, and whole pieces learnt from the base model's text (its words and
its JSON punctuation, as a BPE vocabulary holds whole words): the longest piece wins, a character
covers the rest, so any text encodes. Its vocabulary is saved beside the model
(``trustfed_tokenizer.json``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from trustfed.apps.assistant.corpus import VENDORS, base_text, extraction_records, vendor_records
from trustfed.errors import AppError

TOKENIZER_FILE = "trustfed_tokenizer.json"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<user>", "<assistant>")
PAD, BOS, EOS, USER, ASSISTANT = range(len(SPECIALS))
_RUNS = re.compile(r"[a-z]+|[^a-z0-9\s]+")


@dataclass(frozen=True)
class ChatTokenizer:
    """Special tokens, then printable ASCII characters (anything else becomes ``?``), then pieces."""

    chars: str = "".join(chr(c) for c in range(32, 127))
    pieces: tuple[str, ...] = ()

    @classmethod
    def learn(cls, texts: Iterable[str], min_count: int = 2) -> ChatTokenizer:
        """Pieces: every run of letters or of punctuation (two characters or more) seen ``min_count`` times."""
        counts = Counter(run for t in texts for run in _RUNS.findall(t) if len(run) > 1)
        return cls(pieces=tuple(sorted(p for p, c in counts.items() if c >= min_count)))

    pad_id = PAD
    stop_ids = frozenset({EOS, ASSISTANT})

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.chars) + len(self.pieces)

    @cached_property
    def _index(self) -> dict[str, int]:
        chars = {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}
        start = len(SPECIALS) + len(self.chars)
        return chars | {p: start + i for i, p in enumerate(self.pieces)}

    @cached_property
    def _by_first(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in sorted(self.pieces, key=len, reverse=True):
            out.setdefault(p[0], []).append(p)
        return out

    def encode(self, text: str) -> list[int]:
        index, fallback = self._index, self._index["?"]
        out, i = [], 0
        while i < len(text):
            piece = next((p for p in self._by_first.get(text[i], ()) if text.startswith(p, i)), text[i])
            out.append(index.get(piece, fallback))
            i += len(piece)
        return out

    @cached_property
    def _vocab(self) -> list[str]:
        return [*SPECIALS, *self.chars, *self.pieces]

    def decode(self, ids: Sequence[int]) -> str:
        vocab = self._vocab
        return "".join(vocab[i] for i in ids if len(SPECIALS) <= i < len(vocab))

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
        raw = {"specials": SPECIALS, "chars": self.chars, "pieces": self.pieces}
        (folder / TOKENIZER_FILE).write_text(json.dumps(raw), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> ChatTokenizer:
        try:
            raw = json.loads((folder / TOKENIZER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AppError(f"{folder / TOKENIZER_FILE}: not a trustfed tokenizer ({exc})") from None
        pieces = raw.get("pieces", [])
        if (
            list(raw.get("specials", [])) != list(SPECIALS)
            or not isinstance(raw.get("chars"), str)
            or not isinstance(pieces, list)
            or not all(isinstance(p, str) and p for p in pieces)
        ):
            raise AppError(f"{folder / TOKENIZER_FILE}: unexpected tokenizer layout")
        return cls(raw["chars"], tuple(pieces))


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
    rows: Sequence[tuple[list[int], list[int]]], length: int, pad: int = PAD
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``labels`` and ``attention_mask`` of shape ``[n, length]``."""
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        n = min(len(x), length)
        ids[i, :n] = torch.tensor(x[:n])
        labels[i, :n] = torch.tensor(y[:n])
        mask[i, :n] = 1
    return ids, labels, mask


def pretrain_base(
    folder: Path, *, seed: int = 0, steps: int = 400, length: int = 48, hidden: int = 128, layers: int = 3
) -> Path:
    """Build the tiny LM from config, pre-train it on plain text, small talk and JSON records of
    sentences (no tool calls), and save it with ``save_pretrained`` (safetensors) and its tokenizer
    (learnt from the same text) into ``folder``."""
    from transformers import LlamaForCausalLM

    rng = np.random.default_rng(seed)
    text = base_text(rng, 300)
    chats = [r for v in VENDORS for r in vendor_records(rng, v, 60, tool_share=0.0)] + extraction_records(rng, 1000)
    tok = ChatTokenizer.learn([*text, *(m["content"] for r in chats for m in r["messages"])])
    rows = [([BOS, *tok.encode(t), EOS], [-100, *tok.encode(t), EOS]) for t in text]
    rows += [tok.chat(r["messages"]) for r in chats]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tok.vocab_size, hidden, layers))
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


def load_base(folder: Path) -> nn.Module:
    """The base model from a ``save_pretrained`` folder: safetensors only, never pickle. The folder must
    hold a tokenizer too (checked here, loaded by :func:`load_tokenizer` where chats are encoded)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise AppError(f"{folder}: no model.safetensors (a save_pretrained folder with safetensors weights is needed)")
    tokenizer_kind(folder)
    try:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise AppError(f"{folder}: cannot load the model: {exc}") from None
    return model


class ChatEncoder(Protocol):
    """What the assistant app needs of a tokenizer: a chat template with labels, decoding, padding, stops."""

    pad_id: int

    @property
    def stop_ids(self) -> frozenset[int]: ...

    def chat(self, messages: Sequence[dict[str, str]], *, reply: bool = True) -> tuple[list[int], list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def tokenizer_kind(folder: Path) -> str:
    """Which tokenizer the folder holds: ``"trustfed"`` (the tiny model's ``trustfed_tokenizer.json``) or
    ``"hugging_face"`` (``tokenizer.json`` / ``tokenizer_config.json``)."""
    if (folder / TOKENIZER_FILE).is_file():
        return "trustfed"
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        return "hugging_face"
    raise AppError(f"{folder}: no tokenizer ({TOKENIZER_FILE}, or a Hugging Face tokenizer.json with a chat template)")


def load_tokenizer(folder: Path) -> ChatEncoder:
    """trustfed's own tokenizer or the folder's Hugging Face tokenizer with its chat template."""
    if tokenizer_kind(folder) == "trustfed":
        return ChatTokenizer.load(folder)
    from trustfed.apps.assistant.hf_chat import load_hf_chat_tokenizer

    return load_hf_chat_tokenizer(folder)
