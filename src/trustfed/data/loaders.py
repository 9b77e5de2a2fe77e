"""Loaders for data as an organisation holds it: tables, JSON lines, image folders, saved HF datasets.

A participant's ``[data]`` section points at a path; these turn that path into something a
training loop can use, and turn every problem into a :class:`DataError` that names the file
(and the column, row or line) and says what was expected.

Optional dependencies load on first use (the ``data`` extra): pandas and pyarrow for tables,
Pillow for images, Hugging Face ``datasets`` for saved datasets.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trustfed.data.datasets import Dataset
from trustfed.data.tables import INSTALL_HINT, existing_file, load_table, require
from trustfed.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset as HFDataset
    from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "load_hf_dataset", "load_image_folder", "load_jsonl", "load_table"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})

# Pixel modes with more than 8 bits a channel: Pillow's conversion to L/RGB would clip them.
_WIDE_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


# ---------------------------------------------------------------- JSON lines
def load_jsonl(path: str | Path, *, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Read one JSON object a line (``.jsonl`` or gzipped ``.jsonl.gz``); blank lines are skipped.

    Line numbers in errors count every line of the file from 1, blank ones included.
    """
    p = existing_file(path)
    records: list[dict[str, Any]] = []
    with _open_lines(p) as lines:
        try:
            for number, raw in enumerate(lines, start=1):
                record = _parse_line(p, number, raw)
                if record is None:
                    continue
                missing = [k for k in required if k not in record]
                if missing:
                    raise DataError(f"{p}: line {number}: the record has no key {', '.join(map(repr, missing))}")
                records.append(record)
        except (OSError, EOFError) as exc:
            raise DataError(f"{p}: cannot be read: {exc}") from None
    if not records:
        raise DataError(f"{p}: no records (the file is empty or has only blank lines)")
    return records


@contextmanager
def _open_lines(p: Path) -> Iterator[Iterable[bytes]]:
    if p.name.lower().endswith(".gz"):
        with gzip.open(p, "rb") as packed:
            yield packed
    else:
        with p.open("rb") as plain:
            yield plain


def _parse_line(p: Path, number: int, raw: bytes) -> dict[str, Any] | None:
    try:
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
    except UnicodeDecodeError:
        raise DataError(f"{p}: line {number} is not UTF-8 text") from None
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: line {number} is not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise DataError(f"{p}: line {number}: expected a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- image folders
def load_image_folder(
    path: str | Path,
    *,
    size: tuple[int, int] = (28, 28),
    grayscale: bool = False,
    classes: Sequence[str] | None = None,
) -> Dataset:
    """Read ``path/<class>/<image>`` into x float32 ``[n, c, height, width]`` in [0, 1].

    ``size`` is ``(height, width)``; c is 1 with ``grayscale`` else 3. Without ``classes``, class
    folders sorted by name give the label indices 0, 1, ... and each must hold images. With
    ``classes`` (what a federation passes, so that every site maps labels alike), folder ``name``
    is class ``classes.index(name)``; a site may lack some classes, and a folder not in
    ``classes`` is an error. Images are found at any depth below their class folder, in sorted
    order. Names starting with a dot are ignored, as are files whose suffix is not an image one
    (``IMAGE_SUFFIXES``).
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder")
    height, width = _check_size(size)
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not class_dirs:
        raise DataError(f"{root}: no class folders; expected one sub-folder per class holding its images")
    index = {name: i for i, name in enumerate(classes)} if classes is not None else None
    if index is not None:
        unknown = [d.name for d in class_dirs if d.name not in index]
        if unknown:
            raise DataError(f"{root}: class folder {unknown[0]!r} is not one of the classes {list(index)}")
    files: list[Path] = []
    labels: list[int] = []
    for position, folder in enumerate(class_dirs):
        images = _images_in(folder)
        if not images and index is None:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise DataError(f"{folder}: class folder {folder.name!r} has no images ({suffixes})")
        files += images
        labels += [index[folder.name] if index is not None else position] * len(images)
    if not files:
        raise DataError(f"{root}: no images in any class folder")
    image = _pillow()
    x = np.empty((len(files), 1 if grayscale else 3, height, width), dtype=np.float32)
    for i, f in enumerate(files):
        x[i] = _read_image(image, f, height, width, grayscale)
    num_classes = len(index) if index is not None else len(class_dirs)
    return Dataset(root.name, x, np.asarray(labels, dtype=np.int64), num_classes)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise DataError(f"size must be (height, width) in positive pixels, got {size!r}")
    return size[0], size[1]


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        f
        for f in folder.rglob("*")
        if f.suffix.lower() in IMAGE_SUFFIXES
        and f.is_file()
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
    )


def _pillow() -> Any:
    require("PIL")
    from PIL import Image

    return Image


def _read_image(image: Any, f: Path, height: int, width: int, grayscale: bool) -> np.ndarray:
    try:
        with image.open(f) as opened:
            pixels = _to_pixels(image, opened, f, height, width, grayscale)
    except (OSError, SyntaxError, ValueError, image.DecompressionBombError) as exc:
        raise DataError(f"{f}: cannot read the image: {exc}") from None
    arr = np.asarray(pixels, dtype=np.float32) / 255.0
    return arr[None, :, :] if grayscale else arr.transpose(2, 0, 1)


def _to_pixels(image: Any, img: Image.Image, f: Path, height: int, width: int, grayscale: bool) -> Image.Image:
    if img.mode in _WIDE_MODES:
        raise DataError(f"{f}: pixels of mode {img.mode} (more than 8 bits a channel); save it as 8-bit")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    img = img.convert("L" if grayscale else "RGB")
    if img.size != (width, height):
        img = img.resize((width, height), image.Resampling.BILINEAR)
    return img


# ---------------------------------------------------------------- Hugging Face datasets
def load_hf_dataset(path: str | Path, *, split: str | None = None) -> HFDataset:
    """Load a dataset saved with ``save_to_disk``, formatted for torch (map-style).

    A saved ``DatasetDict`` needs ``split``; a single saved dataset takes ``split`` only if it
    names that dataset's own split.
    """
    try:
        import datasets
    except ImportError:
        raise DataError(f"loading a saved Hugging Face dataset needs the 'datasets' package: {INSTALL_HINT}") from None
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{p}: no such folder" if not p.exists() else f"{p}: not a folder saved with save_to_disk")
    try:
        loaded = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{p}: not a dataset saved with save_to_disk: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = ", ".join(repr(s) for s in loaded)
        if split is None:
            raise DataError(f"{p}: holds the splits {names}; pass split= one of them")
        if split not in loaded:
            raise DataError(f"{p}: no split {split!r}; it holds {names}")
        ds = loaded[split]
    else:
        ds = loaded
        if split is not None and (ds.split is None or str(ds.split) != split):
            own = "no split name" if ds.split is None else f"split {str(ds.split)!r}"
            raise DataError(f"{p}: holds one dataset ({own}), not splits; leave split out")
    ds.set_format("torch")
    return ds
