"""The simulated backend's measurement: SHA-256 of the enclave's code files and aggregation config.

A hardware TEE measures the loaded code itself (``mr_enclave`` / ``mr_td``); in simulation the
enclave process hashes, in a fixed order, every file of the ``trustfed.enclave`` package plus the
``trustfed.core`` modules it runs (codec, aggregators, strategies), the ``trustfed.primitives`` it
signs and hashes with (canonical JSON, the Merkle root of a receipt's commitments) and the central-DP
modules it runs (``trustfed/privacy/central.py`` and ``accounting.py``), then the canonical JSON of
its aggregation config (with its ``central_dp`` parameters, when there are any). Changing any of
them changes the measurement. ``trustfed enclave measure --config enclave.toml`` prints it, so
verifiers can pin it in ``expected_measurements``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trustfed.primitives.canonical import canonical_json

_DOMAIN = b"trustfed-simulated-measurement-v1\0"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # src/trustfed
MEASURED_DIRS = ("enclave", "core", "primitives")
MEASURED_FILES = ("privacy/central.py", "privacy/accounting.py")  # DP-FedAvg runs inside the enclave
MEASURED_SUFFIXES = (".py", ".proto")


def code_files(package_root: Path = _PACKAGE_ROOT) -> list[Path]:
    """The files that make up the enclave's code, sorted by their path relative to ``package_root``."""
    out: list[Path] = []
    for d in MEASURED_DIRS:
        base = package_root / d
        if base.is_dir():
            out += [p for p in base.rglob("*") if p.is_file() and p.suffix in MEASURED_SUFFIXES]
    out += [package_root / f for f in MEASURED_FILES if (package_root / f).is_file()]
    return sorted(out, key=lambda p: p.relative_to(package_root).as_posix())


def measure(aggregation: Mapping[str, Any], package_root: Path = _PACKAGE_ROOT) -> str:
    """Hex SHA-256 over (path, content) of every code file, then the aggregation config."""
    h = hashlib.sha256(_DOMAIN)
    for p in code_files(package_root):
        rel = p.relative_to(package_root).as_posix().encode()
        data = p.read_bytes()
        h.update(struct.pack(">I", len(rel)) + rel + struct.pack(">Q", len(data)) + data)
    cfg = canonical_json(dict(aggregation))
    h.update(b"config\0" + struct.pack(">Q", len(cfg)) + cfg)
    return h.hexdigest()
