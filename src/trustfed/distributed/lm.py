"""A small decoder-only transformer and an assistant-style text task generated offline.

The task is templated question/answer dialogues (arithmetic, capitals, spelling, reversing,
counting, colours) drawn from a seeded ``random.Random``: the same seed gives the same text on
every machine, and nothing is downloaded. Text is encoded at character level with a fixed
vocabulary, so the model's parameter spec does not depend on the data.

:class:`TinyLM` is the reference model for tensor and pipeline parallelism. Its attention
projections and MLP are separate ``nn.Linear`` layers (column / row parallel under DTensor),
attention infers the local head count from its input (so a tensor-parallel shard runs the same
code), and any of its parts may be ``None`` so that a pipeline stage is the same class holding
only its own layers under their original names.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trustfed.errors import TrustFedError

VOCAB = "\n" + string.ascii_letters + string.digits + " .,?!:;'-+=()"
_INDEX = {c: i for i, c in enumerate(VOCAB)}

_CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Norway": "Oslo",
    "Chile": "Santiago",
}
_WORDS = ["cat", "model", "river", "ledger", "garden", "signal", "orange", "planet", "window", "trust"]
_COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}


def _dialogue(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randrange(50), rng.randrange(50)
        q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    elif kind == 1:
        country = rng.choice(sorted(_CAPITALS))
        q, ans = f"What is the capital of {country}?", f"The capital of {country} is {_CAPITALS[country]}."
    elif kind == 2:
        w = rng.choice(_WORDS)
        q, ans = f"Please spell {w}.", "-".join(w) + "."
    elif kind == 3:
        w = rng.choice(_WORDS)
        q, ans = f"Reverse the word {w}.", f"Reversed, {w} is {w[::-1]}."
    elif kind == 4:
        n = rng.randrange(1, 8)
        q, ans = f"Count to {n}.", ", ".join(str(i) for i in range(1, n + 1)) + "."
    else:
        thing = rng.choice(sorted(_COLOURS))
        q, ans = f"What colour is {thing}?", f"Usually {thing} is {_COLOURS[thing]}."
    return f"User: {q}\nAssistant: {ans}\n"


def assistant_corpus(dialogues: int, seed: int) -> str:
    """``dialogues`` templated user/assistant exchanges, the same for the same seed."""
    if dialogues < 1:
        raise TrustFedError(f"assistant corpus needs at least 1 dialogue, got {dialogues}")
    rng = random.Random(f"trustfed-assistant:{seed}")
    return "".join(_dialogue(rng) for _ in range(dialogues))


def encode(text: str) -> torch.Tensor:
    try:
        return torch.tensor([_INDEX[c] for c in text], dtype=torch.long)
    except KeyError as exc:
        raise TrustFedError(f"character {exc.args[0]!r} is not in the model's vocabulary") from None


def decode(ids: torch.Tensor) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


def lm_batch(
    tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of training step ``step``: random windows, a pure function of (seed, step).

    Being a function of the step alone, a resumed run sees exactly the batches the
    uninterrupted run would have seen.
    """
    n = tokens.numel() - seq_len - 1
    if n <= 0:
        raise TrustFedError(f"corpus of {tokens.numel()} tokens is shorter than seq_len + 1 = {seq_len + 1}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, n, (batch_size,), generator=gen)
    offs = torch.arange(seq_len + 1)
    win = tokens[starts[:, None] + offs[None, :]]
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


@dataclass(frozen=True)
class LMShape:
    vocab: int = len(VOCAB)
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    seq_len: int = 64


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise TrustFedError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.head_dim = d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism q/k/v hold only this rank's heads.
        q = self.q(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: torch.Tensor = self.o(y.transpose(1, 2).reshape(b, t, -1))
        return out


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(F.gelu(self.fc1(x)))
        return out


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


class TinyLM(nn.Module):
    """Decoder-only transformer: token + learned position embeddings, pre-norm blocks, a linear head."""

    def __init__(self, shape: LMShape) -> None:
        super().__init__()
        self.shape = shape
        self.tok_emb: nn.Embedding | None = nn.Embedding(shape.vocab, shape.d_model)
        self.pos_emb: nn.Embedding | None = nn.Embedding(shape.seq_len, shape.d_model)
        self.layers = nn.ModuleDict(
            {str(i): Block(shape.d_model, shape.n_heads, shape.d_ff) for i in range(shape.n_layers)}
        )
        self.norm: nn.LayerNorm | None = nn.LayerNorm(shape.d_model)
        self.head: nn.Linear | None = nn.Linear(shape.d_model, shape.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.tok_emb is not None and self.pos_emb is not None:
            pos = torch.arange(x.shape[1], device=x.device)
            h = self.tok_emb(x) + self.pos_emb(pos)[None]
        for layer in self.layers.values():
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        if self.head is not None:
            h = self.head(h)
        return h


def build_lm(shape: LMShape, seed: int) -> TinyLM:
    """A TinyLM with deterministic initial weights (the same in every process)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyLM(shape)


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
