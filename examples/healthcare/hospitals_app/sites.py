"""Each hospital's patients: scikit-learn's copy of the Wisconsin diagnostic breast cancer data (569
biopsies, 30 measurements of the cell nuclei), divided between four hospitals with realistic skew.

- Sizes and case mix differ: the university hospital is a referral centre and sees the most
  malignant tumours; the community clinic sees few.
- Measurement shift: each hospital's imaging system is calibrated slightly differently, so its
  size measurements (radius, perimeter; area by the square) are scaled by its own factor.

Each hospital's folder gets ``train.csv`` and ``eval.csv`` (a stratified quarter held out), with the
measurements under snake_case names and the ``diagnosis`` column (``benign`` / ``malignant``).
Everything is drawn from the federation's seed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

from hospitals_app.app import FEATURES, TARGET


@dataclass(frozen=True)
class Hospital:
    name: str
    share_malignant: float  # share of all malignant biopsies it holds
    share_benign: float  # share of all benign biopsies it holds
    calibration: float  # its imaging system's scale on size measurements


HOSPITALS = {
    "p000": Hospital("university hospital (referral centre)", 0.50, 0.30, 1.00),
    "p001": Hospital("regional hospital", 0.25, 0.30, 1.03),
    "p002": Hospital("community clinic", 0.10, 0.25, 0.97),
    "p003": Hospital("screening centre", 0.15, 0.15, 1.05),
}
_SIZE = ("radius", "perimeter")


def _split(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Row indices of each hospital: every biopsy goes to one hospital by its label's shares."""
    pids = sorted(HOSPITALS)
    owner = np.empty(len(labels), dtype=np.int64)
    for label, share in ((1, "share_malignant"), (0, "share_benign")):
        rows = np.flatnonzero(labels == label)
        p = np.array([getattr(HOSPITALS[pid], share) for pid in pids])
        owner[rows] = rng.choice(len(pids), size=len(rows), p=p / p.sum())
    return {pid: np.flatnonzero(owner == i) for i, pid in enumerate(pids)}


def _calibrated(x: np.ndarray, factor: float) -> np.ndarray:
    x = x.copy()
    for j, name in enumerate(FEATURES):
        if any(s in name for s in _SIZE):
            x[:, j] *= factor
        elif "area" in name:
            x[:, j] *= factor**2
    return x


def _write(path: Path, x: np.ndarray, malignant: np.ndarray) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow([*FEATURES, TARGET])
        for row, m in zip(x, malignant, strict=True):
            out.writerow([*(f"{v:.6g}" for v in row), "malignant" if m else "benign"])


def write_sites(folders: dict[str, Path], seed: int) -> dict[str, dict[str, int]]:
    """Write every hospital's ``train.csv`` / ``eval.csv``; returns its counts (never the data)."""
    bunch = load_breast_cancer()
    malignant = (bunch.target == 0).astype(np.int64)  # scikit-learn codes malignant as 0
    rng = np.random.default_rng(seed)
    counts = {}
    for pid, rows in _split(malignant, rng).items():
        h = HOSPITALS[pid]
        x, y = _calibrated(bunch.data[rows], h.calibration), malignant[rows]
        held = np.zeros(len(rows), dtype=bool)
        for label in (0, 1):  # a stratified quarter held out
            idx = np.flatnonzero(y == label)
            held[rng.choice(idx, size=len(idx) // 4, replace=False)] = True
        folder = folders[pid]
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / "train.csv", x[~held], y[~held])
        _write(folder / "eval.csv", x[held], y[held])
        counts[pid] = {"train": int((~held).sum()), "eval": int(held.sum()), "malignant": int(y.sum())}
    return counts
