"""Tables (CSV, gzipped CSV, Parquet) as an in-memory :class:`Dataset`.

Every problem is a :class:`DataError` that names the file, and where it helps the column, the
row and the offending value. Rows are counted from 1 over the data, the header not counted.

Classification labels become indices into ``classes`` when it is given (so every participant
of a federation maps labels alike, even one that lacks a class), else into the sorted unique
labels of this file. Regression targets are float32 of shape ``[n]``.

pandas and pyarrow load only when a table is read (the ``data`` extra).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from trustfed.data.datasets import Dataset
from trustfed.errors import DataError

Task = Literal["classification", "regression"]

INSTALL_HINT = "pip install 'trustfed[data]'"


def require(module: str) -> Any:
    """Import an optional dependency of the ``data`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading this data needs the {module.split('.')[0]!r} package: {INSTALL_HINT}") from None


def existing_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    if not p.is_file():
        raise DataError(f"{p}: not a file")
    return p


def show(value: Any) -> str:
    """A cell value as the user wrote it: numpy scalars shown as plain Python values."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def load_table(
    path: str | Path,
    *,
    features: Sequence[str] | None = None,
    target: str,
    task: Task = "classification",
    classes: Sequence[Any] | None = None,
    normalize: bool = False,
) -> Dataset:
    """Load a ``.csv``, ``.csv.gz`` or ``.parquet`` table.

    ``features`` defaults to every column but ``target``; x is float32 ``[n, len(features)]``.
    ``normalize`` scales each feature to mean 0 and standard deviation 1 over this file (a
    constant column is only centred).
    """
    if task not in ("classification", "regression"):
        raise DataError(f"task must be 'classification' or 'regression', got {task!r}")
    if task == "regression" and classes is not None:
        raise DataError("classes only apply to task='classification'")
    p = existing_file(path)
    fmt = _table_format(p)
    pd = require("pandas")
    present = _columns(pd, p, fmt)
    wanted = _feature_names(p, present, features, target)
    df = _read(pd, p, fmt, [*wanted, target])
    if len(df) == 0:
        raise DataError(f"{p}: no rows")
    x = np.stack([_numeric(pd, p, df[name], name) for name in wanted], axis=1)
    if normalize:
        std = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    if task == "regression":
        y = _numeric(pd, p, df[target], target).astype(np.float32)
        return Dataset(p.name, x.astype(np.float32), y, 0)
    labels, num_classes = _labels(pd, p, df[target], target, classes)
    return Dataset(p.name, x.astype(np.float32), labels, num_classes)


def _table_format(p: Path) -> Literal["csv", "parquet"]:
    name = p.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith(".parquet"):
        return "parquet"
    raise DataError(f"{p}: unsupported table file; expected a .csv, .csv.gz or .parquet file")


def _read_errors(fmt: str) -> tuple[type[BaseException], ...]:
    # ParserError is a ValueError; a corrupt gzip stream raises OSError or EOFError.
    errors: tuple[type[BaseException], ...] = (ValueError, OSError, EOFError, UnicodeDecodeError)
    if fmt == "parquet":
        errors += (require("pyarrow").ArrowException,)
    return errors


def _columns(pd: Any, p: Path, fmt: str) -> list[str]:
    try:
        if fmt == "csv":
            return [str(c) for c in pd.read_csv(p, nrows=0).columns]
        return [str(c) for c in require("pyarrow.parquet").read_schema(p).names]
    except pd.errors.EmptyDataError:
        raise DataError(f"{p}: the file is empty (no header, no rows)") from None
    except _read_errors(fmt) as exc:
        raise DataError(f"{p}: cannot be read as {fmt.upper()}: {exc}") from None


def _read(pd: Any, p: Path, fmt: str, columns: list[str]) -> Any:
    try:
        if fmt == "csv":
            df = pd.read_csv(p, usecols=columns, low_memory=False)
        else:
            df = pd.read_parquet(p, columns=columns, engine="pyarrow")
    except _read_errors(fmt) as exc:
        raise DataError(f"{p}: cannot be read as {fmt.upper()}: {exc}") from None
    return df[columns]


def _feature_names(p: Path, present: list[str], features: Sequence[str] | None, target: str) -> list[str]:
    listed = ", ".join(repr(c) for c in present)
    for name in [target, *(features or ())]:
        if name not in present:
            raise DataError(f"{p}: no column {name!r}; the file has columns {listed}")
    if features is None:
        wanted = [c for c in present if c != target]
    else:
        wanted = list(features)
        if target in wanted:
            raise DataError(f"{p}: column {target!r} is the target and cannot also be a feature")
        if len(set(wanted)) != len(wanted):
            raise DataError(f"{p}: features list a column twice: {wanted}")
    if not wanted:
        raise DataError(f"{p}: no feature columns besides the target {target!r}")
    return wanted


def _numeric(pd: Any, p: Path, column: Any, name: str) -> np.ndarray:
    """One column as float64, or a DataError naming a non-numeric or missing cell."""
    types = pd.api.types
    values: np.ndarray
    if types.is_bool_dtype(column.dtype) or types.is_numeric_dtype(column.dtype):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    elif types.is_object_dtype(column.dtype) or types.is_string_dtype(column.dtype):
        values = _from_text(pd, p, column, name)
    else:
        first = int(np.flatnonzero(column.notna().to_numpy())[0]) if column.notna().any() else 0
        raise DataError(
            f"{p}: column {name!r} holds {column.dtype} values, not numbers"
            f" (row {first + 1}: {show(column.iloc[first])})"
        )
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0]) + 1
        raise DataError(f"{p}: column {name!r} has an empty, NaN or infinite cell at row {row}")
    return values


def _from_text(pd: Any, p: Path, column: Any, name: str) -> np.ndarray:
    """Numbers written as text are accepted; the first cell that is not a number is reported."""
    try:
        coerced = pd.to_numeric(column, errors="coerce")
    except (TypeError, ValueError):
        coerced = pd.Series(np.nan, index=column.index)
    bad = (coerced.isna() & column.notna()).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{p}: column {name!r} is not numeric: row {row + 1} has {show(column.iloc[row])}")
    result: np.ndarray = coerced.to_numpy(dtype=np.float64, na_value=np.nan)
    return result


def _labels(pd: Any, p: Path, column: Any, name: str, classes: Sequence[Any] | None) -> tuple[np.ndarray, int]:
    missing = column.isna().to_numpy()
    if missing.any():
        row = int(np.flatnonzero(missing)[0]) + 1
        raise DataError(f"{p}: column {name!r} has an empty or NaN cell at row {row}")
    if classes is None:
        codes, uniques = pd.factorize(column, sort=True)
        return np.asarray(codes, dtype=np.int64), len(uniques)
    index = _class_index(classes)
    codes, uniques = pd.factorize(column, sort=False)
    lookup = np.empty(len(uniques), dtype=np.int64)
    for k, label in enumerate(uniques.tolist()):
        found = _find_class(index, label)
        if found is None:
            row = int(np.flatnonzero(codes == k)[0]) + 1
            raise DataError(
                f"{p}: row {row}: label {show(label)} in column {name!r} is not one of the classes {list(classes)!r}"
            )
        lookup[k] = found
    return lookup[np.asarray(codes)], len(classes)


def _class_index(classes: Sequence[Any]) -> dict[Any, int]:
    index: dict[Any, int] = {}
    for i, c in enumerate(classes):
        if c in index:
            raise DataError(f"classes list {c!r} twice: {list(classes)!r}")
        index[c] = i
    return index


def _find_class(index: Mapping[Any, int], label: Any) -> int | None:
    """Exact match first; then by text, so classes written as strings in a config match 0/1 labels."""
    if label in index:
        return index[label]
    by_text = [i for c, i in index.items() if str(c) == str(label)]
    return by_text[0] if len(by_text) == 1 else None
