"""Import a federation app by its ``package.module:attribute`` target and record what it is.

The app's identity is its target, its config and a SHA-256 over its source files: the module that
defines the target and, when that module belongs to a package outside the environment's
site-packages, every ``.py`` file of the top-level package. The audit log, metrics.json and every
participant's signed commitments carry it, so an audit names the code that produced a model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustfed.app.api import App
from trustfed.errors import AppError
from trustfed.primitives.canonical import canonical_json
from trustfed.primitives.imports import importable_from

_LOCK = threading.Lock()
_CACHE: dict[tuple[str, str], App] = {}


def load_app(target: str, path: Path | str | None = None) -> App:
    """The :class:`App` at ``target`` (``package.module:attribute``), importable from ``path`` or the
    environment. A wrong target, an import that fails or an attribute that is not an App is an
    :class:`AppError` naming the target (exit 2)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise AppError(f"app target {target!r} must look like 'package.module:attribute'")
    folder = Path(path).resolve() if path is not None else None
    key = (target, str(folder))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        with importable_from(folder):
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                where = f" (looked in {folder} and the environment)" if folder else ""
                raise AppError(f"app {target!r}: cannot import module {exc.name!r}{where}") from None
            except Exception as exc:  # the user's module raised while importing
                raise AppError(f"app {target!r}: importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
        _check_origin(module, module_name, folder, target)
        found = getattr(module, attr, None)
        if found is None:
            raise AppError(f"app {target!r}: module {module_name} has no attribute {attr!r}")
        if callable(found) and not isinstance(found, App):
            try:
                found = found()
            except Exception as exc:
                raise AppError(f"app {target!r}: calling {attr}() failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(found, App):
            raise AppError(
                f"app {target!r}: {attr} is a {type(found).__name__}, not a trustfed.app.App (App(model=..., data=...))"
            )
        _CACHE[key] = found
        return found


def _check_origin(module: Any, module_name: str, folder: Path | None, target: str) -> None:
    """A module of that name imported earlier from elsewhere would shadow the app in ``folder``."""
    if folder is None:
        return
    top = module_name.split(".")[0]
    local = folder / top
    if not (local.is_dir() or local.with_suffix(".py").is_file()):
        return
    origin = Path(getattr(module, "__file__", "") or "").resolve()
    if not origin.is_relative_to(folder):
        raise AppError(
            f"app {target!r}: a module named {module_name!r} is already imported from {origin}, not from {folder}; "
            "give the app's package a name of its own"
        )


@dataclass(frozen=True)
class AppIdentity:
    """What names an app in records: its target, a hash of its source files and of its config."""

    target: str
    code_sha256: str
    files: tuple[str, ...]
    config: Mapping[str, Any]

    @property
    def config_sha256(self) -> str:
        return hashlib.sha256(canonical_json(dict(self.config), allow_nan=True)).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "code_sha256": self.code_sha256,
            "files": list(self.files),
            "config": dict(self.config),
            "config_sha256": self.config_sha256,
        }


def _source_files(module_name: str, path: Path | None) -> tuple[Path, list[Path]]:
    """(root the names are relative to, the app's source files)."""
    with importable_from(path):
        spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise AppError(f"app module {module_name!r} has no Python source file to hash")
    origin = Path(spec.origin).resolve()
    top = module_name.split(".")[0]
    with importable_from(path):
        top_spec = importlib.util.find_spec(top)
    locations = list(top_spec.submodule_search_locations or []) if top_spec is not None else []
    if locations and "site-packages" not in origin.parts:
        pkg = Path(locations[0]).resolve()
        files = sorted(p for p in pkg.rglob("*.py") if "__pycache__" not in p.parts)
        return pkg.parent, files
    return origin.parent, [origin]


def source_hash(root: Path, files: Sequence[Path]) -> tuple[str, tuple[str, ...]]:
    """SHA-256 over source files (each name relative to ``root``, then its contents) and the names."""
    h = hashlib.sha256(b"trustfed-app-code-v1\0")
    names = []
    for f in files:
        name = f.relative_to(root).as_posix()
        data = f.read_bytes()
        names.append(name)
        h.update(len(name.encode()).to_bytes(4, "big") + name.encode())
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest(), tuple(names)


def app_identity(target: str, path: Path | str | None, config: Mapping[str, Any]) -> AppIdentity:
    """Hash the app's source files (names relative to its package's folder, then contents)."""
    module_name = target.partition(":")[0]
    root, files = _source_files(module_name, Path(path).resolve() if path is not None else None)
    digest, names = source_hash(root, files)
    return AppIdentity(target, digest, names, dict(config))
