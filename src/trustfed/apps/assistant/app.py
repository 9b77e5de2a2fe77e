"""The assistant app: LoRA fine-tuning of a causal LM on each vendor's own chats and tool calls.

``[app.config]``: ``base`` (a ``save_pretrained`` folder: safetensors weights and the tokenizer),
``rank`` (8), ``alpha`` (16), ``frozen_a`` (true: FFA-LoRA, A frozen at its seeded initial value
on every participant, so averaging B is exactly averaging the low-rank products B A; only B
travels), ``length`` (48 tokens), ``generate`` (how many held-out tool calls to generate per
evaluation, 16).

The base folder's tokenizer is trustfed's own (the tiny model's) or any Hugging Face fast tokenizer
with a chat template (``trustfed.apps.assistant.hf_chat``): the template renders the chats and only
the assistant's turns are trained on.

Each vendor's ``[data] path`` holds its chats (``{"messages": [{"role", "content"}, ...]}``) as
``train.jsonl`` and ``eval.jsonl`` (one chat a line), or as Hugging Face datasets saved with
``save_to_disk``: folders ``train`` and ``eval``, or one saved ``DatasetDict`` with those splits. Evaluation: held-out loss and perplexity over the assistant's replies,
and for the tool-call chats, the exact-match and schema-valid rates of greedily generated calls.

With ``[privacy] mode = "local"`` the app trains with DP-SGD on the adapters (:func:`example_loss`:
one loss per chat, the mean over its reply tokens; trustfed's loop with ``[training]``'s optimiser
replaces :func:`train`), see :mod:`trustfed.apps.private`.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trustfed.app import App, AppContext, DataSpec, LocalData, TrainContext, TrainData
from trustfed.apps.assistant.corpus import parse_call, schema_valid
from trustfed.apps.assistant.model import ChatEncoder, batch_of, load_base, load_tokenizer
from trustfed.data.loaders import load_hf_dataset, load_jsonl
from trustfed.errors import AppError

ADAPTER_MARK = "lora_"


def _base(ctx: AppContext) -> Path:
    base = ctx.config.get("base")
    if not base:
        raise AppError("the assistant app needs [app.config] base = the folder of a save_pretrained base model")
    return Path(str(base))


def model(ctx: AppContext) -> nn.Module:
    """The base model with LoRA adapters on the attention projections (``[app.config] targets``)."""
    from peft import LoraConfig, get_peft_model

    base = load_base(_base(ctx))
    cfg = LoraConfig(
        r=int(ctx.config.get("rank", 8)),
        lora_alpha=int(ctx.config.get("alpha", 16)),
        target_modules=list(ctx.config.get("targets", ["q_proj", "k_proj", "v_proj", "o_proj"])),
        lora_dropout=0.0,
        bias="none",
    )
    with warnings.catch_warnings():  # peft asks transformers 5 for a renamed attribute
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model: nn.Module = get_peft_model(base, cfg)
    if bool(ctx.config.get("frozen_a", True)):
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return peft_model


def exchange(m: nn.Module) -> dict[str, torch.Tensor]:
    """What travels: the adapters' trainable tensors (B only when A is frozen), never the base model."""
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    return {k: v for k, v in m.state_dict().items() if ADAPTER_MARK in k and k in trainable}


class Chats(TensorDataset):
    """Tokenized chats (``input_ids``, ``labels``, ``attention_mask``) and the raw records."""

    def __init__(self, records: list[dict[str, Any]], tok: ChatEncoder, length: int) -> None:
        self.records = records
        ids, labels, mask = batch_of([tok.chat(r["messages"]) for r in records], length, tok.pad_id)
        super().__init__(ids, labels, mask)


def _check_chats(records: list[dict[str, Any]], source: Path) -> list[dict[str, Any]]:
    for i, r in enumerate(records, 1):
        msgs = r.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise AppError(f"{source}: chat {i}: 'messages' must be a non-empty list")
        for j, m in enumerate(msgs, 1):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise AppError(f"{source}: chat {i}, message {j}: expected {{'role': str, 'content': str}}")
    return records


def _split(folder: Path, name: str) -> tuple[list[dict[str, Any]], list[Path]]:
    """One split's chats: ``NAME.jsonl``, a saved dataset folder ``NAME``, or split ``NAME`` of a saved DatasetDict."""
    jsonl = folder / f"{name}.jsonl"
    if jsonl.is_file():
        return _check_chats(load_jsonl(jsonl, required=["messages"]), jsonl), [jsonl]
    if (folder / name).is_dir():
        where, split = folder / name, None
    elif (folder / "dataset_dict.json").is_file():
        where, split = folder, name
    else:
        raise AppError(f"{folder}: no {name}.jsonl, no saved dataset folder {name!r} and no saved DatasetDict")
    ds = load_hf_dataset(where, split=split).with_format(None)
    if "messages" not in ds.column_names:
        raise AppError(f"{where}: no 'messages' column (it has {', '.join(ds.column_names)})")
    files = sorted(p for p in where.rglob("*") if p.is_file())
    return _check_chats([dict(r) for r in ds], where), files


