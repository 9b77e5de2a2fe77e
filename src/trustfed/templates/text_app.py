"""A text federation app: each assistant vendor trains one intent classifier on its own requests.

Each vendor's ``[data] path`` holds ``train.jsonl`` and ``eval.jsonl``: one JSON object a line,
``{"text": "...", "intent": "..."}``. Words are hashed into a fixed vocabulary (``[app.config]
vocab``), so vendors need no shared tokenizer file.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from trustfed.app import App, AppContext, DataSpec, LocalData
from trustfed.data.loaders import load_jsonl
from trustfed.errors import DataError

INTENTS = ["weather", "music", "travel", "reminder"]


class BagOfWords(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab + 1, dim, mode="mean", padding_idx=0)
        self.head = nn.Linear(dim, len(INTENTS))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.embed(tokens))
        return out


def model(ctx: AppContext) -> nn.Module:
    return BagOfWords(int(ctx.config.get("vocab", 4096)), int(ctx.config.get("dim", 32)))


def encode(text: str, vocab: int, length: int) -> list[int]:
    """Word ids in 1..vocab (CRC-32 of the word: the same in every process), padded with 0."""
    ids = [zlib.crc32(w.encode()) % vocab + 1 for w in text.lower().split()][:length]
    return ids + [0] * (length - len(ids))


def _read(path: Path, ctx: AppContext) -> TensorDataset:
    vocab, length = int(ctx.config.get("vocab", 4096)), int(ctx.config.get("length", 16))
    rows = load_jsonl(path, required=["text", "intent"])
    labels = []
    for i, row in enumerate(rows, start=1):
        if row["intent"] not in INTENTS:
            raise DataError(f"{path}: record {i}: unknown intent {row['intent']!r}; expected one of {INTENTS}")
        labels.append(INTENTS.index(row["intent"]))
    tokens = torch.tensor([encode(str(r["text"]), vocab, length) for r in rows], dtype=torch.long)
    return TensorDataset(tokens, torch.tensor(labels, dtype=torch.long))


def data(spec: DataSpec, ctx: AppContext) -> LocalData:
    folder = spec.require_path()
    files = [folder / "train.jsonl", folder / "eval.jsonl"]
    return LocalData(train=_read(files[0], ctx), eval=_read(files[1], ctx), files=files)


app = App(model=model, data=data)
