"""Attacks by name: the built-in ones and those a user's module registers.

``@register_attack("name")`` on an :class:`~trustfed.attacks.api.Attack` subclass makes it selectable
as ``[attack] kind = "name"``. A user's module (``[attack] module = "pkg.mod"``) is imported from the
federation file's folder, or the environment, before the kind is looked up, so its decorators run in
every process that builds the attack (simulation workers included).
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from trustfed.attacks.api import Attack, AttackError, Scalar
from trustfed.primitives.imports import importable_from

A = TypeVar("A", bound=type[Attack])

_REGISTRY: dict[str, type[Attack]] = {}
_BUILTIN: set[str] = set()
_IMPORT_LOCK = threading.Lock()


def register_attack(name: str, *, builtin: bool = False) -> Callable[[A], A]:
    """Class decorator: select this attack with ``[attack] kind = name``. A built-in name cannot be
    taken by another class; a user's name may be registered again (a reloaded module)."""
    if not name.isidentifier() or name == "none":
        raise AttackError(f"attack name {name!r} must be an identifier other than 'none'")

    def deco(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Attack)):
            raise AttackError(f"register_attack({name!r}) decorates a trustfed.attacks.Attack subclass, not {cls!r}")
        if name in _BUILTIN and _REGISTRY[name] is not cls:
            raise AttackError(f"attack {name!r} is built in; register yours under another name")
        _REGISTRY[name] = cls
        if builtin:
            _BUILTIN.add(name)
        return cls

    return deco


def available_attacks() -> list[str]:
    """Every registered attack's name, sorted (``none`` is not an attack)."""
    return sorted(_REGISTRY)


def import_attack_module(module: str, folder: Path | None = None) -> None:
    """Import the user's module that registers attacks, from ``folder`` first, then the environment."""
    entry = str(folder.resolve()) if folder is not None else None
    with _IMPORT_LOCK, importable_from(Path(entry) if entry else None):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            where = f" (looked in {entry} and the environment)" if entry else ""
            raise AttackError(f"attack module {module!r}: cannot import {exc.name!r}{where}") from None
        except Exception as exc:  # the user's module raised while importing
            raise AttackError(f"attack module {module!r}: importing it failed: {type(exc).__name__}: {exc}") from exc


def attack_class(kind: str) -> type[Attack]:
    """The class registered as ``kind``; an unknown kind is an error listing the known names."""
    cls = _REGISTRY.get(kind)
    if cls is None:
        raise AttackError(f"unknown attack {kind!r}; expected none or one of {', '.join(available_attacks())}")
    return cls


def build_attack(kind: str, params: Mapping[str, Scalar]) -> Attack:
    """An instance of attack ``kind`` built from its ``[attack] params`` (keyword arguments)."""
    cls = attack_class(kind)
    try:
        inspect.signature(cls).bind(**params)
    except TypeError as exc:
        takes = ", ".join(p for p in inspect.signature(cls).parameters if p not in ("args", "kwargs")) or "none"
        raise AttackError(f"attack {kind!r}: {exc} (its parameters: {takes})") from None
    try:
        return cls(**params)
    except AttackError:
        raise
    except (TypeError, ValueError) as exc:
        raise AttackError(f"attack {kind!r}: {exc}") from exc
