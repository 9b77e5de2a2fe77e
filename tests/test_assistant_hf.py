"""The assistant app on a Hugging Face model folder as a user brings one: a fast tokenizer with its own
chat template (``tokenizer.json``), safetensors weights, and chats as Hugging Face datasets saved with
``save_to_disk``. Everything is made here, offline: a byte-level BPE trained on generated text and a
tiny Llama sized to its vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trustfed.config import validate_federation_config
from trustfed.errors import AppError
from trustfed.simulation.runner import run_simulation

pytest.importorskip("peft", reason="the assistant app needs trustfed[llm] (transformers, peft)")
pytest.importorskip("datasets", reason="saved Hugging Face datasets need trustfed[data] (datasets)")

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def make_base(folder: Path, texts: list[str]) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[3:],
    )
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datasets import Dataset, DatasetDict

    from trustfed.apps.assistant.corpus import VENDORS, vendor_records

    root = tmp_path_factory.mktemp("assistant-hf")
    rng = np.random.default_rng(0)
    chats = {v: (vendor_records(rng, v, 64), vendor_records(rng, v, 16)) for v in list(VENDORS)[:2]}
    texts = [m["content"] for train, held in chats.values() for r in train + held for m in r["messages"]]
    make_base(root / "base", texts)
    (train0, eval0), (train1, eval1) = chats.values()
    Dataset.from_list(train0).save_to_disk(str(root / "v0" / "train"))  # one saved dataset per split
    Dataset.from_list(eval0).save_to_disk(str(root / "v0" / "eval"))
    DatasetDict({"train": Dataset.from_list(train1), "eval": Dataset.from_list(eval1)}).save_to_disk(str(root / "v1"))
    return root


def test_the_template_labels_the_assistant_turns_only(workspace: Path) -> None:
    from trustfed.apps.assistant.model import load_tokenizer

    tok = load_tokenizer(workspace / "base")
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is the weather in paris"},
        {"role": "assistant", "content": "sunny"},
        {"role": "user", "content": "and in rome"},
        {"role": "assistant", "content": "rainy"},
    ]
    ids, labels = tok.chat(chat)
    assert len(ids) == len(labels)
    kept = [t for t in labels if t != -100]
    assert tok.decode(kept) == "sunnyrainy"  # the replies (their <|end|> markers are special, decoded away)
    end = tok.tok.convert_tokens_to_ids("<|end|>")
    assert kept.count(end) == 2 and end in tok.stop_ids  # each reply's end-of-turn is learnt and stops generation
    prompt, none = tok.chat(chat[:2], reply=False)
    assert set(none) == {-100} and tok.tok.decode(prompt).endswith("<|assistant|>")


def test_a_tokenizer_without_a_chat_template_is_refused(workspace: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from trustfed.apps.assistant.model import load_tokenizer

    tok = AutoTokenizer.from_pretrained(str(workspace / "base"), local_files_only=True)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(AppError, match="no chat_template"):
        load_tokenizer(tmp_path)


def raw_config(root: Path, rounds: int) -> dict[str, Any]:
    return {
        "federation": {"name": "assistant-hf", "rounds": rounds, "participants": 2, "seed": 0},
        "app": {
            "target": "trustfed.apps.assistant.app:app",
            "config": {"base": str(root / "base"), "generate": 4, "length": 64, "frozen_a": False},
        },
        "training": {"local_epochs": 3, "batch_size": 8, "lr": 0.01},
        "strategy": {"min_participants": 2},
        "simulation": {"data": {f"p{i:03d}": {"path": str(root / f"v{i}")} for i in range(2)}},
    }


def test_lora_on_a_hugging_face_folder_and_saved_datasets_lowers_held_out_loss(workspace: Path) -> None:
    result = run_simulation(validate_federation_config(raw_config(workspace, 3)), workspace / "run")
    fed = [r["federated_evaluation"] for r in result.metrics["rounds"]]
    base, last = fed[0], fed[-1]  # model_round 0: the base model (B = 0)
    assert base["model_round"] == 0 and last["participants"] == 2
    # a base of random weights (nothing is downloaded): LoRA alone lowers its held-out perplexity by a
    # quarter or more in 3 short rounds (472 -> 285 when this was written)
    assert last["perplexity"] < 0.75 * base["perplexity"], (base, last)
    prov = result.metrics["participants_provenance"]
    assert len({p["data_sha256"] for p in prov.values()}) == 2  # the saved datasets' files are in each manifest


def test_dp_sgd_on_the_adapters_of_a_hugging_face_folder(workspace: Path, tmp_path: Path) -> None:
    """The chat template's labels (-100 off the assistant's turns) drive the per-example loss: DP-SGD on
    A and B (frozen_a = false) lowers held-out perplexity and the spend verifies."""
    from trustfed.privacy.report import load_records, summarize

    raw = raw_config(workspace, 3)
    raw["app"]["config"]["generate"] = 0
    raw["training"] = {"local_epochs": 2, "batch_size": 16, "lr": 0.01, "optimizer": "adamw"}
    raw["privacy"] = {"mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    result = run_simulation(validate_federation_config(raw), tmp_path / "run")
    fed = [r["federated_evaluation"] for r in result.metrics["rounds"]]
    assert fed[-1]["perplexity"] < 0.9 * fed[0]["perplexity"], fed  # 472 -> 386 when this was written
    recs = load_records(tmp_path / "run")
    assert sorted({r["party"] for r in recs}) == ["p000", "p001"] and all(s.verified for s in summarize(recs))


def test_a_saved_dataset_without_messages_is_a_clear_error(workspace: Path, tmp_path: Path) -> None:
    from datasets import Dataset

    from trustfed.app.api import AppContext, DataSpec
    from trustfed.apps.assistant.app import data

    for split in ("train", "eval"):
        Dataset.from_list([{"text": "hello"}]).save_to_disk(str(tmp_path / split))
    ctx = AppContext(config={"base": str(workspace / "base")}, seed=0, participant_id="p000")
    with pytest.raises(AppError, match=r"train.*no 'messages' column \(it has text\)"):
        data(DataSpec(path=tmp_path), ctx)
