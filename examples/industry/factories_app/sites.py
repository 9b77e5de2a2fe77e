"""Each factory's sensor log, generated from a seed: hourly vibration, temperature and motor current
of its machines, and when they failed.

Machines run a daily shift cycle; a fault is rare (a machine fails every 800 to 1,600 hours) and is
preceded by one to three days of wear: vibration grows, the bearing warms, the current becomes
erratic. Factories differ (site skew) in size, in how often their machines fail and in their
sensors: each has its own calibration offsets and gains and its own measurement noise.

- p000 large plant: 40 machines, new sensors;
- p001 mid-size plant: 20 machines, temperature sensors reading 3 C high;
- p002 old plant: 12 machines, noisy sensors, faults twice as often;
- p003 new plant: 6 machines, vibration sensors with 25% more gain.

Each factory's folder gets ``train.csv`` and ``eval.csv`` (a fifth of its machines held out): one
row per 24-hour window every 6 hours (``vib_00..vib_23``, ``temp_00..``, ``current_00..``) with
``fault_24h``: whether the machine failed within the 24 hours after the window.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from factories_app.app import FEATURES, TARGET, WINDOW

HOURS = 2000  # of log per machine at full size
STRIDE = 6
HORIZON = 24


@dataclass(frozen=True)
class Factory:
    name: str
    machines: int  # at full size
    mtbf: float  # mean hours between faults
    offset: tuple[float, float, float]  # its sensors' calibration offsets (vibration, temperature, current)
    gain: tuple[float, float, float]
    noise: float  # its sensors' noise, relative


FACTORIES = {
    "p000": Factory("large plant", 40, 1600.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1.0),
    "p001": Factory("mid-size plant", 20, 1400.0, (0.0, 3.0, 0.0), (1.0, 1.0, 1.0), 1.2),
    "p002": Factory("old plant", 12, 800.0, (0.3, 1.0, 2.0), (1.0, 1.0, 1.05), 2.0),
    "p003": Factory("new plant", 6, 1200.0, (0.0, -1.0, 0.0), (1.25, 1.0, 1.0), 0.8),
}


def machine_log(f: Factory, hours: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(readings ``[hours, 3]``, the hours at which the machine failed)."""
    t = np.arange(hours)
    shift = 0.5 + 0.5 * (np.sin(2 * np.pi * (t % 24 - 6) / 24) > -0.3)  # the machine's load over the day
    wear = np.zeros(hours)
    faults = []
    start = 0
    while True:
        fault = start + int(rng.exponential(f.mtbf)) + 72
        if fault >= hours:
            break
        onset = int(rng.integers(24, 72))
        ramp = np.clip((t - (fault - onset)) / onset, 0, 1) * ((t < fault) & (t >= fault - onset))
        wear = np.maximum(wear, ramp**1.5)
        faults.append(fault)
        start = fault + 24  # repaired in a day
    vibration = 2.0 + 0.8 * shift + 2.5 * wear + rng.normal(0, 0.25 * f.noise, hours)
    temperature = 45.0 + 8.0 * shift + 6.0 * wear + rng.normal(0, 0.8 * f.noise, hours)
    current = 12.0 + 6.0 * shift + rng.normal(0, 0.5 * f.noise, hours) * (1 + 3 * wear)
    raw = np.stack([vibration, temperature, current], axis=1)
    return raw * np.array(f.gain) + np.array(f.offset), np.array(faults, dtype=np.int64)


def windows(raw: np.ndarray, faults: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every 24-hour window (stride 6) outside repairs: its readings by sensor, and its label."""
    rows, labels = [], []
    for end in range(WINDOW, len(raw) - HORIZON, STRIDE):
        ahead = faults[(faults >= end) & (faults < end + HORIZON)]
        under_repair = np.any((faults < end) & (faults + 24 > end - WINDOW))
        if under_repair:
            continue
        rows.append(raw[end - WINDOW : end].T.reshape(-1))  # vib_00..vib_23, temp_00.., current_00..
        labels.append(int(len(ahead) > 0))
    return np.array(rows), np.array(labels, dtype=np.int64)


def _write(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow([*FEATURES, TARGET])
        for row, label in zip(x, y, strict=True):
            out.writerow([*(f"{v:.3f}" for v in row), int(label)])


def write_sites(folders: dict[str, Path], seed: int, scale: float = 1.0) -> dict[str, dict[str, int]]:
    """Write every factory's ``train.csv`` / ``eval.csv`` (``scale`` times the machines, at least 3)."""
    counts: dict[str, dict[str, int]] = {}
    for i, pid in enumerate(sorted(folders)):
        f = FACTORIES[pid]
        rng = np.random.default_rng([seed, i])
        machines = max(3, round(f.machines * scale))
        held = set(rng.choice(machines, size=max(1, machines // 5), replace=False).tolist())
        parts: dict[bool, list[tuple[np.ndarray, np.ndarray]]] = {True: [], False: []}
        for m in range(machines):
            parts[m in held].append(windows(*machine_log(f, HOURS, rng)))
        folders[pid].mkdir(parents=True, exist_ok=True)
        for is_eval, name in ((False, "train.csv"), (True, "eval.csv")):
            x = np.concatenate([p[0] for p in parts[is_eval]])
            y = np.concatenate([p[1] for p in parts[is_eval]])
            _write(folders[pid] / name, x, y)
            counts[pid] = {
                **counts.get(pid, {}),
                name.split(".")[0]: len(y),
                f"{name.split('.')[0]}_faults": int(y.sum()),
            }
        counts[pid]["machines"] = machines
    return counts
