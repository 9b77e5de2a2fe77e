"""Generated chat and tool-call data for assistant vendors, and generic text for the base model.

Each vendor serves its own domain (travel, home, media), so a split by vendor is non-IID: a vendor
sees its tools far more often than the others'. Every record is ``{"messages": [{"role": "user",
"content": ...}, {"role": "assistant", "content": ...}]}``; a tool call is the assistant's content
``{"tool": NAME, "arguments": {...}}`` (JSON). All of it is drawn from a seed.

The base model's text (:func:`base_text`, :func:`extraction_records`) speaks of the same topics and
writes JSON records of a sentence's words, but never names a tool nor writes a tool call: what the
adapters must learn is which tool a request needs and the call's exact shape.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

TOOLS: dict[str, tuple[str, ...]] = {
    "get_weather": ("city", "day"),
    "book_flight": ("to", "day"),
    "set_alarm": ("time",),
    "play_music": ("genre",),
    "turn_on": ("device",),
}
VENDORS = {
    "travel": ("book_flight", "get_weather"),
    "home": ("turn_on", "set_alarm"),
    "media": ("play_music", "get_weather"),
}
_VALUES = {
    "city": ["paris", "rome", "oslo", "lima", "tokyo", "cairo"],
    "day": ["today", "tomorrow", "monday", "friday"],
    "to": ["paris", "rome", "oslo", "lima", "tokyo", "cairo"],
    "time": ["6:00", "7:30", "8:15", "9:00"],
    "genre": ["jazz", "rock", "folk", "pop"],
    "device": ["lights", "heater", "fan", "radio"],
}
_ASK = {
    "get_weather": ["weather in {city} {day}?", "will it rain in {city} {day}?"],
    "book_flight": ["book a flight to {to} on {day}", "fly me to {to} {day}"],
    "set_alarm": ["wake me at {time}", "set an alarm for {time}"],
    "play_music": ["play some {genre}", "put on {genre} music"],
    "turn_on": ["turn on the {device}", "switch the {device} on"],
}
_CHAT = [
    ("hello", "hello! how can i help?"),
    ("thanks", "you are welcome."),
    ("who are you?", "i am your assistant."),
    ("good night", "good night, sleep well."),
]
_GENERIC = [
    "the {a} {n} walks to the {p} every {d}.",
    "a {a} {n} sees the {p} on {d}.",
    "we talk about the {n} and the {p}.",
    "in code the {n} by the {p} is named {a}_{n}.",
]
_KINDS = ["walk", "see", "talk", "code"]
_TOPICS = [
    "the weather in {city} is mild {day}.",
    "a flight to {to} leaves on {day}, so book early.",
    "my alarm rings at {time} and i get up.",
    "we play {genre} music in the city.",
    "turn the {device} off at night, then on again.",
    "set the time on the {device} before the day starts.",
    "this genre of music is popular in {city}.",
    "a good tool and a device help every day.",
    "their arguments about the weather last all day.",
]
_EXTRACTED = _TOPICS[:7]  # the topics with words to extract
_ROLE = {"city": "place", "to": "place", "day": "when", "time": "when", "genre": "thing", "device": "thing"}
_WORDS = {
    "a": ["small", "old", "quiet", "bright", "busy"],
    "n": ["dog", "teacher", "river", "city", "garden"],
    "p": ["market", "station", "park", "library", "harbour"],
    "d": ["morning", "evening", "monday", "weekend"],
}


def tool_call(rng: np.random.Generator, tool: str) -> tuple[str, dict[str, Any]]:
    args = {k: str(rng.choice(_VALUES[k])) for k in TOOLS[tool]}
    ask = str(rng.choice(_ASK[tool])).format(**args)
    return ask, {"tool": tool, "arguments": args}


def vendor_records(rng: np.random.Generator, vendor: str, n: int, tool_share: float = 0.7) -> list[dict[str, Any]]:
    """``n`` chats of ``vendor``: mostly calls of its own tools, sometimes another's, and small talk."""
    own = VENDORS[vendor]
    others = [t for t in TOOLS if t not in own]
    out = []
    for _ in range(n):
        if rng.random() < tool_share:
            tool = str(rng.choice(own)) if rng.random() < 0.8 else str(rng.choice(others))
            ask, call = tool_call(rng, tool)
            reply = _dumps(call)
        else:
            ask, reply = _CHAT[int(rng.integers(len(_CHAT)))]
        out.append({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": reply}]})
    return out


def generic_text(rng: np.random.Generator, n: int) -> list[str]:
    """Plain sentences for the base model: language, no tool calls."""
    out = []
    for _ in range(n):
        t = str(rng.choice(_GENERIC))
        out.append(t.format(**{k: str(rng.choice(v)) for k, v in _WORDS.items()}))
    return out


def base_text(rng: np.random.Generator, n: int) -> list[str]:
    """Plain sentences for the base model: generic ones and the vendors' topics, without any tool call."""
    out = generic_text(rng, n // 2)
    for _ in range(n - len(out)):
        topic = str(rng.choice(_TOPICS))
        out.append(topic.format(**{k: str(rng.choice(v)) for k, v in _VALUES.items()}))
    return out


def extraction_records(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    """Chats that turn a sentence into a JSON record of its words (``{"fields": {...}, "kind": ...}``),
    for the base model: it learns JSON and copying words from the request, but no tool, tool name,
    argument name nor the shape of a call."""
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            i = int(rng.integers(len(_GENERIC)))
            words = {k: str(rng.choice(v)) for k, v in _WORDS.items()}
            record = {"fields": {"noun": words["n"], "place": words["p"]}, "kind": _KINDS[i]}
            ask = _GENERIC[i].format(**words)
        else:
            topic = _EXTRACTED[int(rng.integers(len(_EXTRACTED)))]
            values = {k: str(rng.choice(v)) for k, v in _VALUES.items()}
            slots = [k for k in _VALUES if "{" + k + "}" in topic]
            record = {"fields": {_ROLE[k]: values[k] for k in slots}, "kind": "note"}
            ask = topic.format(**values)
        out.append({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": _dumps(record)}]})
    return out


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def parse_call(text: str) -> dict[str, Any] | None:
    """The tool call in ``text``, or None when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def schema_valid(call: dict[str, Any] | None) -> bool:
    """A known tool with exactly its arguments, each a string."""
    if call is None or set(call) != {"tool", "arguments"} or call["tool"] not in TOOLS:
        return False
    args = call["arguments"]
    return (
        isinstance(args, dict)
        and set(args) == set(TOOLS[call["tool"]])
        and all(isinstance(v, str) for v in args.values())
    )


def write_vendor_data(folder: Any, vendor: str, rng: np.random.Generator, train: int = 240, held_out: int = 60) -> None:
    """``train.jsonl`` and ``eval.jsonl`` of one vendor in ``folder`` (a pathlib.Path)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", train), ("eval.jsonl", held_out)):
        lines = [json.dumps(r) for r in vendor_records(rng, vendor, n)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
