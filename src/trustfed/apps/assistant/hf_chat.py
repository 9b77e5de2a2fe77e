"""Chats through a Hugging Face tokenizer's own chat template, for any causal LM saved with
``save_pretrained`` (a ``tokenizer.json`` / ``tokenizer_config.json`` with a ``chat_template``).

The labels are the assistant's turns as the template renders them (their content and the template's
end-of-turn marker), found by rendering the conversation up to each assistant turn: the characters
the turn adds are labelled, through the fast tokenizer's offsets. Everything else (system and user
turns, the template's headers) is ``-100``. A template that does not render a conversation's prefix
as a prefix of the whole is refused, naming the folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from trustfed.errors import AppError


class HFChatTokenizer:
    """The assistant app's tokenizer seam (``chat``, ``decode``, ``pad_id``, ``stop_ids``) over a
    Hugging Face fast tokenizer."""

    def __init__(self, tok: Any, folder: Path) -> None:
        self.tok = tok
        self.folder = folder
        if not getattr(tok, "chat_template", None):
            raise AppError(f"{folder}: the tokenizer has no chat_template (set one in tokenizer_config.json)")
        if not getattr(tok, "is_fast", False):
            raise AppError(f"{folder}: a fast tokenizer (tokenizer.json) is needed to find the assistant's tokens")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise AppError(f"{folder}: the tokenizer names neither a pad nor an eos token")
        self.pad_id = int(pad)

    def _render(self, messages: Sequence[dict[str, str]], *, prompt: bool) -> str:
        text = self.tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=prompt)
        if not isinstance(text, str):
            raise AppError(f"{self.folder}: the chat template did not render text")
        return text

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]

    def chat(self, messages: Sequence[dict[str, str]], *, reply: bool = True) -> tuple[list[int], list[int]]:
        """Token ids and labels (the assistant turns' tokens, else -100). ``reply=False``: the prompt
        only (the messages before the last assistant turn), ending in the template's generation prompt."""
        if not reply:
            turns = list(messages)
            while turns and turns[-1]["role"] == "assistant":
                turns.pop()
            ids, _ = self._encode(self._render(turns, prompt=True))
            return ids, [-100] * len(ids)
        full = self._render(messages, prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], prompt=True) if i else ""
            upto = self._render(messages[: i + 1], prompt=False)
            if not (full.startswith(upto) and upto.startswith(before)):
                raise AppError(
                    f"{self.folder}: the chat template does not render a conversation's start as the start of the "
                    "whole, so the assistant's tokens cannot be found"
                )
            spans.append((len(before), len(upto)))
        ids, offsets = self._encode(full)
        labels = [
            t if any(s < b and a < e for s, e in spans) and b > a else -100
            for t, (a, b) in zip(ids, offsets, strict=True)
        ]
        return ids, labels

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))

    @cached_property
    def stop_ids(self) -> frozenset[int]:
        """The eos token and the special tokens the template closes an assistant turn with."""
        probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
        ids, labels = self.chat(probe)
        special = set(self.tok.all_special_ids)
        closing = {t for t, y in zip(ids, labels, strict=True) if y != -100 and t in special}
        return frozenset(closing | ({int(self.tok.eos_token_id)} if self.tok.eos_token_id is not None else set()))


def load_hf_chat_tokenizer(folder: Path) -> HFChatTokenizer:
    """The folder's own tokenizer (local files only; no remote code)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise AppError(f"{folder}: cannot load its Hugging Face tokenizer: {exc}") from None
    return HFChatTokenizer(tok, folder)
