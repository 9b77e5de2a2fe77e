"""Each district's hourly electricity demand, generated from a seed: what its substation meters export.

The series start on Monday 1 January 2024 (a year: 50 weeks, to 15 December) and share the city's weather (a yearly temperature cycle,
a daily one and passing weather systems) and its public holidays. Districts differ (site skew):

- city centre: offices, a weekday plateau from 8 to 18, quiet weekends; 120 MWh/h at peak level;
- residential north: morning and evening peaks, busier weekend middays, electric heating;
- industrial port: three shifts on weekdays, a reduced weekend, the largest load;
- university: a daytime peak that drops in the summer break; its meters are new (16 weeks of history);
- suburb south: small and residential, the most temperature-sensitive.

Each district also knows its zoning (``land_use`` in its ``[data]``). Each district's folder gets ``demand.csv``: ``day`` (days since the start), ``hour``,
``temperature_c``, ``holiday`` (0/1) and ``demand_mwh``, one row an hour.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HOLIDAYS = (0, 88, 91, 121, 129, 140, 226, 305, 358, 359)  # days since Monday 1 January 2024


@dataclass(frozen=True)
class District:
    name: str
    profile: str
    level: float  # MWh an hour, typical
    weeks: int  # history at full size
    heating: float  # extra load per degree below 15 C, share of level
    cooling: float  # extra load per degree above 22 C, share of level


DISTRICTS = {
    "p000": District("city centre", "offices", 120.0, 50, 0.010, 0.030),
    "p001": District("residential north", "residential", 60.0, 50, 0.025, 0.010),
    "p002": District("industrial port", "industry", 200.0, 50, 0.004, 0.008),
    "p003": District("university", "campus", 40.0, 16, 0.012, 0.020),
    "p004": District("suburb south", "residential", 30.0, 50, 0.035, 0.015),
}


def _bump(h: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((h - centre) / width) ** 2)


def daily_shape(profile: str, hour: np.ndarray, rest: np.ndarray, day: np.ndarray) -> np.ndarray:
    """The district's load relative to its level: hour of day, rest days (weekends and holidays)."""
    if profile == "offices":
        work = 0.45 + 0.9 * (1 / (1 + np.exp(-(hour - 7.5) * 2)) - 1 / (1 + np.exp(-(hour - 18.5) * 2)))
        return np.where(rest, 0.42 + 0.05 * _bump(hour, 13, 3), work)
    if profile == "residential":
        week = 0.5 + 0.35 * _bump(hour, 7.5, 1.2) + 0.6 * _bump(hour, 19.5, 2.0)
        weekend = 0.55 + 0.3 * _bump(hour, 10.5, 2.5) + 0.55 * _bump(hour, 19.5, 2.2)
        return np.where(rest, weekend, week)
    if profile == "industry":
        shifts = 0.85 + 0.12 * ((hour >= 6) & (hour < 22)) - 0.05 * ((hour == 14) | (hour == 22))
        return np.where(rest, 0.55 + 0.03 * _bump(hour, 12, 4), shifts)
    if profile == "campus":
        term = np.where((day % 364 >= 182) & (day % 364 < 245), 0.6, 1.0)  # the summer break
        work = 0.5 + 0.7 * term * _bump(hour, 13, 3.5)
        return np.where(rest, 0.45 + 0.05 * _bump(hour, 14, 3), work)
    raise ValueError(f"unknown district profile {profile!r}")


def weather(days: int, rng: np.random.Generator) -> np.ndarray:
    """Hourly temperature in C: a yearly cycle, a daily one and passing weather systems."""
    t = np.arange(days * 24)
    day = t / 24
    systems = np.zeros(days)
    for d in range(1, days):  # a weather system lasts a few days
        systems[d] = 0.8 * systems[d - 1] + rng.normal(0.0, 1.6)
    daily = np.interp(day, np.arange(days), systems)
    celsius: np.ndarray = 11 + 9 * np.sin(2 * np.pi * (day - 110) / 365) + 4 * np.sin(2 * np.pi * (t % 24 - 9) / 24)
    return celsius + daily


def demand(d: District, temperature: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hourly demand in MWh of district ``d`` over ``temperature``'s hours."""
    t = np.arange(len(temperature))
    day, hour = t // 24, t % 24
    rest = (day % 7 >= 5) | np.isin(day, HOLIDAYS)
    shape = daily_shape(d.profile, hour, rest, day)
    weather_load = d.heating * np.maximum(15 - temperature, 0) + d.cooling * np.maximum(temperature - 22, 0)
    noise = np.zeros(len(t))
    for i in range(1, len(t)):  # slowly wandering usage, a few percent
        noise[i] = 0.95 * noise[i - 1] + rng.normal(0.0, 0.012)
    mwh: np.ndarray = d.level * (shape + weather_load) * np.exp(noise + rng.normal(0.0, 0.02, len(t)))
    return mwh


def write_sites(folders: dict[str, Path], seed: int, scale: float = 1.0) -> dict[str, dict[str, int]]:
    """Write every district's ``demand.csv`` (history ``scale`` times the full, at least 6 weeks)."""
    rng = np.random.default_rng(seed)
    longest = max(max(6, round(d.weeks * scale)) for d in DISTRICTS.values())
    temperature = weather(longest * 7, rng)
    counts = {}
    for i, pid in enumerate(sorted(folders)):
        d = DISTRICTS[pid]
        weeks = max(6, round(d.weeks * scale))
        start = (longest - weeks) * 7 * 24  # every series ends on the same last hour
        temp = temperature[start:]
        load = demand(d, temp, np.random.default_rng([seed, i]))
        folders[pid].mkdir(parents=True, exist_ok=True)
        with (folders[pid] / "demand.csv").open("w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(["day", "hour", "temperature_c", "holiday", "demand_mwh"])
            for j, (tc, mwh) in enumerate(zip(temp, load, strict=True)):
                day = (start + j) // 24
                out.writerow([day, (start + j) % 24, f"{tc:.2f}", int(day in HOLIDAYS), f"{mwh:.3f}"])
        counts[pid] = {"hours": len(load), "weeks": weeks}
    return counts
