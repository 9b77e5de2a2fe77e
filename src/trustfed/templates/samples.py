"""Small generated sample data for a new project, skewed between sites as real sites are.

Everything is drawn from a seed, so a project made twice holds the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trustfed.templates.tabular_app import CLASSES, FEATURES
from trustfed.templates.text_app import INTENTS


def patients(rng: np.random.Generator, n: int, site: int) -> list[str]:
    """A hospital's patients: each site serves an older or younger population, so risk classes are skewed."""
    age = rng.normal(45 + 8 * site, 12, n).clip(18, 95)
    bmi = rng.normal(26 + site, 4, n).clip(15, 50)
    bp = rng.normal(120 + 0.5 * (age - 45), 12, n)
    glucose = rng.normal(95 + 0.8 * (bmi - 26) * 3, 18, n)
    chol = rng.normal(190 + 0.6 * (age - 45), 30, n)
    smoker = (rng.random(n) < 0.2 + 0.1 * site).astype(float)
    score = 0.06 * (age - 55) + 0.12 * (bmi - 27) + 0.04 * (bp - 130) + 0.03 * (glucose - 105) + 0.9 * smoker
    score += rng.normal(0, 0.6, n)
    risk = np.digitize(score, [-0.8, 0.9])
    rows = [",".join([*FEATURES, "risk"])]
    for r in zip(age, bmi, bp, glucose, chol, smoker, risk, strict=True):
        rows.append(f"{r[0]:.0f},{r[1]:.1f},{r[2]:.0f},{r[3]:.0f},{r[4]:.0f},{r[5]:.0f},{CLASSES[int(r[6])]}")
    return rows


def write_tabular(folder: Path, rng: np.random.Generator, site: int, scale: int) -> None:
    for name, n in (("train.csv", 80 * scale), ("eval.csv", 30 * scale)):
        (folder / name).write_text("\n".join(patients(rng, n, site)) + "\n", encoding="utf-8")


def write_vision(folders: list[Path], rng: np.random.Generator, scale: int) -> None:
    """scikit-learn's handwritten digits (8x8, shipped with the package) as PNG files, split between
    sites with a Dirichlet(0.5) label skew."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0 * 255).astype(np.uint8)
    keep = rng.permutation(len(images))[: min(len(images), 200 * scale * len(folders))]
    shares = rng.dirichlet([0.5] * len(folders), size=10)
    for k, i in enumerate(keep):
        label = int(d.target[i])
        site = int(rng.choice(len(folders), p=shares[label]))
        split = "eval" if rng.random() < 0.25 else "train"
        out = folders[site] / split / str(label)
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(out / f"img_{k:05d}.png")


_PHRASES = {
    "weather": [
        "what is the weather in {city}",
        "will it rain in {city} {when}",
        "forecast for {city} {when}",
        "is it cold in {city} {when}",
        "do i need an umbrella {when}",
    ],
    "music": [
        "play some {genre}",
        "put on {genre} music",
        "i want to hear {genre}",
        "next song please",
        "play my {genre} playlist",
    ],
    "travel": [
        "book a flight to {city} {when}",
        "find a hotel in {city}",
        "train tickets to {city} {when}",
        "how do i get to {city}",
        "reserve a car in {city} {when}",
    ],
    "reminder": [
        "remind me to {task} {when}",
        "set a reminder for {task}",
        "don't let me forget to {task}",
        "alert me {when} to {task}",
        "add {task} to my reminders",
    ],
}
_SLOTS = {
    "city": ["paris", "tokyo", "berlin", "lima", "cairo", "oslo", "delhi", "quito"],
    "when": ["today", "tomorrow", "tonight", "on monday", "this weekend", "next week"],
    "genre": ["jazz", "rock", "classical", "hip hop", "folk", "techno"],
    "task": ["call mum", "buy milk", "pay rent", "water the plants", "book the dentist", "send the report"],
}


def requests(rng: np.random.Generator, n: int, site: int) -> list[str]:
    """An assistant vendor's user requests: each vendor's users ask for some intents more than others."""
    weights = np.roll(np.array([0.4, 0.3, 0.2, 0.1]), site)
    lines = []
    for _ in range(n):
        intent = INTENTS[int(rng.choice(len(INTENTS), p=weights))]
        text = str(rng.choice(_PHRASES[intent]))
        if rng.random() < 0.05:  # mislabelled requests, as real logs have
            intent = INTENTS[int(rng.integers(len(INTENTS)))]
        for slot, values in _SLOTS.items():
            text = text.replace("{" + slot + "}", str(rng.choice(values)))
        lines.append(json.dumps({"text": text, "intent": intent}))
    return lines


def write_text(folder: Path, rng: np.random.Generator, site: int, scale: int) -> None:
    for name, n in (("train.jsonl", 120 * scale), ("eval.jsonl", 40 * scale)):
        (folder / name).write_text("\n".join(requests(rng, n, site)) + "\n", encoding="utf-8")