def data(spec: DataSpec, ctx: AppContext) -> LocalData:
    folder = spec.require_path()
    tok = load_tokenizer(_base(ctx))
    length = int(ctx.config.get("length", 48))
    (train, train_files), (held_out, eval_files) = _split(folder, "train"), _split(folder, "eval")
    files = list(dict.fromkeys([*train_files, *eval_files]))
    return LocalData(train=Chats(train, tok, length), eval=Chats(held_out, tok, length), files=files)


def train(m: nn.Module, d: TrainData, ctx: TrainContext) -> dict[str, float]:
    """AdamW on the adapters over the replies' tokens, ``local_epochs`` epochs."""
    if not isinstance(d, Chats):
        raise AppError("the assistant app trains on its own Chats data")
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ctx.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(ctx.seed)
    total, seen = 0.0, 0
    m.train()
    for _ in range(ctx.epochs):
        for ids, labels, mask in DataLoader(d, batch_size=ctx.batch_size, shuffle=True, generator=gen):
            loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(ids)
            seen += len(ids)
    return {"train_loss": total / max(seen, 1)}


def token_nll(m: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's negative log-likelihood of the next token ``[B, T-1]`` and where it counts
    (a reply token: its label is not -100)."""
    ids, labels, mask = batch
    logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll.masked_fill(~keep, 0.0), keep


def example_loss(m: nn.Module, batch: Any) -> torch.Tensor:
    """One loss per chat (DP-SGD clips each chat's gradient): the mean negative log-likelihood of its
    reply tokens, so a chat weighs the same whatever its length (0 for a chat with no reply token)."""
    nll, keep = token_nll(m, batch)
    return nll.sum(1) / keep.sum(1).clamp(min=1)


@torch.no_grad()
def reply_loss(m: nn.Module, d: Chats) -> tuple[float, int]:
    """Mean negative log-likelihood per reply token, and the token count."""
    m.eval()
    nll, tokens = 0.0, 0
    for batch in DataLoader(d, batch_size=64):
        got, keep = token_nll(m, batch)
        nll += float(got.sum())
        tokens += int(keep.sum())
    return nll / max(tokens, 1), tokens


@torch.no_grad()
def generate(m: nn.Module, tok: ChatEncoder, messages: list[dict[str, str]], max_new: int = 40) -> str:
    """Greedy decoding of the assistant's reply to ``messages`` (the conversation before the reply)."""
    ids, _ = tok.chat(messages, reply=False)
    x = torch.tensor([ids])
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(m(input_ids=x).logits[0, -1].argmax())
        if nxt in tok.stop_ids:
            break
        out.append(nxt)
        x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out)


def final_reply(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str] | None:
    """The conversation before its last assistant turn, and that turn's content (None: no assistant turn)."""
    at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return (messages[: at[-1]], messages[at[-1]]["content"]) if at else None


def tool_scores(m: nn.Module, d: Chats, tok: ChatEncoder, limit: int) -> dict[str, float]:
    """Over the held-out chats whose last reply is a tool call: the rates of generated calls equal to it
    and of calls valid against the tools' schema."""
    turns = [t for t in map(final_reply, (r["messages"] for r in d.records)) if t is not None]
    calls = [(prompt, call) for prompt, reply in turns if (call := parse_call(reply)) is not None][:limit]
    if not calls:
        return {}
    exact = valid = 0
    for prompt, call in calls:
        got = parse_call(generate(m, tok, prompt))
        exact += int(got == call)
        valid += int(schema_valid(got))
    return {"tool_exact_match": exact / len(calls), "tool_schema_valid": valid / len(calls)}


def evaluate(m: nn.Module, d: TrainData, ctx: AppContext) -> dict[str, float]:
    if not isinstance(d, Chats):
        raise AppError("the assistant app evaluates on its own Chats data")
    loss, _ = reply_loss(m, d)
    scores = {"loss": loss, "perplexity": math.exp(loss), "num_examples": float(len(d))}
    tok = load_tokenizer(_base(ctx))
    scores.update(tool_scores(m, d, tok, int(ctx.config.get("generate", 16))))
    return scores


app = App(model=model, data=data, train=train, evaluate=evaluate, exchange=exchange, example_loss=example_loss)
