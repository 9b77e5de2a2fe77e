"""The committed contract artifacts match a fresh solcjs compile of the sources."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from trustfed.ledger.artifacts import CONTRACTS, load_artifact

ROOT = Path(__file__).resolve().parents[1]
COMPILE = ROOT / "src" / "trustfed" / "ledger" / "compile.js"


def test_artifacts_ship_with_the_package() -> None:
    for name in CONTRACTS:
        art = load_artifact(name)
        assert art.bytecode.startswith("0x6080") and art.abi
        assert art.compiler.startswith("solcjs 0.8.37")


@pytest.mark.skipif(
    shutil.which("node") is None or not (ROOT / "node_modules" / "solc").is_dir(),
    reason="node or node_modules/solc missing: run `npm ci` in the repository root (make test does it)",
)
def test_artifacts_are_not_stale() -> None:
    out = subprocess.run(["node", str(COMPILE), "--stdout"], capture_output=True, text=True, timeout=300, check=True)
    fresh = json.loads(out.stdout)
    assert sorted(fresh) == sorted(CONTRACTS)
    for name in CONTRACTS:
        committed = json.loads((COMPILE.parent / "artifacts" / f"{name}.json").read_text(encoding="utf-8"))
        assert fresh[name] == committed, (
            f"artifacts/{name}.json is stale: run `node src/trustfed/ledger/compile.js` and commit the result"
        )
