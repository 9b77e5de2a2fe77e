"""Each bank's loan book, generated from a seed: applicants, their features and whether they defaulted.

Every bank draws its applicants from its own market (site skew) while default follows the same
law everywhere: a logistic model of the features with a few non-linear effects (maxed-out credit
with late payments, a short job history), whose intercept each bank's own default rate sets.

- national retail bank: the largest book, average incomes, 4% defaults;
- regional savings bank: lower incomes, older customers, 5%;
- online lender: young customers with high card use, 9%;
- private bank: the smallest book, high incomes, 2.5%.

Overall about 5% of loans default. Each bank's folder gets ``train.csv`` and ``eval.csv`` (a fifth
held out, stratified) with the columns of ``banks_app.app.FEATURES`` and ``default`` (0/1).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from banks_app.app import FEATURES, TARGET


@dataclass(frozen=True)
class Bank:
    name: str
    applicants: int  # at full size
    default_rate: float
    income: float  # median annual income, thousands
    age: float  # mean age
    card_use: float  # mean credit utilisation


BANKS = {
    "p000": Bank("national retail bank", 16_000, 0.04, 42.0, 44.0, 0.35),
    "p001": Bank("regional savings bank", 8_000, 0.05, 34.0, 52.0, 0.30),
    "p002": Bank("online lender", 4_000, 0.09, 31.0, 31.0, 0.55),
    "p003": Bank("private bank", 3_000, 0.025, 95.0, 49.0, 0.25),
}


def applicants(bank: Bank, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` applicants of ``bank``'s market: one row of ``FEATURES`` each."""
    age = np.clip(rng.normal(bank.age, 11.0, n), 18, 85)
    income = bank.income * np.exp(rng.normal(0.0, 0.45, n))
    months_employed = np.clip(rng.exponential(12 * (age - 17) / 3.0, n), 0, 12 * (age - 17))
    card_use = np.clip(rng.beta(2.0, 2.0 * (1 - bank.card_use) / bank.card_use, n) * 1.1, 0, 1.2)
    loan = income * np.exp(rng.normal(-0.6, 0.5, n))
    debt_to_income = np.clip(rng.gamma(2.0, 0.16, n) + 0.2 * loan / income, 0, 3)
    late = rng.poisson(0.25 + 1.2 * card_use**2, n).astype(float)
    inquiries = rng.poisson(0.6 + 0.8 * (age < 30), n).astype(float)
    accounts = rng.poisson(2 + (age - 18) / 12, n).astype(float)
    home_owner = (rng.random(n) < np.clip((age - 25) / 40, 0.05, 0.85)).astype(float)
    cols = {
        "age": age,
        "income": income,
        "months_employed": months_employed,
        "credit_utilisation": card_use,
        "loan_amount": loan,
        "debt_to_income": debt_to_income,
        "late_payments_12m": late,
        "inquiries_6m": inquiries,
        "open_accounts": accounts,
        "home_owner": home_owner,
    }
    return np.stack([cols[name] for name in FEATURES], axis=1)


def risk(x: np.ndarray) -> np.ndarray:
    """The log-odds of default, up to each bank's intercept: the same law at every bank."""
    c = {name: x[:, j] for j, name in enumerate(FEATURES)}
    log_odds: np.ndarray = (
        2.9 * c["credit_utilisation"]
        + 1.75 * np.minimum(c["debt_to_income"], 1.5)
        + 0.7 * np.minimum(c["late_payments_12m"], 5)
        + 0.4 * c["inquiries_6m"]
        - 0.95 * np.log(c["income"] / 40.0)
        - 0.024 * (c["age"] - 40.0)
        - 0.5 * c["home_owner"]
        + 1.45 * ((c["credit_utilisation"] > 0.85) & (c["late_payments_12m"] > 0))
        + 0.95 * (c["months_employed"] < 12)
    )
    return log_odds


def _intercept(score: np.ndarray, rate: float) -> float:
    """The intercept that gives ``score`` the mean default probability ``rate`` (bisection)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-(score + mid)))) < rate else (lo, mid)
    return (lo + hi) / 2


def _write(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow([*FEATURES, TARGET])
        for row, label in zip(x, y, strict=True):
            out.writerow([*(f"{v:.5g}" for v in row), int(label)])


def write_sites(
    folders: dict[str, Path], seed: int, scale: float = 1.0
) -> tuple[dict[str, dict[str, int]], dict[str, np.ndarray]]:
    """Write every bank's ``train.csv`` / ``eval.csv`` (``scale`` times the full size). Returns its
    counts and, for its held-out loans, the true default probabilities: the best any model could
    score (what only a simulation knows)."""
    counts, truth = {}, {}
    for i, pid in enumerate(sorted(folders)):
        bank = BANKS[pid]
        rng = np.random.default_rng([seed, i])
        n = max(100, round(bank.applicants * scale))
        x = applicants(bank, n, rng)
        score = risk(x)
        p = 1 / (1 + np.exp(-(score + _intercept(score, bank.default_rate))))
        y = (rng.random(n) < p).astype(np.int64)
        held = np.zeros(n, dtype=bool)
        for label in (0, 1):  # a stratified fifth held out
            idx = np.flatnonzero(y == label)
            held[rng.choice(idx, size=len(idx) // 5, replace=False)] = True
        folders[pid].mkdir(parents=True, exist_ok=True)
        _write(folders[pid] / "train.csv", x[~held], y[~held])
        _write(folders[pid] / "eval.csv", x[held], y[held])
        counts[pid] = {"train": int((~held).sum()), "eval": int(held.sum()), "defaults": int(y.sum())}
        truth[pid] = p[held]
    return counts, truth
